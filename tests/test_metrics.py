"""Variance metrics (Sec. 4.2) and the 0-order baselines, each against a second way of computing it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kcore.metrics import ChannelMoments, fit_linear_map, linear_cka, paper_var, r2_score, variance_report


def test_streaming_moments_equal_whole_tensor():
    torch.manual_seed(0)
    x = torch.randn(37, 5, 4, 3) * torch.tensor([1.0, 10.0, 0.1, 3.0, 100.0]).view(1, 5, 1, 1) + 1000.0
    mom = ChannelMoments(5)
    for i in range(0, 37, 6):  # uneven last batch
        mom.update(x[i : i + 6])
    xd = x.double()
    assert mom.global_var() == pytest.approx(float(((xd - xd.mean()) ** 2).mean()), rel=1e-10)
    assert mom.global_var() == pytest.approx(paper_var(x), rel=1e-10)
    per_channel = xd.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mom.channel_var(), per_channel, rtol=1e-10, atol=0)
    assert mom.channel_centred_var() == pytest.approx(float(per_channel.mean()), rel=1e-10)


def test_variance_report_known_values():
    # target with known variance; components are exact fractions of it; residual is the rest
    torch.manual_seed(1)
    t = torch.randn(50, 3, 4, 4, dtype=torch.float64)
    comps = [0.6 * t, 0.3 * t]
    resid = t - sum(comps)
    rep = variance_report(comps, resid, t, batch_size=7)
    v = paper_var(t)
    assert rep.var_target == pytest.approx(v, rel=1e-10)
    assert rep.var_orders == pytest.approx([0.36 * v, 0.09 * v], rel=1e-10)
    assert rep.var_residual == pytest.approx(0.01 * v, rel=1e-8)
    assert rep.instability == pytest.approx(0.01, rel=1e-8)
    ratios = torch.tensor(rep.per_channel.var_ratio_orders, dtype=torch.float64)
    torch.testing.assert_close(ratios, torch.tensor([[0.36] * 3, [0.09] * 3], dtype=torch.float64))
    assert rep.per_channel.var_ratio_residual == pytest.approx([0.01] * 3, rel=1e-8)
    # components proportional to x*: the additive shares are the coefficients 0.6, 0.3 and 0.1
    assert rep.share_orders == pytest.approx([0.6, 0.3], rel=1e-10)
    assert rep.share_residual == pytest.approx(0.1, rel=1e-8)
    torch.testing.assert_close(torch.tensor(rep.per_channel.share_orders, dtype=torch.float64),
                               torch.tensor([[0.6] * 3, [0.3] * 3], dtype=torch.float64))


def test_paper_var_uses_one_global_mean_not_per_channel():
    # two constant channels: zero variance per channel, but the paper's Var sees the gap between them
    x = torch.cat([torch.zeros(4, 1, 2, 2), torch.full((4, 1, 2, 2), 2.0)], 1)
    rep = variance_report([x], torch.zeros_like(x), x)
    assert rep.var_target == pytest.approx(1.0)
    assert rep.var_target_channel_centred == pytest.approx(0.0)


def test_least_squares_map_recovers_a_planted_convolution():
    torch.manual_seed(2)
    x = torch.randn(20, 4, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    y = F.conv2d(x, w, padding=1)
    lin = fit_linear_map(x, y, 3, ridge=1e-10)
    torch.testing.assert_close(lin.weight.double(), w, rtol=1e-4, atol=1e-4)
    assert r2_score(lin(x), y) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("shape, k", [((3, 2, 5, 7), 3), ((2, 3, 1, 5), 3), ((2, 2, 2, 2), 3), ((2, 2, 6, 4), 5),
                                      ((2, 3, 4, 4), 1), ((1, 2, 3, 3), 5)])
def test_normal_equations_without_unfolding_equal_the_unfolded_patch_products(shape, k):
    # two ways of computing the same sums: the explicit patch matrix (F.unfold) and the shift-and-strip form,
    # including maps smaller than the kernel (1×5, 2×2 at 3×3; 3×3 at 5×5), where most blocks are strips
    from kcore.metrics.linear import _normal_equations

    g = torch.Generator().manual_seed(sum(shape) + k)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(shape[0], 2, *shape[2:], generator=g, dtype=torch.float64)
    n, c, h, w = shape
    # one row per image and output position, columns c·k² + (kernel row · k + kernel column), zero-padded
    px = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(n * h * w, c * k * k)
    py = y.permute(0, 2, 3, 1).reshape(n * h * w, 2)
    xtx, xty = _normal_equations(x, y, k)
    torch.testing.assert_close(xtx, px.T @ px, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(xty, px.T @ py, rtol=1e-12, atol=1e-12)


def test_r2_of_mean_prediction_is_zero():
    y = torch.randn(10, 2, 3, 3, dtype=torch.float64)
    mean = y.mean(dim=(0, 2, 3), keepdim=True).expand_as(y)
    assert r2_score(mean, y) == pytest.approx(0.0, abs=1e-12)


def _cka_reference(x, y):
    """Kornblith et al.'s Gram-matrix form with the centring matrix H, straight from the definition."""
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h  # noqa: E741 - K and L of the CKA paper
    return float((k * l).sum() / (k.norm() * l.norm()))


