"""g_θ (Eq. 1) and its conventions: hand-set weights against a direct transcription."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kcore.conventions import Normalization
from kcore.gtheta import GTheta, GThetaSpec, gtheta_loss


def _hand_set(g: GTheta) -> None:
    """Deterministic, non-random weights: a smooth pattern per layer, and distinct gates."""
    with torch.no_grad():
        for i, conv in enumerate(g.convs):
            n = conv.weight.numel()
            conv.weight.copy_(torch.sin(torch.arange(n, dtype=torch.float64) * (0.37 + 0.11 * i)).reshape(conv.weight.shape) * 0.2)
        g.p_param.copy_(torch.logit(torch.tensor([0.3, 0.7][: g.orders], dtype=torch.float64)))


def _authors_transcription(x_raw, w_deepest_first, p_rev):
    """The authors' forward written out as in their code: x <- my_bn(x); out = conv0(x);
    for i in 1..K: out = p[i-1] * ReLU(out / std(out)); out = conv_i(x + out)."""

    def my_bn(t):
        n, c, h, w = t.shape
        a = t.reshape(n, c, h * w).var(-1).sqrt() + 1e-5
        return t / a.reshape(n, c, 1, 1)

    x = my_bn(x_raw)
    out = F.conv2d(x, w_deepest_first[0], padding=1)
    for i in range(1, len(w_deepest_first)):
        out = p_rev[i - 1] * F.relu(my_bn(out))
        out = F.conv2d(x + out, w_deepest_first[i], padding=1)
    return out


def test_authors_convention_matches_direct_transcription_of_eq1():
    torch.manual_seed(0)
    spec = GThetaSpec(5, 5, orders=2, convention="authors", gate="sigmoid", p_init=0.5)
    g = GTheta(spec).double()
    _hand_set(g)
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64) * 2 + 0.5
    norm = Normalization("authors", (6, 7))
    ours = g(norm.source(x))
    # The authors index their convs deepest first and their gates in reverse (p[0] is the paper's p^(2)).
    w = [g.convs[2].weight, g.convs[1].weight, g.convs[0].weight]
    p = g.gates().flip(0)
    theirs = _authors_transcription(x, w, p)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_paper_convention_eval_uses_stored_sigma():
    torch.manual_seed(1)
    g = GTheta(GThetaSpec(4, 3, orders=1, convention="paper")).double().eval()
    g.running_var.fill_(4.0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    h1 = g.convs[1](x)
    expected = g.convs[0](x + g.gates()[0] * F.relu(h1 / (4.0 + 1e-5) ** 0.5))
    torch.testing.assert_close(g(x), expected)


def test_different_channels_and_k0():
    g = GTheta(GThetaSpec(7, 2, orders=0))
    assert g(torch.randn(2, 7, 4, 4)).shape == (2, 2, 4, 4)
    assert g.gates().numel() == 0
    g3 = GTheta(GThetaSpec(7, 2, orders=3))
    assert [tuple(c.weight.shape[:2]) for c in g3.convs] == [(2, 7), (7, 7), (7, 7), (7, 7)]


def test_loss_is_mean_squared_error_plus_gate_penalty():
    out, tgt = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    total, mse = gtheta_loss(out, tgt, torch.tensor([0.5, 0.2]), lam=0.1)
    assert float(mse) == pytest.approx(1.0)
    assert float(total) == pytest.approx(1.0 + 0.1 * (0.25 + 0.04))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(orders=-1), "orders"),
        (dict(kernel_size=2), "kernel_size must be odd"),
        (dict(convention="nope"), "convention must be one of"),
        (dict(gate="tanh"), "gate must be one of"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GThetaSpec(3, 3, **kwargs)


def test_nearly_dead_channels_are_not_blown_up_by_standardisation():
    from kcore.conventions import STD_FLOOR

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, 4, generator=g)
    x[:, 2] *= 1e-5  # a channel that barely moves
    norm = Normalization.fit(x, x, "paper")
    assert float(norm.src_std[0]) == pytest.approx(float(x[:, 0].std(unbiased=False)), rel=1e-6)
    floor = STD_FLOOR * float(torch.stack([x[:, c].std(unbiased=False) for c in range(3)]).double().mean())
    assert float(norm.src_std[2]) == pytest.approx(floor, rel=1e-3)
    assert float(norm.source(x)[:, 2].abs().max()) < 1e-2  # not scaled up to unit variance


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_batch_channel_var_is_the_population_variance_over_images_and_positions(dtype, tol, layout) -> None:
    from kcore.gtheta import batch_channel_var

    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 1.0, 5.0, 2.0]).view(1, 4, 1, 1)
    # the last channel: mean 10× its std, where the one-pass form loses about ε·(mean/std)² ≈ 1e-5 in float32
    shift = torch.tensor([0.0, -3.0, 1.0, 20.0]).view(1, 4, 1, 1)
    h64 = torch.randn(16, 4, 7, 9, generator=g, dtype=torch.float64) * scale + shift
    h = h64.to(dtype).contiguous(memory_format=layout)
    got = batch_channel_var(h)
    want = h.double().var(dim=(0, 2, 3), unbiased=False)  # two-pass, in float64, of the same rounded values
    # (tolerances: float32 rounding times (mean/std)² ≈ 100 for the last channel; bfloat16: the result is rounded)
    assert got.dtype == dtype and got.shape == (4,)
    assert torch.allclose(got.double(), want, rtol=tol, atol=0.0), (got, want)
    const = torch.full((3, 2, 4, 4), 7.0, dtype=dtype)
    assert torch.equal(batch_channel_var(const), torch.zeros(2, dtype=dtype))  # never negative
