"""Tests of pkd.checkpoint: atomic saves (also under SIGKILL), error messages, resuming, export."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator

import pkd.checkpoint as checkpoint_module
from pkd.checkpoint import (
    CheckpointError,
    checkpoint_summary,
    export_student,
    latest_checkpoint,
    load_checkpoint,
    load_exported,
    resume_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from pkd.rng import rng_state

META = {
    "detector": "fcos_resnet50_fpn",
    "num_classes": 3,
    "build": {"min_size": 64, "max_size": 64},
    "label_map": {1: 1, 18: 2},
    "class_names": {1: "person", 2: "dog"},
}


class TinyBackbone(nn.Module):
    """Two feature levels (strides 4 and 8) with 32 channels (FCOS's head uses GroupNorm(32, C))."""

    def __init__(self):
        super().__init__()
        self.out_channels = 32
        self.stem = nn.Conv2d(3, 32, 3, stride=4, padding=1)
        self.down = nn.Conv2d(32, 32, 3, stride=2, padding=1)

    def forward(self, images):
        first = self.stem(images).relu()
        return OrderedDict([("0", first), ("1", self.down(first).relu())])


def tiny_fcos(num_classes=3):
    """A plain torchvision FCOS with a tiny backbone (no downloads, a few thousand weights)."""
    anchors = AnchorGenerator(sizes=((8,), (16,)), aspect_ratios=((1.0,), (1.0,)))
    return FCOS(TinyBackbone(), num_classes=num_classes, min_size=64, max_size=64, anchor_generator=anchors)


def run_checkpoint(**overrides):
    checkpoint = {
        "kind": "run",
        "model": {"weight": torch.randn(4, 3), "bias": torch.zeros(4)},
        "meta": META,
        "epoch": 2,  # a marker the tests below read back; the counters live in "state"
        "state": {"epoch": 2, "step": 40, "best_metric": 0.25},
        "metrics": {"bbox_mAP": 0.25},
        "config": {"train": {"lr": 0.01, "levels": [0, 1, 2]}},
    }
    checkpoint.update(overrides)
    return checkpoint


def test_save_load_round_trip(tmp_path):
    model = nn.Linear(3, 4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3, 5])
    scaler = torch.amp.GradScaler("cpu")
    checkpoint = run_checkpoint(
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        connectors={"0.weight": torch.ones(2, 2, 1, 1)},
    )
    path = save_checkpoint(tmp_path / "sub" / "run.pt", checkpoint)
    loaded = load_checkpoint(path, detector="fcos_resnet50_fpn", num_classes=3)

    assert loaded["format"] == "pkd" and loaded["version"] == 1 and loaded["kind"] == "run"
    assert loaded["meta"] == META  # int keys of label_map/class_names survive weights_only
    assert loaded["state"] == {"epoch": 2, "step": 40, "best_metric": 0.25}
    torch.testing.assert_close(loaded["model"], model.state_dict())
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    scaler.load_state_dict(loaded["scaler"])
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temporary file left


def test_save_rejects_values_weights_only_cannot_load(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['metrics'\]\['bbox_mAP'\] is a numpy.float64.*float\(\)"):
        save_checkpoint(tmp_path / "a.pt", run_checkpoint(metrics={"bbox_mAP": np.float64(0.3)}))
    with pytest.raises(CheckpointError, match=r"\['config'\]\['fn'\] is a builtins.builtin_function"):
        save_checkpoint(tmp_path / "a.pt", run_checkpoint(config={"fn": print}))
    with pytest.raises(CheckpointError, match=r"label_map'\] must be a dict of int -> int"):
        save_checkpoint(tmp_path / "a.pt", run_checkpoint(meta={**META, "label_map": {"1": 1}}))
    with pytest.raises(CheckpointError, match=r"lacks \['class_names'\]"):
        save_checkpoint(tmp_path / "a.pt", run_checkpoint(meta={k: v for k, v in META.items() if k != "class_names"}))
    with pytest.raises(CheckpointError, match="'epoch'\\] must be an int"):
        save_checkpoint(tmp_path / "a.pt", run_checkpoint(state={"epoch": 2.0}))
    assert not list(tmp_path.iterdir())


def test_crash_during_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, run_checkpoint(epoch=1))
    before = path.read_bytes()

    def crashing_save(obj, file):
        file.write_bytes(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, run_checkpoint(epoch=2))
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]


def test_crash_before_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, run_checkpoint(epoch=1))

    def failing_replace(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, run_checkpoint(epoch=2))
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["last.pt"]


def test_leftover_temp_files_do_not_disturb_loading(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, run_checkpoint(epoch=1))
    (tmp_path / f".last.pt.{os.getppid()}.12345678.tmp").write_bytes(b"PK\x03\x04 being written")
    assert load_checkpoint(path)["epoch"] == 1
    assert latest_checkpoint(tmp_path) == path


