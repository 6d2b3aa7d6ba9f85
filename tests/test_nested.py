"""Nested fits (kcore.fit.nested): the models are nested, the gains are exact and add up, their intervals are the
bootstrap's, a planted order structure is recovered, and two torchrun ranks give the gains of one process."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kcore
from helpers import open_run_folder, run_job
from kcore.decompose import nested_components
from kcore.fit import FitConfig, GainAccumulator, extend_order, make_config, nested_decompose
from kcore.gtheta import GTheta, GThetaSpec
from kcore.metrics import fit_linear_map, paper_var
from kcore.metrics.variance import percentile_interval, resample_weights

ROOT = Path(__file__).resolve().parents[1]


def _gtheta(k: int, convention: str = "paper", seed: int = 0) -> GTheta:
    torch.manual_seed(seed)
    g = GTheta(GThetaSpec(5, 4, k, 3, convention, "linear", 0.7))
    with torch.no_grad():
        g.running_var.uniform_(0.5, 2.0)
    return g


def _pair(n: int = 120, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 5, 8, 8) and a non-linear x* (n, 4, 8, 8) with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, 8, 8, generator=g)
    w1, w2 = torch.randn(4, 5, 3, 3, generator=g) * 0.3, torch.randn(5, 5, 3, 3, generator=g) * 0.3
    y = F.conv2d(x, w1, padding=1) + F.conv2d(F.relu(F.conv2d(x, w2, padding=1)), w1, padding=1)
    return x, y + 0.3 * torch.randn(n, 4, 8, 8, generator=g)


@pytest.fixture(scope="module")
def nested_fit() -> tuple[kcore.FitResult, torch.Tensor, torch.Tensor]:
    x, y = _pair()
    return kcore.fit(x, y, orders=2, nested=True, max_steps=60, device="cpu"), x, y


# ------------------------------------------------------------------------------------------- nested models
@pytest.mark.parametrize("convention", ["paper", "authors"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_new_order_with_its_gate_at_zero_is_the_same_function(convention: str, k: int) -> None:
    prev = _gtheta(k, convention).eval()
    x = torch.randn(6, 5, 8, 8)
    before = {n: v.clone() for n, v in prev.state_dict().items()}
    nxt = extend_order(prev, seed=3)
    assert nxt.orders == k + 1 and float(nxt.gates()[-1].detach()) == 0.0 and not nxt.training
    with torch.no_grad():
        torch.testing.assert_close(nxt(x), prev(x), rtol=0, atol=1e-6)
        # the new gate is what keeps it equal: opened, the function changes
        nxt.p_param[-1] = 0.5
        assert float((nxt(x) - prev(x)).abs().max()) > 1e-3
    assert all(torch.equal(v, prev.state_dict()[n]) for n, v in before.items())  # prev unchanged


def test_extend_order_refuses_a_sigmoid_gate_and_other_models() -> None:
    g = GTheta(GThetaSpec(5, 4, 1, 3, "paper", "sigmoid", 0.5))
    with pytest.raises(ValueError, match="gate='linear'.*got gate='sigmoid'.*Fix"):
        extend_order(g)
    with pytest.raises(TypeError, match="prev must be a kcore.gtheta.GTheta; got Linear"):
        extend_order(torch.nn.Linear(2, 2))  # type: ignore[arg-type]


def test_nested_config_is_checked() -> None:
    assert make_config("fast").nested is False and make_config("fast", nested=True).nested is True
    with pytest.raises(ValueError, match="nested=True needs gate='linear'.*gate='sigmoid'.*Fix: pass gate='linear'"):
        make_config("authors", nested=True)
    assert make_config("authors", nested=True, gate="linear").nested
    with pytest.raises(TypeError, match="nested must be True or False; got 'yes'"):
        FitConfig(nested="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- gains
def test_gains_and_instability_add_up_to_one_overall_and_per_channel(nested_fit) -> None:
    res, _, _ = nested_fit
    g = res.nested.gains
    assert len(g.gain_orders) == 3 and len(res.nested.models) == 3 and res.nested.models[-1] is res.model
    assert abs(sum(g.gain_orders) + g.instability - 1.0) < 1e-9
    np.testing.assert_allclose(np.sum(g.channel_gain_orders, 0) + np.array(g.channel_instability), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.cumsum(g.gain_orders), g.r2_orders, atol=1e-12)
    # the same instability as the Eq. 3–4 report of g_K, computed another way (from its components)
    assert abs(g.instability - res.heldout_report.instability) < 1e-5
    assert g.n_images == len(res.heldout_indices) == g.ci.n_heldout
    for k, (lo, hi) in enumerate(g.ci.gain_orders):
        assert lo <= g.gain_orders[k] <= hi
    assert [s.order for s in res.nested.stages] == [0, 1, 2] and res.nested.stages[0].steps_run == 0


def test_g0_is_the_least_squares_map_and_its_gain_its_held_out_r2(nested_fit) -> None:
    res, x, y = nested_fit
    tr, held = list(res.train_indices), list(res.heldout_indices)
    xs, xt = res.norm.source(x), res.norm.target(y)
    lin = fit_linear_map(xs[tr], xt[tr], 3)
    g0 = res.nested.models[0]
    torch.testing.assert_close(g0.convs[0].weight, lin.weight, rtol=0, atol=1e-6)
    with torch.no_grad():
        direct = 1.0 - paper_var(xt[held] - lin(xs[held])) / paper_var(xt[held])
    assert abs(res.nested.gains.gain_orders[0] - direct) < 1e-6
    # each later model starts from the one before: its kept monitor error is never worse than its start
    for s in res.nested.stages[1:]:
        assert s.best_monitor_error <= s.start_monitor_error


def test_nested_components_sum_to_g_K_and_decompose_x_star(nested_fit) -> None:
    res, x, y = nested_fit
    models = [m.double() for m in res.nested.models]
    try:
        xs = res.norm.source(x[:16]).double()
        comps = nested_components(models, xs)
        with torch.no_grad():
            torch.testing.assert_close(torch.stack(comps).sum(0), models[-1](xs), rtol=0, atol=1e-12)
            torch.testing.assert_close(comps[1], models[1](xs) - models[0](xs), rtol=0, atol=0)
    finally:
        for m in models:
            m.float()
    dec = nested_decompose(res, x[:16], y[:16])
    assert dec.meta == {"kind": "nested"} and dec.orders == 2
    torch.testing.assert_close(sum(dec.components) + dec.residual, dec.target, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec.output, res.predict(x[:16]), rtol=0, atol=1e-5)


def test_a_saved_nested_fit_loads_back_whole(nested_fit, tmp_path: Path) -> None:
    res, x, y = nested_fit
    back = kcore.FitResult.load(res.save(tmp_path / "g"))
    assert back.nested.gains == res.nested.gains and back.nested.stages == res.nested.stages
    for a, b in zip(back.nested.models, res.nested.models):
        assert a.spec == b.spec and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.testing.assert_close(nested_decompose(back, x[:4], y[:4]).components[1],
                               nested_decompose(res, x[:4], y[:4]).components[1], rtol=0, atol=0)


def test_nested_components_and_decompose_refuse_what_is_not_nested() -> None:
    with pytest.raises(ValueError, match=r"K = 0, 1, …, K in order; got orders \[1, 0\].*Fix"):
        nested_components([_gtheta(1), _gtheta(0)], torch.randn(1, 5, 8, 8))
    x, y = _pair(40)
    plain = kcore.fit(x, y, orders=1, max_steps=10, device="cpu")
    assert plain.nested is None
    with pytest.raises(ValueError, match="must be a nested fit.*Fix: fit with kcore.fit\\(..., nested=True\\)"):
        nested_decompose(plain, x, y)


def test_orders_zero_is_the_least_squares_fit_alone() -> None:
    x, y = _pair(60)
    res = kcore.fit(x, y, orders=0, nested=True, device="cpu")
    g = res.nested.gains
    assert len(g.gain_orders) == 1 and res.steps_run == 0 and res.history == ()
    assert abs(g.gain_orders[0] - (1.0 - res.heldout_report.instability)) < 1e-6


@pytest.mark.parametrize("groups", [None, [0, 0, 1, 1, 1, 2, 3, 3, 4, 5, 5, 5]])
def test_bootstrap_intervals_equal_a_direct_resample_of_the_images(groups: list[int] | None) -> None:
    """The intervals from per-image sums equal those of the gains recomputed on every resample of whole tensors
    (images, or whole groups of images: a cluster bootstrap, whose resamples differ in size)."""
    g = torch.Generator().manual_seed(1)
    n, c = 12, 3
    t = torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) + 2.0
    outs = [t * 0.5 + 0.3 * torch.randn(n, c, 4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    acc = GainAccumulator(2, c, n)
    acc.set_shifts([o[:5] for o in outs], t[:5])
    for s in (slice(0, 5), slice(5, 12)):
        acc.update([o[s] for o in outs], t[s], s)
    labels = None if groups is None else torch.tensor(groups)
    res = acc.result(n_boot=40, seed=7, groups=labels)
    w = resample_weights(n, 40, 7, labels)
    assert groups is None or len(set((w.sum(1)).tolist())) > 1  # resamples of several sizes
    gains, ch_gains = [], []
    for row in w:
        idx = torch.repeat_interleave(torch.arange(n), row.long())
        r2 = [1 - paper_var(t[idx] - o[idx]) / paper_var(t[idx]) for o in outs]
        gains.append([r2[0], r2[1] - r2[0], r2[2] - r2[1]])
        r2c = torch.stack([1 - (t[idx] - o[idx]).var((0, 2, 3), unbiased=False) / t[idx].var((0, 2, 3), unbiased=False)
                           for o in outs])
        ch_gains.append(torch.cat([r2c[:1], r2c[1:] - r2c[:-1]]))
    np.testing.assert_allclose(res.ci.gain_orders, percentile_interval(torch.tensor(gains, dtype=torch.float64)).numpy(), atol=1e-10)
    np.testing.assert_allclose(res.ci.channel_gain_orders,
                               percentile_interval(torch.stack(ch_gains)).numpy(), atol=1e-10)
    # the point values are those of the whole tensors
    assert abs(res.r2_orders[1] - (1 - paper_var(t - outs[1]) / paper_var(t))) < 1e-12


# ------------------------------------------------------------------------------------------- planted orders
def test_a_planted_linear_plus_relu_target_gives_its_known_gains() -> None:
    """x* = W(x + β ReLU(Cx)) + noise, which g₁ can express exactly (C orthogonal, so every channel of Cx has the
    same variance and Σ's normalisation changes nothing; W's rows sum to 0, so the bias-free g₁ needs no offset). Known answers, from the true function and the best
    linear map of 50 000 fresh images: Δ₀ = R² of the best linear predictor of the whole x* (not Var(Wx)/Var(x*),
    because ReLU(Cx) correlates with x), Δ₀ + Δ₁ = R² of the true function. Δ₀ must equal the best linear map's R²
    on the held-out images, and the population's must lie in its 95 % interval (for this seed; a 95 % interval
    misses for about one seed in twenty). Δ₁ is recovered only up to g₁'s optimisation shortfall."""
    g = torch.Generator().manual_seed(0)
    ca, cb, beta, noise = 4, 3, 1.5, 0.4
    w = torch.randn(cb, ca, 1, 1, generator=g)
    w = w - w.mean(1, keepdim=True)  # W·1 = 0: W ReLU(Cx) has mean 0, as a bias-free g₁ must produce it
    c = torch.linalg.qr(torch.randn(ca, ca, generator=g))[0].view(ca, ca, 1, 1)

    def draw(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = torch.randn(n, ca, 4, 4, generator=gen, dtype=torch.float64)
        clean = F.conv2d(x + beta * F.relu(F.conv2d(x, c.double())), w.double())
        return x, clean, clean + noise * torch.randn(clean.shape, generator=gen, dtype=torch.float64)

    x, clean_x, y = draw(400, torch.Generator().manual_seed(100))
    # the fast preset's 800 steps at lr 3e-3 leave g₁ short of its optimum here (R² 0.87 of 0.93 reachable):
    # a larger rate and patience let it converge
    res = kcore.fit(x.float(), y.float(), orders=1, nested=True, kernel_size=1, lam=0.0, max_steps=1500, lr=3e-2,
                    patience_steps=300, device="cpu")
    mean, std = res.norm.tgt_mean.double().view(1, -1, 1, 1), res.norm.tgt_std.double().view(1, -1, 1, 1)

    def units(t: torch.Tensor) -> torch.Tensor:  # the fit's units of x* (standardised per channel)
        return (t - mean) / std

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])

    def with_one(t: torch.Tensor) -> torch.Tensor:  # the global mean is free in R²
        return torch.cat([rows(t), torch.ones(rows(t).shape[0], 1, dtype=torch.float64)], 1)

    def r2(target: torch.Tensor, pred: torch.Tensor) -> float:
        return 1 - paper_var(target - pred) / paper_var(target)

    xb, clean, yb = draw(50_000, torch.Generator().manual_seed(1))
    coef = torch.linalg.lstsq(with_one(xb), rows(units(yb))).solution

    def best_linear(x_: torch.Tensor) -> torch.Tensor:
        return (with_one(x_) @ coef).view(x_.shape[0], x_.shape[2], x_.shape[3], cb).permute(0, 3, 1, 2)

    ref0, ref_all = r2(units(yb), best_linear(xb)), r2(units(yb), units(clean))
    naive0 = paper_var(units(F.conv2d(xb, w.double())) - units(torch.zeros_like(yb))) / paper_var(units(yb))
    assert abs(ref0 - naive0) > 0.02 and ref_all - ref0 > 0.05
    held = list(res.heldout_indices)
    gains = res.nested.gains
    # on the held-out images: the population's best linear map, exactly (g₀ is closed-form) …
    assert abs(gains.gain_orders[0] - r2(units(y[held]), best_linear(x[held]))) < 0.003
    (lo0, hi0), (lo1, hi1) = gains.ci.gain_orders
    assert lo0 <= ref0 <= hi0, (ref0, gains.ci.gain_orders[0])
    # … and most of the true function's: g₁ stops short of its optimum by about 2 points of Var(x*) even here
    # (0.915 of 0.934 after 1300 steps at lr 3e-2; docs/nested_fits.md), so Δ₁ is found too low by about that
    true_held = r2(units(y[held]), units(clean_x[held]))
    print(f"planted: ref0 {ref0:.4f} ref1 {ref_all - ref0:.4f} gains {gains.gain_orders} ci {gains.ci.gain_orders} "
          f"true on held-out {true_held:.4f}")
    assert 0 < true_held - sum(gains.gain_orders) < 0.03
    assert 0.5 * (ref_all - ref0) < gains.gain_orders[1] <= hi1 and ref_all - ref0 < hi1 + 0.03


