"""Tests of pkd.weights: reading state_dicts, and pickled models loaded without running code."""

import numpy as np
import pytest
import torch
from torch import nn

from pkd.checkpoint import CheckpointError, PickledFileError, save_checkpoint
from pkd.weights import UnsafePickleError, load_pickled_modules, module_state_dict, read_weights

META = {"detector": "d", "num_classes": 2, "build": {}, "label_map": {1: 1}, "class_names": {1: "a"}}


class Payload:
    """Unpickling this creates ``marker``: what a malicious weights file would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


class CallsLinear:
    """Pickles as a *call* of an allowed class (its constructor runs with arguments from the file)."""

    def __reduce__(self):
        return nn.Linear, (2, 3)


def tiny_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU())
    model[1].register_buffer("scratch", torch.ones(1), persistent=False)
    return model


def test_read_weights_of_each_kind(tmp_path):
    weights = {"weight": torch.ones(2, 2)}
    save_checkpoint(tmp_path / "run.pt", {"model": weights, "meta": META})
    torch.save(weights, tmp_path / "plain.pt")
    torch.save({"model": weights, "epoch": 3}, tmp_path / "wrapped.pt")
    assert read_weights(tmp_path / "run.pt")[1] == META
    for name in ("plain.pt", "wrapped.pt"):
        state_dict, meta = read_weights(tmp_path / name)
        assert meta is None and torch.equal(state_dict["weight"], weights["weight"])

    torch.save(tiny_module(), tmp_path / "module.pt")
    with pytest.raises(PickledFileError, match="torch.nn"):
        read_weights(tmp_path / "module.pt")
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_weights(tmp_path / "nothing.pt")


def test_pickled_modules_load_with_their_weights(tmp_path):
    model = tiny_module()
    path = tmp_path / "model.pt"
    torch.save({"model": model, "metrics": {"mAP": np.float64(0.5)}, "args": {"lr": 0.01}}, path)
    loaded = load_pickled_modules(path)
    assert type(loaded["model"]) is nn.Sequential and float(loaded["metrics"]["mAP"]) == 0.5
    state_dict = module_state_dict(loaded["model"])
    assert list(state_dict) == list(model.state_dict())  # the non-persistent buffer is left out
    assert all(torch.equal(state_dict[k], v) for k, v in model.state_dict().items())


def test_a_payload_never_runs(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "payload.pt"
    torch.save({"model": tiny_module(), "extra": Payload(marker)}, path)
    with pytest.raises(UnsafePickleError, match="builtins.exec"):
        load_pickled_modules(path)
    assert not marker.exists()


def test_allowed_classes_are_never_called(tmp_path):
    path = tmp_path / "calls.pt"
    torch.save({"model": CallsLinear()}, path)
    with pytest.raises(UnsafePickleError, match=r"calls torch\.nn\.modules\.linear\.Linear"):
        load_pickled_modules(path)


def test_hooks_and_foreign_classes_are_refused(tmp_path):
    model = tiny_module()
    model.register_forward_hook(print)  # a callable from the file would run on every forward
    torch.save(model, tmp_path / "hooked.pt")
    with pytest.raises(UnsafePickleError, match="builtins.print"):
        load_pickled_modules(tmp_path / "hooked.pt")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_pickled_files(tmp_path, damage):
    path = tmp_path / "model.pt"
    torch.save(tiny_module(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a checkpoint" * 50)
    with pytest.raises(CheckpointError, match="truncated or corrupt|not a torch.save archive"):
        load_pickled_modules(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_pickled_modules(tmp_path / "missing.pt")
