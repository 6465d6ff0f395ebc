"""Tests of pkd.rng: the global generators' state survives a checkpoint round trip."""

import random

import numpy as np
import pytest
import torch
from test_checkpoint import run_checkpoint

from pkd.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pkd.rng import rng_state, set_rng_state


def draw_numbers():
    return random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_rng_round_trip_through_save_and_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draw_numbers()
    np.random.randn()  # leaves a cached Gaussian in NumPy's state, which must be kept too
    checkpoint = run_checkpoint()  # before rng_state(): building it draws random weights
    checkpoint["rng"] = rng_state()
    path = save_checkpoint(tmp_path / "run.pt", checkpoint)
    expected = draw_numbers()

    draw_numbers()
    set_rng_state(load_checkpoint(path)["rng"])  # weights_only load: plain types only
    assert draw_numbers() == expected


def test_rng_state_errors():
    with pytest.raises(CheckpointError, match=r"RNG state lacks \['numpy'"):
        set_rng_state({"python": [], "torch": torch.get_rng_state(), "cuda": []})
