"""The five statistics of :mod:`pkd.analysis`, each a result type and a small accumulator.

Every accumulator takes one batch of one stage at a time (``add``), keeps fixed-size state
(nothing grows with the number of batches), and turns it into its result (``result``). The
stage and model bookkeeping, input checks and the summary table are :mod:`pkd.analysis`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pkd.losses import mse_feature_loss, pkd_loss
from pkd.pkd_kernel import combine_moments

__all__ = [
    "ChannelDominance",
    "Correlation",
    "GradientShares",
    "MagnitudeHistogram",
    "StageMaps",
]

MODELS = ("teacher", "student")
LOSS_NAMES = ("mse", "pkd")

# The histogram's fixed grid covers |x| from 1e-4 to 1e6: FPN activations are of order 0.01-100,
# smaller magnitudes are indistinguishable from zero for this purpose (they share one central
# bin), and larger ones (clamped into the outermost bins) would mean a broken model.
_HIST_LOG10_MIN = -4
_HIST_LOG10_MAX = 6
# Elements binned per step: bounds the int64 index temporaries to 32 MiB whatever the batch.
_HIST_CHUNK = 1 << 22


class _Sums:
    """Tensors summed per key (e.g. ``(model, stage)``) over batches."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], Tensor] = {}

    def add(self, key: tuple[str, str], value: Tensor) -> None:
        self.values[key] = self.values[key] + value if key in self.values else value

    def __getitem__(self, key: tuple[str, str]) -> Tensor:
        return self.values[key]


class ChannelMoments:
    """Per-channel count, means and centred co-moments of ``K`` variables, merged exactly.

    Chunks are pooled with :func:`pkd.pkd_kernel.combine_moments` (the pairwise update of Chan,
    Golub and LeVeque), which equals a single pass over all values up to rounding, without raw
    sums of squares (those lose every digit when a channel's mean is far larger than its spread).
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # (K, C) float64
        self.comoment: Tensor | None = None  # (K, K, C) float64: sum of (x_a - mean_a)(x_b - mean_b)

    def update(self, values: Tensor) -> None:
        """Adds one chunk.

        Args:
            values: ``(K, C, M)``: ``M`` new values of ``K`` variables for each of ``C`` channels.
        """
        values = values.double()
        chunk_mean = values.mean(-1)
        centred = values - chunk_mean[..., None]
        chunk_comoment = torch.einsum("acm,bcm->abc", centred, centred).cpu()
        chunk_mean, chunk_count = chunk_mean.cpu(), values.shape[-1]
        if self.mean is None:
            self.count, self.mean, self.comoment = chunk_count, chunk_mean, chunk_comoment
            return
        counts = torch.tensor([self.count, chunk_count], dtype=torch.float64)
        self.mean, self.comoment = combine_moments(
            counts, torch.stack([self.mean, chunk_mean], 1), torch.stack([self.comoment, chunk_comoment], 2)
        )
        self.count += chunk_count

    def add_images(self, *maps: Tensor) -> None:
        """Adds ``(N, C, H, W)`` maps of ``K = len(maps)`` variables, one image at a time.

        One image at a time keeps the float64 copies the size of one image's features.
        """
        channels = maps[0].shape[1]
        for image in range(maps[0].shape[0]):
            self.update(torch.stack([x[image].reshape(channels, -1).double() for x in maps]))


@dataclass
class MagnitudeHistogram:
    """Histogram of activation values per stage and model, on one set of bins for all of them.

    The bins are symmetric and log-spaced: ``bins_per_decade`` per decade of ``|x|`` from 1e-4
    to 1e6 on each side of zero, plus one central bin ``(-1e-4, 1e-4)`` holding the values
    indistinguishable from zero; values beyond ``±1e6`` are counted in the outermost bins. The
    grid is fixed, so batches are binned independently and their counts add up exactly; at the
    end it is cropped to the bins from the first to the last non-empty one over every stage of
    both models. Show the counts on a log scale (and the values on a symlog axis).

    Attributes:
        edges: ``B + 1`` increasing bin edges, shared by every stage of both models.
        teacher: stage name -> ``B`` counts of the teacher's activation values.
        student: stage name -> ``B`` counts of the student's activation values (not resized).
    """

    edges: list[float]
    teacher: dict[str, list[int]]
    student: dict[str, list[int]]


def _histogram_edges(bins_per_decade: int) -> np.ndarray:
    """The fixed symmetric log grid of :class:`MagnitudeHistogram`: ``2K + 2`` edges, ``2K + 1`` bins."""
    decades = _HIST_LOG10_MAX - _HIST_LOG10_MIN
    positive = 10.0 ** (_HIST_LOG10_MIN + np.arange(decades * bins_per_decade + 1) / bins_per_decade)
    return np.concatenate([-positive[::-1], positive])


def _histogram_counts(x: Tensor, bins_per_decade: int) -> Tensor:
    """Counts of ``x``'s values in the bins of :func:`_histogram_edges`, as a CPU int64 tensor."""
    per_side = (_HIST_LOG10_MAX - _HIST_LOG10_MIN) * bins_per_decade
    counts = torch.zeros(2 * per_side + 1, dtype=torch.int64)
    flat = x.detach().reshape(-1)
    for start in range(0, flat.numel(), _HIST_CHUNK):
        values = flat[start : start + _HIST_CHUNK].float()
        magnitude = values.abs()
        # Bin k on the positive side holds [10^(min + k/B), 10^(min + (k+1)/B)); the negative side
        # mirrors it, and the central bin (index per_side) holds everything closer to zero.
        k = ((magnitude.clamp_min(10.0**_HIST_LOG10_MIN).log10() - _HIST_LOG10_MIN) * bins_per_decade).floor()
        k = k.long().clamp(0, per_side - 1)
        index = torch.where(values > 0, per_side + 1 + k, per_side - 1 - k)
        index = torch.where(magnitude < 10.0**_HIST_LOG10_MIN, per_side, index)
        counts += torch.bincount(index, minlength=counts.numel()).cpu()
    return counts


