"""g_θ's training throughput in FLOP/s against a matrix multiply of similar size, in the same process.

FLOPs are counted analytically: a forward pass of g costs 2·C_in·C_out·k²·H·W per convolution per image (K+1
convolutions), and a training step costs about 3 forward passes (the backward pass ≈ 2 forwards). The step
timed is the fit's own (:func:`kcore.fit.train_step` with the fit's optimiser). The reference is
``torch.matmul`` of the convolution's im2col shape, (B·H·W × C_in·k²) @ (C_in·k² × C_out), timed
interleaved with the step so that load on a shared machine hits both alike.
"""
from __future__ import annotations

from typing import Any

import torch

from bench.common import interleaved_times
from kcore.fit import make_config, make_optimizer, train_step
from kcore.gtheta import GTheta, GThetaSpec


def forward_flops(spec: GThetaSpec, h: int, w: int) -> float:
    """FLOPs of one forward pass of g for one image (multiply-adds count 2)."""
    k2 = spec.kernel_size**2
    ca, cb = spec.in_channels, spec.out_channels
    return 2.0 * k2 * h * w * (ca * cb + spec.orders * ca * ca)


def training_throughput(
    channels: int, size: int, batch_size: int | None = None, orders: int = 2, preset: str = "fast", repeats: int = 7
) -> dict[str, Any]:
    """FLOP/s of the fit's training step and of a similar matmul; their ratio.

    Args:
        channels: C (C_a = C_b).
        size: H = W.
        batch_size: images per step (default: the preset's).
        orders: K.
        preset: whose optimiser settings and convention to use.
        repeats: timed repeats (median).
    """
    cfg = make_config(preset, orders=orders, **({"batch_size": batch_size} if batch_size else {}))
    torch.manual_seed(0)
    spec = GThetaSpec(channels, channels, cfg.orders, cfg.kernel_size, cfg.convention, cfg.gate, cfg.p_init)
    model = GTheta(spec).train()
    opt = make_optimizer(model, cfg)
    b = cfg.batch_size
    xb = torch.randn(b, channels, size, size)
    tb = torch.randn(b, channels, size, size)
    k2 = cfg.kernel_size**2
    a = torch.randn(b * size * size, channels * k2)
    wm = torch.randn(channels * k2, channels)

    def step() -> None:
        train_step(model, opt, xb, tb, cfg.lam)

    def matmul() -> None:
        torch.matmul(a, wm)

    t = interleaved_times({"step": step, "matmul": matmul}, repeats=repeats, warmup=2)
    step_flops = 3.0 * forward_flops(spec, size, size) * b
    mm_flops = 2.0 * a.shape[0] * a.shape[1] * wm.shape[1]
    step_rate, mm_rate = step_flops / t["step"], mm_flops / t["matmul"]
    return {
        "shape": [channels, size, size],
        "batch_size": b,
        "orders": cfg.orders,
        "convention": cfg.convention,
        "step_seconds": t["step"],
        "ms_per_image": 1e3 * t["step"] / b,
        "step_gflops": step_rate / 1e9,
        "matmul_gflops": mm_rate / 1e9,
        "ratio": step_rate / mm_rate,
    }
