"""Tests of pkd.losses: PKD against the reference algorithm and its mathematical properties."""

import math

import pytest
import torch
import torch.nn.functional as F

from pkd.losses import LOSSES, PKDLoss, cwd_loss, mse_feature_loss, pkd_loss


def reference_pkd(student, teacher, eps=1e-6):
    """The reference algorithm of PKD.md, written out step by step (sum over a list of levels)."""
    if isinstance(student, torch.Tensor):
        student, teacher = [student], [teacher]
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)

        def norm(x):
            x = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1)
            return (x - x.mean(dim=-1, keepdim=True)) / (x.std(dim=-1, keepdim=True) + eps)

        total = total + F.mse_loss(norm(s), norm(t.detach())) / 2
    return total


def correlated_pair(shape, correlation, *, dtype=torch.float64, generator=None, scale=1.0, offset=0.0):
    """Student/teacher tensors whose channels have the given Pearson correlation (in expectation)."""
    s = torch.randn(shape, dtype=dtype, generator=generator)
    noise = torch.randn(shape, dtype=dtype, generator=generator)
    t = correlation * s + math.sqrt(1 - correlation**2) * noise
    return s * scale + offset, t * 2.5 - 1.0


FPN_LIKE = [
    # batch 2 of a 256x320 input, strides 8..128, 32 channels
    [(2, 32, 32, 40), (2, 32, 16, 20), (2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 3)],
    # batch 1 of a 128x128 input, top level 1x1
    [(1, 16, 16, 16), (1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2), (1, 16, 1, 1)],
]


def grad_of(fn, student, teacher):
    student = [s.detach().clone().requires_grad_() for s in student]
    value = fn(student, teacher)
    grads = torch.autograd.grad(value, student)
    return value.detach(), grads


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 4, 1, 9), (1, 3, 4, 4)])
def test_gradcheck_float64(shape):
    generator = torch.Generator().manual_seed(0)
    s, t = correlated_pair(shape, 0.6, generator=generator, scale=3.0, offset=2.0)
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: pkd_loss(x, t), (s,))
    assert torch.autograd.gradgradcheck is not None  # first-order loss: no double backward promised


def test_gradcheck_through_resize():
    generator = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    t = torch.randn(2, 3, 8, 9, dtype=torch.float64, generator=generator)
    assert torch.autograd.gradcheck(lambda x: pkd_loss(x, t, resize="student"), (s,))
    assert torch.autograd.gradcheck(lambda x: pkd_loss(x, t, resize="teacher"), (s,))


@pytest.mark.parametrize("shapes", FPN_LIKE)
def test_matches_reference_float32(shapes):
    generator = torch.Generator().manual_seed(2)
    student = [torch.randn(shape, generator=generator) * 4 + 1 for shape in shapes]
    teacher = [0.3 * s + torch.randn(s.shape, generator=generator) * 20 - 5 for s in student]
    # The reference is NaN on a level with one value per channel (unbiased std of one value);
    # such a level is 0 for us, tested below, so compare the other levels.
    valid = [i for i, s in enumerate(student) if s.shape[0] * s.shape[2] * s.shape[3] > 1]
    student_valid = [student[i] for i in valid]
    teacher_valid = [teacher[i] for i in valid]
    ours, our_grads = grad_of(pkd_loss, student, teacher)
    ref, ref_grads = grad_of(reference_pkd, student_valid, teacher_valid)
    assert torch.allclose(ours, ref, rtol=1e-5, atol=0)
    for i, g in enumerate(our_grads):
        if i not in valid:
            assert g.abs().max() == 0
            continue
        r = ref_grads[valid.index(i)]
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-5 * r.abs().max())


def test_equals_one_minus_correlation_with_eps_zero():
    generator = torch.Generator().manual_seed(3)
    s, t = correlated_pair((3, 6, 5, 4), 0.7, generator=generator, scale=0.2, offset=9.0)
    m = 3 * 5 * 4
    r = torch.stack(
        [torch.corrcoef(torch.stack([s[:, c].flatten(), t[:, c].flatten()]))[0, 1] for c in range(s.shape[1])]
    )
    expected = ((m - 1) / m * (1 - r)).mean()
    assert torch.allclose(pkd_loss(s, t, eps=0.0), expected, rtol=1e-12)