class HistogramAccumulator:
    """Counts of activation values per model and stage on the fixed grid (:class:`MagnitudeHistogram`)."""

    def __init__(self, bins_per_decade: int) -> None:
        self.bins_per_decade = bins_per_decade
        self.counts = _Sums()

    def add(self, model: str, stage: str, x: Tensor) -> None:
        self.counts.add((model, stage), _histogram_counts(x, self.bins_per_decade))

    def result(self, stages: list[str]) -> MagnitudeHistogram:
        edges = _histogram_edges(self.bins_per_decade)
        counts = {model: {stage: self.counts[model, stage].numpy() for stage in stages} for model in MODELS}
        used = np.flatnonzero(sum(c for per_stage in counts.values() for c in per_stage.values()))
        first, last = int(used[0]), int(used[-1])
        cropped = lambda c: [int(n) for n in c[first : last + 1]]  # noqa: E731
        return MagnitudeHistogram(
            edges=[float(e) for e in edges[first : last + 2]],
            teacher={stage: cropped(c) for stage, c in counts["teacher"].items()},
            student={stage: cropped(c) for stage, c in counts["student"].items()},
        )


@dataclass
class ChannelDominance:
    """How many spatial positions each channel wins the argmax over channels at.

    For each stage and model, every position ``(n, u, v)`` is won by the channel with the
    largest activation there (the first one on ties).

    Attributes:
        teacher: stage name -> positions won by each channel, sorted descending (``C`` ints).
        student: the same for the student.
        teacher_top_share: stage name -> share of all positions won by the top 1% of the
            channels, ``ceil(C / 100)`` channels (at least one).
        student_top_share: the same for the student.
    """

    teacher: dict[str, list[int]]
    student: dict[str, list[int]]
    teacher_top_share: dict[str, float]
    student_top_share: dict[str, float]


class DominanceAccumulator:
    """Positions won per channel, per model and stage (:class:`ChannelDominance`)."""

    def __init__(self) -> None:
        self.wins = _Sums()

    def add(self, model: str, stage: str, x: Tensor) -> None:
        self.wins.add((model, stage), torch.bincount(x.argmax(1).reshape(-1), minlength=x.shape[1]).cpu())

    def result(self, stages: list[str]) -> ChannelDominance:
        sorted_wins = {model: {} for model in MODELS}
        top_share = {model: {} for model in MODELS}
        for model in MODELS:
            for stage in stages:
                wins = self.wins[model, stage].sort(descending=True).values
                top = math.ceil(wins.numel() / 100)
                sorted_wins[model][stage] = wins.tolist()
                top_share[model][stage] = float(wins[:top].sum() / wins.sum())
        return ChannelDominance(
            teacher=sorted_wins["teacher"],
            student=sorted_wins["student"],
            teacher_top_share=top_share["teacher"],
            student_top_share=top_share["student"],
        )


