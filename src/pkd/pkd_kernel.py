"""The PKD loss of one feature level in closed form, with an analytic backward.

The reference algorithm of PKD (permute to ``(C, N*H*W)``, mean, unbiased std, normalise,
MSE) makes about twenty full-size temporaries per level. :func:`pkd_level` computes the same
value from per-channel moments (:func:`channel_moments`: one chunked pass over the features,
rows merged exactly by :func:`combine_moments`) and has an analytic backward, so it reads the
features a few times, keeps only ``(C,)``-sized statistics, and allocates nothing full-size
except the gradient. :mod:`pkd.losses` sums it over levels and checks its input; the
analysis pools its own statistics with :func:`combine_moments`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["channel_moments", "combine_moments", "pkd_level"]

# Elements of one feature map processed per step of the chunked passes: the temporaries of a
# step (a few of this size) stay in the CPU's cache instead of streaming through memory.
_CHUNK_ELEMENTS = 1 << 18


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


def channel_moments(student: Tensor, teacher: Tensor, compiled: bool = False) -> tuple[Tensor, ...]:
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
        mean_s, mean_t, sum_ss, sum_tt, sum_st = channel_moments(student, teacher, compiled)
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


def pkd_level(student: Tensor, teacher: Tensor, eps: float = 1e-6, compiled: bool = False) -> Tensor:
    """PKD loss of one level pair of equal shape; gradient for the student only.

    Args:
        student: ``(N, C, H, W)``.
        teacher: ``(N, C, H, W)``; treated as a constant.
        eps: Added to each standard deviation before dividing (>= 0).
        compiled: Use the ``torch.compile`` kernels instead of the eager ones.

    Returns:
        Scalar: ``mse(s_hat, t_hat) / 2`` over the level, as :func:`pkd.losses.pkd_loss` defines it.
    """
    return _PKDLevel.apply(student, teacher.detach(), float(eps), bool(compiled))
