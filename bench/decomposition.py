"""Decomposition time against one forward pass of g, timed interleaved in the same process.

The batched decomposition applies W^(j) once to the stack of every branch that passes level j:
(K+1)(K+2)/2 convolutions against K+1 for a forward pass, so its arithmetic floor is (K+2)/2 forward passes.
Two ratios are reported: the core one (``kcore.decompose.components`` against ``GTheta.forward`` on prepared
input, the forward pass at its fastest chunking of the images) and the user-facing one (``FitResult.decompose`` against ``FitResult.predict`` on raw features, both
including normalisation and the copies to the CPU).
"""
from __future__ import annotations

from typing import Any

import torch

from bench.common import interleaved_times
from kcore.decompose import components
from kcore.gtheta import GTheta, GThetaSpec


def decomposition_ratio(
    channels: int, size: int, n_images: int = 256, orders: int = 2, convention: str = "paper", repeats: int = 7
) -> dict[str, Any]:
    """Median time of ``components(g, x)`` over that of ``g(x)`` for one batch (no grad, eval mode)."""
    torch.manual_seed(0)
    g = GTheta(GThetaSpec(channels, channels, orders, 3, convention)).eval()
    x = torch.randn(n_images, channels, size, size)

    def forward(m: int) -> None:
        with torch.no_grad():
            for i in range(0, n_images, m):
                g(x[i : i + m])

    def decompose() -> None:
        components(g, x)

    # The reference is the forward pass at its fastest: the whole batch at once, or in chunks (on a CPU a
    # batch that overflows the caches costs more per image, and the decomposition itself runs in chunks).
    chunks = [n_images] + [m for m in (16, 32, 64) if m < n_images]
    fns = {f"forward_{m}": (lambda m=m: forward(m)) for m in chunks}
    fns["decompose"] = decompose
    t = interleaved_times(fns, repeats=repeats, warmup=1)
    best = min(chunks, key=lambda m: t[f"forward_{m}"])
    floor = (orders + 2) / 2
    ratio = t["decompose"] / t[f"forward_{best}"]
    return {
        "shape": [channels, size, size],
        "n_images": n_images,
        "orders": orders,
        "convention": convention,
        "forward_seconds": t[f"forward_{best}"],
        "forward_chunk": best,
        "forward_seconds_by_chunk": {m: t[f"forward_{m}"] for m in chunks},
        "decompose_seconds": t["decompose"],
        "ratio": ratio,
        "ratio_to_whole_batch_forward": t["decompose"] / t[f"forward_{n_images}"],
        "floor": floor,
        "ratio_to_floor": ratio / floor,
    }


def result_decompose_ratio(result: Any, x_src: torch.Tensor, x_tgt: torch.Tensor, repeats: int = 5) -> dict[str, Any]:
    """``FitResult.decompose`` against ``FitResult.predict`` on the same raw features (user-facing ratio)."""
    t = interleaved_times(
        {"predict": lambda: result.predict(x_src), "decompose": lambda: result.decompose(x_src, x_tgt)},
        repeats=repeats,
        warmup=1,
    )
    floor = (result.model.orders + 2) / 2
    return {
        "n_images": int(x_src.shape[0]),
        "predict_seconds": t["predict"],
        "decompose_seconds": t["decompose"],
        "ratio": t["decompose"] / t["predict"],
        "floor": floor,
    }
