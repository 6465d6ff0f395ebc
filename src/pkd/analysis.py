"""What PKD fixes, measured on a user's own teacher/student pair.

PKD (Cao et al., NeurIPS 2022, https://arxiv.org/abs/2207.02039) is motivated by three
observations about FPN features that make plain MSE imitation fail: teacher and student
activations live on different scales, a few FPN stages have much larger activations and take
most of MSE's gradient, and a few channels win the per-pixel argmax almost everywhere. This
module measures those on already-paired features, one batch at a time:

1. :class:`MagnitudeHistogram`: activation values per stage and model, on shared bins.
2. :class:`ChannelDominance`: how many positions each channel wins the argmax over channels.
3. :class:`StageMaps`: the channel-max map of one image per stage, on one scale per model.
4. :class:`GradientShares`: how the distillation gradient splits over stages and channel
   deciles under MSE imitation and under PKD.
5. :class:`Correlation`: the per-channel Pearson correlation PKD maximises.

A *stage* is one paired FPN level, named by the caller (e.g. ``"stride 8"``). Each batch is a
pair of dicts ``student, teacher`` from stage name to ``(N, C, H, W)`` features with equal
channel counts (pass the student through its connector first when they differ); the spatial
sizes may differ, and wherever the two are compared the student is resized to the teacher's
size bilinearly, as the loss does. Every item is accumulated per batch into fixed-size
statistics, so memory does not grow with the number of batches, and all but the gradient
shares equal what one big batch would give.

Example:
    >>> student = {"stride 8": torch.randn(2, 16, 32, 32), "stride 16": torch.randn(2, 16, 16, 16)}
    >>> teacher = {name: 10 * x + 1 for name, x in student.items()}
    >>> analysis = analyze([(student, teacher)])
    >>> [round(analysis.correlation.mean_r[stage], 3) for stage in analysis.stages]
    [1.0, 1.0]
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pkd.losses import mse_feature_loss, pkd_loss

__all__ = [
    "Analysis",
    "AnalysisAccumulator",
    "ChannelDominance",
    "Correlation",
    "GradientShares",
    "MagnitudeHistogram",
    "StageMaps",
    "StageSummary",
    "analyze",
    "format_table",
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


@dataclass
class StageSummary:
    """One row of the console table: a stage at a glance.

    Attributes:
        stage: stage name.
        teacher_mean_abs: mean ``|x|`` of the teacher's activations.
        teacher_std: standard deviation of the teacher's activations (all channels together).
        student_mean_abs: mean ``|x|`` of the student's activations.
        student_std: standard deviation of the student's activations.
        teacher_top_share: share of positions won by the teacher's top 1% of channels.
        student_top_share: the same for the student.
        pearson_r: mean over channels of the student/teacher Pearson correlation.
        mse_grad_share: share of MSE's gradient (squared norm) this stage receives.
        pkd_grad_share: share of PKD's gradient this stage receives.
    """

    stage: str
    teacher_mean_abs: float
    teacher_std: float
    student_mean_abs: float
    student_std: float
    teacher_top_share: float
    student_top_share: float
    pearson_r: float
    mse_grad_share: float
    pkd_grad_share: float


@dataclass
class Analysis:
    """Everything :func:`analyze` measures on a teacher/student pair.

    Attributes:
        stages: stage names in the order of the first batch.
        num_batches: batches analysed.
        num_images: images analysed (sum of the batch sizes).
        histogram: activation values per stage and model (item 1).
        dominance: positions won per channel (item 2).
        stage_maps: channel-max maps of the first image (item 3).
        gradients: distillation gradient shares, MSE vs PKD (item 4).
        correlation: per-channel Pearson correlation (item 5).
        table: one :class:`StageSummary` per stage.
    """

    stages: list[str]
    num_batches: int
    num_images: int
    histogram: MagnitudeHistogram
    dominance: ChannelDominance
    stage_maps: StageMaps
    gradients: GradientShares
    correlation: Correlation
    table: list[StageSummary]

    def to_json(self) -> dict:
        """A dict of plain lists, numbers and strings that :func:`json.dumps` accepts."""
        maps = self.stage_maps
        return {
            "stages": list(self.stages),
            "num_batches": self.num_batches,
            "num_images": self.num_images,
            "histogram": asdict(self.histogram),
            "dominance": asdict(self.dominance),
            "stage_maps": {
                "teacher": {stage: image.tolist() for stage, image in maps.teacher.items()},
                "student": {stage: image.tolist() for stage, image in maps.student.items()},
                "teacher_range": list(maps.teacher_range),
                "student_range": list(maps.student_range),
            },
            "gradients": asdict(self.gradients),
            "correlation": asdict(self.correlation),
            "table": [asdict(row) for row in self.table],
        }

    @classmethod
    def from_json(cls, data: Mapping) -> Analysis:
        """Rebuilds an :class:`Analysis` from the output of :meth:`to_json`."""
        maps = data["stage_maps"]
        as_image = lambda rows: np.asarray(rows, dtype=np.uint8)  # noqa: E731
        return cls(
            stages=list(data["stages"]),
            num_batches=int(data["num_batches"]),
            num_images=int(data["num_images"]),
            histogram=MagnitudeHistogram(**data["histogram"]),
            dominance=ChannelDominance(**data["dominance"]),
            stage_maps=StageMaps(
                teacher={stage: as_image(rows) for stage, rows in maps["teacher"].items()},
                student={stage: as_image(rows) for stage, rows in maps["student"].items()},
                teacher_range=tuple(maps["teacher_range"]),
                student_range=tuple(maps["student_range"]),
            ),
            gradients=GradientShares(**data["gradients"]),
            correlation=Correlation(**data["correlation"]),
            table=[StageSummary(**row) for row in data["table"]],
        )

    def save(self, path: str | Path) -> Path:
        """Writes :meth:`to_json` to ``path`` (e.g. ``analysis.json``) and returns the path."""
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), allow_nan=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        """Reads an :class:`Analysis` written by :meth:`save`."""
        return cls.from_json(json.loads(Path(path).read_text()))


class _ChannelMoments:
    """Per-channel count, means and centred co-moments of ``K`` variables, merged exactly.

    Chunks are merged with the pairwise update of Chan, Golub and LeVeque,
    ``M_ab = M_ab' + M_ab'' + d_a * d_b * n' * n'' / n`` with ``d`` the difference of the chunk
    means, which equals a single pass over all values up to rounding, without raw sums of
    squares (those lose every digit when a channel's mean is far larger than its spread).
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
        chunk_count = values.shape[-1]
        chunk_mean = values.mean(-1)
        centred = values - chunk_mean[..., None]
        chunk_comoment = torch.einsum("acm,bcm->abc", centred, centred).cpu()
        chunk_mean = chunk_mean.cpu()
        if self.mean is None:
            self.count, self.mean, self.comoment = chunk_count, chunk_mean, chunk_comoment
            return
        total = self.count + chunk_count
        delta = chunk_mean - self.mean
        self.comoment += chunk_comoment + delta[:, None] * delta[None] * (self.count * chunk_count / total)
        self.mean += delta * (chunk_count / total)
        self.count = total


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


class AnalysisAccumulator:
    """Accumulates the items of :class:`Analysis` batch by batch in bounded memory.

    Per stage and model it keeps histogram counts, argmax counts and per-channel moments (all of
    fixed size), the squared gradient norms per channel, and the first image's channel-max maps;
    nothing grows with the number of batches.

    Args:
        bins_per_decade: histogram resolution, bins per decade of ``|x|`` (see
            :class:`MagnitudeHistogram`).

    Example:
        >>> accumulator = AnalysisAccumulator()
        >>> for _ in range(3):
        ...     student = {"stride 8": torch.randn(2, 8, 16, 16)}
        ...     accumulator.update(student, {"stride 8": 2 * student["stride 8"]})
        >>> accumulator.result().num_images
        6
    """

    def __init__(self, *, bins_per_decade: int = 10) -> None:
        if bins_per_decade < 1:
            raise ValueError(f"bins_per_decade must be >= 1, got {bins_per_decade}")
        self.bins_per_decade = int(bins_per_decade)
        self.stages: list[str] = []
        self.channels: dict[str, int] = {}
        self.num_batches = 0
        self.num_images = 0
        # model -> stage -> statistic
        self._histograms = {model: {} for model in MODELS}
        self._wins = {model: {} for model in MODELS}
        self._moments = {model: {} for model in MODELS}
        self._abs_sums = {model: {} for model in MODELS}
        self._first_maps = {model: {} for model in MODELS}
        # stage -> moments of (resized student, teacher) pairs; loss -> stage -> (C,) squared norms
        self._pair_moments: dict[str, _ChannelMoments] = {}
        self._grad_sq = {loss: {} for loss in LOSS_NAMES}

    def update(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> None:
        """Adds one batch.

        Args:
            student: stage name -> student features ``(N, C, H, W)``.
            teacher: stage name -> teacher features ``(N, C, H', W')``, same stages, batch size
                and channels as ``student``.

        Raises:
            ValueError: the stages differ from each other or from the first batch's, a tensor is
                not ``(N, C, H, W)``, batch sizes or channel counts differ, or a value is not finite.
        """
        self._check(student, teacher)
        first_batch = self.num_batches == 0
        for stage in self.stages:
            student_x, teacher_x = student[stage].detach(), teacher[stage].detach()
            self._add_model_statistics("student", stage, student_x, first_batch)
            self._add_model_statistics("teacher", stage, teacher_x, first_batch)
            self._add_pair_statistics(stage, student_x, teacher_x)
        self._add_gradients(student, teacher)
        self.num_batches += 1
        self.num_images += next(iter(student.values())).shape[0]

    def _check(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> None:
        if not isinstance(student, Mapping) or not isinstance(teacher, Mapping):
            raise TypeError(
                f"expected dicts of stage name -> features, got {type(student).__name__} and {type(teacher).__name__}"
            )
        if not student or set(student) != set(teacher):
            raise ValueError(
                f"student and teacher must have the same, non-empty stages: student has {list(student)}, "
                f"teacher has {list(teacher)}"
            )
        if self.stages and set(student) != set(self.stages):
            raise ValueError(f"this batch has stages {list(student)}, the first batch had {self.stages}")
        batch = None
        for stage in student:
            student_x, teacher_x = student[stage], teacher[stage]
            shapes = (
                f"student {tuple(getattr(student_x, 'shape', ()))}, teacher {tuple(getattr(teacher_x, 'shape', ()))}"
            )
            if not all(isinstance(x, Tensor) and x.dim() == 4 for x in (student_x, teacher_x)):
                raise ValueError(f"stage {stage!r}: expected tensors of shape (N, C, H, W), got {shapes}")
            if student_x.shape[1] != teacher_x.shape[1]:
                raise ValueError(
                    f"stage {stage!r}: channel counts differ ({shapes}); the correlation and gradient analyses "
                    "compare channel by channel, so pass the student features through their connector "
                    "(a 1x1 conv to the teacher's channels) first"
                )
            if student_x.shape[0] != teacher_x.shape[0] or (batch is not None and student_x.shape[0] != batch):
                raise ValueError(f"stage {stage!r}: batch sizes must be equal across models and stages, got {shapes}")
            if student_x.numel() == 0 or teacher_x.numel() == 0:
                raise ValueError(f"stage {stage!r}: empty features, {shapes}")
            batch = student_x.shape[0]
            if stage in self.channels and student_x.shape[1] != self.channels[stage]:
                raise ValueError(
                    f"stage {stage!r}: {student_x.shape[1]} channels in this batch, {self.channels[stage]} in the first"
                )
            for model, x in (("student", student_x), ("teacher", teacher_x)):
                if not torch.isfinite(x).all():
                    raise ValueError(f"stage {stage!r}: the {model}'s features contain NaN or infinity")
        if not self.stages:
            self.stages = list(student)
            self.channels = {stage: student[stage].shape[1] for stage in self.stages}

    def _add_model_statistics(self, model: str, stage: str, x: Tensor, first_batch: bool) -> None:
        channels = x.shape[1]
        counts = _histogram_counts(x, self.bins_per_decade)
        histograms = self._histograms[model]
        histograms[stage] = histograms[stage] + counts if stage in histograms else counts

        wins = torch.bincount(x.argmax(1).reshape(-1), minlength=channels).cpu()
        self._wins[model][stage] = self._wins[model][stage] + wins if stage in self._wins[model] else wins

        moments = self._moments[model].setdefault(stage, _ChannelMoments())
        abs_sum = torch.zeros(channels, dtype=torch.float64)
        # One image at a time, so the float64 copies stay the size of one image's features.
        for image in range(x.shape[0]):
            values = x[image].reshape(channels, -1).double()
            moments.update(values[None])
            abs_sum += values.abs().sum(1).cpu()
        self._abs_sums[model][stage] = self._abs_sums[model].get(stage, 0) + abs_sum

        if first_batch:
            self._first_maps[model][stage] = x[0].float().amax(0).cpu().numpy()

    def _add_pair_statistics(self, stage: str, student: Tensor, teacher: Tensor) -> None:
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(student.float(), size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        pair = self._pair_moments.setdefault(stage, _ChannelMoments())
        channels = teacher.shape[1]
        # One image at a time, so the float64 copies stay the size of one image's features.
        for image in range(teacher.shape[0]):
            student_values = student[image].reshape(channels, -1).double()
            teacher_values = teacher[image].reshape(channels, -1).double()
            pair.update(torch.stack([student_values, teacher_values]))

    def _add_gradients(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> None:
        teacher = {stage: teacher[stage].detach() for stage in self.stages}
        for loss_name, loss in (("mse", mse_feature_loss), ("pkd", pkd_loss)):
            inputs = {stage: student[stage].detach().float().requires_grad_() for stage in self.stages}
            grads = torch.autograd.grad(loss(inputs, teacher), list(inputs.values()))
            for stage, grad in zip(self.stages, grads, strict=True):
                squared = grad.double().pow(2).sum((0, 2, 3)).cpu()
                sums = self._grad_sq[loss_name]
                sums[stage] = sums[stage] + squared if stage in sums else squared

    def result(self) -> Analysis:
        """The analysis of all batches added so far.

        Raises:
            ValueError: no batch was added.
        """
        if self.num_batches == 0:
            raise ValueError("no batches to analyse: call update() with at least one (student, teacher) batch")
        dominance = self._dominance()
        gradients = self._gradient_shares()
        correlation = self._correlation()
        stats = {model: {stage: self._stage_mean_abs_std(model, stage) for stage in self.stages} for model in MODELS}
        table = [
            StageSummary(
                stage=stage,
                teacher_mean_abs=stats["teacher"][stage][0],
                teacher_std=stats["teacher"][stage][1],
                student_mean_abs=stats["student"][stage][0],
                student_std=stats["student"][stage][1],
                teacher_top_share=dominance.teacher_top_share[stage],
                student_top_share=dominance.student_top_share[stage],
                pearson_r=correlation.mean_r[stage],
                mse_grad_share=gradients.stage["mse"][stage],
                pkd_grad_share=gradients.stage["pkd"][stage],
            )
            for stage in self.stages
        ]
        return Analysis(
            stages=list(self.stages),
            num_batches=self.num_batches,
            num_images=self.num_images,
            histogram=self._histogram(),
            dominance=dominance,
            stage_maps=self._stage_maps(),
            gradients=gradients,
            correlation=correlation,
            table=table,
        )

    def _histogram(self) -> MagnitudeHistogram:
        edges = _histogram_edges(self.bins_per_decade)
        counts = {model: {stage: self._histograms[model][stage].numpy() for stage in self.stages} for model in MODELS}
        used = np.flatnonzero(sum(c for per_stage in counts.values() for c in per_stage.values()))
        first, last = int(used[0]), int(used[-1])
        cropped = lambda c: [int(n) for n in c[first : last + 1]]  # noqa: E731
        return MagnitudeHistogram(
            edges=[float(e) for e in edges[first : last + 2]],
            teacher={stage: cropped(c) for stage, c in counts["teacher"].items()},
            student={stage: cropped(c) for stage, c in counts["student"].items()},
        )

    def _dominance(self) -> ChannelDominance:
        sorted_wins = {model: {} for model in MODELS}
        top_share = {model: {} for model in MODELS}
        for model in MODELS:
            for stage in self.stages:
                wins = self._wins[model][stage].sort(descending=True).values
                top = math.ceil(wins.numel() / 100)
                sorted_wins[model][stage] = wins.tolist()
                top_share[model][stage] = float(wins[:top].sum() / wins.sum())
        return ChannelDominance(
            teacher=sorted_wins["teacher"],
            student=sorted_wins["student"],
            teacher_top_share=top_share["teacher"],
            student_top_share=top_share["student"],
        )

    def _stage_maps(self) -> StageMaps:
        images, ranges = {}, {}
        for model in MODELS:
            maps = self._first_maps[model]
            low = float(min(m.min() for m in maps.values()))
            high = float(max(m.max() for m in maps.values()))
            scale = 255.0 / (high - low) if high > low else 0.0
            images[model] = {
                stage: np.clip(np.rint((maps[stage] - low) * scale), 0, 255).astype(np.uint8) for stage in self.stages
            }
            ranges[model] = (low, high)
        return StageMaps(
            teacher=images["teacher"],
            student=images["student"],
            teacher_range=ranges["teacher"],
            student_range=ranges["student"],
        )

    def _gradient_shares(self) -> GradientShares:
        # Decile of each channel: rank by the teacher channel's mean |x| over all batches, largest first.
        deciles = {}
        for stage in self.stages:
            rank = torch.empty(self.channels[stage], dtype=torch.int64)
            order = self._abs_sums["teacher"][stage].argsort(descending=True, stable=True)
            rank[order] = torch.arange(order.numel())
            deciles[stage] = rank * 10 // order.numel()
        stage_shares, decile_shares = {}, {}
        for loss_name in LOSS_NAMES:
            per_channel = self._grad_sq[loss_name]
            per_stage = {stage: float(per_channel[stage].sum()) for stage in self.stages}
            pooled = sum(
                torch.zeros(10, dtype=torch.float64).index_add_(0, deciles[stage], per_channel[stage])
                for stage in self.stages
            )
            total = sum(per_stage.values())
            # A zero gradient (student equal to teacher under MSE) has no split: all shares are 0.
            scale = 1.0 / total if total > 0 else 0.0
            stage_shares[loss_name] = {stage: value * scale for stage, value in per_stage.items()}
            decile_shares[loss_name] = [float(value) * scale for value in pooled]
        return GradientShares(stage=stage_shares, decile=decile_shares)

    def _correlation(self) -> Correlation:
        mean_r, channel_r = {}, {}
        for stage in self.stages:
            comoment = self._pair_moments[stage].comoment
            var_s, var_t, cov = comoment[0, 0], comoment[1, 1], comoment[0, 1]
            defined = (var_s > 0) & (var_t > 0)
            r = torch.where(defined, cov / (var_s * var_t).sqrt().clamp_min(1e-300), 0.0).clamp(-1.0, 1.0)
            channel_r[stage] = r.tolist()
            mean_r[stage] = float(r.mean())
        return Correlation(mean_r=mean_r, channel_r=channel_r)

    def _stage_mean_abs_std(self, model: str, stage: str) -> tuple[float, float]:
        """Mean |x| and std of all of a stage's values, from its per-channel moments."""
        moments = self._moments[model][stage]
        channels = moments.mean.shape[1]
        per_channel = moments.count
        total = per_channel * channels
        mean = moments.mean[0].mean()
        # Law of total variance: within-channel spread plus the spread of the channel means.
        sum_sq = moments.comoment[0, 0].sum() + per_channel * (moments.mean[0] - mean).pow(2).sum()
        std = math.sqrt(float(sum_sq) / max(total - 1, 1))
        return float(self._abs_sums[model][stage].sum()) / total, std


def analyze(
    batches: Iterable[tuple[Mapping[str, Tensor], Mapping[str, Tensor]]], *, bins_per_decade: int = 10
) -> Analysis:
    """Measures what PKD fixes on a teacher/student pair, batch by batch.

    Args:
        batches: ``(student, teacher)`` pairs of dicts stage name -> features ``(N, C, H, W)``
            (see :meth:`AnalysisAccumulator.update`); consumed one at a time, so a generator
            that runs the models lazily keeps memory bounded.
        bins_per_decade: histogram resolution, bins per decade of ``|x|``.

    Returns:
        The :class:`Analysis` of all batches.

    Raises:
        ValueError: no batches, or a batch the accumulator rejects.
    """
    accumulator = AnalysisAccumulator(bins_per_decade=bins_per_decade)
    for student, teacher in batches:
        accumulator.update(student, teacher)
    return accumulator.result()


def format_table(analysis: Analysis) -> str:
    """The per-stage summary as an aligned plain-text table for the console.

    Columns: mean ``|x|`` and std of teacher (T) and student (S), the share of positions won by
    the top 1% of channels, the mean Pearson r, and the share of MSE's and PKD's gradient.
    """
    header = ["stage", "|x| T", "std T", "|x| S", "std S", "top1% T", "top1% S", "r", "grad MSE", "grad PKD"]
    rows = [
        [
            row.stage,
            f"{row.teacher_mean_abs:.3g}",
            f"{row.teacher_std:.3g}",
            f"{row.student_mean_abs:.3g}",
            f"{row.student_std:.3g}",
            f"{row.teacher_top_share:.1%}",
            f"{row.student_top_share:.1%}",
            f"{row.pearson_r:+.3f}",
            f"{row.mse_grad_share:.1%}",
            f"{row.pkd_grad_share:.1%}",
        ]
        for row in analysis.table
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    # Stage names left-aligned, numbers right-aligned so their digits line up.
    format_line = lambda line: "  ".join(  # noqa: E731
        cell.ljust(width) if i == 0 else cell.rjust(width)
        for i, (cell, width) in enumerate(zip(line, widths, strict=True))
    )
    lines = [format_line(header), "  ".join("-" * width for width in widths), *map(format_line, rows)]
    legend = [
        f"{analysis.num_images} images in {analysis.num_batches} batches. T = teacher, S = student.",
        "top1% = share of positions whose argmax over channels is one of the top 1% of channels.",
        "r = mean per-channel Pearson r (what PKD maximises).",
        "grad = share of the distillation gradient's squared norm under MSE imitation and under PKD.",
    ]
    return "\n".join([*lines, "", *legend])


def inspect_pair(
    config,
    *,
    student_checkpoint: str | Path | None = None,
    teacher_checkpoint: str | Path | None = None,
    batches: int = 4,
    split: str = "val",
    batch_size: int | None = None,
    bins_per_decade: int = 10,
) -> Analysis:
    """Runs the analysis on a config's teacher and student for a few batches of a split.

    The pair is built as ``pkd distill`` builds it (the same level pairing; checkpoints, when
    given, replace the config's weights), the batches are those of the split's evaluation
    loader, and both models see the student's eval-mode transform of each batch.

    Args:
        config: a :class:`~pkd.config.Config` with ``teacher`` (and ``distill``) sections.
        student_checkpoint: pkd run checkpoint or export of the student (its trained
            connectors, if any, are loaded from a run checkpoint).
        teacher_checkpoint: pkd checkpoint of the teacher.
        batches: number of batches to analyse.
        split: ``"val"``, ``"test"`` or ``"train"`` (train images without augmentation).
        batch_size: images per batch (default: the config's).
        bins_per_decade: histogram resolution.

    Returns:
        The :class:`Analysis` of the distilled pairs (stages named after the pairs, e.g. "s8").
    """
    from pkd.build import build_distiller, build_model, load_detector, resolve_device
    from pkd.checkpoint import load_checkpoint
    from pkd.data import CocoDetection, build_loader, eval_transforms

    if config.teacher is None and teacher_checkpoint is None:
        raise ValueError("inspect needs a teacher: a config with a teacher section or --teacher-checkpoint")
    section = getattr(config.data, split)
    if section is None:
        raise ValueError(f"data.{split}: the config has no {split} split")
    dataset = CocoDetection(section.annotations, section.images, transforms=eval_transforms())
    sizes = dict(eval_size=config.data.eval_size, max_size=config.data.max_size)
    if student_checkpoint is not None:
        student, _ = load_detector(student_checkpoint)
    else:
        student, _ = build_model(config.model, num_classes=dataset.num_classes, **sizes)
    if teacher_checkpoint is not None:
        teacher, _ = load_detector(teacher_checkpoint)
    else:
        teacher, _ = build_model(config.teacher, num_classes=dataset.num_classes, **sizes)
    distiller = build_distiller(student, teacher, config.distill)
    if distiller.connectors:
        stored = load_checkpoint(student_checkpoint) if student_checkpoint is not None else {}
        trained = stored.get("extra", {}).get("connectors") if stored.get("kind") == "run" else None
        if not trained:
            raise ValueError(
                "the pair needs connectors (channel counts differ) and no trained ones were given: pass the "
                "student's run checkpoint (last.pt / best.pt of a `pkd distill` run) as --student-checkpoint"
            )
        distiller.load_connector_state_dict(trained)
    device = resolve_device(config.train.device)
    distiller.to(device).eval()
    loader = build_loader(
        dataset, batch_size=batch_size or config.train.batch_size, train=False, workers=0, distributed=False, seed=0
    )
    accumulator = AnalysisAccumulator(bins_per_decade=bins_per_decade)
    for index, (images, _, _) in enumerate(loader):
        if index >= batches:
            break
        student_features, teacher_features = distiller.paired_features([image.to(device) for image in images])
        accumulator.update(
            {k: v.float().cpu() for k, v in student_features.items()},
            {k: v.float().cpu() for k, v in teacher_features.items()},
        )
    return accumulator.result()
