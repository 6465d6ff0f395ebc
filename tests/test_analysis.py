"""Tests of pkd.analysis: known answers for each item, exact accumulation, errors, JSON."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pkd.analysis import Analysis, AnalysisAccumulator, analyze, format_table

STAGES = ("stride 8", "stride 16")


def random_features(generator, batch=2, channels=20, sizes=((8, 8), (8, 8))):
    return {
        stage: torch.randn(batch, channels, *size, generator=generator)
        for stage, size in zip(STAGES, sizes, strict=True)
    }


def independent_pair(seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return random_features(generator, **kwargs), random_features(generator, **kwargs)


def split(features, parts):
    """One big batch of feature dicts -> ``parts`` smaller batches along N."""
    chunks = {stage: x.chunk(parts) for stage, x in features.items()}
    return [{stage: chunks[stage][i] for stage in features} for i in range(parts)]


def test_dominant_channel_wins_argmax_and_mse_gradient_but_not_pkd():
    student, teacher = independent_pair(channels=20)
    for features in (student, teacher):
        for x in features.values():
            # Channel 7: positive and 100x larger, so it wins the argmax almost everywhere.
            x[:, 7] = 100 * x[:, 7].abs()
    analysis = analyze([(student, teacher)])

    for stage in STAGES:
        for model in ("teacher", "student"):
            wins = getattr(analysis.dominance, model)[stage]
            assert wins == sorted(wins, reverse=True)
            assert sum(wins) == 2 * 8 * 8
            # 20 channels: the top 1% is one channel.
            assert getattr(analysis.dominance, f"{model}_top_share")[stage] > 0.9
            assert wins[0] / sum(wins) == getattr(analysis.dominance, f"{model}_top_share")[stage]

    # Decile 1 (the two channels with the largest teacher |x|, one being channel 7) takes MSE's gradient.
    assert analysis.gradients.decile["mse"][0] > 0.95
    assert sum(analysis.gradients.decile["mse"]) == pytest.approx(1.0)
    # PKD scales each channel's gradient by 1/std of the student channel: the big channel gets less, not more.
    assert analysis.gradients.decile["pkd"][0] < 0.2


def test_dominant_teacher_channel_leaves_pkd_deciles_balanced():
    # The student starts without the teacher's dominant channel (as a randomly initialised one does).
    student, teacher = independent_pair(channels=20, batch=4, sizes=((16, 16), (16, 16)))
    for x in teacher.values():
        x[:, 3] *= 100
    shares = analyze([(student, teacher)]).gradients
    assert shares.decile["mse"][0] > 0.95
    assert shares.decile["pkd"] == pytest.approx([0.1] * 10, abs=0.03)
    assert sum(shares.decile["pkd"]) == pytest.approx(1.0)


def test_dominant_stage_takes_mse_gradient_not_pkd():
    student, teacher = independent_pair(batch=4, sizes=((16, 16), (16, 16)))
    plain = analyze([(student, teacher)]).gradients
    teacher["stride 16"] = 100 * teacher["stride 16"]
    scaled = analyze([(student, teacher)]).gradients

    assert scaled.stage["mse"]["stride 16"] > 0.99
    assert scaled.stage["pkd"]["stride 16"] == pytest.approx(0.5, abs=0.05)
    # PKD's gradient does not see the teacher's magnitude at all.
    for stage in STAGES:
        assert scaled.stage["pkd"][stage] == pytest.approx(plain.stage["pkd"][stage], rel=1e-6)
    assert scaled.decile["pkd"] == pytest.approx(plain.decile["pkd"], rel=1e-6)


def test_gradient_shares_of_stages_with_different_sizes_sum_to_one():
    student, teacher = independent_pair(sizes=((16, 16), (4, 4)))
    shares = analyze([(student, teacher)]).gradients
    for loss in ("mse", "pkd"):
        assert sum(shares.stage[loss].values()) == pytest.approx(1.0)
        assert sum(shares.decile[loss]) == pytest.approx(1.0)


def test_zero_gradient_gives_zero_shares():
    student, _ = independent_pair()
    shares = analyze([(student, {k: v.clone() for k, v in student.items()})]).gradients
    assert shares.stage["mse"] == {stage: 0.0 for stage in STAGES}
    assert shares.decile["mse"] == [0.0] * 10


def test_correlation_is_one_for_affine_teacher_per_channel():
    generator = torch.Generator().manual_seed(1)
    student = random_features(generator, channels=6)
    scale = torch.rand(1, 6, 1, 1, generator=generator) * 10 + 0.1
    shift = torch.randn(1, 6, 1, 1, generator=generator) * 50
    teacher = {stage: scale * x + shift for stage, x in student.items()}
    correlation = analyze([(student, teacher)]).correlation
    for stage in STAGES:
        assert correlation.mean_r[stage] == pytest.approx(1.0, abs=1e-9)
        assert correlation.channel_r[stage] == pytest.approx([1.0] * 6, abs=1e-9)


def test_correlation_is_near_zero_for_independent_noise():
    student, teacher = independent_pair(batch=4, channels=16, sizes=((16, 16), (16, 16)))
    correlation = analyze([(student, teacher)]).correlation
    for stage in STAGES:
        assert abs(correlation.mean_r[stage]) < 0.03
        assert max(abs(r) for r in correlation.channel_r[stage]) < 0.15


def test_student_is_resized_to_the_teacher_for_correlation():
    generator = torch.Generator().manual_seed(2)
    student = random_features(generator, channels=4, sizes=((8, 8), (4, 4)))
    # The teacher is exactly the bilinearly upsampled student, at twice its resolution.
    teacher = {
        stage: 3 * F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False) - 1
        for stage, x in student.items()
    }
    analysis = analyze([(student, teacher)])
    assert analysis.correlation.mean_r["stride 8"] == pytest.approx(1.0, abs=1e-9)
    assert analysis.stage_maps.student["stride 8"].shape == (8, 8)
    assert analysis.stage_maps.teacher["stride 8"].shape == (16, 16)


def test_constant_channel_counts_as_zero_correlation():
    student, teacher = independent_pair(channels=4)
    teacher = {stage: student[stage].clone() for stage in STAGES}
    student["stride 8"][:, 2] = 5.0
    correlation = analyze([(student, teacher)]).correlation
    assert correlation.channel_r["stride 8"] == pytest.approx([1.0, 1.0, 0.0, 1.0])
    assert correlation.mean_r["stride 8"] == pytest.approx(0.75)
    assert all(math.isfinite(r) for r in correlation.channel_r["stride 8"])


def test_several_batches_equal_one_big_batch():
    generator = torch.Generator().manual_seed(3)
    student = random_features(generator, batch=6, channels=8, sizes=((8, 8), (4, 4)))
    teacher = {stage: 0.5 * x + 0.7 * torch.randn(x.shape, generator=generator) + 3 for stage, x in student.items()}
    teacher["stride 16"] = F.interpolate(teacher["stride 16"], size=(6, 6), mode="bilinear", align_corners=False)
    whole = analyze([(student, teacher)])
    parts = analyze(zip(split(student, 3), split(teacher, 3), strict=True))

    assert (parts.num_batches, parts.num_images) == (3, 6)
    assert parts.histogram == whole.histogram
    assert parts.dominance == whole.dominance
    for stage in STAGES:
        assert parts.correlation.channel_r[stage] == pytest.approx(whole.correlation.channel_r[stage], abs=1e-12)
        np.testing.assert_array_equal(parts.stage_maps.teacher[stage], split_first_maps(teacher, stage))
    for part_row, whole_row in zip(parts.table, whole.table, strict=True):
        for name in ("teacher_mean_abs", "teacher_std", "student_mean_abs", "student_std", "pearson_r"):
            assert getattr(part_row, name) == pytest.approx(getattr(whole_row, name), rel=1e-12)


def split_first_maps(teacher, stage):
    """The teacher's stage maps computed by hand: image 0, max over channels, one scale for all stages."""
    maps = {name: x[0].amax(0).numpy() for name, x in teacher.items()}
    low = min(m.min() for m in maps.values())
    high = max(m.max() for m in maps.values())
    return np.rint((maps[stage] - low) / (high - low) * 255).astype(np.uint8)


