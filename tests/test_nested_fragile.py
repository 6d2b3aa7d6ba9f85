"""Fragile gains of nested fits (kcore.fit.nested.image_gains, fragile_gains): each held-out image's part of every
gain, computed two ways; a planted held-out image on which g₁'s output explodes is flagged by name while the fit
itself (and the guard, which never sees held-out images) is unchanged; a healthy fit is not flagged; the flags
survive save/load and metrics.json, are printed by the CLI, and the Overview shows them with the guard's decisions."""
from __future__ import annotations

import dataclasses as dc
import json
import math
from pathlib import Path

import pytest
import torch

import kcore
from helpers import planted_relu_pair
from kcore.fit import GainAccumulator
from kcore.fit.nested import (
    FRAGILE_CI_WIDTH,
    FRAGILE_IMAGE_SHARE,
    GainIntervals,
    NestedGains,
    NestedStage,
    fragile_gains,
    guard_rows,
    image_gains,
)

ROOT = Path(__file__).resolve().parents[1]
SCALE = 30.0  # the planted image's x is multiplied by this: g₁'s ReLU branch (and g₀'s map) go far off on it


FIT = dict(orders=1, nested=True, kernel_size=1, lam=0.0, max_steps=300, lr=3e-2, device="cpu")


@pytest.fixture(scope="module")
def fits() -> dict:
    """A healthy nested fit, and the same images with one held-out image's x scaled by SCALE."""
    torch.set_num_threads(1)
    x, y = planted_relu_pair(300)
    healthy = kcore.fit(x, y, **FIT)
    planted = int(healthy.heldout_indices[3])  # the split depends on the seed and the count, not on the values
    xp = x.clone()
    xp[planted] *= SCALE
    return dict(x=x, y=y, xp=xp, healthy=healthy, fragile=kcore.fit(xp, y, **FIT), planted=planted)


