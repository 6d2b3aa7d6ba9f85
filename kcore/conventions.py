"""The two normalisation conventions and how source / target feature maps are prepared for g_θ.

``"paper"`` (Sec. 3, footnote 2): x and x* are standardised per channel (zero mean, unit variance) with
statistics of the fit split, which are stored with the fitted model; Σ_(k) is the per-channel variance of
h^(k) over images (and positions), fixed after fitting.

``"authors"`` (the public reference code, ``my_bn``): x is divided by its per-sample, per-channel spatial
standard deviation (unbiased, eps added to the std, no centring); the target x* is used raw; Σ_(k) is the
same per-sample spatial std of h^(k), detached from the gradient.

Spatial sizes: when x and x* differ in H×W, x is resampled to x*'s H×W *before* normalisation, bilinearly
(``align_corners=False``; with antialiasing when shrinking). Resampling is linear, so it does not affect the
exactness of the decomposition; it is part of how x is defined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Convention = Literal["paper", "authors"]
CONVENTIONS: dict[str, str] = {
    "paper": "x and x* standardised per channel over the fit split; Σ = per-channel variance over images",
    "authors": "x divided by its per-sample spatial std (no centring); raw x*; Σ = per-sample spatial std",
}
EPS = 1e-5


def check_convention(convention: str) -> str:
    """Raise a ValueError naming the valid conventions when ``convention`` is not one of them."""
    if convention not in CONVENTIONS:
        raise ValueError(
            f"convention must be one of {sorted(CONVENTIONS)}; got {convention!r}. "
            "'paper' follows Sec. 3 of the paper, 'authors' follows the authors' public code."
        )
    return convention


def resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resample ``x`` (N, C, H, W) to ``size`` = (H', W') bilinearly; identity when sizes already match."""
    if x.dtype in (torch.float16, torch.bfloat16):  # e.g. the float16 feature cache; interpolate needs float32
        x = x.float()
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def spatial_std(h: Tensor, eps: float = EPS) -> Tensor:
    """Per-sample, per-channel spatial std of ``h`` (N, C, H, W) as the authors' code computes it.

    Unbiased variance over H·W, square root, plus ``eps``; 1 where H·W = 1. Detached. Returns (N, C, 1, 1).
    """
    n, c, hh, ww = h.shape
    if hh * ww == 1:
        return torch.ones(n, c, 1, 1, dtype=h.dtype, device=h.device)
    return h.detach().reshape(n, c, hh * ww).var(-1, unbiased=True).sqrt().add(eps).reshape(n, c, 1, 1)


STATS_BATCH_ELEMENTS = 2**23
""":func:`channel_mean_std` reads at most this many values per batch (64 MiB in float64)."""