def test_histogram_bins_are_shared_and_count_every_value():
    student, teacher = independent_pair(channels=4, sizes=((8, 8), (4, 4)))
    teacher = {stage: 30 * x for stage, x in teacher.items()}
    histogram = analyze([(student, teacher)]).histogram
    edges = np.asarray(histogram.edges)
    assert np.all(np.diff(edges) > 0)
    for model in ("teacher", "student"):
        for stage in STAGES:
            counts = getattr(histogram, model)[stage]
            assert len(counts) == len(edges) - 1
            assert sum(counts) == student[stage].numel()
    # Every value lies within its bin, checked against numpy on the same edges.
    for stage in STAGES:
        expected, _ = np.histogram(teacher[stage].numpy(), bins=edges)
        assert np.abs(expected - np.asarray(histogram.teacher[stage])).sum() <= 2  # float32 vs float64 edges
    # Bins are symmetric log-spaced: a constant ratio between consecutive positive edges.
    positive = edges[edges > 1e-4]
    assert np.allclose(positive[1:] / positive[:-1], 10 ** (1 / 10))


def test_histogram_resolution_and_tiny_values():
    features = {"stride 8": torch.tensor([0.0, 1e-9, -1e-9, 1.0, 10.0, -1.0]).reshape(1, 6, 1, 1)}
    histogram = analyze([(features, features)], bins_per_decade=2).histogram
    edges = np.asarray(histogram.edges)
    counts = np.asarray(histogram.teacher["stride 8"])
    centre = int(np.flatnonzero((edges[:-1] < 0) & (edges[1:] > 0))[0])
    assert counts[centre] == 3  # the values indistinguishable from zero share the central bin
    # Bins are [10^(k/2), 10^((k+1)/2)) and mirrored: -1 lies in (-10^0.5, -1], 10 in [10, 10^1.5).
    assert edges[0] == pytest.approx(-(10**0.5)) and edges[-1] == pytest.approx(10**1.5)
    assert counts.sum() == 6


