"""Measure how exactly the order-wise components add up to g(x) (README, "What is computed").

    .venv/bin/python tools/exactness.py
"""
import copy
import dataclasses

import torch

import kcore

torch.manual_seed(0)
xs, xt = torch.randn(64, 6, 9, 11) * 3 + 1, torch.randn(64, 4, 6, 7)
for K in (0, 1, 2, 3):
    res = kcore.fit(xs, xt, orders=K, epochs=2, p_init=0.8)
    d = res.decompose(xs, xt)
    g = res.predict(xs)
    r32 = float((d.output - g).abs().max() / g.abs().max())
    r64m = dataclasses.replace(res, model=copy.deepcopy(res.model).double())
    d64 = r64m.decompose(xs.double(), xt.double())
    g64 = r64m.predict(xs.double())
    r64 = float((d64.output - g64).abs().max() / g64.abs().max())
    print(f"K={K}: float32 {r32:.1e}  float64 {r64:.1e}")