def channel_mean_std(x: Tensor, batch_size: int | None = None, ctx: Any = None) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of ``x`` (N, C, H, W) over images and positions, in float64.

    ``batch_size`` images are read at a time (default: as many as hold :data:`STATS_BATCH_ELEMENTS` values, at
    most 1024), so memory does not grow with N or with the map's size.

    With ``ctx`` (a :class:`kcore.distributed.Context` of several ranks) each rank sums its own batches and the
    sums are all-reduced, so every rank gets the statistics of all N images.
    """
    from kcore.distributed import all_reduce_sum
    from kcore.streaming import batch_slices

    c = x.shape[1]
    if batch_size is None:
        per_image = max(1, int(x.shape[1]) * int(x.shape[2]) * int(x.shape[3]))
        batch_size = max(1, min(1024, STATS_BATCH_ELEMENTS // per_image))
    total = torch.zeros(c + 1, dtype=torch.float64)  # per-channel sums, then the count
    total_sq = torch.zeros(c, dtype=torch.float64)
    mine = batch_slices(x.shape[0], batch_size, ctx)
    # Two passes (mean, then squared deviations) keep the variance accurate for features with a large mean.
    for sl in mine:
        xb = x[sl].to(dtype=torch.float64, device="cpu")
        total[:c] += xb.sum(dim=(0, 2, 3))
        total[c] += xb.shape[0] * xb.shape[2] * xb.shape[3]
    total = all_reduce_sum(total, ctx)
    mean = total[:c] / total[c]
    for sl in mine:
        xb = x[sl].to(dtype=torch.float64, device="cpu")
        total_sq += ((xb - mean.view(1, c, 1, 1)) ** 2).sum(dim=(0, 2, 3))
    std = (all_reduce_sum(total_sq, ctx) / total[c]).sqrt()
    return mean, std


#: a channel's std is floored at this share of the mean std over channels (see :func:`std_floor`)
STD_FLOOR = 0.01


def std_floor(std: Tensor, share: float = STD_FLOOR) -> Tensor:
    """Floor per-channel stds at ``share`` × their mean, so nearly dead channels are not blown up.

    A channel that almost never fires (std ~1e-4 of the others') would otherwise be multiplied by ~1e4 and
    a single image's rare activation would dominate the loss and every variance. A constant channel
    (std 0, nothing to standardise) gets the floor too, or 1 when every channel is constant.
    """
    floor = float(std.mean()) * share
    if floor <= 0:
        return torch.ones_like(std)
    return std.clamp_min(floor)


@dataclass(frozen=True)
class Normalization:
    """How raw feature maps become g_θ's input and target; fitted on the training split.

    Attributes:
        convention: ``"paper"`` or ``"authors"`` (see the module docstring).
        target_size: x*'s (H, W); x is resampled to it.
        src_mean, src_std: (C_a,) float64 channel statistics of the resampled x (paper convention only).
        tgt_mean, tgt_std: (C_b,) float64 channel statistics of x* (paper convention only).
    """

    convention: Convention
    target_size: tuple[int, int]
    src_mean: Tensor | None = None
    src_std: Tensor | None = None
    tgt_mean: Tensor | None = None
    tgt_std: Tensor | None = None

    @staticmethod
    def fit(
        x_src: Tensor, x_tgt: Tensor, convention: Convention, indices: Tensor | None = None, ctx: Any = None
    ) -> "Normalization":
        """Compute the normalisation from training features.

        Args:
            x_src: (N, C_a, H_a, W_a) source features.
            x_tgt: (N, C_b, H, W) target features.
            convention: ``"paper"`` or ``"authors"``.
            indices: the training images (default: all); read batch by batch, never copied whole.
            ctx: a :class:`kcore.distributed.Context`: with several ranks each reads its share of the
                batches and the sums are all-reduced (the same statistics as one process).
        """
        check_convention(convention)
        size = (int(x_tgt.shape[-2]), int(x_tgt.shape[-1]))
        if convention == "authors":
            return Normalization("authors", size)
        sm, ss = channel_mean_std(_Batches(x_src, size, indices), ctx=ctx)
        tm, ts = channel_mean_std(_Batches(x_tgt, None, indices), ctx=ctx)
        ss, ts = std_floor(ss), std_floor(ts)
        return Normalization("paper", size, sm, ss, tm, ts)

    def source(self, x: Tensor) -> Tensor:
        """g_θ's input from raw source features ``x`` (N, C_a, H_a, W_a) -> (N, C_a, H, W)."""
        x = resample(x, self.target_size)
        if self.convention == "authors":
            return x / spatial_std(x)
        return (x - _col(self.src_mean, x)) / _col(self.src_std, x)

    def target(self, x: Tensor) -> Tensor:
        """g_θ's target from raw target features ``x`` (N, C_b, H, W)."""
        if self.convention == "authors":
            return x
        return (x - _col(self.tgt_mean, x)) / _col(self.tgt_std, x)

    def target_to_raw(self, y: Tensor, *, add_mean: bool = True) -> Tensor:
        """Map target-space values back to raw feature units (inverse of :meth:`target`)."""
        if self.convention == "authors":
            return y
        out = y * _col(self.tgt_std, y)
        return out + _col(self.tgt_mean, y) if add_mean else out

    def state(self) -> dict[str, Tensor]:
        """Tensors to store with the fitted model (empty for the authors' convention)."""
        if self.convention == "authors":
            return {}
        return {"src_mean": self.src_mean, "src_std": self.src_std, "tgt_mean": self.tgt_mean, "tgt_std": self.tgt_std}


class _Batches:
    """A lazy (n, C, H, W) view of selected images of x, resampled batch by batch (bounded memory)."""

    def __init__(self, x: Tensor, size: tuple[int, int] | None, indices: Tensor | None):
        self.x, self.size, self.indices = x, size, indices
        n = x.shape[0] if indices is None else len(indices)
        hw = tuple(x.shape[-2:]) if size is None else size
        self.shape = (n, x.shape[1], *hw)

    def __getitem__(self, idx: slice) -> Tensor:
        xb = self.x[idx] if self.indices is None else self.x[self.indices[idx]]
        return resample(xb, self.size) if self.size is not None else xb


def _col(v: Tensor | None, like: Tensor) -> Tensor:
    assert v is not None, "paper-convention statistics missing"
    return v.to(dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