# ------------------------------------------------------------------------------------------- two ranks
@pytest.mark.slow
def test_two_torchrun_ranks_give_the_gains_of_one_process(tmp_path: Path) -> None:
    job = str(ROOT / "tests" / "nested_dist_job.py")
    x, y = _pair(200)
    np.save(tmp_path / "x.npy", x.half().numpy())  # the feature cache stores float16
    np.save(tmp_path / "y.npy", y.half().numpy())
    one = run_job([sys.executable, job, str(tmp_path), str(tmp_path / "one.json")], tmp_path / "one.json")
    two = run_job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", job,
                str(tmp_path), str(tmp_path / "two.json")], tmp_path / "two.json")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    # g₀ is closed-form from all-reduced normal equations: its gain and intervals are the same to float precision
    assert abs(one["gain_orders"][0] - two["gain_orders"][0]) < 1e-5
    np.testing.assert_allclose(two["gain_ci"][0], one["gain_ci"][0], atol=1e-5)
    # g₁, g₂ are trained (DDP: each rank half of every batch), so they agree as closely as two such fits do
    np.testing.assert_allclose(two["gain_orders"], one["gain_orders"], atol=0.01)
    for row in (one, two):
        assert abs(sum(row["gain_orders"]) + row["instability"] - 1) < 1e-9


