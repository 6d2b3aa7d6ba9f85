"""The guard of nested fits (kcore.fit.nested.guard_stage): a gₖ that does not beat gₖ₋₁ on the monitor images by
more than their noise is replaced by gₖ₋₁'s function (Δₖ = 0 exactly), one that does is kept; the decision is
recorded per stage (result, metrics.json, CLI), and metrics.csv carries the gains and their intervals."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import kcore
from helpers import plain_net, planted_relu_pair
from kcore import export, load_result
from kcore.checkpoints import LoadedModel
from kcore.fit.nested import GUARD_MIN_GAIN, GUARD_Z, guard_stage, per_image_errors
from kcore.gtheta import GTheta, GThetaSpec
from kcore.pipeline import compare

ROOT = Path(__file__).resolve().parents[1]


def _linear_pair(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 4, 4, 4) and x* = A x + noise: no order above 0 can add anything but over-fitting."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 4, 4, generator=g)
    a = torch.randn(3, 4, 1, 1, generator=g)
    return x, F.conv2d(x, a) + 0.7 * torch.randn(n, 3, 4, 4, generator=g)


@pytest.fixture(scope="module")
def linear_fit() -> tuple[kcore.FitResult, torch.Tensor, torch.Tensor]:
    x, y = _linear_pair(200)
    return kcore.fit(x, y, orders=2, nested=True, kernel_size=1, max_steps=150, device="cpu"), x, y


# ------------------------------------------------------------------------------------------- the decision
def _model(w: torch.Tensor) -> GTheta:
    """A K = 0 g_θ (1×1) computing the linear map ``w`` (C_b, C_a)."""
    g = GTheta(GThetaSpec(w.shape[1], w.shape[0], 0, 1, "paper", "linear", 0.0)).eval()
    with torch.no_grad():
        g.convs[0].weight.copy_(w.view(*w.shape, 1, 1))
    return g


def test_the_guard_statistic_is_the_paired_drop_of_the_monitor_error() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(30, 4, 4, 4, generator=gen)
    a = torch.randn(3, 4, generator=gen)
    y = torch.einsum("oc,nchw->nohw", a, x) + 0.5 * torch.randn(30, 3, 4, 4, generator=gen)
    worse, better = _model(0.5 * a), _model(a)
    dev = torch.device("cpu")
    # by hand: per-image squared errors over the mean per-image Σ(x* − channel mean)²
    e = [((y - torch.einsum("oc,nchw->nohw", w, x)).double() ** 2).sum((1, 2, 3)) for w in (0.5 * a, a)]
    sst = float(((y - y.mean((0, 2, 3), keepdim=True)).double() ** 2).sum()) / 30
    d = (e[0] - e[1]) / sst
    torch.testing.assert_close(per_image_errors(better, x, y, 7, dev), e[1], rtol=1e-5, atol=1e-6)
    dec = guard_stage(worse, better, x, y, 7, dev)
    assert dec.accepted and dec.n_images == 30 and "accepted" in dec.reason
    assert math.isclose(dec.gain, float(d.mean()), rel_tol=1e-5)
    assert math.isclose(dec.se, float(d.std()) / math.sqrt(30), rel_tol=1e-4)
    assert dec.gain > GUARD_Z * dec.se and dec.gain > GUARD_MIN_GAIN
    # the other way round the drop is negative: kept
    back = guard_stage(better, worse, x, y, 7, dev)
    assert not back.accepted and math.isclose(back.gain, -dec.gain, rel_tol=1e-5) and "kept g_(k-1)" in back.reason
    # the same function: no drop, no noise, kept (a gain must be more than zero)
    same = guard_stage(better, better, x, y, 7, dev)
    assert not same.accepted and same.gain == 0.0 and same.se == 0.0
    # a threshold above the measured ratio, or a minimum gain above the drop, flips the decision
    assert not guard_stage(worse, better, x, y, 7, dev, z=dec.gain / dec.se * 1.01).accepted
    assert guard_stage(worse, better, x, y, 7, dev, min_gain=dec.gain * 0.99).accepted
    assert not guard_stage(worse, better, x, y, 7, dev, min_gain=dec.gain * 1.01).accepted


def test_the_guard_accepts_unchecked_without_monitor_images_and_checks_z() -> None:
    g = _model(torch.ones(3, 4))
    dec = guard_stage(g, g, None, None, 8, torch.device("cpu"))
    assert dec.accepted and dec.gain is None and "no monitor split" in dec.reason
    with pytest.raises(ValueError, match=r"z must be a finite number >= 0; got -1. Fix: use 2"):
        guard_stage(g, g, None, None, 8, torch.device("cpu"), z=-1)
    with pytest.raises(ValueError, match=r"min_gain must be a finite number >= 0; got nan. Fix: use 0.005"):
        guard_stage(g, g, None, None, 8, torch.device("cpu"), min_gain=float("nan"))


# ------------------------------------------------------------------------------------------- planted targets
def test_a_new_order_that_cannot_help_is_not_kept_and_its_gain_is_exactly_zero(linear_fit) -> None:
    res, x, _ = linear_fit
    nested = res.nested
    stages, gains = nested.stages, nested.gains
    assert stages[0].accepted and stages[0].guard == ""
    assert [s.accepted for s in stages[1:]] == [False, False], [s.guard for s in stages]
    for s in stages[1:]:
        assert s.guard.startswith("kept g_(k-1)") and s.gates[-1] == 0.0 and s.steps_run > 0
        assert s.monitor_gain is not None
        assert s.monitor_gain <= GUARD_Z * s.monitor_gain_se or s.monitor_gain <= GUARD_MIN_GAIN
    # g₁, g₂ compute g₀'s function exactly, so the gains above 0 are exactly 0, as are their intervals
    xs = res.norm.source(x[:16])
    with torch.no_grad():
        out = [m(xs) for m in nested.models]
    assert torch.equal(out[1], out[0]) and torch.equal(out[2], out[0])
    assert gains.gain_orders[1] == 0.0 and gains.gain_orders[2] == 0.0
    assert gains.r2_orders[0] == gains.r2_orders[1] == gains.r2_orders[2]
    assert gains.ci.gain_orders[1] == (0.0, 0.0) and gains.ci.gain_orders[2] == (0.0, 0.0)
    # the nesting's invariant still holds
    assert abs(sum(gains.gain_orders) + gains.instability - 1) < 1e-9
    for c in range(3):
        assert abs(sum(g[c] for g in gains.channel_gain_orders) + gains.channel_instability[c] - 1) < 1e-9


def test_a_new_order_that_helps_is_kept() -> None:
    x, y = planted_relu_pair(300)
    res = kcore.fit(x, y, orders=1, nested=True, kernel_size=1, lam=0.0, max_steps=300, lr=3e-2, device="cpu")
    st, gains = res.nested.stages[1], res.nested.gains
    assert st.accepted and st.guard.startswith("accepted"), st.guard
    assert st.monitor_gain > GUARD_Z * st.monitor_gain_se and st.monitor_gain > 0.02
    assert gains.gain_orders[1] > 0.02 and gains.ci.gain_orders[1][0] > 0
    assert abs(sum(gains.gain_orders) + gains.instability - 1) < 1e-9


def test_the_guard_s_decisions_are_saved_and_loaded(linear_fit, tmp_path: Path) -> None:
    res, _, _ = linear_fit
    block = res.nested.as_dict()["stages"]
    assert [s["accepted"] for s in block] == [True, False, False]
    assert block[1]["guard"] == res.nested.stages[1].guard and block[1]["monitor_gain"] is not None
    res.save(tmp_path / "g")
    back = load_result(tmp_path / "g").nested.stages
    assert back == res.nested.stages


# ------------------------------------------------------------------------------------------- exports and CLI
@pytest.fixture(scope="module")
def nested_comparison(random_images):
    a = LoadedModel(plain_net(0, 5), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(plain_net(1, 4), "b.safetensors", "b" * 64, "safetensors", None, 10)
    images = random_images(24, 12)
    return compare(a, "2", b, "2", images, orders=1, epochs=2, nested=True, gate="linear", device="cpu")


def test_metrics_csv_has_the_gains_and_their_intervals(nested_comparison, tmp_path: Path) -> None:
    export.write_metrics(nested_comparison, tmp_path)
    df = pd.read_csv(tmp_path / "metrics.csv")
    fit = nested_comparison.directions["A_to_B"].fit
    gains = fit.nested.gains
    row = df.iloc[0]
    for k in range(2):
        assert math.isclose(row[f"gain_x{k}"], gains.gain_orders[k], rel_tol=1e-5, abs_tol=1e-7)
        lo, hi = gains.ci.gain_orders[k]
        assert math.isclose(row[f"gain_x{k}_ci_lo"], lo, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(row[f"gain_x{k}_ci_hi"], hi, rel_tol=1e-5, abs_tol=1e-7)
    # the gains and g_K's instability (the file's own column) add up to 1
    assert abs(row["gain_x0"] + row["gain_x1"] + row["instability"] - 1) < 1e-4
    assert str(row["gain_accepted"]) == " ".join("1" if s.accepted else "0" for s in fit.nested.stages)
    assert "gain_x2" not in df.columns


def test_metrics_csv_of_a_plain_fit_has_no_gain_columns(random_images) -> None:
    a = LoadedModel(plain_net(0, 5), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(plain_net(1, 4), "b.safetensors", "b" * 64, "safetensors", None, 10)
    comp = compare(a, "2", b, "2", random_images(24, 12), orders=1, epochs=2, device="cpu")
    assert not [c for c in export.metrics_table(comp).columns if c.startswith("gain_")]


@pytest.mark.slow
def test_cli_prints_each_stage_s_guard_and_metrics_json_keeps_it(tmp_path: Path) -> None:
    from kcore.cli import main

    out = tmp_path / "run"
    weak = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"
    strong = ROOT / "sample_models" / "kshapes_resnet_s0.safetensors"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["fit", "--a", str(weak), "--b", str(strong), "--data", "kshapes", "--n-images", "60",
                   "--orders", "1", "--epochs", "2", "--nested", "--out", str(out)])
    assert rc == 0
    stage = json.loads((out / "metrics.json").read_text())["directions"]["A_to_B"]["nested"]["stages"][1]
    assert isinstance(stage["accepted"], bool) and stage["guard"]
    assert f"g_1: {stage['guard']}" in printed.getvalue()