class MagnitudeAccumulator:
    """Per-channel moments and sums of ``|x|`` per model and stage: the table's mean ``|x|`` and std,
    and the channel ranking of the gradient deciles."""

    def __init__(self) -> None:
        self.moments: dict[tuple[str, str], ChannelMoments] = {}
        self.abs_sums = _Sums()

    def add(self, model: str, stage: str, x: Tensor) -> None:
        self.moments.setdefault((model, stage), ChannelMoments()).add_images(x)
        self.abs_sums.add((model, stage), x.abs().sum((0, 2, 3), dtype=torch.float64).cpu())

    def mean_abs_std(self, model: str, stage: str) -> tuple[float, float]:
        """Mean ``|x|`` and std of all of a stage's values, from its per-channel moments."""
        moments = self.moments[model, stage]
        channels = moments.mean.shape[1]
        per_channel = moments.count
        total = per_channel * channels
        mean = moments.mean[0].mean()
        # Law of total variance: within-channel spread plus the spread of the channel means.
        sum_sq = moments.comoment[0, 0].sum() + per_channel * (moments.mean[0] - mean).pow(2).sum()
        std = math.sqrt(float(sum_sq) / max(total - 1, 1))
        return float(self.abs_sums[model, stage].sum()) / total, std


@dataclass
class StageMaps:
    """The channel-max map of one image per stage, on one scale per model.

    The maps are ``x[0].amax(0)`` of each stage's features in the first batch. All the stages of
    one model share one linear scale, from the smallest value over its maps (0) to the largest
    (255), so the magnitude gap between stages stays visible; teacher and student are scaled
    separately. A model whose maps are constant gets all zeros.

    Attributes:
        teacher: stage name -> ``(H, W)`` uint8 map at the teacher's resolution.
        student: stage name -> ``(H, W)`` uint8 map at the student's resolution.
        teacher_range: the activation values mapped to 0 and to 255 for the teacher.
        student_range: the same for the student.
    """

    teacher: dict[str, np.ndarray]
    student: dict[str, np.ndarray]
    teacher_range: tuple[float, float]
    student_range: tuple[float, float]


class StageMapAccumulator:
    """The channel-max map of the first image of the first batch (:class:`StageMaps`)."""

    def __init__(self) -> None:
        self.maps: dict[str, dict[str, np.ndarray]] = {model: {} for model in MODELS}

    def add(self, model: str, stage: str, x: Tensor) -> None:
        self.maps[model].setdefault(stage, x[0].float().amax(0).cpu().numpy())

    def result(self, stages: list[str]) -> StageMaps:
        images, ranges = {}, {}
        for model in MODELS:
            maps = self.maps[model]
            low = float(min(m.min() for m in maps.values()))
            high = float(max(m.max() for m in maps.values()))
            scale = 255.0 / (high - low) if high > low else 0.0
            images[model] = {
                stage: np.clip(np.rint((maps[stage] - low) * scale), 0, 255).astype(np.uint8) for stage in stages
            }
            ranges[model] = (low, high)
        return StageMaps(
            teacher=images["teacher"],
            student=images["student"],
            teacher_range=ranges["teacher"],
            student_range=ranges["student"],
        )


@dataclass
class GradientShares:
    """How the distillation gradient w.r.t. the student features splits under MSE and PKD.

    For each batch, the gradient of :func:`~pkd.losses.mse_feature_loss` and of
    :func:`~pkd.losses.pkd_loss` (summed over stages, as the losses do) w.r.t. the raw student
    features is taken, and its squared norm is summed per stage and channel over the batches.
    Shares are fractions of the total (all zeros when the gradient is zero). PKD's batch
    statistics make its gradient depend on how the data is split into batches, so unlike the
    other items these shares are those of the batches given, not of one big batch.

    Attributes:
        stage: loss name (``"mse"``, ``"pkd"``) -> stage name -> share of the squared norm.
        decile: loss name -> 10 shares of the squared norm, one per channel decile: the channels
            of each stage are ranked by the teacher channel's mean ``|x|`` and decile 1 (index
            0) is the 10% largest; deciles are pooled across stages. With fewer than 10 channels
            in a stage some of its deciles are empty.
    """

    stage: dict[str, dict[str, float]]
    decile: dict[str, list[float]]