def test_stage_maps_share_one_scale_per_model():
    generator = torch.Generator().manual_seed(4)
    student = random_features(generator, channels=4, sizes=((8, 8), (4, 4)))
    teacher = {stage: x.clone() for stage, x in student.items()}
    teacher["stride 16"] = 50 * teacher["stride 16"] + 100
    maps = analyze([(student, teacher)]).stage_maps
    for model in ("teacher", "student"):
        images = getattr(maps, model)
        assert all(image.dtype == np.uint8 for image in images.values())
        assert max(int(image.max()) for image in images.values()) == 255
        assert min(int(image.min()) for image in images.values()) == 0
    # The teacher's large stage takes the top of the scale and the small one is crushed near 0.
    assert maps.teacher["stride 16"].max() == 255 and maps.teacher["stride 8"].max() < 10
    low, high = maps.teacher_range
    assert high == pytest.approx(float(teacher["stride 16"][0].amax(0).max()))
    assert low == pytest.approx(float(teacher["stride 8"][0].amax(0).min()))


def test_constant_maps_are_zero():
    features = {"stride 8": torch.ones(1, 2, 3, 3)}
    maps = analyze([(features, features)]).stage_maps
    assert maps.teacher["stride 8"].tolist() == [[0] * 3] * 3


def test_table_row_statistics():
    student, teacher = independent_pair(batch=3, channels=5)
    teacher = {stage: 2 * x + 1 for stage, x in teacher.items()}
    analysis = analyze([(student, teacher)])
    for row in analysis.table:
        for model, features in (("teacher", teacher), ("student", student)):
            x = features[row.stage].double()
            assert getattr(row, f"{model}_mean_abs") == pytest.approx(float(x.abs().mean()), rel=1e-12)
            assert getattr(row, f"{model}_std") == pytest.approx(float(x.std()), rel=1e-12)
        assert row.pearson_r == analysis.correlation.mean_r[row.stage]
        assert row.mse_grad_share == analysis.gradients.stage["mse"][row.stage]
    assert [row.stage for row in analysis.table] == list(STAGES)


def test_json_round_trip(tmp_path):
    student, teacher = independent_pair(channels=4, sizes=((8, 8), (4, 4)))
    analysis = analyze([(student, teacher)])
    text = json.dumps(analysis.to_json(), allow_nan=False)
    again = Analysis.from_json(json.loads(text))
    assert again.to_json() == analysis.to_json()
    assert again.stage_maps.teacher["stride 8"].dtype == np.uint8
    loaded = Analysis.load(analysis.save(tmp_path / "analysis.json"))
    assert loaded.to_json() == analysis.to_json()
    assert loaded.table == analysis.table


def test_format_table_lists_every_stage():
    student, teacher = independent_pair(channels=4)
    text = format_table(analyze([(student, teacher)]))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["stage", "|x|", "T"]
    assert sum(line.startswith(stage) for line in lines for stage in STAGES) == 2
    assert "Pearson" in text


def test_accumulator_keeps_stage_order_and_counts():
    accumulator = AnalysisAccumulator()
    for seed in range(3):
        student, teacher = independent_pair(seed)
        # Same stages in a different order: still the first batch's order.
        accumulator.update(dict(reversed(list(student.items()))) if seed else student, teacher)
    analysis = accumulator.result()
    assert analysis.stages == list(STAGES)
    assert analysis.num_images == 6


def test_errors():
    student, teacher = independent_pair()
    with pytest.raises(ValueError, match="no batches"):
        analyze([])
    with pytest.raises(ValueError, match="channel counts differ.*connector"):
        analyze([(student, {stage: x[:, :10] for stage, x in teacher.items()})])
    with pytest.raises(ValueError, match="same, non-empty stages"):
        analyze([(student, {"stride 8": teacher["stride 8"]})])
    with pytest.raises(ValueError, match="batch sizes"):
        analyze([(student, {stage: x[:1] for stage, x in teacher.items()})])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        analyze([({"stride 8": torch.randn(2, 3)}, {"stride 8": torch.randn(2, 3)})])
    bad = {stage: x.clone() for stage, x in teacher.items()}
    bad["stride 16"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="teacher's features contain NaN"):
        analyze([(student, bad)])
    with pytest.raises(ValueError, match="first batch had"):
        analyze([(student, teacher), ({"other": student["stride 8"]}, {"other": teacher["stride 8"]})])
    with pytest.raises(ValueError, match="bins_per_decade"):
        AnalysisAccumulator(bins_per_decade=0)
