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
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pkd.feature_stats import (
    MODELS,
    ChannelDominance,
    Correlation,
    CorrelationAccumulator,
    DominanceAccumulator,
    GradientAccumulator,
    GradientShares,
    HistogramAccumulator,
    MagnitudeAccumulator,
    MagnitudeHistogram,
    StageMapAccumulator,
    StageMaps,
)
from pkd.losses import match_sizes

# The item types live with their accumulators in pkd.feature_stats; they are named here too.
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


class AnalysisAccumulator:
    """Accumulates the items of :class:`Analysis` batch by batch in bounded memory.

    It checks each batch and hands every stage to the statistics' own accumulators
    (:mod:`pkd.feature_stats`), each of fixed size: nothing grows with the number of batches.

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
        self.stages: list[str] = []
        self.channels: dict[str, int] = {}
        self.num_batches = 0
        self.num_images = 0
        self.histogram = HistogramAccumulator(int(bins_per_decade))
        self.dominance = DominanceAccumulator()
        self.magnitude = MagnitudeAccumulator()
        self.stage_maps = StageMapAccumulator()
        self.correlation = CorrelationAccumulator()
        self.gradients = GradientAccumulator()

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
        for stage in self.stages:
            features = {"student": student[stage].detach(), "teacher": teacher[stage].detach()}
            for model, x in features.items():
                for statistic in (self.histogram, self.dominance, self.magnitude, self.stage_maps):
                    statistic.add(model, stage, x)
            # Wherever the two are compared, the student is brought to the teacher's size, as the loss does.
            self.correlation.add(stage, *match_sizes(features["student"].float(), features["teacher"]))
        self.gradients.add(self.stages, student, teacher)
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

    def result(self) -> Analysis:
        """The analysis of all batches added so far.

        Raises:
            ValueError: no batch was added.
        """
        if self.num_batches == 0:
            raise ValueError("no batches to analyse: call update() with at least one (student, teacher) batch")
        stages = self.stages
        dominance = self.dominance.result(stages)
        teacher_abs_sums = {stage: self.magnitude.abs_sums["teacher", stage] for stage in stages}
        gradients = self.gradients.result(stages, teacher_abs_sums)
        correlation = self.correlation.result(stages)
        stats = {model: {stage: self.magnitude.mean_abs_std(model, stage) for stage in stages} for model in MODELS}
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
            for stage in stages
        ]
        return Analysis(
            stages=list(stages),
            num_batches=self.num_batches,
            num_images=self.num_images,
            histogram=self.histogram.result(stages),
            dominance=dominance,
            stage_maps=self.stage_maps.result(stages),
            gradients=gradients,
            correlation=correlation,
            table=table,
        )


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
    from pkd.build import build_dataset, build_distiller, build_model, load_detector, resolve_device
    from pkd.checkpoint import load_checkpoint
    from pkd.data import build_loader

    if config.teacher is None and teacher_checkpoint is None:
        raise ValueError("inspect needs a teacher: a config with a teacher section or --teacher-checkpoint")
    dataset = build_dataset(config.data, split)
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
        trained = stored.get("connectors") if stored.get("kind") == "run" else None
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
