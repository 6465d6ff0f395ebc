"""Training curves from a run folder's ``metrics.jsonl``: :func:`plot_run` and :func:`plot_runs`.

:func:`plot_run` draws one run, all panels (losses, their components, the learning rate,
validation and test metrics); :func:`plot_runs` overlays the validation mAP of several runs.
Every function builds a :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot), so
figures never share global state and are freed with their last reference; nothing here needs a
display. The figures of the teacher/student analysis are in :mod:`pkd.analysis_plots`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pkd.metrics_log import METRICS_FILE, RunMetrics, load_metrics

__all__ = ["DPI", "panel_grid", "plot_run", "plot_runs"]

DPI = 110
# Validation metrics drawn in a run's panel, the headline one first.
VAL_KEYS = ("mAP", "AP50", "AP75")


def panel_grid(count: int, *, columns: int, panel_size: tuple[float, float], **subplot_kw) -> tuple[Figure, list[Axes]]:
    """A figure with ``count`` panels in rows of ``columns``; unused cells of the last row are hidden.

    Args:
        count: Number of panels.
        columns: Most panels per row.
        panel_size: Width and height of one panel in inches.
        **subplot_kw: Passed to :meth:`matplotlib.figure.Figure.subplots` (``sharex``, ...).

    Returns:
        The figure and its ``count`` visible axes, row by row.
    """
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(panel_size[0] * columns, panel_size[1] * rows), dpi=DPI, layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, **subplot_kw).ravel().tolist()
    for unused in axes[count:]:
        unused.set_visible(False)
    return figure, axes[:count]


def _series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of the records that have a number under ``key``."""
    pairs = [
        (record["step"], float(record[key]))
        for record in records
        if isinstance(record.get(key), int | float) and not isinstance(record.get(key), bool)
    ]
    steps = np.asarray([step for step, _ in pairs], dtype=np.float64)
    return steps, np.asarray([value for _, value in pairs], dtype=np.float64)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Bias-corrected exponential moving average over about 2% of the points (at least 1)."""
    window = min(max(len(values) / 50.0, 1.0), 200.0)
    decay = 1.0 - 1.0 / window
    smoothed = np.empty_like(values)
    average, weight = 0.0, 0.0
    for i, value in enumerate(values):
        if not math.isfinite(value):
            smoothed[i] = value
            continue
        average = decay * average + (1.0 - decay) * value
        # Dividing by the weight so far removes the pull towards the zero the average starts from.
        weight = decay * weight + (1.0 - decay)
        smoothed[i] = average / weight
    return smoothed


def _plot_curves(ax: Axes, records: Sequence[Mapping], keys: Sequence[str], labels: Sequence[str]) -> bool:
    """Raw curves faint and smoothed ones solid; log y when every value is positive. False if no data."""
    drawn = []
    for index, (key, label) in enumerate(zip(keys, labels, strict=True)):
        steps, values = _series(records, key)
        if len(steps) == 0:
            continue
        color = f"C{index % 10}"
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(values), color=color, linewidth=1.6, label=label)
        drawn.append(values)
    if not drawn:
        return False
    finite = np.concatenate(drawn)
    finite = finite[np.isfinite(finite)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 10:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return True


def _message(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_run(run_dir: str | Path) -> Path:
    """Training curves of one run: writes ``run_dir/curves.png``.

    Panels: total training loss; its components (the detector's own losses and the total
    distillation loss); the distillation loss per level when logged; the learning rate; and
    validation mAP / AP50 / AP75 over steps, with the final test evaluation as stars when there
    is one. Loss curves are drawn raw (faint) and smoothed. Panels without data say so.

    Args:
        run_dir: a run folder holding ``metrics.jsonl`` (see :func:`load_metrics`).

    Returns:
        The path of the PNG written.
    """
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    train_keys = list(dict.fromkeys(key for record in metrics.train for key in record))
    components = [k for k in train_keys if k.startswith("loss_") and not k.startswith("loss_distill/")]
    # The detector's own losses first, then the total distillation loss.
    components.sort(key=lambda key: key == "loss_distill")
    # Levels in stride order: "s8" before "s16" (numbers compared as numbers).
    per_level = sorted(
        (k for k in train_keys if k.startswith("loss_distill/")),
        key=lambda k: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", k)],
    )

    panels = ["loss", "components", *(["levels"] if per_level else []), "val", "lr"]
    figure, axes = panel_grid(len(panels), columns=3, panel_size=(5.2, 3.7))
    axes = dict(zip(panels, axes, strict=True))
    no_train = f"no training lines in {METRICS_FILE}"

    ax = axes["loss"]
    ax.set_title("training loss (total)")
    if not _plot_curves(ax, metrics.train, ["loss"], ["total"]):
        _message(ax, no_train)

    ax = axes["components"]
    ax.set_title("loss components")
    if not _plot_curves(ax, metrics.train, components, [k.removeprefix("loss_") for k in components]):
        _message(ax, "no loss_<component> keys logged")

    if per_level:
        ax = axes["levels"]
        ax.set_title("distillation loss per level")
        _plot_curves(ax, metrics.train, per_level, [k.removeprefix("loss_distill/") for k in per_level])

    ax = axes["lr"]
    ax.set_title("learning rate")
    steps, lr = _series(metrics.train, "lr")
    if len(steps):
        ax.plot(steps, lr, color="tab:gray", linewidth=1.4)
        ax.grid(alpha=0.3)
    else:
        _message(ax, no_train)

    _plot_validation(axes["val"], metrics)

    for name, ax in axes.items():
        if ax.has_data():
            ax.set_xlabel("training step")
            ax.set_ylabel({"lr": "learning rate", "val": "COCO box AP"}.get(name, "loss"))
    figure.suptitle(f"run {run_dir.resolve().name}")
    out_png = run_dir / "curves.png"
    figure.savefig(out_png)
    return out_png


def _plot_validation(ax: Axes, metrics: RunMetrics) -> None:
    ax.set_title("validation")
    drawn = False
    for index, key in enumerate(VAL_KEYS):
        steps, values = _series(metrics.val, key)
        if len(steps) == 0:
            continue
        drawn = True
        headline = index == 0
        ax.plot(
            steps,
            values,
            marker="o",
            markersize=3,
            color=f"C{index}",
            linewidth=2 if headline else 1,
            alpha=1.0 if headline else 0.6,
            label=key,
        )
        if headline:
            best = int(np.argmax(values))
            epoch = next((r.get("epoch") for r in metrics.val if r["step"] == steps[best]), None)
            where = f" (epoch {epoch})" if epoch is not None else ""
            ax.annotate(
                f"best {values[best]:.3g}{where}",
                (steps[best], values[best]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize="small",
            )
    test_steps, test_map = _series(metrics.test, "mAP")
    if len(test_steps):
        drawn = True
        ax.scatter(test_steps, test_map, marker="*", s=120, color="black", zorder=3, label="test mAP")
    if drawn:
        # Head room for the "best" label above the highest point.
        ax.margins(y=0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    else:
        _message(ax, f"no validation results in {METRICS_FILE} yet")


def plot_runs(run_dirs: Sequence[str | Path], out_png: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Validation mAP of several runs over training steps, overlaid, to compare them.

    Args:
        run_dirs: run folders, each holding ``metrics.jsonl``.
        out_png: the PNG to write (its folder is created if missing).
        labels: legend label per run; the folder names by default.

    Returns:
        ``out_png`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no runs, or ``labels`` does not have one label per run.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    if labels is None:
        labels = [run_dir.resolve().name for run_dir in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"got {len(labels)} labels for {len(run_dirs)} runs")
    figure = Figure(figsize=(8.0, 5.0), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    any_validation = False
    for index, (run_dir, label) in enumerate(zip(run_dirs, labels, strict=True)):
        metrics = load_metrics(run_dir)
        color = f"C{index % 10}"
        steps, values = _series(metrics.val, "mAP")
        if len(steps):
            any_validation = True
            ax.plot(steps, values, marker="o", markersize=3, color=color, label=f"{label} (best {values.max():.3g})")
        else:
            # Keep the run in the legend so its absence is explained, not silent.
            ax.plot([], [], color=color, label=f"{label} (no validation results)")
        test_steps, test_map = _series(metrics.test, "mAP")
        if len(test_steps):
            any_validation = True
            ax.scatter(test_steps, test_map, marker="*", s=120, color=color, zorder=3, label=f"{label} test")
    if not any_validation:
        _message(ax, f"none of these runs has validation results in {METRICS_FILE} yet")
    else:
        ax.set_xlabel("training step")
        ax.set_ylabel("validation mAP@[.5:.95]")
        ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title("validation mAP" + (" (stars: final test split)" if any_validation else ""))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out_png)
    return out_png