def test_invariant_to_positive_affine_rescaling_per_channel():
    generator = torch.Generator().manual_seed(4)
    s, t = correlated_pair((2, 5, 6, 6), 0.4, generator=generator)
    scale_s = torch.rand(1, 5, 1, 1, dtype=torch.float64, generator=generator) * 100 + 0.01
    scale_t = torch.rand(1, 5, 1, 1, dtype=torch.float64, generator=generator) * 100 + 0.01
    shift_s = torch.randn(1, 5, 1, 1, dtype=torch.float64, generator=generator) * 50
    shift_t = torch.randn(1, 5, 1, 1, dtype=torch.float64, generator=generator) * 50
    base = pkd_loss(s, t, eps=0.0)
    assert torch.allclose(pkd_loss(s * scale_s + shift_s, t, eps=0.0), base, rtol=1e-12)
    assert torch.allclose(pkd_loss(s, t * scale_t + shift_t, eps=0.0), base, rtol=1e-12)
    # A negative scale flips the correlation, so the loss must change.
    assert not torch.allclose(pkd_loss(-s, t, eps=0.0), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_when_student_equals_teacher(dtype):
    x = torch.randn(2, 8, 9, 7, dtype=dtype) * 30 + 100
    assert pkd_loss(x, x.clone()).abs() < 1e-6
    assert pkd_loss([x, x[:, :, ::2, ::2]], [x.clone(), x[:, :, ::2, ::2].clone()]).abs() < 1e-6


def test_gradient_closed_form_with_eps_zero():
    generator = torch.Generator().manual_seed(5)
    s, t = correlated_pair((2, 4, 5, 3), 0.5, generator=generator, scale=7.0, offset=-3.0)
    s.requires_grad_()
    (grad,) = torch.autograd.grad(pkd_loss(s, t, eps=0.0), s)
    n, c, h, w = s.shape
    m = n * h * w
    sd = s.detach()
    s_hat = (sd - sd.mean((0, 2, 3), keepdim=True)) / sd.std((0, 2, 3), keepdim=True)
    t_hat = (t - t.mean((0, 2, 3), keepdim=True)) / t.std((0, 2, 3), keepdim=True)
    r = (s_hat * t_hat).sum((0, 2, 3), keepdim=True) / (m - 1)
    expected = (s_hat * r - t_hat) / (m * c * sd.std((0, 2, 3), keepdim=True))
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)


def test_teacher_receives_no_gradient():
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, requires_grad=True)
    loss = pkd_loss(s, t)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None


def test_saves_only_inputs_and_channel_statistics():
    """The backward keeps the two inputs and (C,)-sized statistics, nothing full-size of its own."""
    s = torch.randn(4, 16, 20, 20, requires_grad=True)
    t = torch.randn(4, 16, 20, 20)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        pkd_loss(s, t)
    big = [x for x in saved if x.numel() > 16]
    assert len(big) == 2
    assert {x.data_ptr() for x in big} == {s.data_ptr(), t.data_ptr()}
    assert all(x.numel() == 16 for x in saved if x.numel() <= 16)


def test_levels_as_list_and_dict_are_summed():
    generator = torch.Generator().manual_seed(6)
    student = [torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)]
    teacher = [torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 4, 4, generator=generator)]
    each = pkd_loss(student[0], teacher[0]) + pkd_loss(student[1], teacher[1])
    assert torch.allclose(pkd_loss(student, teacher), each)
    assert torch.allclose(pkd_loss(tuple(student), tuple(teacher)), each)
    as_dict = pkd_loss({"p3": student[0], "p4": student[1]}, {"p4": teacher[1], "p3": teacher[0]})
    assert torch.allclose(as_dict, each)


@pytest.mark.filterwarnings("ignore:std:UserWarning")
def test_single_value_per_channel_is_zero_not_nan():
    s = torch.randn(1, 8, 1, 1, requires_grad=True)
    t = torch.randn(1, 8, 1, 1)
    loss = pkd_loss(s, t)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(s.grad, torch.zeros_like(s))
    assert torch.isnan(reference_pkd(s.detach(), t))  # what the reference does there


