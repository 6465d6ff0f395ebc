"""Tests of pkd.analysis_plots: every analysis figure is labelled and renders to a PNG that PIL opens."""

import pytest
import torch
from conftest import assert_png

from pkd.analysis import analyze
from pkd.analysis_plots import (
    plot_channel_dominance,
    plot_correlation,
    plot_gradient_shares,
    plot_histograms,
    plot_stage_maps,
    save_analysis_figures,
)


@pytest.fixture(scope="module")
def analysis():
    generator = torch.Generator().manual_seed(0)
    sizes = {"stride 8": (16, 16), "stride 16": (8, 8), "stride 32": (4, 4)}
    student = {stage: torch.randn(2, 12, *size, generator=generator) for stage, size in sizes.items()}
    teacher = {stage: 3 * x + torch.randn(x.shape, generator=generator) for stage, x in student.items()}
    teacher["stride 32"] = 40 * teacher["stride 32"]
    return analyze([(student, teacher)])


@pytest.mark.parametrize(
    "plot", [plot_histograms, plot_channel_dominance, plot_stage_maps, plot_gradient_shares, plot_correlation]
)
def test_analysis_figure_is_labelled(plot, analysis):
    figure = plot(analysis)
    assert figure.get_suptitle() or any(ax.get_title() for ax in figure.axes)
    for ax in figure.axes:
        # Image panels are labelled by their column title, row label and colour bar instead.
        if ax.get_visible() and ax.get_label() != "<colorbar>" and not ax.images:
            assert ax.get_title()
            assert ax.get_xlabel() and ax.get_ylabel()


def test_save_analysis_figures(analysis, tmp_path):
    # Renders every figure above to a PNG.
    paths = save_analysis_figures(analysis, tmp_path / "figures")
    assert set(paths) == {"histograms", "channel_dominance", "stage_maps", "gradient_shares", "correlation"}
    for path in paths.values():
        assert path.parent == tmp_path / "figures"
        assert_png(path)
