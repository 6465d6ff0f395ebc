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
per-channel moments in closed form and has an analytic backward, so it reads the features a
few times, keeps only small temporaries, and allocates nothing full-size except the gradient.

Every loss here takes one level ``(N, C, H, W)`` or several (a sequence or a dict of levels,
summed) and resizes the student (or the teacher) when the spatial sizes of a pair differ.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LOSSES", "PKDLoss", "combine_moments", "cwd_loss", "match_sizes", "mse_feature_loss", "pkd_loss"]

Features = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
Resize = Literal["student", "teacher"] | None

# Elements of one feature map processed per step of the chunked passes: the temporaries of a
# step (a few of this size) stay in the CPU's cache instead of streaming through memory.
_CHUNK_ELEMENTS = 1 << 18


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


def _work_dtype(x: Tensor) -> torch.dtype:
    # float16/bfloat16 statistics in float32 (the reference's sums overflow or lose digits otherwise).
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(rows: int, row_length: int):
    step = max(1, _CHUNK_ELEMENTS // max(row_length, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _row_moment_sums(student: Tensor, teacher: Tensor) -> Tensor:
    """Raw moments of each ``(n, c)`` row of ``H*W`` values, in cache-sized chunks (eager path).

    Returns:
        ``(7, N*C)``: per row, the rounded means of s and t, the residual means of s and t
        after subtracting those, and the sums of squares and products of the centred values.
    """
    batch, channels, height, width = student.shape
    hw = height * width
    rows = batch * channels
    dtype = _work_dtype(student)
    s_rows = student.reshape(rows, hw)
    t_rows = teacher.reshape(rows, hw)
    stats = torch.empty(7, rows, dtype=dtype, device=student.device)
    for chunk in _row_chunks(rows, hw):
        s = s_rows[chunk].to(dtype)
        t = t_rows[chunk].to(dtype)
        torch.mean(s, 1, out=stats[0, chunk])
        torch.mean(t, 1, out=stats[1, chunk])
        s = s - stats[0, chunk, None]
        t = t - stats[1, chunk, None]
        torch.mean(s, 1, out=stats[2, chunk])
        torch.mean(t, 1, out=stats[3, chunk])
        torch.linalg.vecdot(s, s, out=stats[4, chunk])
        torch.linalg.vecdot(t, t, out=stats[5, chunk])
        torch.linalg.vecdot(s, t, out=stats[6, chunk])
    return stats


def _channel_moment_sums(student: Tensor, teacher: Tensor) -> Tensor:
    """The same moments as :func:`_row_moment_sums` per channel over ``(0, 2, 3)``: ``(7, C)``.

    Written as whole-tensor reductions for ``torch.compile``, which fuses them into two passes.
    """
    dtype = _work_dtype(student)
    s = student.to(dtype)
    t = teacher.to(dtype)
    s_mean = s.mean((0, 2, 3), keepdim=True)
    t_mean = t.mean((0, 2, 3), keepdim=True)
    s = s - s_mean
    t = t - t_mean
    dims = (0, 2, 3)
    return torch.stack(
        [
            s_mean.flatten(),
            t_mean.flatten(),
            s.mean(dims),
            t.mean(dims),
            (s * s).sum(dims),
            (t * t).sum(dims),
            (s * t).sum(dims),
        ]
    )


def _channel_gradient(student, teacher, mean_s_hi, mean_t_hi, alpha, beta, constant) -> Tensor:
    """``alpha*(s - mean_s_hi) - beta*(t - mean_t_hi) + constant`` with ``(C,)`` coefficients."""
    dtype = _work_dtype(student)
    shape = (1, -1, 1, 1)
    s = student.to(dtype) - mean_s_hi.view(shape)
    t = teacher.to(dtype) - mean_t_hi.view(shape)
    return (s * alpha.view(shape) - t * beta.view(shape) + constant.view(shape)).to(student.dtype)


_COMPILED: dict[str, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn.__name__ not in _COMPILED:
        # Shapes are specialised: each new feature-map shape compiles once (tens of seconds on CPU).
        # Five FPN levels at a few input sizes exceed dynamo's default of 8 specialisations per
        # function, after which it silently falls back to slow unfused code; allow more.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, 64)
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


def _channel_moments(student: Tensor, teacher: Tensor, compiled: bool = False) -> tuple[Tensor, ...]:
    """Per-channel means and centred second moments of a level pair.

    Each row (an ``(n, c)`` map in the eager path, a whole channel in the compiled one) is
    centred on its own rounded mean, which makes the subtraction exact in floating point when
    the values are close to that mean (Sterbenz's lemma); the residual mean and the centred sums
    are then taken, and the rows of a channel are merged exactly with the parallel-variance
    formula of Chan, Golub and LeVeque. This is the reference's ``(0, 2, 3)`` reduction without
    its permuted copy, and it stays accurate when a channel's mean is thousands of times its
    standard deviation, where raw sums of squares lose every digit.

    Args:
        student: ``(N, C, H, W)``.
        teacher: ``(N, C, H, W)``.
        compiled: use the ``torch.compile`` kernel instead of the chunked eager loop.

    Returns:
        ``mean_s, mean_t, sum_ss, sum_tt, sum_st``, each ``(C,)`` float64:
        the channel means and ``sum((s - mean_s)**2)``, ``sum((t - mean_t)**2)``,
        ``sum((s - mean_s) * (t - mean_t))`` over the ``m = N*H*W`` values of each channel.
    """
    batch, channels, height, width = student.shape
    if compiled:
        stats, groups, count = _compiled(_channel_moment_sums)(student, teacher), 1, batch * height * width
    elif student.numel() <= _CHUNK_ELEMENTS:
        # Small levels: whole-tensor reductions, fewer operations and cache-sized temporaries anyway.
        stats, groups, count = _channel_moment_sums(student, teacher), 1, batch * height * width
    else:
        stats, groups, count = _row_moment_sums(student, teacher), batch, height * width
    stats = stats.double().view(7, groups, channels)
    row_means = stats[0:2] + stats[2:4]  # (2, groups, C): exact row means of s and t
    residuals = stats[2:4]
    # Sums centred on the exact row mean: sum((x - d)(y - e)) = sum(x y) - count * d * e.
    ss, tt, st = stats[4:7] - count * residuals[[0, 1, 0]] * residuals[[0, 1, 1]]
    row_comoments = torch.stack([torch.stack([ss, st]), torch.stack([st, tt])])  # (2, 2, groups, C)
    counts = torch.full((groups,), float(count), dtype=torch.float64, device=stats.device)
    means, sums = combine_moments(counts, row_means, row_comoments)
    return means[0], means[1], sums[0, 0].clamp_min(0), sums[1, 1].clamp_min(0), sums[0, 1]


def combine_moments(counts: Tensor, means: Tensor, comoments: Tensor) -> tuple[Tensor, Tensor]:
    """Pools per-group moments exactly: the parallel update of Chan, Golub and LeVeque.

    ``M_ab = sum_g M_ab,g + sum_g n_g (mean_a,g - mean_a)(mean_b,g - mean_b)`` equals one pass over
    all the values up to rounding, with no raw sums of squares (which lose every digit when a
    channel's mean is far larger than its spread).

    Args:
        counts: ``(G,)`` values per group.
        means: ``(K, G, C)`` per-group means of ``K`` variables over ``C`` channels.
        comoments: ``(K, K, G, C)`` per-group centred co-moment sums ``sum (x_a - mean_a)(x_b - mean_b)``.

    Returns:
        ``(K, C)`` means and ``(K, K, C)`` centred co-moment sums of all groups together.
    """
    mean = (means * counts[:, None]).sum(1) / counts.sum()
    offsets = means - mean[:, None]
    spread = torch.einsum("g,agc,bgc->abc", counts, offsets, offsets)
    return mean, comoments.sum(2) + spread


class _PKDLevel(torch.autograd.Function):
    """PKD loss of one level with an analytic backward (gradient for the student only)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, eps: float, compiled: bool) -> Tensor:
        batch, channels, height, width = student.shape
        m = batch * height * width
        mean_s, mean_t, sum_ss, sum_tt, sum_st = _channel_moments(student, teacher, compiled)
        # Unbiased std as in the reference; with one value per channel (m == 1) it is undefined
        # and taken as 0, which makes both normalised maps 0 and the level's loss 0.
        std_s = (sum_ss / max(m - 1, 1)).sqrt()
        std_t = (sum_tt / max(m - 1, 1)).sqrt()
        a = 1.0 / (std_s + eps) if eps > 0 else torch.where(std_s > 0, 1.0 / std_s, 0.0)
        b = 1.0 / (std_t + eps) if eps > 0 else torch.where(std_t > 0, 1.0 / std_t, 0.0)
        # sum_i (a*ds_i - b*dt_i)^2 = a^2*Sss - 2ab*Sst + b^2*Stt, per channel.
        per_channel = (a * a) * sum_ss - 2.0 * (a * b) * sum_st + (b * b) * sum_tt
        loss = per_channel.sum() / (2.0 * m * channels)

        # dL/ds_i = [a^2 (1 - a*std_s + b*Sst / ((m-1) std_s)) ds_i - a*b*dt_i] / (m*C), with
        # 1 - a*std_s = eps*a written without the cancellation. A constant student channel
        # (std_s == 0, or m == 1) has no defined correlation: it gets no gradient, where the
        # derivative of (s - mean) / (std + eps) would be of order 1/eps (the reference gives NaN).
        live = std_s > 0
        safe_std_s = torch.where(live, std_s, 1.0)
        coef_s = a * a * (eps * a + b * sum_st / (max(m - 1, 1) * safe_std_s)) / (m * channels)
        coef_t = a * b / (m * channels)
        coef_s = torch.where(live, coef_s, 0.0)
        coef_t = torch.where(live, coef_t, 0.0)
        ctx.save_for_backward(student, teacher, mean_s, mean_t, coef_s, coef_t)
        ctx.compiled = compiled
        return loss.to(_work_dtype(student))

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None, None]:
        student, teacher, mean_s, mean_t, coef_s, coef_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = _work_dtype(student)
        scale = grad_output.double()
        alpha = coef_s * scale
        beta = coef_t * scale
        # g = alpha*(s - mean_s) - beta*(t - mean_t). The float64 means are split into a part
        # in the working dtype and a remainder, so that s - mean_hi is exact and the remainder
        # enters as a per-channel constant: the gradient stays accurate to the last bits even
        # when a channel's mean is thousands of times its spread.
        mean_s_hi = mean_s.to(dtype)
        mean_t_hi = mean_t.to(dtype)
        constant = beta * (mean_t - mean_t_hi.double()) - alpha * (mean_s - mean_s_hi.double())
        coefficients = torch.stack([mean_s_hi.double(), mean_t_hi.double(), alpha, beta, constant]).to(dtype)
        if ctx.compiled:
            grad = _compiled(_channel_gradient)(student, teacher, *coefficients)
        elif student.numel() <= _CHUNK_ELEMENTS:
            grad = _channel_gradient(student, teacher, *coefficients)
        else:
            grad = _chunked_gradient(student, teacher, coefficients)
        return grad, None, None, None


def _chunked_gradient(student: Tensor, teacher: Tensor, coefficients: Tensor) -> Tensor:
    """:func:`_channel_gradient` in cache-sized chunks of rows, writing straight into the result.

    Args:
        student: ``(N, C, H, W)``.
        teacher: ``(N, C, H, W)``.
        coefficients: ``(5, C)``: ``mean_s_hi, mean_t_hi, alpha, beta, constant``.
    """
    batch, channels, height, width = student.shape
    rows, hw = batch * channels, height * width
    dtype = _work_dtype(student)
    mean_s_hi, mean_t_hi, alpha, beta, constant = coefficients.repeat(1, batch)[:, :, None]
    grad = torch.empty_like(student, memory_format=torch.contiguous_format)
    g_rows = grad.view(rows, hw)
    s_rows = student.reshape(rows, hw)
    t_rows = teacher.reshape(rows, hw)
    direct = grad.dtype == dtype
    for chunk in _row_chunks(rows, hw):
        g = g_rows[chunk] if direct else torch.empty(g_rows[chunk].shape, dtype=dtype, device=grad.device)
        torch.sub(s_rows[chunk].to(dtype), mean_s_hi[chunk], out=g)
        g.mul_(alpha[chunk])
        g.addcmul_(t_rows[chunk].to(dtype) - mean_t_hi[chunk], beta[chunk], value=-1.0)
        g.add_(constant[chunk])
        if not direct:
            g_rows[chunk] = g
    return grad


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
    return _sum_over_levels(
        lambda s, t: _PKDLevel.apply(s, t.detach(), float(eps), bool(compiled)), student, teacher, resize
    )


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
