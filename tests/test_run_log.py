"""Tests of pkd.run_log: what a run reports, in metrics.jsonl and as plain lines."""

import json

from pkd.run_log import RunLog, duration
from pkd.train_state import TrainState


def test_plain_lines_and_records_where_no_bar_is_drawn(tmp_path, capsys):
    log = RunLog(tmp_path / "plain", 6, 0, resumed=False, main=True, progress=False, images_per_step=4)
    state = TrainState()
    for step in (2, 4):
        state.step = step
        state.window["loss"] += [1.0, 3.0]
        state.window["loss_distill"] += [0.5, 0.5]
        log.train(state, lr=0.01)
    state.best_metric, state.best_step = 0.5, 4
    log.evaluation("val", state, {"mAP": 0.5, "AP50": 0.75})
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "4/6"]
    assert "loss=2.0000" in lines[0] and "loss_distill=0.5000" in lines[0] and "img/s" in lines[0]
    assert "val mAP 0.5000" in lines[2] and "best 0.5000 at step 4" in lines[2]
    records = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["type"], r["step"]) for r in records] == [("train", 2), ("train", 4), ("val", 4)]
    assert records[0]["loss"] == 2.0 and records[0]["lr"] == 0.01 and not state.window


def test_resumed_log_drops_records_after_the_checkpoint(tmp_path):
    first = RunLog(tmp_path, 10, 0, resumed=False, main=True, progress=False, images_per_step=1)
    state = TrainState()
    for step in (2, 4, 6):
        state.step = step
        state.window["loss"].append(float(step))
        first.train(state, lr=0.1)
    first.close()
    RunLog(tmp_path, 10, 4, resumed=True, main=True, progress=False, images_per_step=1).close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path / "rank1", 4, 0, resumed=False, main=False, progress=False, images_per_step=1)
    state = TrainState(step=2)
    state.window["loss"].append(1.0)
    log.train(state, lr=0.1)
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_duration():
    assert duration(65) == "1:05" and duration(3723) == "1:02:03" and duration(float("inf")) == "?"
