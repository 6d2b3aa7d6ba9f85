"""The benchmark's code paths at tiny sizes (a smoke test; benchmarks are not timed tests)."""
from __future__ import annotations

import json

import pytest
import torch

from bench.__main__ import main
from bench.data import synthetic_pair
from bench.quality import Curve, time_to_quality
from bench.real_size import longer_overrides
from bench.throughput import forward_flops
from kcore.fit import make_config, small_batch_config, step_flops, train_plan
from kcore.gtheta import GThetaSpec


def test_forward_flops_counts_every_convolution():
    spec = GThetaSpec(4, 6, orders=2, kernel_size=3)
    # W^(0): 4 -> 6, W^(1), W^(2): 4 -> 4; 2 FLOPs per multiply-add, 9 taps, 5x7 positions
    assert forward_flops(spec, 5, 7) == 2 * 9 * 35 * (4 * 6 + 2 * 4 * 4)


def test_curve_finds_the_first_epoch_at_or_below_a_target():
    c = Curve("fast", times=[1.0, 2.0, 3.0], errors=[0.5, 0.3, 0.2])
    assert c.first_time_at_or_below(0.3) == (2.0, 2)
    assert c.first_time_at_or_below(0.1) is None


def test_synthetic_pair_is_deterministic_and_shaped():
    a, b = synthetic_pair(6, 4, 5, seed=3), synthetic_pair(6, 4, 5, seed=3)
    assert a[0].shape == a[1].shape == (6, 4, 5, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_time_to_quality_compares_in_the_same_units():
    x, y = synthetic_pair(30, 4, 5)
    r = time_to_quality("tiny", x, y, authors_epochs=2, fast_overrides={"epochs": 2})
    assert r["authors_epochs_run"] == 2 and not r["authors_full_run"]
    assert len(r["authors_curve"]["err"]) == 2
    assert r["authors_error"] == pytest.approx(r["authors_curve"]["err"][-1])
    assert r["authors_full_seconds_extrapolated"] == pytest.approx(r["authors_seconds_per_epoch"] * 1000)
    if r["ratio"] is not None:
        assert r["fast_curve"]["err"][r["fast_epoch_at_quality"] - 1] <= r["authors_error"]


def test_smoke_profile_writes_the_table_and_json(tmp_path):
    assert main(["--profile", "smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["profile"] == "smoke"
    for key in ("quality", "throughput", "decomposition", "extraction", "redraw"):
        assert key in data, key
    assert data["extraction"][0]["n_images"] == 32 and data["extraction"][0]["peak_rss"] > 0
    assert data["decomposition"][0]["floor"] == 2.0
    table = (tmp_path / "results.md").read_text()
    assert "| Measure | Setting | Result | Target | Met |" in table
    for measure in ("time to quality", "training FLOP/s", "decomposition / forward", "extraction", "dashboard redraw"):
        assert measure in table, measure


@pytest.mark.parametrize("shape", [(256, 14), (1024, 14), (512, 28)])
def test_the_quality_reference_runs_ten_times_the_default_plan_even_where_the_flops_budget_binds(shape):
    c, size = shape
    preset = make_config("fast")
    ran = small_batch_config(preset, 720, step_flops(c, c, size, size, preset))  # FitResult.config
    default = train_plan(ran, 720, step_flops(c, c, size, size, ran))
    assert ran.batch_size == 16 and default.total_steps < 4 * preset.max_steps  # the budget decides the length
    ref = make_config("fast", **longer_overrides(ran, default.total_steps))
    longer = train_plan(ref, 720, step_flops(c, c, size, size, ref))
    assert (ref.batch_size, ref.eval_every) == (ran.batch_size, ran.eval_every)
    assert longer.total_steps == 10 * default.total_steps
    assert longer.patience_steps == 10 * default.patience_steps


def test_the_gpu_table_is_skipped_with_a_row_that_says_why_where_there_is_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--only", "real_size", "--real-size-device", "cuda", "--real-size-rows", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert "no CUDA device" in data["real_size_gpu"]["skipped"] and "real_size" not in data
    table = (tmp_path / "results.md").read_text()
    assert "| real size on GPU | resnet50 layer3 | skipped: no CUDA device" in table


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_the_training_step_is_timed_against_a_bare_convolution_on_each_device(device):
    from bench.real_size import step_vs_conv

    t = step_vs_conv(8, 8, 8, repeats=1, device=device)
    assert t["step_seconds"] > 0 and t["step_gflops"] > 0 and t["conv_gflops"] > 0
    assert t["ratio"] == pytest.approx(t["step_gflops"] / t["conv_gflops"])
