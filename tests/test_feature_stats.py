"""Tests of pkd.feature_stats: each statistic's accumulator on its own."""

import torch

from pkd.feature_stats import (
    ChannelMoments,
    CorrelationAccumulator,
    DominanceAccumulator,
    HistogramAccumulator,
    MagnitudeAccumulator,
    StageMapAccumulator,
)


def test_channel_moments_merged_in_chunks_equal_one_pass():
    torch.manual_seed(0)
    x = 1e3 + torch.randn(6, 5, 4, 4)
    chunked = ChannelMoments()
    for chunk in x.split([1, 2, 3]):
        chunked.add_images(chunk)
    values = x.transpose(0, 1).reshape(5, -1).double()
    assert chunked.count == 96
    assert torch.allclose(chunked.mean[0], values.mean(1), atol=1e-9, rtol=0)
    assert torch.allclose(chunked.comoment[0, 0], (values - values.mean(1, keepdim=True)).pow(2).sum(1), rtol=1e-9)


def test_each_statistic_sums_its_batches():
    torch.manual_seed(1)
    batches = [torch.randn(2, 8, 4, 4) for _ in range(3)]
    histogram, dominance, magnitude, maps = (
        HistogramAccumulator(10),
        DominanceAccumulator(),
        MagnitudeAccumulator(),
        StageMapAccumulator(),
    )
    for x in batches:
        for model in ("teacher", "student"):
            for statistic in (histogram, dominance, magnitude, maps):
                statistic.add(model, "s8", x)
    counts = histogram.result(["s8"])
    assert sum(counts.teacher["s8"]) == 3 * 2 * 8 * 16
    assert sum(dominance.result(["s8"]).student["s8"]) == 3 * 2 * 16
    mean_abs, std = magnitude.mean_abs_std("teacher", "s8")
    everything = torch.cat(batches)
    assert abs(mean_abs - everything.abs().mean().item()) < 1e-5 and abs(std - everything.std().item()) < 1e-5
    first = maps.result(["s8"]).teacher["s8"]  # the first batch's first image only, scaled to 0..255
    assert first.shape == (4, 4) and first.max() == 255 and first.min() == 0


def test_correlation_of_an_affine_copy_is_one():
    correlation = CorrelationAccumulator()
    for _ in range(2):
        student = torch.randn(2, 3, 4, 4)
        correlation.add("s8", student, 5 * student - 2)
    assert abs(correlation.result(["s8"]).mean_r["s8"] - 1.0) < 1e-9
