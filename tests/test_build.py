"""Tests of pkd.build: config sections to detectors, optimiser and schedule."""

import pytest
import torch
from torch import nn

from pkd.build import build_model, build_optimizer, lr_factor
from pkd.checkpoint import CheckpointError
from pkd.config import ModelConfig, config_from_dict


def test_schedules_and_optimizer_groups():
    config = config_from_dict(
        {
            "model": {"name": "x"},
            "data": {"train": {"annotations": "a", "images": "b"}},
            "train": {"steps": 100, "warmup_steps": 10, "warmup_factor": 0.1, "milestones": [0.5, 0.8]},
        }
    ).train
    assert lr_factor(0, config, 100) == pytest.approx(0.1)
    assert lr_factor(5, config, 100) == pytest.approx(0.55)
    assert [lr_factor(s, config, 100) for s in (10, 49, 50, 80, 99)] == pytest.approx([1, 1, 0.1, 0.01, 0.01])
    config.schedule = "cosine"
    assert [lr_factor(s, config, 100) for s in (10, 55, 100)] == pytest.approx([1, 0.5, 0])
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    optimizer = build_optimizer(model.parameters(), config)
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_a_pickled_model_given_as_weights_is_a_clear_error(tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")
    for name in ("", "fcos_resnet18_fpn"):
        config = ModelConfig(name=name, weights=str(tmp_path / "model.pt"))
        with pytest.raises((CheckpointError, ValueError), match=r"not a pkd checkpoint: it holds Python objects"):
            build_model(config, num_classes=3, eval_size=64, max_size=64)