KILL_SNIPPET = textwrap.dedent(
    """
    import sys, torch
    from pkd.checkpoint import save_checkpoint

    meta = {"detector": "d", "num_classes": 2, "build": {}, "label_map": {}, "class_names": {}}
    epoch = 0
    while True:
        epoch += 1
        weights = torch.full((4_000_000,), float(epoch))  # 16 MB: most of the loop is the write
        save_checkpoint(sys.argv[1], {"model": {"w": weights}, "meta": meta, "epoch": epoch})
        print(epoch, flush=True)
    """
)


def test_sigkill_never_leaves_a_partial_checkpoint(tmp_path):
    path = tmp_path / "last.pt"
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_SNIPPET, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            # Wait until at least one save completed (or show why the child died), then kill the
            # writer in the middle of its next write: as soon as its temporary file exists.
            assert process.stdout.readline().strip().isdigit(), process.stderr.read()
            deadline = time.monotonic() + 60
            while not any(entry.name.endswith(".tmp") for entry in tmp_path.iterdir()):
                assert time.monotonic() < deadline, "the writer never started another save"
                time.sleep(0.0005)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
            process.stdout.close()
            process.stderr.close()
        assert any(entry.name.endswith(".tmp") for entry in tmp_path.iterdir()), "the kill did not land mid-write"

        loaded = load_checkpoint(path)
        weights = loaded["model"]["w"]
        assert weights.numel() == 4_000_000
        assert bool((weights == loaded["epoch"]).all())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_truncated_or_corrupt_file(tmp_path, damage):
    path = save_checkpoint(tmp_path / "run.pt", run_checkpoint())
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 50, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"run\.pt is truncated or corrupt \(.+\)") as error:
        load_checkpoint(path)
    assert error.value.__cause__ is not None


def test_plain_state_dict_is_not_a_pkd_checkpoint(tmp_path):
    path = tmp_path / "fcos.pth"
    torch.save(tiny_fcos().state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "is not a pkd checkpoint" in message and "plain state_dict" in message
    assert "build_detector(..., weights=PATH)" in message


def test_foreign_files_are_not_pkd_checkpoints(tmp_path):
    other = tmp_path / "other.pth"
    torch.save({"net": {"w": torch.ones(1)}, "epoch": 3}, other)
    with pytest.raises(CheckpointError, match=r"not a pkd checkpoint: it is a dict with keys \['epoch', 'net'\]"):
        load_checkpoint(other)

    pickled_model = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), pickled_model)  # a whole pickled module, which weights_only refuses
    with pytest.raises(CheckpointError, match=r"not a pkd checkpoint: it holds Python objects \(torch\.nn"):
        load_checkpoint(pickled_model)

    a_list = tmp_path / "list.pt"
    torch.save([torch.ones(1)], a_list)
    with pytest.raises(CheckpointError, match="not a pkd checkpoint: it holds a list"):
        load_checkpoint(a_list)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (2, r"unsupported checkpoint version 2 \(written by a newer pkd; upgrade pkd\); this pkd reads version 1"),
        (0, r"unsupported checkpoint version 0; this pkd reads version 1"),
        ("1", r"unsupported checkpoint version '1'"),
    ],
)
def test_unsupported_version(tmp_path, version, message):
    path = tmp_path / "run.pt"
    checkpoint = {"format": "pkd", **run_checkpoint(), "version": version}
    torch.save(checkpoint, path)  # bypasses save_checkpoint, which writes version 1 only
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_checkpoint_of_another_model(tmp_path):
    path = save_checkpoint(tmp_path / "run.pt", run_checkpoint())
    with pytest.raises(
        CheckpointError, match=r"holds 'fcos_resnet50_fpn' with 3 classes, expected 'retinanet_resnet50_fpn' with 3"
    ):
        load_checkpoint(path, detector="retinanet_resnet50_fpn")
    with pytest.raises(
        CheckpointError, match=r"holds 'fcos_resnet50_fpn' with 3 classes, expected 'fcos_resnet50_fpn' with 91"
    ):
        load_checkpoint(path, num_classes=91)
    assert load_checkpoint(path, detector="fcos_resnet50_fpn", num_classes=3)["epoch"] == 2


def test_run_dir_last_and_best(tmp_path):
    run_dir = tmp_path / "run"
    assert latest_checkpoint(run_dir) is None

    save_run_checkpoint(run_dir, run_checkpoint(epoch=1, best_metric=0.1), is_best=True)
    save_run_checkpoint(run_dir, run_checkpoint(epoch=2, best_metric=0.1), is_best=False)
    assert latest_checkpoint(run_dir) == run_dir / "last.pt"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 2
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 1  # untouched by the later save of last.pt

    save_run_checkpoint(run_dir, run_checkpoint(epoch=3, best_metric=0.3), is_best=True)
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 3
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 3
    assert sorted(entry.name for entry in run_dir.iterdir()) == ["best.pt", "last.pt"]


def test_best_without_hard_links(tmp_path, monkeypatch):
    def no_links(source, target):
        raise OSError("hard links not supported")

    monkeypatch.setattr(checkpoint_module.os, "link", no_links)
    save_run_checkpoint(tmp_path, run_checkpoint(epoch=1), is_best=True)
    save_run_checkpoint(tmp_path, run_checkpoint(epoch=2), is_best=False)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2


