"""Fitting g_θ: planted answers, reproducibility, progress/cancel, persistence and input errors."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

import kcore
from kcore.conventions import resample, spatial_std
from kcore.fit import split_indices
from kcore.gtheta import GTheta

N, C, H = 160, 8, 8


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(0)
    return torch.randn(N, C, H, H)


@pytest.fixture(scope="module")
def permuted(x):
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(1))
    y = x[:, perm] * 3.0 - 1.0  # a permuted, rescaled copy
    return kcore.fit(x, y, orders=2), y


def _higher_share(rep):
    return sum(rep.var_orders[1:]) / rep.var_target


def test_channel_permutation_is_zero_order_consistent(permuted, x):
    res, y = permuted
    rep = res.decompose(x, y).report()
    assert rep.var_orders[0] >= 0.95 * rep.var_target
    assert rep.instability <= 0.05
    # also on the held-out images alone, as the fit reports it
    assert res.heldout_report.instability <= 0.05
    assert res.baseline.linear_r2 >= 0.99


def test_identity_is_consistent(x):
    res = kcore.fit(x, x.clone(), orders=2)
    assert res.heldout_report.instability <= 0.01
    assert res.heldout_error <= 0.01


def test_independent_target_is_inconsistent(x):
    y = torch.randn(N, 5, H, H, generator=torch.Generator().manual_seed(7))
    res = kcore.fit(x, y, orders=2)
    assert res.heldout_report.instability >= 0.9
    assert abs(res.baseline.linear_r2) < 0.1


def test_relu_of_conv_needs_higher_orders(permuted, x):
    w = torch.randn(6, C, 3, 3, generator=torch.Generator().manual_seed(3)) / (C * 9) ** 0.5
    y = F.relu(F.conv2d(x, w, padding=1))
    res = kcore.fit(x, y, orders=2)
    share_relu = _higher_share(res.heldout_report)
    share_perm = _higher_share(permuted[0].heldout_report)
    assert share_relu > 0.003
    assert share_relu > 100 * share_perm
    # and g beats the closed-form linear map held out, because of those orders
    assert 1 - res.heldout_error > res.baseline.linear_r2


def test_fit_is_reproducible_for_a_seed(x):
    y = x.flip(1)
    a = kcore.fit(x, y, orders=1, epochs=3, min_steps=0, seed=5)
    b = kcore.fit(x, y, orders=1, epochs=3, min_steps=0, seed=5)
    c = kcore.fit(x, y, orders=1, epochs=3, min_steps=0, seed=6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert a.heldout_indices == b.heldout_indices != c.heldout_indices


def test_split_is_disjoint_and_complete():
    tr, mon, held = split_indices(50, 0.2, 0.1, seed=0)
    allidx = torch.cat([tr, mon, held]).sort().values
    assert torch.equal(allidx, torch.arange(50))
    assert len(held) == 10 and len(mon) == 4


def test_progress_and_cancel(x):
    seen = []
    kcore.fit(x, x, orders=1, epochs=3, min_steps=0, patience=None, progress=seen.append)
    phases = [p.phase for p in seen]
    assert phases[0] == "init" and phases[-1] == "done" and phases.count("train") == 3
    assert seen[-1].fraction == 1.0
    stop = threading.Event()
    stop.set()
    with pytest.raises(kcore.FitCancelled):
        kcore.fit(x, x, orders=1, cancel=stop)
    calls = []

    def cancel_after_two_epochs():
        calls.append(1)
        return len(calls) > 4

    with pytest.raises(kcore.FitCancelled):
        kcore.fit(x, x, orders=1, batch_size=64, cancel=cancel_after_two_epochs)


def test_save_and_load_round_trip(tmp_path, permuted, x):
    res, y = permuted
    res.save(tmp_path / "run")
    back = kcore.load_result(tmp_path / "run")
    assert back.config == res.config
    assert back.heldout_error == res.heldout_error
    torch.testing.assert_close(back.predict(x), res.predict(x))
    for a, b in zip(back.decompose(x, y).components, res.decompose(x, y).components):
        torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def authors_run(x):
    return kcore.fit(x, x.flip(1), preset="authors", epochs=3)


def test_authors_preset_runs_their_recipe(authors_run, x):
    # what the authors' code does, seen in what the fit did (not read back from the preset's fields)
    res = authors_run
    assert [r.lr for r in res.history] == pytest.approx([1e-4, 1e-5, 1e-6])  # log-linear, 1e-4 → 1e-6 per epoch
    assert len(res.train_indices) + len(res.heldout_indices) == N  # no monitor split: every other image trains
    per_epoch = math.ceil(len(res.train_indices) / 64)  # batches of 64
    assert [r.step for r in res.history] == [per_epoch, 2 * per_epoch, 3 * per_epoch]
    assert all(tuple(conv.weight.shape[-2:]) == (3, 3) for conv in res.model.convs)
    assert len(res.decompose(x[:4], x[:4].flip(1)).components) == 3  # K = 2: x(0), x(1), x(2)
    assert GTheta(res.model.spec).gates().tolist() == pytest.approx([0.5, 0.5])  # sigmoid gates start at 0.5
    assert all(0 < p < 1 for p in res.gates)
    # their normalisation: x over its per-sample spatial std, the raw target, nothing stored
    torch.testing.assert_close(res.norm.source(x[:4]), x[:4] / spatial_std(x[:4]))
    assert torch.equal(res.norm.target(x[:4]), x[:4]) and res.norm.state() == {}


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "a, b, kwargs, match",
    [
        (torch.randn(10, 3, 4, 4), torch.randn(9, 3, 4, 4), {}, r"same images.*x_src N=10 and x_tgt N=9"),
        (torch.randn(10, 3, 4), torch.randn(10, 3, 4, 4), {}, r"x_src must be a 4-D feature map.*3-D tensor of shape \(10, 3, 4\)"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 12), {}, r"x_tgt must be a 4-D feature map.*2-D"),
        (torch.full((10, 3, 4, 4), float("nan")), torch.randn(10, 3, 4, 4), {}, r"x_src must be finite; got 480 NaN/Inf"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4).index_fill(0, torch.tensor([2]), float("inf")), {}, r"x_tgt must be finite"),
        (torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), {}, r"too few samples for the held-out split: N=2"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4), {"orders": -1}, r"orders \(K\) must be >= 0.*got -1"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4), {"lamda": 1}, r"unknown fit option\(s\) \['lamda'\]"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4), {"val_fraction": 1.5}, r"val_fraction must lie in \(0, 1\); got 1.5"),
        (torch.randn(10, 3, 4, 4), torch.randn(10, 3, 4, 4), {"device": "tpu"}, r"device must be one of"),
    ],
)
def test_bad_input_names_argument_expected_and_actual(a, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kcore.fit(a, b, **kwargs)


def test_not_a_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="x_src must be a torch.Tensor.*got list"):
        kcore.fit([[1.0]], torch.randn(4, 1, 2, 2))


def test_decompose_rejects_features_of_another_layer(permuted, x):
    res, _ = permuted
    with pytest.raises(ValueError, match="x_tgt has shape"):
        res.decompose(x, torch.randn(N, 3, H, H))
    with pytest.raises(ValueError, match="x_src has 5 channels"):
        res.decompose(torch.randn(N, 5, H, H), x)


@pytest.mark.needs_cuda  # skipped without CUDA by tests/conftest.py
def test_cuda_fit_matches_cpu_closely(x):
    # the same fixed schedule (3 epochs, no early stop) on both devices: the same split, nearly the same g_θ
    y = x.flip(1)
    on_cpu = kcore.fit(x, y, orders=1, epochs=3, min_steps=0, patience=None, seed=0, device="cpu")
    on_gpu = kcore.fit(x, y, orders=1, epochs=3, min_steps=0, patience=None, seed=0, device="cuda")
    assert on_cpu.device == "cpu" and on_gpu.device.startswith("cuda")
    assert on_gpu.heldout_indices == on_cpu.heldout_indices
    assert len(on_gpu.history) == len(on_cpu.history) == 3
    assert on_gpu.heldout_error == pytest.approx(on_cpu.heldout_error, abs=0.01)
    assert on_gpu.heldout_report.instability == pytest.approx(on_cpu.heldout_report.instability, abs=0.01)
    held = x[list(on_cpu.heldout_indices)]
    p_cpu, p_gpu = on_cpu.predict(held), on_gpu.predict(held).cpu()
    assert float((p_gpu - p_cpu).norm() / p_cpu.norm()) < 0.02  # TF32 convolutions on the GPU: not bit-equal


def test_float16_cached_features_with_different_sizes_fit_and_decompose():
    # the float16 on-disk feature cache hands fit float16 tensors; A and B differ in H×W
    g = torch.Generator().manual_seed(4)
    xa = torch.randn(30, 4, 8, 8, generator=g)
    xb = resample(xa[:, :3], (4, 4)) * 2.0  # B sees A's channels at half the resolution
    res = kcore.fit(xa.half(), xb.half(), orders=1, epochs=3)
    dec = res.decompose(xa.half(), xb.half())
    assert dec.components[0].dtype == torch.float32
    assert res.heldout_report.instability < 0.01  # x is resampled to x*'s size first: linear, 0-order
