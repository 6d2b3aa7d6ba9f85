"""Exact order-wise decomposition (Eq. 3–4): sums, two algorithms, memory-bounded batching."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import kcore
from kcore.decompose import components
from kcore.gtheta import GTheta, GThetaSpec


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def feats():
    torch.manual_seed(0)
    x_src = torch.randn(24, 6, 9, 11) * 3 + 1  # C_A = 6, H_A×W_A = 9×11
    x_tgt = torch.randn(24, 4, 6, 7) * 0.5  # C_B = 4, H×W = 6×7
    return x_src, x_tgt


@pytest.mark.parametrize("convention", ["paper", "authors"])
@pytest.mark.parametrize("K", [0, 1, 2, 3])
def test_components_sum_to_g_of_x(feats, K, convention):
    x_src, x_tgt = feats
    # no monitor split: the trained weights are kept (on this noise target the least-squares start, with the
    # gates closed, would win the monitor and leave the higher orders at exactly zero)
    res = kcore.fit(x_src, x_tgt, orders=K, convention=convention, epochs=2, p_init=0.8, monitor_fraction=0.0)
    # float32: relative 1e-5
    dec = res.decompose(x_src, x_tgt, batch_size=7)
    assert len(dec.components) == K + 1
    assert all(c.shape == (24, 4, 6, 7) for c in dec.components)
    g_x = res.predict(x_src)
    assert _rel(dec.output, g_x) <= 1e-5
    torch.testing.assert_close(dec.residual, dec.target - dec.output)
    # float64: relative 1e-10
    res64 = dataclasses.replace(res, model=copy.deepcopy(res.model).double())
    dec64 = res64.decompose(x_src.double(), x_tgt.double())
    assert dec64.components[0].dtype == torch.float64
    assert _rel(dec64.output, res64.predict(x_src.double())) <= 1e-10
    # the non-linear orders are really in play (gates pass part of the signal)
    if K > 0:
        assert float(dec64.components[1].abs().max()) > 0


@pytest.mark.parametrize("convention", ["paper", "authors"])
@pytest.mark.parametrize("K", [1, 2, 3])
def test_batched_equals_branch_by_branch(K, convention):
    torch.manual_seed(K)
    g = GTheta(GThetaSpec(5, 3, orders=K, convention=convention, p_init=0.7)).double().eval()
    g.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 5, 6, 6, dtype=torch.float64)
    a = components(g, x, "batched")
    b = components(g, x, "branchwise")
    for ca, cb in zip(a, b):
        torch.testing.assert_close(ca, cb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(a).sum(0), g(x), rtol=1e-12, atol=1e-12)


def test_linear_component_is_w0_of_x():
    torch.manual_seed(3)
    g = GTheta(GThetaSpec(5, 3, orders=2)).double().eval()
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(components(g, x)[0], g.convs[0](x))


def test_batch_size_does_not_change_the_result(feats):
    x_src, x_tgt = feats
    res = kcore.fit(x_src, x_tgt, orders=2, epochs=1, min_steps=0, convention="authors")
    a = res.decompose(x_src, x_tgt, batch_size=5)
    b = res.decompose(x_src, x_tgt, batch_size=24)
    for ca, cb in zip(a.components, b.components):
        torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-6)


def test_streaming_report_equals_report_of_materialised_decomposition(feats):
    x_src, x_tgt = feats
    res = kcore.fit(x_src, x_tgt, orders=2, epochs=1, min_steps=0)
    streamed = res.report(x_src, x_tgt, batch_size=5)
    whole = res.decompose(x_src, x_tgt).report()
    assert streamed.var_orders == pytest.approx(whole.var_orders, rel=1e-6)
    assert streamed.var_residual == pytest.approx(whole.var_residual, rel=1e-6)


def test_inputs_are_not_mutated(feats):
    x_src, x_tgt = feats
    a, b = x_src.clone(), x_tgt.clone()
    res = kcore.fit(x_src, x_tgt, orders=1, epochs=1, min_steps=0)
    res.decompose(x_src, x_tgt)
    assert torch.equal(a, x_src) and torch.equal(b, x_tgt)
