"""Tests of pkd.metrics_log: the one writer and reader of a run's metrics.jsonl."""

import json

import pytest
from test_plots import train_line, write_run

from pkd.metrics_log import append_record, keep_records_until, load_metrics, validation_curve


def test_load_metrics_tolerates_truncated_last_line(tmp_path):
    run = write_run(tmp_path / "run", test=True)
    metrics = load_metrics(run)
    assert len(metrics.train) == 60 and metrics.train[-1]["step"] == 118
    assert [record["step"] for record in metrics.val] == [38, 78, 118]
    assert len(metrics.test) == 1
    assert load_metrics(run / "metrics.jsonl") == metrics


def test_load_metrics_keeps_the_last_record_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [train_line(0, 0), train_line(2, 0), {**train_line(2, 0), "loss": 9.0}, {"type": "val", "mAP": 0.1}]
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    metrics = load_metrics(path)
    assert [record["step"] for record in metrics.train] == [0, 2]
    assert metrics.train[-1]["loss"] == 9.0
    assert metrics.val == []  # no step: nowhere to draw it


def test_load_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        load_metrics(tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 0, "loss": 1.0}\n{"type": "tr\n{"type": "train", "step": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        load_metrics(path)


def test_append_then_keep_records_until_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (0, 10, 20):
        append_record(path, train_line(step, 0))
    append_record(path, {"type": "val", "step": 20, "epoch": 0, "mAP": 0.5})
    path.write_text(path.read_text() + '{"type": "tr')  # a killed run's half-written line
    keep_records_until(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 10]


def test_validation_curve(tmp_path):
    run = write_run(tmp_path / "run", test=True)
    curve = validation_curve(run)
    assert [step for step, _ in curve] == [38, 78, 118] and all(isinstance(value, float) for _, value in curve)
