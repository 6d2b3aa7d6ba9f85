"""The default fit's stopping rule: steps, the least-squares start as a candidate, the time budget, progress lines."""
from __future__ import annotations

import argparse
import importlib
import io
import time

import pytest
import torch
import torch.nn.functional as F

import kcore
from kcore.cli import ProgressBar, _duration
from kcore.fit import PRESETS, fit, make_config, train_plan
from kcore.pipeline import PipelineProgress

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(n: int = 60, c: int = 8, h: int = 8, noise: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g) / (c * 9) ** 0.5
    return x, F.conv2d(x, w, padding=1) + noise * torch.randn(n, c, h, h, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_never_ends_worse_than_its_least_squares_start(seed: int) -> None:
    # a linear target under heavy noise: the non-linear orders can only overfit, so training tends to make the
    # monitor error worse than the least-squares start; the kept weights must not be
    x, y = _pair(seed=seed)
    res = kcore.fit(x, y, orders=2, lr=3e-2, lr_w0_scale=1.0, warmup=0.0)  # a rough schedule on purpose
    start = res.extra["start_monitor_error"]
    kept = start if res.best_epoch == 0 else res.history[res.best_epoch - 1].monitor_error
    assert kept <= start
    assert kept <= min(r.monitor_error for r in res.history)
    if res.best_epoch == 0:  # the start is exactly the least-squares map: the gates are closed
        assert res.gates == (0.0, 0.0)
        assert res.heldout_error == pytest.approx(1 - res.baseline.linear_r2, rel=1e-4, abs=1e-6)


def test_stopping_is_counted_in_optimiser_steps() -> None:
    cfg = make_config("fast")
    small, large = train_plan(cfg, 100), train_plan(cfg, 5000)
    assert small.total_steps == large.total_steps == cfg.max_steps  # the same schedule whatever the set size
    assert sum(n for _, n in small.rounds) == sum(n for _, n in large.rounds) == cfg.max_steps
    assert max(n for _, n in large.rounds) == cfg.eval_every  # long epochs are measured within
    explicit = make_config("fast", epochs=3)
    assert explicit.max_steps is None and train_plan(explicit, 128).epochs == 3
    x, y = _pair(n=80)
    res = kcore.fit(x, y, orders=1, max_steps=12, eval_every=4, batch_size=8, patience=None)
    assert [r.step for r in res.history] == [4, 8, 12] and res.extra["steps_run"] == 12


def test_budget_fit_stops_within_its_budget(monkeypatch) -> None:
    # the fit reads its clock through time.perf_counter: a clock that moves 10 ms per reading makes the budget a
    # known number of readings, whatever the machine's load (real seconds are a timing: bench/, not a test)
    readings = []

    def clock() -> float:
        readings.append(0.01 * len(readings))
        return readings[-1]

    x, y = _pair(n=40, c=4, h=6)
    monkeypatch.setattr(time, "perf_counter", clock)
    res = kcore.fit(x, y, orders=1, max_steps=5000, eval_every=10, batch_size=8, patience=None, budget=1.5)
    assert res.extra["stopped_by"] == "budget" and 0 < res.extra["steps_run"] < 5000
    # the training rounds stopped before the budget ran out, with time left for the held-out pass
    assert res.seconds <= 1.5
    assert res.heldout_error == res.heldout_error  # evaluated (not NaN)
    again = kcore.fit(x, y, orders=1, max_steps=5000, eval_every=10, batch_size=8, patience=None, budget=3.0)
    assert again.extra["steps_run"] > res.extra["steps_run"]  # twice the budget: more steps


def test_budget_duration_parser() -> None:
    assert (_duration("60s"), _duration("2m"), _duration("90"), _duration("0.5h")) == (60, 120, 90, 1800)
    with pytest.raises(argparse.ArgumentTypeError, match=r"expected a positive duration such as 60s.*got 'soon'"):
        _duration("soon")


def test_non_tty_progress_prints_periodic_lines(monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    out = io.StringIO()  # not a terminal
    bar = ProgressBar(stream=out, every=5.0)
    bar(PipelineProgress("extract", 0.0, "extracting"))
    for i in range(1, 61):  # one update a second for a minute within one stage
        clock[0] = float(i)
        bar(PipelineProgress("fit A_to_B", 0.3 + 0.01 * i, f"g_θ A_to_B: train epoch {i}/100, ETA {100 - i} s"))
    lines = out.getvalue().splitlines()
    assert 12 <= len(lines) <= 14  # the stage changes, then a line every 5 s: not 61, not 2
    assert "ETA" in lines[-1] and "epoch 56/100" in lines[-1]  # lines at 1, 6, ..., 56 s


def test_cli_fit_off_a_terminal_prints_progress_with_eta(tmp_path, capsys, monkeypatch) -> None:
    import functools
    from pathlib import Path

    from kcore import cli
    from kcore.cli import main

    # this fit takes seconds: print every update (the 5 s spacing is tested above) to see what a line holds
    monkeypatch.setattr(cli, "ProgressBar", functools.partial(ProgressBar, every=0.0))

    strong = Path(__file__).resolve().parents[1] / "sample_models" / "kshapes_resnet_s0.safetensors"
    if not strong.is_file():
        pytest.skip("sample models not built")
    rc = main(["fit", "--a", str(strong), "--b", str(strong), "--n-images", "60", "--budget", "20s",
               "--out", str(tmp_path / "run")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "monitor error" in err and "ETA" in err and "step" in err


# ------------------------------------------------------------------------------------- bfloat16 training steps
def test_training_dtype_is_bfloat16_only_where_it_pays(monkeypatch):
    kfit = importlib.import_module("kcore.fit.plan")  # where training_dtype reads the CPU capability

    auto, f32 = make_config("fast"), make_config("fast", train_precision="float32")
    assert auto.train_precision == "auto" and PRESETS["authors"].train_precision == "float32"
    big, small = kfit.BF16_MIN_STEP_FLOPS, kfit.BF16_MIN_STEP_FLOPS / 2
    cpu = torch.device("cpu")
    monkeypatch.setattr(kfit, "cpu_has_native_bf16", lambda: True)
    assert kfit.training_dtype(auto, cpu, big) == torch.bfloat16
    assert kfit.training_dtype(auto, cpu, small) == torch.float32  # small steps: the casts eat the gain
    assert kfit.training_dtype(f32, cpu, big) == torch.float32
    assert kfit.training_dtype(auto, torch.device("cuda"), big) == torch.float32  # CPU only
    monkeypatch.setattr(kfit, "cpu_has_native_bf16", lambda: False)
    assert kfit.training_dtype(auto, cpu, big) == torch.float32  # emulated bfloat16 would be slower
    with pytest.raises(ValueError, match="train_precision must be"):
        make_config("fast", train_precision="half")


def test_bfloat16_steps_count_half_in_the_flops_budget(monkeypatch):
    kfit = importlib.import_module("kcore.fit")
    cfg = make_config("fast")
    resnet18 = kfit.step_flops(256, 256, 14, 14, cfg)  # layer3 → layer3
    f32, bf16 = train_plan(cfg, 480, resnet18, torch.float32), train_plan(cfg, 480, resnet18, torch.bfloat16)
    assert f32.total_steps == int(cfg.flops_budget / resnet18) == 195
    assert bf16.total_steps == int(cfg.flops_budget / (kfit.BF16_STEP_COST * resnet18)) == 390
    assert (f32.precision, bf16.precision) == (torch.float32, torch.bfloat16)
    big = kfit.step_flops(1024, 1024, 14, 14, cfg)  # resnet50 layer3: the floor either way
    assert train_plan(cfg, 800, big, torch.bfloat16).total_steps == kfit.MIN_PLANNED_STEPS
    # fit() plans with the precision its steps will run in (seen in the plan it reports before the first step)
    x, y = _pair(n=40, c=8, h=8)
    planned: dict[str, int] = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        monkeypatch.setattr(kfit, "training_dtype", lambda *a, _d=dtype: _d)
        flops = kfit.step_flops(8, 8, 8, 8, make_config("fast", batch_size=8))
        with pytest.raises(kfit.FitCancelled):  # cancelled before its first step: only the plan is looked at
            fit(x, y, orders=2, batch_size=8, flops_budget=100 * flops, max_steps=1000, cancel=lambda: True,
                progress=lambda p, _n=name: planned.setdefault(_n, p.steps))
    assert planned == {"float32": 100, "bfloat16": 200}


def test_the_flops_budget_binds_on_the_cpu_only():
    kfit = importlib.import_module("kcore.fit")
    cfg = make_config("fast")
    big = kfit.step_flops(1024, 1024, 14, 14, cfg)  # resnet50 layer3: the CPU plans the floor
    assert train_plan(cfg, 800, big, torch.float32, "cpu").total_steps == kfit.MIN_PLANNED_STEPS
    assert train_plan(cfg, 800, big, torch.float32, torch.device("cuda", 0)).total_steps == cfg.max_steps == 800
    assert train_plan(cfg, 800, big, torch.float32, "mps").total_steps == 800


@pytest.mark.parametrize("channels, size", [(256, 14), (1024, 14), (512, 28)])
def test_where_the_budget_binds_the_same_flops_run_as_four_times_the_steps_of_16_images(channels, size):
    kfit = importlib.import_module("kcore.fit")
    cfg = make_config("fast")
    big = kfit.step_flops(channels, channels, size, size, cfg)
    for precision in (torch.float32, torch.bfloat16):
        before = train_plan(cfg, 720, big, precision)
        small = kfit.small_batch_config(cfg, 720, big, precision)
        after = train_plan(small, 720, kfit.step_flops(channels, channels, size, size, small), precision)
        assert (small.batch_size, small.small_batch, small.flops_budget) == (16, None, None)
        assert after.total_steps == small.max_steps == 4 * before.total_steps
        assert after.total_steps * after.flops_per_step == pytest.approx(before.total_steps * before.flops_per_step)
        assert (small.patience_steps, small.eval_every) == (4 * cfg.patience_steps, 4 * cfg.eval_every)
        assert (small.lr, small.warmup_steps, small.lam) == (cfg.lr, cfg.warmup_steps, cfg.lam)  # nothing else


def test_the_batch_stays_where_the_budget_does_not_bind_or_does_not_apply():
    kfit = importlib.import_module("kcore.fit")
    cfg = make_config("fast")
    sample = kfit.step_flops(64, 128, 16, 16, cfg)  # the sample models: 800 steps fit the budget
    assert kfit.small_batch_config(cfg, 288, sample) is cfg
    big = kfit.step_flops(1024, 1024, 14, 14, cfg)
    assert kfit.small_batch_config(cfg, 720, big, torch.float32, "cuda") is cfg  # no budget on a GPU
    assert make_config("fast", batch_size=32).small_batch is None  # an explicit batch is what every step uses
    assert kfit.small_batch_config(make_config("fast", batch_size=32), 720, big).batch_size == 32
    assert make_config("fast", batch_size=32, small_batch=8).small_batch == 8
    with pytest.raises(ValueError, match="small_batch must be a positive integer"):
        make_config("fast", small_batch=0)


def test_a_fit_whose_budget_binds_runs_and_records_the_small_batch_plan():
    x, y = _pair(n=60, c=8, h=8)
    kfit = importlib.import_module("kcore.fit")
    budget = 10 * kfit.step_flops(8, 8, 8, 8, make_config("fast"))  # binds: the floor of 60 steps at batch 64
    res = fit(x, y, orders=2, device="cpu", flops_budget=budget, max_steps=1000, train_precision="float32")
    assert res.config.batch_size == 16 and res.extra["steps_planned"] == 4 * kfit.MIN_PLANNED_STEPS
    assert res.extra["steps_run"] <= 4 * kfit.MIN_PLANNED_STEPS
    planned: list[int] = []
    with pytest.raises(kfit.FitCancelled):  # the recorded config re-runs the same plan
        fit(x, y, config=res.config, device="cpu", cancel=lambda: True, progress=lambda p: planned.append(p.steps))
    assert planned[0] == res.extra["steps_planned"]


@pytest.mark.needs_cuda  # skipped without CUDA by tests/conftest.py
def test_a_fit_on_cuda_plans_max_steps_whatever_the_flops_budget():
    x, y = _pair(n=40, c=8, h=8)
    flops = importlib.import_module("kcore.fit").step_flops(8, 8, 8, 8, make_config("fast", batch_size=8))
    planned: list[int] = []
    with pytest.raises(importlib.import_module("kcore.fit").FitCancelled):
        fit(x, y, orders=2, batch_size=8, flops_budget=100 * flops, max_steps=1000, cancel=lambda: True,
            device="cuda", progress=lambda p: planned.append(p.steps))
    assert planned[0] == 1000


@pytest.mark.skipif(not importlib.import_module("kcore.fit").cpu_has_native_bf16(),
                    reason="this CPU has no native bfloat16")
def test_bfloat16_steps_train_as_well_as_float32():
    """Same steps, same data: the bfloat16-autocast fit ends within a hair of the float32 one (weights stay float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, 12, 12, generator=g)  # a step of 6e9 FLOPs: above BF16_MIN_STEP_FLOPS
    w = torch.randn(64, 64, 3, 3, generator=g) * 0.05
    y = torch.nn.functional.conv2d(x, w, padding=1)
    y = y + 0.3 * torch.tanh(y) ** 2 + 0.05 * torch.randn(y.shape, generator=g)
    res = {p: fit(x, y, train_precision=p, max_steps=30, eval_every=10) for p in ("auto", "float32")}
    assert res["auto"].extra["train_precision"] == "bfloat16 autocast"
    assert res["float32"].extra["train_precision"] == "float32"
    assert all(p.dtype == torch.float32 for p in res["auto"].model.parameters())
    assert res["auto"].extra["steps_run"] == res["float32"].extra["steps_run"] == 30
    assert abs(res["auto"].heldout_error - res["float32"].heldout_error) < 0.01, (
        res["auto"].heldout_error, res["float32"].heldout_error)


def test_warm_up_lasts_at_least_warmup_steps_at_most_half_the_schedule():
    kfit = importlib.import_module("kcore.fit")

    def warm(total: int, c) -> int:  # steps before the peak rate (the ramp's last step reaches it)
        lrs = [kfit._cosine_lr(c, s, total) for s in range(total)]
        return lrs.index(max(lrs)) + 1

    # known answers of the rule max(warmup_steps, 5 % of the schedule), at most half of it, for two floors
    cfg = make_config("fast", warmup_steps=30)
    assert warm(800, cfg) == 40  # 5 % of a long schedule: the floor changes nothing there
    assert warm(390, cfg) == 30  # the floor (5 % would be 19)
    assert warm(60, cfg) == 30  # (5 % would be 3)
    assert warm(40, cfg) == 20  # never more than half the schedule
    low = make_config("fast", warmup_steps=10)
    assert (warm(800, low), warm(390, low), warm(60, low), warm(40, low)) == (40, 19, 10, 10)
    lrs = [kfit._cosine_lr(cfg, s, 60) for s in range(60)]
    assert lrs[:30] == sorted(lrs[:30]) and lrs[29] == pytest.approx(cfg.lr)  # a linear ramp to the peak...
    assert lrs[29:] == sorted(lrs[29:], reverse=True) and lrs[-1] > cfg.lr_final  # ...then the cosine decay
    # an explicit number of epochs runs the share of warm-up the studies were measured with
    assert make_config("fast", epochs=10).warmup_steps == 0
    assert warm(60, make_config("fast", epochs=10)) == 3
    with pytest.raises(ValueError, match="warmup_steps must be"):
        make_config("fast", warmup_steps=-1)