# ------------------------------------------------------------------------------------------- CLI and run folder
@pytest.fixture(scope="module")
def nested_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """`kcore fit --nested` on the sample pair (60 images, the authors' preset for 2 epochs): the run folder and
    what it printed."""
    import contextlib
    import io

    from kcore.cli import main

    out = tmp_path_factory.mktemp("runs") / "nested_run"
    weak = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"
    strong = ROOT / "sample_models" / "kshapes_resnet_s0.safetensors"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        # the authors' preset has sigmoid gates: --nested fits with linear ones (a new order starts at p = 0)
        rc = main(["fit", "--a", str(weak), "--b", str(strong), "--data", "kshapes", "--n-images", "60", "--preset",
                   "authors", "--epochs", "2", "--nested", "--out", str(out)])
    assert rc == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_cli_nested_prints_the_gains_and_the_run_folder_keeps_them(nested_run) -> None:
    from kcore.run_folder import read_run

    out, printed = nested_run
    assert "order-wise gains of nested fits" in printed and "Δ0" in printed and "Δ2" in printed
    block = json.loads((out / "metrics.json").read_text())["directions"]["A_to_B"]
    assert len(block["gain_orders"]) == 3 and len(block["gain_ci"]) == 3
    assert len(block["nested"]["per_channel"]["gain_orders"]) == 3
    assert len(block["nested"]["per_channel"]["gain_orders"][0]) == 32  # resnet layer2's channels
    assert abs(sum(block["gain_orders"]) + block["nested"]["instability"] - 1) < 1e-9
    fit = read_run(out).directions["A_to_B"].fit
    assert fit.config.nested and fit.config.gate == "linear" and fit.config.convention == "authors"
    assert list(fit.nested.gains.gain_orders) == block["gain_orders"]
    assert [m.orders for m in fit.nested.models] == [0, 1, 2] and fit.nested.models[-1] is fit.model
    assert [s.order for s in fit.nested.stages] == [0, 1, 2]


