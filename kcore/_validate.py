"""Input checks shared by the core: every message names the argument, the expectation, the value and a fix."""
from __future__ import annotations

import torch
from torch import Tensor


def check_feature_map(name: str, x: object) -> Tensor:
    """Check that ``x`` is a finite, non-empty 4-D float tensor ``(N, C, H, W)``.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: wrong number of dimensions, an empty dimension, or NaN/Inf values.
    """
    if not isinstance(x, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (N, C, H, W); got {type(x).__name__}. "
            f"Fix: convert with torch.as_tensor({name})."
        )
    if x.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D feature map (N, C, H, W); got a {x.dim()}-D tensor of shape {tuple(x.shape)}. "
            "Fix: pick a convolutional layer, or add the missing dimensions with x[:, :, None, None] for vectors."
        )
    if min(x.shape) == 0:
        raise ValueError(f"{name} must have no empty dimension; got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}. Fix: {name}.float().")
    # checked in chunks: no full-size temporary for large (possibly memory-mapped) feature sets
    step = max(1, (1 << 24) // max(1, x[0].numel()))
    bad = sum(int((~torch.isfinite(x[i : i + step])).sum()) for i in range(0, x.shape[0], step))
    if bad:
        raise ValueError(
            f"{name} must be finite; got {bad} NaN/Inf value(s) out of {x.numel()}. "
            "Fix: check the model and images that produced these features (e.g. a diverged checkpoint)."
        )
    return x


def check_pair(x_src: object, x_tgt: object) -> tuple[Tensor, Tensor]:
    """Check a (source, target) pair of feature maps: each valid and with the same number of images."""
    xs = check_feature_map("x_src", x_src)
    xt = check_feature_map("x_tgt", x_tgt)
    if xs.shape[0] != xt.shape[0]:
        raise ValueError(
            f"x_src and x_tgt must hold the same images: expected equal N, got x_src N={xs.shape[0]} "
            f"and x_tgt N={xt.shape[0]}. Fix: extract both feature maps from the same image list."
        )
    return xs, xt


def constant_channels(x: Tensor) -> list[int]:
    """Channels of a 4-D feature map ``(N, C, H, W)`` that hold one value over all images and positions.

    ``x`` may be any array whose slices ``x[i:j]`` are tensors (e.g. a :class:`kcore.feature_cache.CachedArray`).
    """
    c = x.shape[1]
    lo = torch.full((c,), float("inf"), dtype=torch.float64)
    hi = torch.full((c,), float("-inf"), dtype=torch.float64)
    step = max(1, (1 << 21) // max(1, x[0].numel()))  # chunks of 2M values (16 MiB as float64): bounded memory
    for i in range(0, x.shape[0], step):
        chunk = x[i : i + step].detach().to("cpu", torch.float64)
        lo = torch.minimum(lo, chunk.amin(dim=(0, 2, 3)))
        hi = torch.maximum(hi, chunk.amax(dim=(0, 2, 3)))
    return [k for k in range(c) if lo[k] == hi[k]]


def check_informative(x_src: Tensor, x_tgt: Tensor, src_name: str = "x_src", tgt_name: str = "x_tgt") -> None:
    """Refuse a constant target (instability Var(x^Δ)/Var(x*) would be 0/0 = NaN) and a constant source
    (e.g. all zeros: nothing to reconstruct from); the message names the feature map and its channels.

    Raises:
        ValueError: every channel of ``x_tgt``, or every channel of ``x_src``, is constant.
    """
    for name, x, why, fix in (
        (tgt_name, x_tgt, "Var(x*) = 0, so the instability Var(x^Δ)/Var(x*) and every share would be 0/0 (NaN)",
         "pick a layer whose features vary over the images (check the checkpoint loaded correctly and the images "
         "are not all the same)"),
        (src_name, x_src, "there is nothing to reconstruct the target from (the fit would report 1 trivially)",
         "pick another layer of the source network, or check that its checkpoint loaded correctly (an all-zero "
         "map usually means a dead ReLU layer or missing weights)"),
    ):
        const = constant_channels(x)
        if len(const) == x.shape[1]:
            value = float(x[0:1].reshape(-1)[0])
            raise ValueError(
                f"{name} is constant: all {x.shape[1]} channels hold the single value {value:g} over the "
                f"{x.shape[0]} images (channels {const[:8]}{' ...' if len(const) > 8 else ''}); {why}. Fix: {fix}.")


def check_orders(orders: object) -> int:
    """Check the number of non-linear orders K (an int >= 0)."""
    if isinstance(orders, bool) or not isinstance(orders, int):
        raise ValueError(f"orders (K) must be an integer >= 0; got {orders!r} ({type(orders).__name__}).")
    if orders < 0:
        raise ValueError(
            f"orders (K) must be >= 0 (0 = linear only); got {orders}. Fix: use orders=2 as in the paper."
        )
    return orders
