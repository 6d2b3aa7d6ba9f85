"""Additive shares, bootstrap intervals and the typed report: known answers."""
from __future__ import annotations

import json

import pytest
import torch

from kcore.metrics import VarianceReport, paper_cov, paper_var, variance_report


def _parts(K: int, seed: int, n: int = 12, C: int = 5):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, C, 4, 3, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, C).view(1, C, 1, 1) + 2.0
    # correlated components of mixed sign, so the paper's Var ratios do not add up
    comps = [0.8 * t + torch.randn(t.shape, generator=g, dtype=torch.float64) * (k + 1) for k in range(K + 1)]
    comps = [c - k * 0.5 * comps[0] for k, c in enumerate(comps)]
    return comps, t - sum(comps), t


@pytest.mark.parametrize("K", [0, 1, 3])
def test_shares_sum_to_one_per_direction_and_per_channel(K):
    comps, resid, t = _parts(K, seed=K)
    rep = variance_report(comps, resid, t, batch_size=5)
    assert len(rep.share_orders) == K + 1
    assert sum(rep.share_orders) + rep.share_residual == pytest.approx(1.0, abs=1e-9)
    f64 = torch.float64
    shares = torch.tensor(rep.per_channel.share_orders, dtype=f64).sum(0) + torch.tensor(rep.per_channel.share_residual, dtype=f64)
    assert torch.allclose(shares, torch.ones_like(shares), atol=1e-9, rtol=0)
    # the streamed share is the directly computed Cov / Var with the paper's single global mean
    assert rep.share_orders[0] == pytest.approx(paper_cov(comps[0], t) / paper_var(t), rel=1e-10)
    if K > 0:  # the paper's Var ratios are not additive (that is why shares exist)
        assert abs(sum(rep.var_ratio_orders) + rep.var_residual / rep.var_target - 1) > 1e-3


def test_report_round_trips_through_json_and_refuses_dict_access():
    comps, resid, t = _parts(2, seed=0)
    rep = variance_report(comps, resid, t)
    back = VarianceReport.from_dict(json.loads(json.dumps(rep.as_dict())))
    assert back == rep
    d = rep.as_dict()
    assert d["n_heldout"] == 12 and len(d["ci"]["share_orders"]) == 3 and len(d["ci"]["instability"]) == 2
    with pytest.raises(TypeError, match="Fix: use report.instability"):
        rep["instability"]


def test_old_report_format_is_read_back_without_shares():
    comps, resid, t = _parts(1, seed=3)
    d = variance_report(comps, resid, t).as_dict()
    old = {k: d[k] for k in ("n_images", "orders", "var_orders", "var_output", "var_residual", "var_target",
                             "instability", "mse", "var_orders_channel_centred", "var_residual_channel_centred",
                             "var_target_channel_centred")}
    pc = d["per_channel"]
    old["per_channel"] = {"var_orders": pc["var_orders"], "var_residual": pc["var_residual"],
                          "var_target": pc["var_target"], "order_share": pc["var_ratio_orders"],
                          "residual_share": pc["var_ratio_residual"]}
    rep = VarianceReport.from_dict(old)
    assert rep.instability == d["instability"] and not rep.has_shares and rep.ci is None
    for got, want in zip(rep.per_channel.var_ratio_orders, pc["var_ratio_orders"]):
        assert list(got) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="not a variance report"):
        VarianceReport.from_dict({"instability": 0.3})


def _random_effects_problem(seed: int, n: int = 100):
    """x* = c + r per image, with image-level amplitudes a ~ U(0.5, 1.5), b ~ U(0.2, 1.0) of zero-mean noise.

    True instability Var(r)/Var(x*) = E[b²] / (E[a²] + E[b²]) with E[a²] = 13/12, E[b²] = 0.36 + 0.64/12.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64) + 0.5
    b = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64) * 0.8 + 0.2
    c = a * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    r = b * torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return [0.6 * c, 0.4 * c], r, c + r


TRUE_INSTABILITY = (0.36 + 0.64 / 12) / (13 / 12 + 0.36 + 0.64 / 12)


def test_bootstrap_interval_covers_the_true_instability():
    covered = 0
    for seed in range(50):
        comps, r, t = _random_effects_problem(seed)
        rep = variance_report(comps, r, t, batch_size=32)
        lo, hi = rep.ci.instability
        assert lo < rep.instability < hi
        covered += lo <= TRUE_INSTABILITY <= hi
    assert covered >= 45, f"the 95 % interval covered the true instability in {covered}/50 repeats"


def test_bootstrap_is_seeded_and_warns_on_few_images():
    comps, r, t = _random_effects_problem(0, n=20)
    a, b = variance_report(comps, r, t), variance_report(comps, r, t)
    assert a.ci == b.ci and a.ci.n_heldout == 20
    assert any("fewer than 50" in w for w in a.warnings())
    assert any("wide" in w for w in a.warnings())  # 20 noisy images: intervals wider than 0.1


def test_channel_permutation_puts_everything_in_the_linear_share():
    import kcore

    torch.manual_seed(0)
    x = torch.randn(160, 8, 8, 8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    res = kcore.fit(x, x[:, perm] * 3.0 - 1.0, orders=2)
    rep = res.heldout_report
    assert 0.95 <= rep.share_orders[0] <= 1.0 + 1e-6
    assert max(max(row) for row in rep.per_channel.share_orders) <= 1.0 + 1e-6
    assert min(rep.per_channel.share_orders[0]) >= 0.95
    # the interval of a (near) exact reconstruction is tight and holds the estimate
    lo, hi = rep.ci.share_orders[0]
    assert lo <= rep.share_orders[0] <= hi and hi - lo < 1e-3