@pytest.mark.slow
def test_overview_shows_the_gains_of_a_nested_run(nested_run, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.testing.v1 import AppTest

    out, _ = nested_run
    monkeypatch.setenv("KCORE_RUNS_DIR", str(out.parent))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=180).run()
    open_run_folder(at, out, "overview")
    assert not at.exception, [e.value for e in at.exception]
    captions = [c.value for c in at.caption]
    gains = [c for c in captions if c.startswith("Order-wise gains of nested fits")]
    assert len(gains) == 1 and "Δ0" in gains[0] and "Δ2" in gains[0] and "±" in gains[0]
    assert any("nested fits instead" in c for c in captions)


def test_the_dashboard_checks_and_prices_a_nested_request() -> None:
    from dashboard.jobs import check_fit_request
    from dashboard.state.jobs import FitRequest

    params = FitRequest(orders=3, epochs=2).as_params()
    plain = check_fit_request(params, 100)
    assert check_fit_request({**params, "nested": True}, 100) == 3 * plain  # g_1 … g_3 each train
    with pytest.raises(TypeError, match="fit setting 'nested' must be true or false; got 'yes'.*Fix"):
        check_fit_request({**params, "nested": "yes"}, 100)
    cfg = FitRequest(orders=2, preset="authors", nested=True).config()
    assert cfg.nested and cfg.gate == "linear" and cfg.convention == "authors"