def test_export_loads_into_plain_torchvision_without_pkd(tmp_path):
    torch.manual_seed(0)
    student = tiny_fcos().eval()
    checkpoint = run_checkpoint(
        model=student.state_dict(),
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1).state_dict(),
        rng=rng_state(),
        connectors={"0.weight": torch.ones(16, 16, 1, 1)},
    )
    run_path = save_checkpoint(tmp_path / "last.pt", checkpoint)
    out_path = export_student(load_checkpoint(run_path), tmp_path / "student.pt")

    # What a user without pkd does: plain torch.load, plain torchvision model, strict loading.
    exported = torch.load(out_path, weights_only=True)
    assert set(exported) == {"format", "version", "kind", "state_dict", "meta"}
    assert exported["kind"] == "export" and exported["meta"] == META
    assert exported["state_dict"]._metadata == student.state_dict()._metadata  # module versions kept
    fresh = tiny_fcos()
    fresh.load_state_dict(exported["state_dict"], strict=True)
    fresh.eval()
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        mine, theirs = student.backbone(image[None]), fresh.backbone(image[None])
        torch.testing.assert_close(mine, theirs)
        torch.testing.assert_close(student([image])[0], fresh([image])[0])

    assert load_exported(out_path, detector="fcos_resnet50_fpn")["state_dict"].keys() == student.state_dict().keys()
    with pytest.raises(CheckpointError, match="is a run checkpoint, not an exported student"):
        load_exported(run_path)


def test_export_rejects_wrapper_state_dicts(tmp_path):
    wrapped = {"student.weight": torch.ones(1), "teacher.weight": torch.ones(1)}
    with pytest.raises(CheckpointError, match=r"weights under \['student', 'teacher'\].*plain student"):
        export_student(run_checkpoint(model=wrapped), tmp_path / "student.pt")
    with pytest.raises(CheckpointError, match=r"weights under \['module'\]"):
        export_student(run_checkpoint(model={"module.weight": torch.ones(1)}), tmp_path / "student.pt")
    assert not (tmp_path / "student.pt").exists()


def test_checkpoint_summary():
    assert (
        checkpoint_summary(
            {"format": "pkd", "version": 1, **run_checkpoint(state={"epoch": 2, "step": 40, "best_metric": 0.3125})}
        )
        == "run checkpoint: fcos_resnet50_fpn, 3 classes, epoch 2, step 40, best metric 0.3125"
    )
    assert checkpoint_summary(run_checkpoint(state={"epoch": 2})).endswith("epoch 2, no best metric yet")
    assert checkpoint_summary({"kind": "export", "meta": META}) == "exported student: fcos_resnet50_fpn, 3 classes"


def test_export_in_half_precision_loads_into_a_float32_model(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    checkpoint = {
        "kind": "run",
        "model": model.state_dict(),
        "meta": {"detector": "d", "num_classes": 2, "build": {}, "label_map": {1: 1}, "class_names": {1: "a"}},
    }
    path = export_student(checkpoint, tmp_path / "half.pt", half=True)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state["0.weight"].dtype == torch.float16
    assert state["1.num_batches_tracked"].dtype == torch.int64
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fresh.load_state_dict(state)
    assert fresh[0].weight.dtype == torch.float32
    assert torch.allclose(fresh[0].weight, model[0].weight, atol=1e-3)
    full = export_student(checkpoint, tmp_path / "full.pt")
    assert path.stat().st_size < full.stat().st_size


def test_resume_checkpoint_picks_last_or_best_and_names_the_ways_forward(tmp_path):
    run_dir = tmp_path / "run"
    assert resume_checkpoint(run_dir) is None  # a new run
    save_run_checkpoint(run_dir, run_checkpoint(state={"step": 10}), is_best=True)
    save_run_checkpoint(run_dir, run_checkpoint(state={"step": 20}), is_best=False)
    assert resume_checkpoint(run_dir)[1]["state"]["step"] == 20
    path, best = resume_checkpoint(run_dir, "best")
    assert path == run_dir / "best.pt" and best["state"]["step"] == 10
    assert resume_checkpoint(run_dir, False) is None

    data = (run_dir / "last.pt").read_bytes()
    (run_dir / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as error:
        resume_checkpoint(run_dir)
    assert "--resume-from best" in str(error.value) and "step 10" in str(error.value)
    assert "--no-resume" in str(error.value)
    assert resume_checkpoint(run_dir, "best")[1]["state"]["step"] == 10

    (run_dir / "best.pt").unlink()
    with pytest.raises(CheckpointError) as error:
        resume_checkpoint(run_dir)
    assert "--no-resume" in str(error.value) and "--resume-from" not in str(error.value)
    with pytest.raises(CheckpointError, match="no best.pt"):
        resume_checkpoint(run_dir, "best")
    with pytest.raises(ValueError, match="resume must be"):
        resume_checkpoint(run_dir, "first")
