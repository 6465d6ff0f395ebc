"""Tests of pkd.engine: training, distillation, COCO evaluation, checkpoints and resuming."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import pkd.engine
from pkd.checkpoint import load_checkpoint
from pkd.config import config_from_dict
from pkd.engine import RunInterrupted, TrainState, fit, train_one_epoch
from pkd.evaluation import COCO_METRICS


def tiny_config(digits, output, *, teacher=None, **train):
    values = {
        "model": {"name": "fcos_resnet18_fpn", "fpn_channels": 64},
        "data": {
            "train": {"annotations": str(digits.annotations["train"]), "images": str(digits.images["train"])},
            "val": {"annotations": str(digits.annotations["val"]), "images": str(digits.images["val"])},
            "test": {"annotations": str(digits.annotations["test"]), "images": str(digits.images["test"])},
            "train_sizes": [64, 80],
            "max_size": 128,
            "eval_size": 64,
            "workers": 0,
        },
        "train": {"steps": 6, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "eval_every": 3, "log_every": 2, **train},
        "output": str(output),
    }
    if teacher is not None:
        values["teacher"] = {"weights": str(teacher)}
        values["distill"] = {"loss": "pkd", "weight": 2.0}
    return config_from_dict(values)


@pytest.fixture(scope="module")
def teacher_run(tiny_digits, tmp_path_factory):
    """A few steps of a Faster R-CNN 'teacher', trained once for the module."""
    output = tmp_path_factory.mktemp("runs") / "teacher"
    config = tiny_config(tiny_digits, output)
    config.model.name = "fasterrcnn_resnet18_fpn"
    results = fit(config, progress=False)
    return output, results


def read_metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_checkpoints_metrics_and_events(teacher_run):
    run, results = teacher_run
    assert {"last.pt", "best.pt", "config.yaml", "metrics.jsonl", "results.json"} <= {p.name for p in run.iterdir()}
    assert list(run.glob("events.out.tfevents.*"))
    records = read_metrics(run)
    assert [r["step"] for r in records if r["type"] == "train"] == [2, 4, 6]
    assert [r["step"] for r in records if r["type"] == "val"] == [3, 6]
    assert [r["type"] for r in records].count("test") == 1
    train = next(r for r in records if r["type"] == "train")
    assert {"loss", "lr", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(train)
    assert train["skipped_samples"] == 0 and train["skipped_steps"] == 0
    assert set(COCO_METRICS) <= set(records[-1])
    assert results["steps"] == 6 and set(results["test"]) == set(COCO_METRICS)
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint["state"]["step"] == 6 and checkpoint["meta"]["detector"] == "fasterrcnn_resnet18_fpn"
    assert checkpoint["meta"]["num_classes"] == 11 and len(checkpoint["meta"]["label_map"]) == 10


def test_distill_from_a_trained_teacher(teacher_run, tiny_digits, tmp_path):
    teacher, _ = teacher_run
    validations = []
    config = tiny_config(tiny_digits, tmp_path / "student", teacher=teacher / "best.pt")
    results = fit(config, progress=False, on_validation=lambda step, metrics: validations.append((step, metrics)))
    assert [step for step, _ in validations] == [3, 6] and all("mAP" in m for _, m in validations)
    assert not (tmp_path / "student" / "curves.png").exists()  # drawing is the caller's
    train = [r for r in read_metrics(tmp_path / "student") if r["type"] == "train"]
    assert {"loss_distill", "loss_distill/s8", "loss_distill/s64", "loss_classification"} <= set(train[0])
    assert all(r["loss_distill"] > 0 for r in train)
    checkpoint = load_checkpoint(tmp_path / "student" / "best.pt")
    assert checkpoint["meta"]["detector"] == "fcos_resnet18_fpn" and checkpoint["meta"]["teacher"]
    assert not any(k.startswith(("teacher", "student.", "connectors")) for k in checkpoint["model"])
    assert results["test"]["mAP"] >= 0


def test_resumed_run_matches_an_uninterrupted_one(tiny_digits, tmp_path, monkeypatch):
    whole = tiny_config(tiny_digits, tmp_path / "whole", steps=6, eval_every=6, checkpoint_every=1, deterministic=True)
    fit(whole, progress=False)

    # The same run, interrupted by a real Ctrl-C (SIGINT) after step 3, then resumed.
    original = pkd.engine.train_step

    def interrupt_at_step_3(*args, state, **kwargs):
        original(*args, state=state, **kwargs)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    interrupted = tiny_config(
        tiny_digits, tmp_path / "resumed", steps=6, eval_every=6, checkpoint_every=1, deterministic=True
    )
    monkeypatch.setattr(pkd.engine, "train_step", interrupt_at_step_3)
    with pytest.raises(RunInterrupted, match="interrupted at step 3"):
        fit(interrupted, progress=False)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["state"]["step"] == 3
    monkeypatch.setattr(pkd.engine, "train_step", original)
    fit(interrupted, progress=False)

    a = load_checkpoint(tmp_path / "whole" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["state"] == b["state"] and a["state"]["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    steps = [r["step"] for r in read_metrics(tmp_path / "resumed") if r["type"] == "train"]
    assert steps == [2, 4, 6]


def test_resuming_with_another_config_is_an_error(teacher_run, tiny_digits):
    run, _ = teacher_run
    config = tiny_config(tiny_digits, run, lr=0.02)
    config.model.name = "fasterrcnn_resnet18_fpn"
    with pytest.raises(ValueError, match=r"another config \(train.lr: 0.01 -> 0.02\).*--no-resume"):
        fit(config, progress=False)


def test_a_damaged_last_pt_names_the_ways_forward_and_best_resumes(teacher_run, tiny_digits, tmp_path, capsys):
    from pkd.cli import main
    from pkd.config import save_config

    run, _ = teacher_run
    copy = tmp_path / "teacher"
    shutil.copytree(run, copy)  # best.pt becomes its own file, as after a copy or a rescue of the folder
    damaged = (copy / "last.pt").read_bytes()
    (copy / "last.pt").write_bytes(damaged[: len(damaged) // 2])
    config = tiny_config(tiny_digits, copy)
    config.model.name = "fasterrcnn_resnet18_fpn"
    save_config(config, tmp_path / "config.yaml")

    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    error = capsys.readouterr().err
    assert "truncated or corrupt" in error and "--resume-from best" in error and "--no-resume" in error
    assert load_checkpoint(copy / "best.pt")["state"]["step"] == 3  # the fixture run validates at steps 3 and 6
    assert main(["train", str(tmp_path / "config.yaml"), "--resume-from", "best"]) == 0
    # Steps 4-6 trained again from best.pt's state; what the damaged run logged after step 3 was dropped.
    assert load_checkpoint(copy / "last.pt")["state"]["step"] == 6
    assert [r["step"] for r in read_metrics(copy) if r["type"] == "train"] == [2, 4, 6]


@pytest.mark.slow  # the kill of a writer mid-save is tested at the checkpoint level in the default suite
def test_sigkill_while_checkpointing_resumes_from_the_last_good_one(tiny_digits, tmp_path):
    config = tiny_config(tiny_digits, tmp_path / "run", steps=40, eval_every=40, checkpoint_every=1)
    path = tmp_path / "config.yaml"
    from pkd.config import save_config

    save_config(config, path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "pkd", "train", str(path)], env=env)
    run = tmp_path / "run"
    try:
        deadline = time.time() + 240
        # Kill as soon as a checkpoint is being written after the first one exists.
        while time.time() < deadline:
            if (run / "last.pt").exists() and list(run.glob(".last.pt.*.tmp")):
                break
            time.sleep(0.001)
        else:
            pytest.fail("no checkpoint write observed")
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    good = load_checkpoint(run / "last.pt")
    assert 1 <= good["state"]["step"] < 40
    results = fit(config, progress=False)
    assert results["steps"] == 40


def test_non_finite_losses_are_skipped_then_stop_training():
    class Flaky(nn.Module):
        def __init__(self, bad_steps):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(()))
            self.bad_steps = bad_steps
            self.calls = 0

        def forward(self, images, targets):
            self.calls += 1
            value = self.weight * 2
            return {"loss_x": value * float("nan") if self.calls in self.bad_steps else value}

    batches = [([torch.zeros(3, 4, 4)], [{}], 0)] * 6
    model = Flaky({2, 3})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="non-finite loss"):
        state = train_one_epoch(model, optimizer, batches, torch.device("cpu"), 0, state=TrainState())
    assert state.step == 6 and state.skipped_steps == 2 and torch.isfinite(model.weight)
    model = Flaky(set(range(1, 7)))
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="4 non-finite losses in a row"):
        train_one_epoch(model, optimizer, batches, torch.device("cpu"), 0, state=TrainState(), max_bad_steps=3)
    # Images that failed to load are counted and an empty batch is passed over.
    state = train_one_epoch(
        Flaky(set()), optimizer, [([], [], 2), *batches[:2]], torch.device("cpu"), 0, state=TrainState()
    )
    assert state.skipped_samples == 2 and state.step == 2


@pytest.mark.ddp
@pytest.mark.slow  # the distillation DDP test below trains, evaluates and saves under torchrun too
def test_ddp_two_cpu_processes_train_and_evaluate(tiny_digits, tmp_path):
    config = tiny_config(tiny_digits, tmp_path / "ddp", steps=4, eval_every=4, batch_size=2)
    from pkd.config import save_config

    save_config(config, tmp_path / "config.yaml")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pkd", "train", str(tmp_path / "config.yaml"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in records if r["type"] == "val"] == [4]
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["steps"] == 4
    assert load_checkpoint(tmp_path / "ddp" / "last.pt")["state"]["step"] == 4


def test_results_file(teacher_run):
    run, results = teacher_run
    assert json.loads((Path(run) / "results.json").read_text()) == results


@pytest.mark.gpu
def test_distill_on_cuda_with_mixed_precision(teacher_run, tiny_digits, tmp_path):
    teacher, _ = teacher_run
    config = tiny_config(tiny_digits, tmp_path / "cuda", teacher=teacher / "best.pt", device="cuda", amp=True)
    results = fit(config, progress=False)
    checkpoint = load_checkpoint(tmp_path / "cuda" / "last.pt")
    assert results["steps"] == 6 and checkpoint["scaler"]["scale"] > 0
    assert torch.isfinite(torch.tensor(results["test"]["mAP"]))


@pytest.mark.ddp
def test_ddp_distillation_with_connectors(teacher_run, tiny_digits, tmp_path):
    """Student and connectors train in one DDP: both ranks end with the same connector weights."""
    teacher, _ = teacher_run
    config = tiny_config(tiny_digits, tmp_path / "ddp", teacher=teacher / "best.pt", steps=2, eval_every=2)
    config.model.fpn_channels = 32  # the teacher's are 64: connectors are needed
    config.distill.connectors = True
    from pkd.config import save_config

    save_config(config, tmp_path / "config.yaml")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "pkd", "distill", str(tmp_path / "config.yaml"),
    ]  # fmt: skip
    done = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert checkpoint["state"]["step"] == 2 and checkpoint["connectors"]
    assert [r["step"] for r in read_metrics(tmp_path / "ddp") if r["type"] == "val"] == [2]  # evaluated on both ranks
    assert json.loads((tmp_path / "ddp" / "results.json").read_text())["steps"] == 2


class StopTrial(Exception):
    """What a tuner's pruning raises through fit's on_validation (optuna.TrialPruned in pkd.tune)."""


def test_on_validation_sees_each_validation_and_can_stop_the_run(tiny_digits, tmp_path):
    seen = []

    def on_validation(step, metrics):
        seen.append((step, metrics["mAP"]))
        if step >= 3:
            raise StopTrial

    config = tiny_config(tiny_digits, tmp_path / "run", steps=6, eval_every=3)
    with pytest.raises(StopTrial):
        fit(config, progress=False, on_validation=on_validation)
    assert [step for step, _ in seen] == [3]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["state"]["step"] == 3  # saved before the hook ran
    assert not (tmp_path / "run" / "results.json").exists()
    results = fit(config, progress=False, on_validation=lambda step, metrics: seen.append((step, metrics["mAP"])))
    assert [step for step, _ in seen] == [3, 6] and results["steps"] == 6