# ------------------------------------------------------------------------------------------- per-image parts
def test_each_image_s_part_of_the_gains_adds_up_and_equals_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(2)
    n, c = 9, 3
    t = torch.randn(n, c, 5, 5, generator=g, dtype=torch.float64) + 3.0
    outs = [0.6 * t + 0.4 * torch.randn(n, c, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    acc = GainAccumulator(2, c, n)
    for s in (slice(0, 4), slice(4, 9)):
        acc.update([o[s] for o in outs], t[s], s)
    res = acc.result()
    parts = image_gains(acc.merged_sums(), c * 25)
    assert parts.shape == (n, 3)
    torch.testing.assert_close(parts.sum(0), torch.tensor(res.gain_orders, dtype=torch.float64), rtol=0, atol=1e-12)
    # directly: each image's Σ(p − global mean of p)² for x* and every residual, differenced
    def per_image(p: torch.Tensor) -> torch.Tensor:
        return ((p - p.mean()) ** 2).sum((1, 2, 3))

    errs = [per_image(t)] + [per_image(t - o) for o in outs]
    direct = torch.stack([errs[k] - errs[k + 1] for k in range(3)], 1) / errs[0].sum()
    torch.testing.assert_close(parts, direct, rtol=0, atol=1e-12)
    # the image named per gain is the one with the largest |part|, and its share is of the sum of |parts|
    assert list(res.top_image) == [int(i) for i in parts.abs().argmax(0)]
    torch.testing.assert_close(torch.tensor(res.top_image_share, dtype=torch.float64),
                               parts.abs().max(0).values / parts.abs().sum(0), rtol=0, atol=1e-12)


def test_fragile_gains_flags_a_wide_interval_or_one_dominant_image_and_never_delta_0() -> None:
    n = 10
    calm = torch.full((n, 1), 0.01, dtype=torch.float64)
    lone = torch.cat([torch.tensor([[0.54]]), torch.full((n - 1, 1), 0.04)]).double()  # image 0: 0.54 / 0.9 = 60 %
    contrib = torch.cat([lone, calm, lone], 1)  # Δ₀ dominated by one image too: never flagged
    ci = GainIntervals(0.95, 100, 0, n, ((0.0, 0.9), (0.0, 0.02), (0.9, 1.0)), (0.0, 0.1))
    ids = list(range(100, 100 + n))
    top, top_gain, share, warn = fragile_gains((0.9, 0.1, 0.9), ci, contrib, ids)
    assert top == (100, 100, 100) and top_gain == pytest.approx((0.54, 0.01, 0.54))
    assert share == pytest.approx((0.6, 0.1, 0.6))
    assert len(warn) == 1 and warn[0].startswith("Δ2 = +90.0 points is fragile (one image holds more than 50%")
    assert "image 100 alone moves it by +54.0 points (60% of the change in error between g_2 and g_1 over 10" in warn[0]
    assert "[+90.0, +100.0] is 10.0 points wide" in warn[0]
    # a wide interval alone flags it, naming the interval
    wide = dc.replace(ci, gain_orders=((0.0, 0.9), (-0.1, 0.05), (0.9, 1.0)))
    warn = fragile_gains((0.9, 0.1, 0.9), wide, torch.cat([calm, calm, calm], 1), ids)[3]
    assert len(warn) == 1 and warn[0].startswith("Δ1 = +10.0 points is fragile (its interval is wider than 10 points)")
    assert "[-10.0, +5.0] is 15.0 points wide" in warn[0]
    # a gain of exactly 0 (a stage the guard did not keep): no image, no flag
    top, _, share, warn = fragile_gains((0.5, 0.0), None, torch.cat([calm, torch.zeros(n, 1).double()], 1))
    assert top == (0, -1) and share[1] == 0.0 and warn == ()
    with pytest.raises(ValueError, match="image_ids must name every held-out image: expected 10, got 2. Fix"):
        fragile_gains((0.1,), None, calm, [1, 2])
    with pytest.raises(ValueError, match="max_share must be in \\(0, 1\\); got 1.5. Fix: use 0.5"):
        fragile_gains((0.1,), None, calm, max_share=1.5)
    with pytest.raises(ValueError, match="max_width must be a number > 0 .*got -1. Fix: use 0.1"):
        fragile_gains((0.1,), None, calm, max_width=-1)
    assert (FRAGILE_CI_WIDTH, FRAGILE_IMAGE_SHARE) == (0.10, 0.5)


# ------------------------------------------------------------------------------------------- planted outlier
def test_a_held_out_image_on_which_g1_explodes_is_flagged_by_name(fits) -> None:
    res, i = fits["fragile"], fits["planted"]
    gains = res.nested.gains
    assert len(gains.fragile) == 1 and gains.fragile[0].startswith("Δ1 = ")
    assert f"held-out image {i} alone" in gains.fragile[0] and f"look at image {i}" in gains.fragile[0]
    lo, hi = gains.ci.gain_orders[1]
    assert f"[{100 * lo:+.1f}, {100 * hi:+.1f}]" in gains.fragile[0]
    assert gains.top_image[1] == i and gains.top_image_share[1] > FRAGILE_IMAGE_SHARE
    # two ways: the image's part of Δ₁ from g₀ and g₁ on the held-out images directly
    held = list(res.heldout_indices)
    xs, xt = res.norm.source(fits["xp"][held]).double(), res.norm.target(fits["y"][held]).double()
    with torch.no_grad():
        r = [xt - m.double()(xs) for m in res.nested.models]
    for m in res.nested.models:
        m.float()
    per = [((p - p.mean()) ** 2).sum((1, 2, 3)) for p in r]
    sst = ((xt - xt.mean()) ** 2).sum()
    assert math.isclose(gains.top_image_gain[1], float((per[0] - per[1])[held.index(i)] / sst), abs_tol=1e-5)
    # the fit itself is the healthy one: the normalisation, training and guard read no held-out image
    healthy = fits["healthy"]
    assert [dc.replace(s, seconds=0.0) for s in res.nested.stages] == [dc.replace(s, seconds=0.0)
                                                                       for s in healthy.nested.stages]
    for a, b in zip(res.nested.models, healthy.nested.models):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert [s.guard for s in res.nested.stages] == [s.guard for s in healthy.nested.stages]


def test_a_healthy_nested_fit_is_not_flagged(fits) -> None:
    gains = fits["healthy"].nested.gains
    assert gains.fragile == () and fits["healthy"].nested.stages[1].accepted
    lo, hi = gains.ci.gain_orders[1]
    assert hi - lo < FRAGILE_CI_WIDTH / 4 and max(gains.top_image_share[1:]) < 0.2


def test_the_flags_survive_save_load_and_metrics_json(fits, tmp_path: Path) -> None:
    res = fits["fragile"]
    gains = res.nested.gains
    assert NestedGains.from_dict(gains.as_dict()) == gains
    block = res.nested.as_dict()
    assert block["fragile"] == list(gains.fragile) and block["top_image"] == list(gains.top_image)
    back = kcore.FitResult.load(res.save(tmp_path / "g"))
    assert back.nested.gains == gains and back.nested.gains.fragile == gains.fragile
    # a block written before the flags existed reads back without them
    old = {k: v for k, v in gains.as_dict().items() if k not in ("fragile", "top_image", "top_image_gain",
                                                                "top_image_share")}
    assert NestedGains.from_dict(old).fragile == () and NestedGains.from_dict(old).top_image == ()


def test_guard_rows_say_what_each_stage_decided() -> None:
    stages = (NestedStage(0, 0.1), NestedStage(1, 2.0, 100, accepted=True, guard="accepted: monitor error 3.23 …",
                                                monitor_gain=0.0323, monitor_gain_se=0.0046),
              NestedStage(2, 2.0, 50, accepted=False, guard="kept g_(k-1): …", monitor_gain=0.001,
                          monitor_gain_se=0.002),
              NestedStage(3, 1.0, 10, guard="accepted unchecked: no monitor split"))
    rows = guard_rows(stages)
    assert [r["model"] for r in rows] == ["g_0", "g_1", "g_2", "g_3"]
    assert [r["kept"] for r in rows] == ["yes", "yes", "no (g_1's function)", "yes"]
    assert [r["monitor gain"] for r in rows] == ["—", "+3.23 ± 0.46 points", "+0.10 ± 0.20 points", "—"]
    assert rows[2]["guard"] == "kept g_(k-1): …" and rows[0]["guard"].startswith("closed-form")


# ------------------------------------------------------------------------------------------- CLI and Overview
@pytest.fixture(scope="module")
def nested_run(random_images, tmp_path_factory: pytest.TempPathFactory):
    """A nested run folder whose A→B gains carry a fragile warning, and that warning.

    The run is a real nested fit of two small networks (its guard decisions are what it decided); the warning is
    fragile_gains' own text for a planted dominant image, put into the run as tests/test_linear_error_shown.py
    plants its numbers, since no setting of these tiny networks makes a gain fragile on purpose."""
    from helpers import loaded, tiny_net
    from kcore.pipeline import compare, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, nested=True, gate="linear", device="cpu")
    d = comp.directions["A_to_B"]
    gains = d.fit.nested.gains
    n = gains.n_images
    contrib = torch.cat([torch.full((n, 1), 0.01), torch.cat([torch.tensor([[0.9]]), torch.full((n - 1, 1), 0.01)])],
                        1).double()
    warning = fragile_gains((0.5, 0.9), None, contrib, list(d.fit.heldout_indices))[3]
    assert len(warning) == 1
    nested = dc.replace(d.fit.nested, gains=dc.replace(gains, fragile=warning))
    comp = dc.replace(comp, directions={**comp.directions, "A_to_B": dc.replace(d, fit=dc.replace(d.fit, nested=nested))})
    runs = tmp_path_factory.mktemp("runs")
    return runs, write_run(comp, runs / "fragile"), warning[0], comp


def test_cli_prints_the_fragile_warnings(nested_run, tmp_path: Path, monkeypatch, capsys) -> None:
    """`kcore fit --nested` prints each fragile warning under the gains (the fit itself is the planted run's:
    compare_fit is replaced by it, so the test reads what the CLI prints, not how it fits)."""
    import kcore.pipeline
    from kcore.cli import main

    *_, warning, comp = nested_run
    monkeypatch.setattr(kcore.pipeline, "compare_fit", lambda *a, **k: comp)
    weak = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"
    strong = ROOT / "sample_models" / "kshapes_resnet_s0.safetensors"
    rc = main(["fit", "--a", str(weak), "--b", str(strong), "--data", "kshapes", "--n-images", "40", "--orders", "1",
               "--nested", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "order-wise gains of nested fits" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "order-wise gains of nested fits" in line)
    assert lines[at + 1] == f"  warning: {warning}"
    # the run folder keeps it: metrics.json's nested block, and the fit read back
    from kcore.run_folder import read_run

    block = json.loads((tmp_path / "run" / "metrics.json").read_text())["directions"]["A_to_B"]["nested"]
    assert block["fragile"] == [warning] and len(block["top_image_share"]) == 2
    assert read_run(tmp_path / "run").directions["A_to_B"].fit.nested.gains.fragile == (warning,)


def test_overview_shows_the_guard_s_decisions_and_the_fragile_warning(nested_run, monkeypatch) -> None:
    from streamlit.testing.v1 import AppTest

    from helpers import open_run_folder

    runs, folder, warning, comp = nested_run
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    open_run_folder(at, folder, "overview")
    assert not at.exception, [e.value for e in at.exception]
    assert warning in [w.value for w in at.warning]
    stages = comp.directions["A_to_B"].fit.nested.stages
    tables = [t.value for t in at.dataframe if "guard" in t.value.columns]
    assert len(tables) == len(comp.directions)  # one table of the guard's decisions per fitted direction
    table = tables[0]
    assert list(table["model"]) == ["g_0", "g_1"] and list(table["guard"])[1] == (stages[1].guard or "accepted")
    assert list(table["kept"])[1] == ("yes" if stages[1].accepted else "no (g_0's function)")
    if stages[1].monitor_gain is not None:
        assert list(table["monitor gain"])[1] == (f"{100 * stages[1].monitor_gain:+.2f} ± "
                                                  f"{100 * stages[1].monitor_gain_se:.2f} points")
    assert any(c.value.startswith("The guard of each nested fit") for c in at.caption)