def test_constant_student_channel_is_finite_and_documented():
    generator = torch.Generator().manual_seed(7)
    s = torch.randn(2, 3, 4, 5, generator=generator)
    t = torch.randn(2, 3, 4, 5, generator=generator)
    s[:, 1] = 4.0  # a constant channel
    s.requires_grad_()
    loss = pkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert torch.equal(s.grad[:, 1], torch.zeros_like(s.grad[:, 1]))
    assert s.grad[:, 0].abs().sum() > 0
    # Documented value: the constant channel contributes (m-1)/(2m) * (std_t / (std_t + eps))^2.
    m = 2 * 4 * 5
    std_t = t[:, 1].std()
    others = pkd_loss(s.detach()[:, [0, 2]], t[:, [0, 2]]) * 2
    expected = (others + (m - 1) / (2 * m) * (std_t / (std_t + 1e-6)) ** 2) / 3
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_constant_teacher_channel_is_finite():
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.randn(2, 3, 4, 5)
    t[:, 2] = -1.5
    loss = pkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    ref, (ref_grad,) = grad_of(reference_pkd, [s.detach()], [t])
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert torch.allclose(s.grad, ref_grad, atol=1e-6 * ref_grad.abs().max())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_statistics_in_float32(dtype):
    generator = torch.Generator().manual_seed(8)
    s32, t32 = correlated_pair((2, 8, 16, 16), 0.8, dtype=torch.float32, generator=generator, offset=30.0)
    s = s32.to(dtype).requires_grad_()
    t = t32.to(dtype)
    loss = pkd_loss(s, t)
    loss.backward()
    assert loss.dtype == torch.float32
    assert s.grad.dtype == dtype
    # Same value and gradient as float32 on the same (rounded) inputs.
    exact, (exact_grad,) = grad_of(pkd_loss, [s.detach().float()], [t.float()])
    assert torch.allclose(loss, exact, rtol=1e-5)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert torch.allclose(s.grad.float(), exact_grad, atol=tolerance * exact_grad.abs().max())


@pytest.mark.parametrize("resize", ["student", "teacher"])
@pytest.mark.parametrize("student_size", [(6, 10), (12, 7)])
def test_resize_both_ways(resize, student_size):
    generator = torch.Generator().manual_seed(9)
    s = torch.randn(2, 4, *student_size, generator=generator)
    t = torch.randn(2, 4, 9, 8, generator=generator)
    if resize == "student":
        expected = pkd_loss(F.interpolate(s, size=(9, 8), mode="bilinear", align_corners=False), t)
    else:
        expected = pkd_loss(s, F.interpolate(t, size=student_size, mode="bilinear", align_corners=False))
    assert torch.allclose(pkd_loss(s, t, resize=resize), expected)


def test_shape_errors_name_both_shapes_and_the_fix():
    s = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"\(2, 8, 4, 4\).*\(2, 16, 4, 4\).*connector"):
        pkd_loss(s, torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match=r"batch sizes differ.*\(2, 8, 4, 4\).*\(3, 8, 4, 4\)"):
        pkd_loss(s, torch.randn(3, 8, 4, 4))
    with pytest.raises(ValueError, match=r"resize=None"):
        pkd_loss(s, torch.randn(2, 8, 5, 4), resize=None)
    with pytest.raises(ValueError, match="resize must be"):
        pkd_loss(s, torch.randn(2, 8, 5, 4), resize="both")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        pkd_loss(torch.randn(8, 4, 4), torch.randn(8, 4, 4))
    with pytest.raises(ValueError, match="2 levels and teacher 1"):
        pkd_loss([s, s], [s])
    with pytest.raises(ValueError, match="student has \\['p3'\\], teacher has \\['p4'\\]"):
        pkd_loss({"p3": s}, {"p4": s})
    with pytest.raises(TypeError, match="both be a tensor"):
        pkd_loss(s, [s])
    with pytest.raises(ValueError, match="eps must be"):
        pkd_loss(s, s, eps=-1.0)
    with pytest.raises(ValueError, match="no feature levels"):
        pkd_loss([], [])


@pytest.mark.parametrize("ratio", [1, 10, 100, 1000])
@pytest.mark.parametrize("correlation", [0.0, 0.5, 0.9, 0.99])
def test_stable_when_means_dwarf_stds(ratio, correlation):
    """float32 value and gradient against a float64 evaluation of the same float32 inputs."""
    generator = torch.Generator().manual_seed(10)
    shape = (2, 8, 24, 20)
    s64, t64 = correlated_pair(shape, correlation, generator=generator)
    std = torch.rand(1, 8, 1, 1, dtype=torch.float64, generator=generator) + 0.5
    s = (s64 * std + ratio * std).float()
    t = (t64 * 3 + ratio * 3).float()
    value, (grad,) = grad_of(pkd_loss, [s], [t])
    value64, (grad64,) = grad_of(pkd_loss, [s.double()], [t.double()])
    assert abs(value.double() - value64) <= 1e-5 * value64.abs() + 1e-7
    assert (grad.double() - grad64).abs().max() <= 2e-6 * grad64.abs().max()