class GradientAccumulator:
    """Squared norms of MSE's and PKD's gradients per stage and channel (:class:`GradientShares`)."""

    def __init__(self) -> None:
        self.squared = _Sums()  # (loss, stage) -> (C,)

    def add(self, stages: list[str], student: dict[str, Tensor], teacher: dict[str, Tensor]) -> None:
        """Adds one batch of every stage (the losses sum over stages, so their gradients need all)."""
        teacher = {stage: teacher[stage].detach() for stage in stages}
        for loss_name, loss in (("mse", mse_feature_loss), ("pkd", pkd_loss)):
            inputs = {stage: student[stage].detach().float().requires_grad_() for stage in stages}
            grads = torch.autograd.grad(loss(inputs, teacher), list(inputs.values()))
            for stage, grad in zip(stages, grads, strict=True):
                self.squared.add((loss_name, stage), grad.double().pow(2).sum((0, 2, 3)).cpu())

    def result(self, stages: list[str], teacher_abs_sums: dict[str, Tensor]) -> GradientShares:
        """The shares, with channels ranked into deciles by the teacher's ``|x|`` sums per stage."""
        deciles = {}
        for stage in stages:
            order = teacher_abs_sums[stage].argsort(descending=True, stable=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            deciles[stage] = rank * 10 // order.numel()
        stage_shares, decile_shares = {}, {}
        for loss_name in LOSS_NAMES:
            per_stage = {stage: float(self.squared[loss_name, stage].sum()) for stage in stages}
            pooled = sum(
                torch.zeros(10, dtype=torch.float64).index_add_(0, deciles[stage], self.squared[loss_name, stage])
                for stage in stages
            )
            total = sum(per_stage.values())
            # A zero gradient (student equal to teacher under MSE) has no split: all shares are 0.
            scale = 1.0 / total if total > 0 else 0.0
            stage_shares[loss_name] = {stage: value * scale for stage, value in per_stage.items()}
            decile_shares[loss_name] = [float(value) * scale for value in pooled]
        return GradientShares(stage=stage_shares, decile=decile_shares)


@dataclass
class Correlation:
    """Pearson correlation between student and teacher, per channel over all ``N*H*W`` values.

    The quantity PKD maximises: its loss is, per channel, ``(m - 1) / m * (1 - r)``. Computed
    exactly over all batches from running per-channel moments. A channel that is constant on
    either side has no defined ``r``; it counts as 0, as in PKD's loss.

    Attributes:
        mean_r: stage name -> mean of ``r`` over the stage's channels.
        channel_r: stage name -> ``r`` of each channel (``C`` floats).
    """

    mean_r: dict[str, float]
    channel_r: dict[str, list[float]]


class CorrelationAccumulator:
    """Joint per-channel moments of (student, teacher) per stage (:class:`Correlation`)."""

    def __init__(self) -> None:
        self.moments: dict[str, ChannelMoments] = {}

    def add(self, stage: str, student: Tensor, teacher: Tensor) -> None:
        """``student`` and ``teacher`` ``(N, C, H, W)``, already at the same spatial size."""
        self.moments.setdefault(stage, ChannelMoments()).add_images(student, teacher)

    def result(self, stages: list[str]) -> Correlation:
        mean_r, channel_r = {}, {}
        for stage in stages:
            comoment = self.moments[stage].comoment
            var_s, var_t, cov = comoment[0, 0], comoment[1, 1], comoment[0, 1]
            defined = (var_s > 0) & (var_t > 0)
            r = torch.where(defined, cov / (var_s * var_t).sqrt().clamp_min(1e-300), 0.0).clamp(-1.0, 1.0)
            channel_r[stage] = r.tolist()
            mean_r[stage] = float(r.mean())
        return Correlation(mean_r=mean_r, channel_r=channel_r)
