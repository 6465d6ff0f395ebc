"""Feature-imitation losses for detector distillation: PKD and the baselines it is compared with.

PKD (Cao et al., "PKD: General Distillation Framework for Object Detectors via Pearson
Correlation Coefficient", NeurIPS 2022, https://arxiv.org/abs/2207.02039) normalises every
channel of a student and a teacher FPN level to zero mean and unit variance over the whole
mini-batch and takes half the mean squared error between them. With ``eps -> 0`` that is, per
channel, ``(m - 1) / m * (1 - r)`` with ``r`` the Pearson correlation of the channel's
``m = N*H*W`` student and teacher values, so the student imitates the *relations* in the
teacher's features and not their magnitude.

The reference algorithm (permute to ``(C, N*H*W)``, mean, unbiased std, normalise, MSE) makes
about twenty full-size temporaries per level. :func:`pkd_loss` computes the same value from
per-channel moments in closed form with an analytic backward (:mod:`pkd.pkd_kernel`), so it
keeps no full-size temporaries.

Every loss here takes one level ``(N, C, H, W)`` or several (a sequence or a dict of levels,
summed) and resizes the student (or the teacher) when the spatial sizes of a pair differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from pkd.pkd_kernel import pkd_level

__all__ = ["LOSSES", "PKDLoss", "cwd_loss", "match_sizes", "mse_feature_loss", "pkd_loss"]

Features = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Resize = Literal["student", "teacher"] | None


def _check_pair(student: Tensor, teacher: Tensor, resize: Resize, where: str) -> tuple[Tensor, Tensor]:
    """Validates one student/teacher level pair and resizes it to a common spatial size."""
    if not isinstance(student, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(f"{where}: expected tensors, got {type(student).__name__} and {type(teacher).__name__}")
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"{where}: expected feature maps of shape (N, C, H, W), got student {tuple(student.shape)} "
            f"and teacher {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{where}: batch sizes differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "the teacher must run on exactly the batch the student sees"
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"{where}: channel counts differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}; "
            "map the student's channels to the teacher's with a 1x1 conv connector "
            "(Distiller(..., connectors=True)) before the loss"
        )
    if student.shape[-2:] != teacher.shape[-2:] and resize is None:
        raise ValueError(
            f"{where}: spatial sizes differ, student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}, "
            "and resize=None; pass resize='student' or resize='teacher'"
        )
    if resize is not None:
        student, teacher = match_sizes(student, teacher, resize)
    return student, teacher


def match_sizes(student: Tensor, teacher: Tensor, resize: str = "student") -> tuple[Tensor, Tensor]:
    """Brings a level pair to one spatial size, bilinearly, as the reference does.

    Args:
        student: ``(N, C, H, W)``.
        teacher: ``(N, C', H', W')``.
        resize: ``"student"`` resizes the student map to the teacher's size (the reference),
            ``"teacher"`` the teacher map to the student's.

    Returns:
        ``(student, teacher)``, untouched when their sizes are equal.
    """
    if resize not in ("student", "teacher"):
        raise ValueError(f"resize must be 'student', 'teacher' or None, got {resize!r}")
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if resize == "student":
        return F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False), teacher
    return student, F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)


def _level_pairs(student: Features, teacher: Features) -> list[tuple[str, Tensor, Tensor]]:
    """Lines up the levels of ``student`` and ``teacher`` (a tensor, a sequence or a dict each)."""
    if isinstance(student, Tensor) and isinstance(teacher, Tensor):
        return [("level", student, teacher)]
    if isinstance(student, Mapping) and isinstance(teacher, Mapping):
        if set(student) != set(teacher):
            raise ValueError(
                f"student and teacher levels differ: student has {list(student)}, teacher has {list(teacher)}; "
                "pair them first (see pkd.features.pair_levels)"
            )
        return [(f"level {key!r}", student[key], teacher[key]) for key in student]
    is_seq = lambda x: isinstance(x, Sequence) and not isinstance(x, str | bytes)  # noqa: E731
    if is_seq(student) and is_seq(teacher):
        if len(student) != len(teacher):
            raise ValueError(
                f"student has {len(student)} levels and teacher {len(teacher)}; "
                "pair them first (see pkd.features.pair_levels)"
            )
        return [(f"level {i}", s, t) for i, (s, t) in enumerate(zip(student, teacher, strict=True))]
    raise TypeError(
        "student and teacher must both be a tensor, both a sequence of tensors or both a dict of tensors, "
        f"got {type(student).__name__} and {type(teacher).__name__}"
    )


def _sum_over_levels(
    level_loss: Callable[[Tensor, Tensor], Tensor], student: Features, teacher: Features, resize: Resize
) -> Tensor:
    pairs = _level_pairs(student, teacher)
    if not pairs:
        raise ValueError("no feature levels to compare")
    total = None
    for where, s, t in pairs:
        s, t = _check_pair(s, t, resize, where)
        value = level_loss(s, t)
        total = value if total is None else total + value
    return total


def pkd_loss(
    student: Features, teacher: Features, *, eps: float = 1e-6, resize: Resize = "student", compiled: bool = False
) -> Tensor:
    """PKD loss: half the MSE between per-channel standardised student and teacher features.

    For each level and channel ``c``, over the ``m = N*H*W`` values of the mini-batch,
    ``x_hat = (x - mean(x)) / (std(x) + eps)`` with the unbiased ``std``, for student and teacher
    separately; the level's loss is ``mse(s_hat, t_hat) / 2`` and levels are summed. With
    ``eps = 0`` a level's loss is the mean over channels of ``(m - 1) / m * (1 - r_c)``, with
    ``r_c`` the Pearson correlation of channel ``c`` (PKD, NeurIPS 2022,
    https://arxiv.org/abs/2207.02039).

    The value equals the reference algorithm's; it is computed in closed form from per-channel
    moments with an analytic backward, so no full-size temporaries are made. Only the student
    receives a gradient; the teacher is treated as a constant.

    Degenerate input gives finite results, never NaN:

    * A level with one value per channel (``N*H*W == 1``, e.g. batch 1 and a 1x1 top level) has
      no spread: its standardised maps are 0 and it contributes 0 loss and 0 gradient (the
      reference's unbiased std is NaN there).
    * A channel whose student values are all equal (``std = 0``) has no defined correlation:
      its ``s_hat`` is 0 as in the reference, so it contributes
      ``(m - 1) / (2m) * (std_t / (std_t + eps))**2`` (about 1/2) to that level's channel mean,
      and it gets zero gradient (the derivative of ``(s - mean) / (std + eps)`` there is of
      order ``1 / eps``; the reference gives NaN). A constant teacher channel has ``t_hat = 0``
      and is handled by the general formula.

    float16 / bfloat16 inputs: statistics are computed in float32 and the student gradient is
    returned in the input's dtype; the returned loss is float32. float64 inputs are computed in
    float64.

    Args:
        student: student features: a tensor ``(N, C, H, W)``, or a sequence or dict of them.
        teacher: teacher features, same structure, channels and batch size as ``student``.
        eps: added to each standard deviation before dividing (1e-6 in the reference).
        resize: when a pair's spatial sizes differ, bilinearly resize the ``"student"`` map to
            the teacher's size (the reference) or the ``"teacher"`` map to the student's;
            ``None`` makes a size mismatch an error.
        compiled: run the statistics and the gradient as ``torch.compile`` kernels, specialised
            to each feature shape (the first call per shape compiles for tens of seconds; worth
            it for long runs with fixed input sizes and a working compiler toolchain).

    Returns:
        A scalar tensor: the sum over levels of each level's loss.

    Raises:
        ValueError: batch or channel counts differ (use a connector for channels), the levels
            of the two sides do not line up, or a spatial mismatch with ``resize=None``.

    Example:
        >>> student = torch.randn(2, 256, 64, 64, requires_grad=True)
        >>> teacher = 3.0 * student.detach() + 7.0  # same relations, other magnitude
        >>> float(pkd_loss(student, teacher)) < 1e-6
        True
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return _sum_over_levels(lambda s, t: pkd_level(s, t, eps, compiled), student, teacher, resize)


def mse_feature_loss(student: Features, teacher: Features, *, resize: Resize = "student") -> Tensor:
    """Plain feature imitation: mean squared error between raw student and teacher features.

    The baseline PKD improves on: it matches absolute values, so it is dominated by the
    largest FPN levels and channels and by the teacher/student magnitude gap.

    Args:
        student: a tensor ``(N, C, H, W)``, or a sequence or dict of them.
        teacher: same structure as ``student``; receives no gradient.
        resize: as in :func:`pkd_loss`.

    Returns:
        Scalar: the sum over levels of ``mean((s - t)**2)`` over all ``N*C*H*W`` elements.
    """
    return _sum_over_levels(lambda s, t: F.mse_loss(s.float(), t.detach().float()), student, teacher, resize)


def cwd_loss(student: Features, teacher: Features, *, tau: float = 1.0, resize: Resize = "student") -> Tensor:
    """Channel-wise distillation (Shu et al., ICCV 2021, https://arxiv.org/abs/2011.13256).

    Each channel's ``H*W`` activations become a spatial distribution with a temperature-``tau``
    softmax; the loss is ``tau**2 * KL(teacher || student)``, averaged over the ``N*C``
    channel maps, summed over levels.

    Args:
        student: a tensor ``(N, C, H, W)``, or a sequence or dict of them.
        teacher: same structure as ``student``; receives no gradient.
        tau: softmax temperature (> 0).
        resize: as in :func:`pkd_loss`.

    Returns:
        Scalar loss.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")

    def level(s: Tensor, t: Tensor) -> Tensor:
        n, c = s.shape[:2]
        log_p_s = F.log_softmax(s.float().reshape(n * c, -1) / tau, dim=1)
        log_p_t = F.log_softmax(t.detach().float().reshape(n * c, -1) / tau, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="sum", log_target=True) * (tau * tau) / (n * c)

    return _sum_over_levels(level, student, teacher, resize)


class PKDLoss(nn.Module):
    """:func:`pkd_loss` times a weight, as a module.

    Args:
        weight: multiplies the loss (the reference's ``loss_weight``, alpha in the paper).
        eps: see :func:`pkd_loss`.
        resize: see :func:`pkd_loss`.
        compiled: see :func:`pkd_loss`.

    Example:
        >>> criterion = PKDLoss(weight=6.0)
        >>> levels = [torch.randn(2, 64, 32, 32), torch.randn(2, 64, 16, 16)]
        >>> criterion([x.clone().requires_grad_() for x in levels], levels).shape
        torch.Size([])
    """

    def __init__(
        self, weight: float = 1.0, *, eps: float = 1e-6, resize: Resize = "student", compiled: bool = False
    ) -> None:
        super().__init__()
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        self.weight = float(weight)
        self.eps = float(eps)
        self.resize = resize
        self.compiled = compiled

    def forward(self, student: Features, teacher: Features) -> Tensor:
        loss = pkd_loss(student, teacher, eps=self.eps, resize=self.resize, compiled=self.compiled)
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"weight={self.weight}, eps={self.eps}, resize={self.resize!r}, compiled={self.compiled}"


#: The feature losses by the names configs use.
LOSSES: dict[str, Callable[..., Tensor]] = {"pkd": pkd_loss, "mse": mse_feature_loss, "cwd": cwd_loss}
