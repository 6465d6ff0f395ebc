"""Figures of what :mod:`pkd.analysis` measures on a teacher/student pair.

One figure per analysis item: :func:`plot_histograms`, :func:`plot_channel_dominance`,
:func:`plot_stage_maps`, :func:`plot_gradient_shares`, :func:`plot_correlation`;
:func:`save_analysis_figures` writes them all as PNGs. As in :mod:`pkd.plots`, every function
builds a :class:`matplotlib.figure.Figure` directly (Agg canvas, no pyplot), so nothing here
needs a display or shares global state.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from pkd.analysis import Analysis
from pkd.plots import DPI, panel_grid

__all__ = [
    "plot_channel_dominance",
    "plot_correlation",
    "plot_gradient_shares",
    "plot_histograms",
    "plot_stage_maps",
    "save_analysis_figures",
]

MODEL_COLORS = {"teacher": "tab:blue", "student": "tab:orange"}
LOSS_COLORS = {"mse": "tab:red", "pkd": "tab:green"}
LOSS_LABELS = {"mse": "MSE imitation", "pkd": "PKD"}


def plot_histograms(analysis: Analysis) -> Figure:
    """Activation values per stage, teacher vs student, on the shared bins; counts on a log scale.

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.

    Returns:
        One panel per stage, all with the same axes, so both the teacher/student gap and the
        gap between stages show at a glance.
    """
    histogram = analysis.histogram
    edges = np.asarray(histogram.edges)
    # The central bin (values indistinguishable from zero) is the symlog axis's linear part.
    linear_width = float(np.abs(edges).min())
    ticks = _symlog_ticks(edges, linear_width)
    rows = {row.stage: row for row in analysis.table}
    figure, axes = panel_grid(len(analysis.stages), columns=3, panel_size=(4.6, 3.4), sharex=True, sharey=True)
    for ax, stage in zip(axes, analysis.stages, strict=True):
        for model, color in MODEL_COLORS.items():
            ax.stairs(getattr(histogram, model)[stage], edges, baseline=None, color=color, linewidth=1.4, label=model)
        ax.set_xscale("symlog", linthresh=linear_width, linscale=0.5)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_yscale("log")
        # Empty bins fall off the bottom of the log axis instead of being drawn at a made-up floor.
        ax.set_ylim(bottom=0.5)
        row = rows[stage]
        ax.set_title(f"{stage}: mean |x| teacher {row.teacher_mean_abs:.3g}, student {row.student_mean_abs:.3g}")
        ax.set_xlabel("activation value (symlog)")
        ax.set_ylabel("values per bin (log)")
        ax.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside upper right")
    figure.suptitle(
        f"Activation values per FPN stage, same bins for all ({analysis.num_images} images)\n"
        "MSE must close the magnitude gap; PKD standardises each channel first"
    )
    return figure


def _symlog_ticks(edges: np.ndarray, linear_width: float, most_per_side: int = 4) -> list[float]:
    """Zero and a few powers of ten on each side of it, spaced so that their labels do not overlap."""
    low = math.floor(math.log10(linear_width))
    high = math.ceil(math.log10(max(abs(edges[0]), abs(edges[-1]))))
    step = max(1, math.ceil((high - low) / most_per_side))
    # Powers next to the linear part would print on top of the zero tick.
    powers = [10.0**decade for decade in range(high, low, -step) if decade > low + 1]
    ticks = [0.0]
    if edges[-1] > 0:
        ticks += [p for p in powers if p <= 10 * edges[-1]]
    if edges[0] < 0:
        ticks += [-p for p in powers if p <= 10 * -edges[0]]
    return sorted(ticks)


def plot_channel_dominance(analysis: Analysis) -> Figure:
    """Share of positions each channel wins the argmax over channels at, sorted, per stage.

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.

    Returns:
        One panel per stage with the teacher's and the student's sorted shares overlaid and the
        uniform share ``1 / C`` as a reference line.
    """
    dominance = analysis.dominance
    figure, axes = panel_grid(len(analysis.stages), columns=3, panel_size=(4.6, 3.6))
    for ax, stage in zip(axes, analysis.stages, strict=True):
        for model, color in MODEL_COLORS.items():
            wins = np.asarray(getattr(dominance, model)[stage], dtype=np.float64)
            percent = 100.0 * wins / max(wins.sum(), 1.0)
            top_share = getattr(dominance, f"{model}_top_share")[stage]
            ranks = np.arange(len(wins) + 1) + 0.5
            ax.stairs(percent, ranks, fill=True, alpha=0.35, color=color)
            ax.stairs(
                percent, ranks, color=color, linewidth=1.2, label=f"{model}: top 1% of channels win {top_share:.0%}"
            )
        channels = len(dominance.teacher[stage])
        ax.axhline(100.0 / channels, color="0.3", linestyle="--", linewidth=1, label=f"uniform (1/{channels})")
        ax.set_xlim(0.5, channels + 0.5)
        ax.set_ylim(bottom=0)
        ax.set_title(stage)
        ax.set_xlabel("channel rank (by positions won)")
        ax.set_ylabel("positions won (%)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
    figure.suptitle(
        "Channel dominance: share of positions (n, u, v) where each channel has the largest activation\n"
        "a few dominant channels take most of MSE's gradient (see the gradient shares)"
    )
    return figure


def plot_stage_maps(analysis: Analysis) -> Figure:
    """Channel-max maps of the first image: stages as columns, teacher row over student row.

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.

    Returns:
        A grid of maps; each row (model) uses one colour scale in activation units for all its
        stages, so the magnitude gap between stages is visible.
    """
    maps = analysis.stage_maps
    stages = analysis.stages
    figure = Figure(figsize=(2.9 * len(stages) + 1.2, 5.6), dpi=DPI, layout="constrained")
    grid = figure.subplots(2, len(stages), squeeze=False)
    for row, model in enumerate(MODEL_COLORS):
        low, high = getattr(maps, f"{model}_range")
        image = None
        for column, stage in enumerate(stages):
            ax = grid[row, column]
            pixels = getattr(maps, model)[stage]
            # Back from 0..255 to activation units, so the colour bar reads in the model's own values.
            values = low + pixels.astype(np.float64) / 255.0 * (high - low)
            image = ax.imshow(values, cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(stage)
            ax.set_xlabel(f"{pixels.shape[0]}×{pixels.shape[1]}", fontsize="small")
            if column == 0:
                ax.set_ylabel(model, fontsize="large")
        figure.colorbar(image, ax=grid[row, :].tolist(), label=f"{model} channel-max activation", shrink=0.9)
    figure.suptitle("Channel-max map of the first image per stage (one colour scale per model)")
    return figure


def plot_gradient_shares(analysis: Analysis) -> Figure:
    """How the distillation gradient splits over stages and channel deciles, MSE vs PKD.

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.

    Returns:
        Two panels of grouped bars (share of the gradient's squared norm, %): per stage, and per
        channel decile of the teacher's mean ``|x|`` pooled across stages; dashed lines mark an
        equal split.
    """
    shares = analysis.gradients
    figure = Figure(figsize=(12.5, 4.6), dpi=DPI, layout="constrained")
    stage_ax, decile_ax = figure.subplots(1, 2, width_ratios=[max(len(analysis.stages), 3), 6])
    width = 0.4
    groups = (
        (stage_ax, list(analysis.stages), lambda loss: [shares.stage[loss][s] for s in analysis.stages]),
        (decile_ax, [str(d) for d in range(1, 11)], lambda loss: shares.decile[loss]),
    )
    for ax, names, values in groups:
        positions = np.arange(len(names))
        for offset, loss in zip((-width / 2, width / 2), LOSS_COLORS, strict=True):
            bars = ax.bar(
                positions + offset,
                100.0 * np.asarray(values(loss)),
                width,
                color=LOSS_COLORS[loss],
                label=LOSS_LABELS[loss],
            )
            ax.bar_label(bars, fmt="{:.0f}", fontsize="x-small", padding=1)
        ax.axhline(100.0 / len(names), color="0.3", linestyle="--", linewidth=1, label="equal split")
        ax.set_xticks(positions, names)
        ax.set_ylabel("share of gradient squared norm (%)")
        ax.set_ylim(0, 109)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize="small")
    stage_ax.set_xlabel("FPN stage")
    stage_ax.set_title("per stage")
    decile_ax.set_xlabel("channel decile by teacher mean |x| (1 = largest 10%), pooled over stages")
    decile_ax.set_title("per channel decile")
    figure.suptitle("Distillation gradient w.r.t. the student features: where it goes under MSE and under PKD")
    return figure


def plot_correlation(analysis: Analysis) -> Figure:
    """Per-stage Pearson correlation between student and teacher: the quantity PKD maximises.

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.

    Returns:
        Bars of the mean ``r`` over channels per stage, with every channel's ``r`` as a dot.
    """
    correlation = analysis.correlation
    stages = analysis.stages
    figure = Figure(figsize=(max(5.0, 1.5 * len(stages) + 2.5), 4.2), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    positions = np.arange(len(stages))
    mean_r = [correlation.mean_r[s] for s in stages]
    ax.bar(positions, mean_r, 0.6, color="tab:purple", alpha=0.55, label="mean over channels")
    for position, stage in zip(positions, stages, strict=True):
        channel_r = np.asarray(correlation.channel_r[stage])
        # Spread the dots across the bar so that channels with equal r stay visible.
        spread = np.linspace(-0.22, 0.22, len(channel_r)) if len(channel_r) > 1 else np.zeros(1)
        ax.scatter(
            position + spread,
            channel_r,
            s=6,
            color="0.15",
            alpha=0.5,
            label="channels" if position == 0 else None,
            zorder=3,
        )
    ax.axhline(0.0, color="0.3", linewidth=0.8)
    ax.set_xticks(positions, [f"{stage}\nmean r {r:+.2f}" for stage, r in zip(stages, mean_r, strict=True)])
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("FPN stage")
    ax.set_ylabel("Pearson r (student vs teacher)")
    ax.set_title(f"Per-channel correlation over N·H·W ({analysis.num_images} images); PKD minimises 1 − r")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="lower right")
    return figure


def save_analysis_figures(analysis: Analysis, out_dir: str | Path) -> dict[str, Path]:
    """Writes one PNG per analysis item into ``out_dir`` (created if missing).

    Args:
        analysis: the result of :func:`pkd.analysis.analyze`.
        out_dir: folder for the PNGs.

    Returns:
        Item name (``histograms``, ``channel_dominance``, ``stage_maps``, ``gradient_shares``,
        ``correlation``) -> path of its PNG.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    makers = {
        "histograms": plot_histograms,
        "channel_dominance": plot_channel_dominance,
        "stage_maps": plot_stage_maps,
        "gradient_shares": plot_gradient_shares,
        "correlation": plot_correlation,
    }
    paths = {}
    for name, make in makers.items():
        paths[name] = out_dir / f"{name}.png"
        make(analysis).savefig(paths[name])
    return paths
