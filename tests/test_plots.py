"""Tests of pkd.plots: training curves of one run and of several render to PNGs that PIL open."""

import json

import pytest
from conftest import assert_png

from pkd.plots import panel_grid, plot_run, plot_runs


def test_panel_grid_hides_the_unused_cells():
    figure, axes = panel_grid(4, columns=3, panel_size=(2.0, 1.5))
    assert len(axes) == 4 and all(ax.get_visible() for ax in axes)
    assert sum(not ax.get_visible() for ax in figure.axes) == 2


def train_line(step, epoch, distill=True):
    record = {
        "type": "train",
        "step": step,
        "epoch": epoch,
        "lr": 0.01 * min(1.0, (step + 1) / 20),
        "loss": 2.0 / (1 + step / 30),
        "loss_classification": 1.2 / (1 + step / 30),
        "loss_bbox_regression": 0.6 / (1 + step / 40),
    }
    if distill:
        record["loss_distill"] = 0.2 / (1 + step / 10)
        record["loss_distill/stride 8"] = 0.12 / (1 + step / 10)
        record["loss_distill/stride 16"] = 0.08 / (1 + step / 10)
    return record


def write_run(folder, *, val=True, test=False, distill=True):
    folder.mkdir(parents=True)
    lines = []
    for step in range(0, 120, 2):
        lines.append(json.dumps(train_line(step, step // 40, distill)))
        if val and step % 40 == 38:
            metrics = {key: 0.1 + step / 1000 for key in ("mAP", "AP50", "AP75", "AP_small", "AR100")}
            lines.append(json.dumps({"type": "val", "step": step, "epoch": step // 40, **metrics}))
    if test:
        lines.append(json.dumps({"type": "test", "step": 118, "epoch": 2, "mAP": 0.2, "AP50": 0.4}))
    # A run killed mid-write leaves a truncated last line.
    text = "\n".join(lines) + "\n" + json.dumps(train_line(120, 3))[:37]
    (folder / "metrics.jsonl").write_text(text)
    return folder


@pytest.mark.parametrize("kind", [dict(test=True), dict(val=False, distill=False)], ids=["full", "no-val-no-distill"])
def test_plot_run(kind, tmp_path):
    run = write_run(tmp_path / "run", **kind)
    path = plot_run(run)
    assert path == run / "curves.png"
    assert_png(path, min_size=(800, 400))


def test_plot_run_on_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert_png(plot_run(tmp_path), min_size=(800, 400))


def test_plot_runs(tmp_path):
    runs = [write_run(tmp_path / "pkd"), write_run(tmp_path / "mse", test=True), write_run(tmp_path / "x", val=False)]
    path = plot_runs(runs, tmp_path / "out" / "compare.png")
    assert path == tmp_path / "out" / "compare.png"
    assert_png(path)
    assert_png(plot_runs(runs[:2], tmp_path / "labelled.png", labels=["PKD", "MSE"]))
    assert_png(plot_runs(runs[2:], tmp_path / "none.png"))
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        plot_runs(runs, tmp_path / "bad.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        plot_runs([], tmp_path / "bad.png")
