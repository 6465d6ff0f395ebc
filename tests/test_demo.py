"""The demo end to end (--quick preset): every stage, the report, and reuse on a second call."""

import json

import pytest

from pkd.demo import PRESETS, first_step_reaching, run_demo, run_name, student_run_dir
from pkd.metrics_log import validation_curve


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    messages = []
    # Two students at a time, whatever the machine: the worker processes are what this tests.
    report = run_demo("quick", workdir, jobs=2, progress=False, log=messages.append)
    return workdir, report, messages


def test_quick_demo_writes_the_report_table_and_plot(quick_demo):
    workdir, report, messages = quick_demo
    assert list(report.rows) == ["teacher", "alone", "pkd", "mse", "cwd"]
    for row in report.rows.values():
        assert -1 <= row["mAP"] <= 1 and row["parameters"] > 0 and row["ms_per_image"] > 0
    text = report.report.read_text()
    for label in ("teacher", "student alone", "student + PKD", "student + MSE", "student + CWD", "| run | mAP | AP50"):
        assert label in text
    assert report.plot.is_file() and report.plot.stat().st_size > 10_000
    runs = workdir / "runs" / "quick"
    names = ["teacher", "alone", *(run_name(d) for d in PRESETS["quick"].distill.values())]
    assert len(set(names)) == 5
    for name in names:
        assert (runs / name / "results.json").is_file() and (runs / name / "curves.png").is_file()
    distill = json.loads((runs / names[2] / "results.json").read_text())
    assert distill["steps"] == PRESETS["quick"].student_train["steps"]
    assert any(f"teacher: {PRESETS['quick'].teacher['name']}" in m for m in messages)
    assert any("4 runs, 2 at a time" in m for m in messages)
    assert set(report.stage_times_s) == {"dataset", "teacher", "students", "report"}
    assert "Wall time of this `pkd demo` call" in text and "students" in text
    assert "reaches alone's final val mAP" in text
    assert report.deploy["onnx"] == workdir / "student_pkd_quick.onnx" and report.deploy["onnx"].is_file()
    assert "Deploy: the PKD student in ONNX, `" in text and "bench_onnx.py" in text
    assert "reaches_alone_at_step" in report.rows["pkd"] and "reaches_alone_at_step" not in report.rows["alone"]
    curve = validation_curve(runs / "alone")
    assert [step for step, _ in curve] == [4, 8] and all(0 <= value <= 1 for _, value in curve)


def test_first_step_reaching():
    curve = [(50, 0.1), (100, 0.3), (150, 0.25)]
    assert first_step_reaching(curve, 0.2) == 100
    assert first_step_reaching(curve, 0.1) == 50
    assert first_step_reaching(curve, 0.5) is None


def test_student_run_dirs_are_named_by_what_they_train_and_the_seed(tmp_path):
    assert run_name(None) == "alone" and run_name({"loss": "mse", "weight": 0.005}) == "mse_w0.005"
    assert student_run_dir(tmp_path, "default", "pkd_w2", 0) == tmp_path / "runs" / "default" / "pkd_w2"
    assert student_run_dir(tmp_path, "default", "pkd_w2", 2) == tmp_path / "runs" / "default" / "pkd_w2-seed2"


def test_second_call_reuses_finished_runs(quick_demo):
    workdir, first, _ = quick_demo
    messages = []
    second = run_demo("quick", workdir, progress=False, log=messages.append)
    assert sum("reusing" in m for m in messages) == 5
    assert second.rows["pkd"]["mAP"] == first.rows["pkd"]["mAP"]


def test_a_run_with_other_loader_workers_is_reused_and_a_changed_schedule_is_not(quick_demo, tmp_path):
    import shutil

    import yaml

    from pkd.demo import _config, _same_config, demo_dataset, train_student

    workdir, _, _ = quick_demo
    settings = PRESETS["quick"]
    digits = demo_dataset(settings, workdir, log=lambda message: None)
    run_dir = tmp_path / "alone"
    shutil.copytree(workdir / "runs" / "quick" / "alone", run_dir)
    config = _config(settings, digits, run_dir, settings.student, settings.student_train, seed=0)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["data"]["workers"] = 3  # how data is loaded does not change what the run trains
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert _same_config(run_dir, config)
    messages = []
    train_student(settings, digits, run_dir, seed=0, log=messages.append, label="alone")
    assert messages == [f"      alone: reusing {run_dir}"]
    saved["train"]["lr"] = 0.5  # a learning rate does
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert not _same_config(run_dir, config)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        run_demo("huge")


def test_student_config_takes_tuned_values_on_top_of_the_preset(tmp_path):
    from types import SimpleNamespace

    from pkd.demo import student_config

    splits = ("train", "val", "test")
    digits = SimpleNamespace(
        annotations={s: tmp_path / f"{s}.json" for s in splits}, images={s: tmp_path / s for s in splits}
    )
    distill = {"loss": "pkd", "weight": 64.0}
    plain = student_config(PRESETS["default"], digits, tmp_path / "run", seed=1, distill=distill, teacher="t.pt")
    assert plain.train.lr == PRESETS["default"].student_train["lr"] and plain.distill.weight == 64.0
    tuned = student_config(
        PRESETS["default"],
        digits,
        tmp_path / "run",
        seed=1,
        distill=distill,
        teacher="t.pt",
        params={"train.lr": 5e-4, "distill.weight": 32.0},
    )
    assert (tuned.train.lr, tuned.distill.weight, tuned.train.seed, tuned.teacher.weights) == (5e-4, 32.0, 1, "t.pt")


def test_the_report_names_the_fpn_width_only_where_the_preset_sets_one():
    from pkd.demo import _student_text

    assert _student_text(PRESETS["default"]) == "`fcos_timm_tf_efficientnet_lite0_fpn` (FPN 128), 400 steps of batch 8"
    assert _student_text(PRESETS["yolo"]) == "`yolo11n`, 1250 steps of batch 8"  # YOLO has no FPN width to set


def test_a_workdir_spelled_relative_or_absolute_is_one_demo(quick_demo, monkeypatch):
    workdir, _, _ = quick_demo
    monkeypatch.chdir(workdir.parent)
    messages = []
    run_demo("quick", workdir.name, progress=False, log=messages.append)  # first made with the absolute path
    assert sum("reusing" in m for m in messages) == 5