def test_pkd_loss_module_weight_and_repr():
    s = torch.randn(2, 4, 5, 5)
    t = torch.randn(2, 4, 5, 5)
    criterion = PKDLoss(weight=6.0, eps=1e-6)
    assert torch.allclose(criterion(s, t), 6.0 * pkd_loss(s, t))
    assert "weight=6.0" in repr(criterion)
    with pytest.raises(ValueError, match="eps"):
        PKDLoss(eps=-1)


def test_mse_feature_loss_is_plain_mse_summed_over_levels():
    student = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    teacher = [torch.randn(2, 4, 8, 8), torch.randn(2, 4, 4, 4)]
    expected = F.mse_loss(student[0], teacher[0]) + F.mse_loss(student[1], teacher[1])
    assert torch.allclose(mse_feature_loss(student, teacher), expected)
    # Unlike PKD it depends on magnitude.
    assert mse_feature_loss(student[0], teacher[0] * 10) > 10 * mse_feature_loss(student[0], teacher[0])


def test_cwd_loss_matches_its_definition():
    generator = torch.Generator().manual_seed(11)
    s = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    tau = 2.0
    p_t = torch.softmax(t.detach().reshape(6, -1) / tau, dim=1)
    p_s = torch.softmax(s.detach().reshape(6, -1) / tau, dim=1)
    expected = (p_t * (p_t.log() - p_s.log())).sum() * tau**2 / 6
    loss = cwd_loss(s, t, tau=tau)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert cwd_loss(t.detach(), t.detach(), tau=tau).abs() < 1e-6
    with pytest.raises(ValueError, match="tau"):
        cwd_loss(s, t, tau=0.0)


def test_losses_dict_names_the_losses():
    assert LOSSES == {"pkd": pkd_loss, "mse": mse_feature_loss, "cwd": cwd_loss}


@pytest.fixture
def small_chunks(monkeypatch):
    """Forces the chunked passes (used for large levels) on test-sized tensors."""
    import pkd.pkd_kernel

    monkeypatch.setattr(pkd.pkd_kernel, "_CHUNK_ELEMENTS", 64)


@pytest.mark.parametrize("shapes", FPN_LIKE)
def test_chunked_path_matches_reference(small_chunks, shapes):
    test_matches_reference_float32(shapes)


@pytest.mark.parametrize("ratio", [1, 1000])
def test_chunked_path_is_stable(small_chunks, ratio):
    test_stable_when_means_dwarf_stds(ratio, 0.99)


def test_chunked_path_half_precision_and_gradcheck(small_chunks):
    test_half_precision_statistics_in_float32(torch.float16)
    test_gradcheck_float64((3, 4, 5, 9))
    test_constant_student_channel_is_finite_and_documented()


@pytest.mark.slow
def test_compiled_path_matches_eager():
    """torch.compile kernels (needs a C++ toolchain; compiling takes a while on CPU)."""
    generator = torch.Generator().manual_seed(12)
    s, t = correlated_pair((2, 8, 12, 10), 0.9, dtype=torch.float32, generator=generator, offset=500.0)
    value, (grad,) = grad_of(pkd_loss, [s], [t])
    compiled, (compiled_grad,) = grad_of(lambda a, b: pkd_loss(a, b, compiled=True), [s], [t])
    assert torch.allclose(compiled, value, rtol=1e-5)
    assert torch.allclose(compiled_grad, grad, atol=2e-6 * grad.abs().max())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    generator = torch.Generator().manual_seed(13)
    s, t = correlated_pair((4, 64, 40, 48), 0.7, dtype=torch.float32, generator=generator, offset=20.0)
    s, t = s.to(dtype), t.to(dtype)
    cpu_value, (cpu_grad,) = grad_of(pkd_loss, [s.float()], [t.float()])
    cuda_value, (cuda_grad,) = grad_of(pkd_loss, [s.cuda()], [t.cuda()])
    assert cuda_grad.dtype == dtype and cuda_grad.is_cuda
    assert torch.allclose(cuda_value.cpu(), cpu_value, rtol=1e-4)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 2e-3 if dtype == torch.float16 else 1e-5
    assert torch.allclose(cuda_grad.float().cpu(), cpu_grad, atol=tolerance * cpu_grad.abs().max())


def test_match_sizes_resizes_the_side_asked():
    from pkd.losses import match_sizes

    student, teacher = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 16, 16)
    assert match_sizes(student, teacher)[0].shape == (2, 4, 16, 16)
    assert match_sizes(student, teacher, "teacher")[1].shape == (2, 4, 8, 8)
    same = torch.randn(2, 4, 8, 8)
    assert match_sizes(student, same)[0] is student
    with pytest.raises(ValueError, match="resize must be"):
        match_sizes(student, teacher, "both")
