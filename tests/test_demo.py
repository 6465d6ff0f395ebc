"""The demo end to end (--quick preset): every stage, the report, and reuse on a second call."""

import json

import pytest

from pkd.demo import PRESETS, run_demo


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    messages = []
    report = run_demo("quick", workdir, progress=False, log=messages.append)
    return workdir, report, messages


def test_quick_demo_writes_the_report_table_and_plot(quick_demo):
    workdir, report, messages = quick_demo
    assert list(report.rows) == ["teacher", "alone", "pkd", "mse"]
    for row in report.rows.values():
        assert -1 <= row["mAP"] <= 1 and row["parameters"] > 0 and row["ms_per_image"] > 0
    text = report.report.read_text()
    for label in ("teacher", "student alone", "student + PKD", "student + MSE", "| run | mAP | AP50"):
        assert label in text
    assert report.plot.is_file() and report.plot.stat().st_size > 10_000
    runs = workdir / "runs" / "quick"
    for name in ("teacher", "alone", "pkd", "mse"):
        assert (runs / name / "results.json").is_file() and (runs / name / "curves.png").is_file()
    distill = json.loads((runs / "pkd" / "results.json").read_text())
    assert distill["steps"] == PRESETS["quick"].student_train["steps"]
    assert any("teacher: fasterrcnn_resnet18_fpn" in m for m in messages)


def test_second_call_reuses_finished_runs(quick_demo):
    workdir, first, _ = quick_demo
    messages = []
    second = run_demo("quick", workdir, progress=False, log=messages.append)
    assert sum("reusing" in m for m in messages) == 4
    assert second.rows["pkd"]["mAP"] == first.rows["pkd"]["mAP"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_demo("huge")
