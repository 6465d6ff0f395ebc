"""Teacher + student: the student detector trained with its own losses plus FPN imitation.

This is the framework of PKD (Cao et al., NeurIPS 2022, https://arxiv.org/abs/2207.02039): a
frozen teacher detector runs its backbone + FPN (never its heads) on exactly the batch the
student sees, and the student's FPN levels are pulled towards the teacher's with a feature loss
(PKD by default) added to the student's detection losses. Teacher and student may be different
kinds of detectors (two-stage Faster / Mask R-CNN teacher, one-stage RetinaNet / FCOS student).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pkd.families import describe
from pkd.features import FeatureTap, LevelPair, as_levels, build_connectors, pair_levels, submodule
from pkd.losses import LOSSES, match_sizes

__all__ = ["Distiller", "default_weight"]

LevelLoss = Callable[[Tensor, Tensor], Tensor]


def default_weight(teacher: nn.Module) -> float:
    """The weight the teacher declares (:attr:`pkd.detector.DetectorSpec.distill_weight`).

    For torchvision teachers it is the reference configs': 6 two-stage, 10 one-stage.
    """
    return describe(teacher).distill_weight


class Distiller(nn.Module):
    """A student detector distilled from a frozen teacher detector's FPN features.

    In training mode ``forward(images, targets)`` runs the student as usual (its transform,
    backbone + FPN, heads and losses), records the student's FPN levels and the normalised,
    padded batch its backbone saw, runs the teacher's backbone + FPN on that same batch under
    ``torch.no_grad`` and adds one weighted feature loss per level pair. The returned dict is the
    student's losses plus ``"loss_distill/<pair>"`` entries, so ``sum(losses.values())`` is the
    total to minimise. In eval mode it is the student.

    The teacher is frozen: ``requires_grad=False``, always in eval mode (BatchNorm statistics
    untouched), and only its backbone is called. It runs under ``no_grad`` rather than
    ``inference_mode`` because its features are saved for the student's backward.

    ``state_dict()`` is the student's own (no teacher, no connectors): it loads with
    ``strict=True`` into the plain torchvision detector. Connectors are saved with
    :meth:`connector_state_dict`.

    Args:
        student: the detector to train (a :class:`pkd.detector.Detector`: ``transform`` then ``backbone``).
        teacher: the detector to imitate; frozen here.
        loss: ``"pkd"``, ``"mse"``, ``"cwd"`` (see :data:`pkd.losses.LOSSES`) or a callable
            ``(student_level, teacher_level) -> scalar`` on ``(N, C, H, W)`` maps of equal shape.
        weight: loss weight (alpha); default 6 with a two-stage teacher, 10 with a one-stage one,
            as the reference configs.
        levels: which pairs to distil (strides for stride pairing, positions for index pairing);
            default the first ``max_levels``.
        pairing: ``"stride"`` (levels of equal stride), ``"index"`` (by position, the reference)
            or an explicit list of ``(student, teacher)`` level names or strides.
        max_levels: default number of pairs (4, as the reference).
        connectors: add a learnable 1x1 conv on the student side for each pair whose channel
            counts differ; without it such a pair is an error.
        distill_until: stop distilling (and running the teacher) from this training step on.
        warmup_steps: ramp the weight linearly from ``weight / warmup_steps`` to ``weight``.
        resize: when a pair's spatial sizes differ, resize the ``"student"`` map (the
            reference) or the ``"teacher"`` map.
        student_path: dotted path of the student's feature module (default: what the student
            declares, :attr:`pkd.detector.DetectorSpec.features`).
        teacher_path: same for the teacher.

    Levels, strides, channels and pixel normalisation come from what each detector declares
    (:func:`pkd.families.describe`), never from its class.

    Example:
        >>> teacher = build_detector("fasterrcnn_resnet18_fpn", num_classes=3, min_size=64, max_size=64)
        >>> student = build_detector("retinanet_resnet18_fpn", num_classes=3, min_size=64, max_size=64)
        >>> distiller = Distiller(student, teacher)
        >>> [pair.name for pair in distiller.pairs], distiller.weight
        (['s8', 's16', 's32', 's64'], 6.0)
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        loss: str | LevelLoss = "pkd",
        weight: float | None = None,
        levels: Sequence[int] | None = None,
        pairing: str | Sequence[tuple[str | int, str | int]] = "stride",
        max_levels: int = 4,
        connectors: bool = False,
        distill_until: int | None = None,
        warmup_steps: int = 0,
        resize: str = "student",
        student_path: str | None = None,
        teacher_path: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose one of {sorted(LOSSES)} or pass a callable")
            self.loss_name = loss
            self.loss_fn: LevelLoss = LOSSES[loss]
        elif callable(loss):
            self.loss_name = getattr(loss, "__name__", type(loss).__name__)
            self.loss_fn = loss
        else:
            raise TypeError(f"loss must be a name or a callable, got {type(loss).__name__}")
        if resize not in ("student", "teacher"):
            raise ValueError(f"resize must be 'student' or 'teacher', got {resize!r}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

        student_spec, teacher_spec = describe(student), describe(teacher)
        self.student = student
        # Stored outside the module tree: the teacher is not the student's to save, move by
        # accident with an optimizer, or count as trainable.
        self.__dict__["teacher"] = teacher
        teacher.eval()
        teacher.requires_grad_(False)
        self.weight = float(teacher_spec.distill_weight if weight is None else weight)
        self.distill_until = distill_until
        self.warmup_steps = warmup_steps
        self.resize = resize
        self.student_path = student_spec.features if student_path is None else student_path
        self.teacher_path = teacher_spec.features if teacher_path is None else teacher_path
        self.step = 0

        self.student_strides = student_spec.strides
        self.teacher_strides = teacher_spec.strides
        self.pairs: list[LevelPair] = pair_levels(
            self.student_strides, self.teacher_strides, pairing, levels=levels, max_levels=max_levels
        )
        student_channels, teacher_channels = student_spec.channels, teacher_spec.channels
        mismatched = [
            f"{p.name}: student {student_channels[p.student]} vs teacher {teacher_channels[p.teacher]} channels"
            for p in self.pairs
            if student_channels[p.student] != teacher_channels[p.teacher]
        ]
        if mismatched and not connectors:
            raise ValueError(
                f"channel counts differ ({'; '.join(mismatched)}); pass connectors=True to learn a 1x1 conv "
                "from student to teacher channels, or build both with the same fpn_channels"
            )
        self.connectors = build_connectors(self.pairs, student_channels, teacher_channels)

        # When the two detectors normalise pixels differently, the batch the student's backbone
        # saw is re-normalised for the teacher: x_t = x_s * std_s / std_t + (mean_s - mean_t) / std_t.
        student_norm = (student_spec.image_mean, student_spec.image_std)
        teacher_norm = (teacher_spec.image_mean, teacher_spec.image_std)
        scale, shift = torch.ones(3), torch.zeros(3)
        self.renormalise = student_norm != teacher_norm
        if self.renormalise:
            (mean_s, std_s), (mean_t, std_t) = (tuple(map(torch.tensor, n)) for n in (student_norm, teacher_norm))
            scale, shift = std_s / std_t, (mean_s - mean_t) / std_t
        self.register_buffer("_teacher_scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_teacher_shift", shift.view(1, 3, 1, 1), persistent=False)

    # -- the teacher -------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        # Keep the teacher on the student's device and dtype through .to() / .cuda() / .half().
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def teacher_features(self, batch: Tensor) -> dict[str, Tensor]:
        """The teacher's FPN levels for a batch normalised and padded as the student's.

        Args:
            batch: ``(N, 3, H, W)``, the input of the student's backbone.

        Returns:
            ``{level: (N, C, h, w)}`` without gradient.
        """
        if self.renormalise:
            batch = batch * self._teacher_scale + self._teacher_shift
        with torch.no_grad():
            return as_levels(submodule(self.teacher, self.teacher_path)(batch))

    # -- weights over training ------------------------------------------------------------------
    def current_weight(self, step: int | None = None) -> float:
        """The loss weight at a training step (0 after ``distill_until``; ramped during warm-up)."""
        step = self.step if step is None else step
        if self.distill_until is not None and step >= self.distill_until:
            return 0.0
        if self.warmup_steps > 0:
            return self.weight * min(1.0, (step + 1) / self.warmup_steps)
        return self.weight

    # -- forward ---------------------------------------------------------------------------------
    def distill_losses(self, student_levels: dict[str, Tensor], teacher_levels: dict[str, Tensor], weight: float):
        """Weighted feature loss per level pair: ``{"loss_distill/<pair>": scalar}``."""
        losses = {}
        for pair in self.pairs:
            student_map = student_levels[pair.student]
            if pair.name in self.connectors:
                student_map = self.connectors[pair.name](student_map)
            teacher_map = teacher_levels[pair.teacher]
            student_map, teacher_map = match_sizes(student_map, teacher_map, self.resize)
            losses[f"loss_distill/{pair.name}"] = weight * self.loss_fn(student_map, teacher_map)
        return losses

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None) -> Any:
        """Student losses plus distillation losses in training; the student's output in eval.

        Args:
            images: list of ``(3, H, W)`` float images in [0, 1].
            targets: list of target dicts (``boxes`` ``(K, 4)`` xyxy, ``labels`` ``(K,)``, ...).

        Returns:
            Training: ``{loss name: scalar}`` (student losses and ``loss_distill/<pair>``).
            Eval: the student's detections.
        """
        if not self.training:
            return self.student(images, targets)
        weight = self.current_weight()
        self.step += 1
        if weight == 0.0:
            return self.student(images, targets)
        with FeatureTap(self.student, self.student_path) as tap:
            losses = self.student(images, targets)
        if tap.input is None:
            raise RuntimeError(f"the student's {self.student_path!r} was not called with an image batch")
        teacher_levels = self.teacher_features(tap.input)
        losses.update(self.distill_losses(tap.levels, teacher_levels, weight))
        return losses

    @torch.no_grad()
    def paired_features(self, images: list[Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Student and teacher features of the distilled pairs for a batch, keyed by pair name.

        Runs the student's transform (eval-mode resizing) and both backbones, no heads; student
        maps go through their connectors. For analysis (``pkd inspect``).
        """
        student_core = submodule(self.student, "")
        transform = getattr(student_core, "transform", None)
        if transform is None:
            raise ValueError("paired_features needs a torchvision-style student with a .transform")
        was_training = student_core.training
        student_core.eval()
        try:
            batch = transform(images)[0].tensors
            student_levels = as_levels(submodule(self.student, self.student_path)(batch))
        finally:
            student_core.train(was_training)
        teacher_levels = self.teacher_features(batch)
        students, teachers = {}, {}
        for pair in self.pairs:
            student_map = student_levels[pair.student]
            if pair.name in self.connectors:
                student_map = self.connectors[pair.name](student_map)
            students[pair.name] = student_map
            teachers[pair.name] = teacher_levels[pair.teacher]
        return students, teachers

    # -- saving ----------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """The student's state_dict alone (unwrapped from DDP): loads into the plain detector."""
        return submodule(self.student, "").state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Tensor], strict: bool = True, assign: bool = False):
        return submodule(self.student, "").load_state_dict(state_dict, strict=strict, assign=assign)

    def connector_state_dict(self) -> dict[str, Tensor]:
        """The connectors' weights (empty without connectors), saved next to the student for resuming."""
        return self.connectors.state_dict()

    def load_connector_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        self.connectors.load_state_dict(state_dict)

    def extra_repr(self) -> str:
        pairs = ", ".join(f"{p.name}({p.student}<-{p.teacher})" for p in self.pairs)
        return f"loss={self.loss_name}, weight={self.weight}, pairs=[{pairs}]"
