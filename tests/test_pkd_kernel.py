"""Tests of pkd.pkd_kernel: per-channel moments on every path, their exact merge, and one PKD level."""

import pytest
import torch

from pkd import pkd_kernel
from pkd.pkd_kernel import channel_moments, combine_moments, pkd_level


def direct_moments(student, teacher):
    """Channel means and centred (co)moment sums over (0, 2, 3), straight from the definition."""
    s = student.double().transpose(0, 1).flatten(1)
    t = teacher.double().transpose(0, 1).flatten(1)
    ds, dt = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    return s.mean(1), t.mean(1), (ds * ds).sum(1), (dt * dt).sum(1), (ds * dt).sum(1)


@pytest.mark.parametrize("chunk_elements", [1 << 18, 64], ids=["whole-tensor", "chunked-rows"])
def test_channel_moments_equal_their_definition(monkeypatch, chunk_elements):
    monkeypatch.setattr(pkd_kernel, "_CHUNK_ELEMENTS", chunk_elements)
    generator = torch.Generator().manual_seed(3)
    student = 300.0 + torch.randn(3, 5, 6, 7, generator=generator)
    teacher = -2.0 * student + torch.randn(3, 5, 6, 7, generator=generator)
    for got, expected in zip(channel_moments(student, teacher), direct_moments(student, teacher), strict=True):
        assert got.dtype == torch.float64 and got.shape == (5,)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-3)


def test_pkd_level_is_half_the_mse_of_standardised_channels():
    generator = torch.Generator().manual_seed(4)
    student = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = 5.0 + 3.0 * torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=generator)

    def standardised(x):
        x = x.transpose(0, 1).flatten(1)
        return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)

    expected = ((standardised(student) - standardised(teacher)) ** 2).mean() / 2
    assert torch.allclose(pkd_level(student, teacher), expected)
    assert torch.autograd.gradcheck(lambda s: pkd_level(s, teacher), (student,))


def test_combine_moments_equals_one_pass_over_all_values():
    torch.manual_seed(0)
    values = 1e4 + torch.randn(2, 3, 50, dtype=torch.float64)  # (K, C, M), mean far above the spread
    sizes = [10, 25, 15]
    groups = values.split(sizes, dim=-1)
    means = torch.stack([g.mean(-1) for g in groups], 1)  # (K, G, C)
    comoments = torch.stack(
        [torch.einsum("acm,bcm->abc", g - g.mean(-1, keepdim=True), g - g.mean(-1, keepdim=True)) for g in groups], 2
    )
    mean, comoment = combine_moments(torch.tensor(sizes, dtype=torch.float64), means, comoments)
    centred = values - values.mean(-1, keepdim=True)
    assert torch.allclose(mean, values.mean(-1), rtol=0, atol=1e-9)
    assert torch.allclose(comoment, torch.einsum("acm,bcm->abc", centred, centred), rtol=1e-9, atol=1e-9)