@pytest.mark.parametrize("n", [6, 200])  # Gram form (n <= features) and feature-space form (n > features)
def test_linear_cka_matches_reference_and_invariances(n):
    torch.manual_seed(3)
    x = torch.randn(n, 3, 2, 2)
    y = torch.randn(n, 2, 2, 2) + 0.3 * x[:, :2]
    assert linear_cka(x, y) == pytest.approx(_cka_reference(x, y), abs=1e-10)
    q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))
    xr = (x.reshape(n, -1).double() @ q) * 5.0 + 2.0  # rotation, isotropic scale, offset
    assert linear_cka(x, xr) == pytest.approx(1.0, abs=1e-10)


def test_linear_cka_rejects_mismatched_images():
    with pytest.raises(ValueError, match="same images"):
        linear_cka(torch.randn(4, 3), torch.randn(5, 3))


class _CountingMaps:
    """A lazy (N, C, H, W) array that makes its images on demand and records the largest batch read."""

    def __init__(self, shape: tuple[int, int, int, int]) -> None:
        self.shape, self.largest = shape, 0
        g = torch.Generator().manual_seed(0)
        self.scale = torch.rand(shape[0], shape[1], 1, 1, generator=g) + 0.5

    def __getitem__(self, sl: slice) -> torch.Tensor:
        scale = self.scale[sl]
        self.largest = max(self.largest, scale.shape[0])
        ramp = torch.linspace(-1.0, 1.0, self.shape[2] * self.shape[3]).view(1, 1, *self.shape[2:])
        return scale * ramp + scale


def test_normalisation_statistics_read_big_maps_in_small_batches():
    """Per-channel mean/std of 40 maps of 16×256×256 (1 M values each): read 8 at a time, same numbers."""
    from kcore.conventions import STATS_BATCH_ELEMENTS, channel_mean_std

    maps = _CountingMaps((40, 16, 256, 256))
    mean, std = channel_mean_std(maps)
    assert maps.largest == STATS_BATCH_ELEMENTS // (16 * 256 * 256) == 8
    whole = maps[0:40].double()
    torch.testing.assert_close(mean, whole.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(std, whole.std(dim=(0, 2, 3), unbiased=False))


def test_evaluation_batches_are_bounded_in_images_and_values():
    from kcore.fit import EVAL_BATCH_ELEMENTS, EVAL_BATCH_SIZE, eval_batch_size

    assert eval_batch_size((1000, 64, 14, 14)) == EVAL_BATCH_SIZE  # small maps: the image cap
    assert eval_batch_size((1000, 512, 28, 28)) == EVAL_BATCH_ELEMENTS // (512 * 28 * 28) == 20
    assert eval_batch_size((3, 4096, 64, 64)) == 1  # one map above the value cap still goes, alone
