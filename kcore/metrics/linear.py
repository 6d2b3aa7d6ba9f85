"""The 0-order baselines beside the non-linear result: a closed-form least-squares convolution from x to x*
(its held-out R²) and linear CKA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kcore.distributed import all_reduce_sum, batch_slices
from kcore.metrics.moments import ChannelMoments

#: above this many patch features (C_a·k²) the least-squares map uses the centre tap only (1×1), to bound its
#: cost: 4608 = 512 channels with a 3×3 kernel (a 4608² normal-equation matrix, 170 MB in float64)
MAX_LSTSQ_FEATURES = 4608
#: patch products are computed in float32 (about twice as fast on the CPU as float64) and summed per batch
#: into float64 normal equations; against float64 products the weights differ by ~5e-4 relative at 2304
#: features, far below the ridge's effect (``bench/`` measures it)
GRAM_DTYPE = torch.float32
#: map positions per batch of the normal equations: a batch holds 65536 × (C_a + C_b) floats, channels-last
#: copies of them and the copies of two shifted regions at a time (the patches are never unfolded, see
#: ``_normal_equations``); about 0.8 GB at C_a = C_b = 512
GRAM_ROWS = 65536


def effective_kernel(channels: int, kernel_size: int) -> int:
    """Kernel used by the least-squares map: ``kernel_size`` unless C·k² exceeds MAX_LSTSQ_FEATURES, then 1."""
    return kernel_size if channels * kernel_size**2 <= MAX_LSTSQ_FEATURES else 1


@dataclass(frozen=True)
class LinearMap:
    """A bias-free convolution (C_b, C_a, k, k) fitted in closed form by ridge least squares."""

    weight: Tensor
    kernel_size: int

    def __call__(self, x: Tensor) -> Tensor:
        """Apply the map to ``x`` (N, C_a, H, W) → (N, C_b, H, W), in ``x``'s dtype."""
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.kernel_size // 2)


def _valid(size: int, shift: int) -> tuple[int, int]:
    """The positions u of one axis (0 ≤ u < size) with u + shift also on it: [lo, hi)."""
    return max(0, -shift), min(size, size - shift)


def _region_sum(xl: Tensor, rows: tuple[int, int], cols: tuple[int, int], dy: int, dx: int) -> Tensor:
    """Σ over images and the positions u in rows × cols of x(u) x(u + (dy, dx))ᵀ, (C, C); ``xl`` is (N, H, W, C)."""
    (r0, r1), (c0, c1) = rows, cols
    if r1 <= r0 or c1 <= c0:
        return xl.new_zeros(xl.shape[3], xl.shape[3])
    a = xl[:, r0:r1, c0:c1].reshape(-1, xl.shape[3])
    b = xl[:, r0 + dy : r1 + dy, c0 + dx : c1 + dx].reshape(-1, xl.shape[3])
    return a.T @ b


def _normal_equations(x: Tensor, y: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """PᵀP and PᵀY of the 'same'-padded k×k patches P of ``x`` (N, C_a, H, W) and the rows Y of ``y``, without
    unfolding P (``F.unfold``): the same sums, 2.7–3× faster at 3×3 (256×14×14 and 512×28×28 in float32).

    The block of PᵀP for patch offsets a and b sums x(u) x(u + b − a)ᵀ over the pixels u that offset a reads
    inside the image. That region is the full overlap of the image with itself shifted by δ = b − a, less a
    strip of at most k//2 rows and k//2 columns at its edges, so each of the (2k − 1)² shifts δ is summed once
    over its full overlap (half of them, as the transposes of the other half) and every block is that sum
    less its edge strips. PᵀY sums x(p + a − k//2) y(p)ᵀ over the output positions p per offset a.
    """
    _, c, h, w = x.shape
    r, k2 = k // 2, k * k
    xl = x.permute(0, 2, 3, 1).contiguous()  # (N, H, W, C): every region below is a plain reshape away
    yl = y.permute(0, 2, 3, 1).contiguous()
    offsets = [(i - r, j - r) for i in range(k) for j in range(k)]  # patch entry a reads pixel p + offsets[a]
    full: dict[tuple[int, int], Tensor] = {}
    for dy in range(-2 * r, 2 * r + 1):
        for dx in range(-2 * r, 2 * r + 1):
            if (dy, dx) < (0, 0):  # the transpose of the sum for (−dy, −dx)
                continue
            full[(dy, dx)] = _region_sum(xl, _valid(h, dy), _valid(w, dx), dy, dx)
    blocks = x.new_zeros(k2, k2, c, c)
    for ia, (ay, ax) in enumerate(offsets):
        for ib in range(ia, k2):
            by, bx = offsets[ib]
            dy, dx = by - ay, bx - ax
            g = full[(dy, dx)] if (dy, dx) >= (0, 0) else full[(-dy, -dx)].T
            # the region offset a reads: pixels u = p + a with p on the grid, and u + δ in the image
            fy, fx = _valid(h, dy), _valid(w, dx)
            ry = (max(fy[0], ay), min(fy[1], h + ay))
            rx = (max(fx[0], ax), min(fx[1], w + ax))
            for strip in ((fy[0], ry[0]), (ry[1], fy[1])):  # rows of the full overlap outside the region
                g = g - _region_sum(xl, strip, fx, dy, dx)
            for strip in ((fx[0], rx[0]), (rx[1], fx[1])):  # columns within the region's rows
                g = g - _region_sum(xl, ry, strip, dy, dx)
            blocks[ia, ib] = g
            if ib != ia:
                blocks[ib, ia] = g.T
    xty = x.new_zeros(k2, c, y.shape[1])
    for ia, (ay, ax) in enumerate(offsets):
        (p0, p1), (q0, q1) = _valid(h, ay), _valid(w, ax)  # output positions p whose pixel p + a is inside
        a = xl[:, p0 + ay : p1 + ay, q0 + ax : q1 + ax].reshape(-1, c)
        xty[ia] = a.T @ yl[:, p0:p1, q0:q1].reshape(-1, y.shape[1])
    # patch column c·k² + a (F.unfold's order)
    return blocks.permute(2, 0, 3, 1).reshape(c * k2, c * k2), xty.permute(1, 0, 2).reshape(c * k2, y.shape[1])


def fit_linear_map(
    x: Tensor,
    y: Tensor,
    kernel_size: int = 3,
    ridge: float = 1e-4,
    batch_size: int = 256,
    ctx: Any = None,
) -> LinearMap:
    """Closed-form least-squares convolution ``y ≈ W * x`` (the best 0-order reconstruction).

    Args:
        x: (N, C_a, H, W) source, already resampled to y's H×W.
        y: (N, C_b, H, W) target.
        kernel_size: k of W (odd); falls back to 1 when C_a·k² > MAX_LSTSQ_FEATURES.
        ridge: Tikhonov regulariser, relative to the mean diagonal of XᵀX.
        batch_size: at most this many images per batch of the normal equations.
        ctx: a :class:`kcore.distributed.Context`: with several ranks each accumulates its share of the
            batches and the normal equations are all-reduced before the solve (every rank gets the same map).
            ``x`` and ``y`` only need to be sliceable (e.g. :class:`kcore.streaming.Rows`).

    Returns:
        The fitted map; normal equations are accumulated in float64 batch by batch, each batch's sums are
        products in ``GRAM_DTYPE`` (:func:`_normal_equations`: the patch matrix is never unfolded).
    """
    k = effective_kernel(x.shape[1], kernel_size)
    d = x.shape[1] * k * k
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, y.shape[1], dtype=torch.float64)
    batch_size = max(1, min(batch_size, GRAM_ROWS // (x.shape[2] * x.shape[3])))
    for sl in batch_slices(x.shape[0], batch_size, ctx):
        gram, cross = _normal_equations(x[sl].to(GRAM_DTYPE), y[sl].to(GRAM_DTYPE), k)
        xtx += gram.to("cpu", torch.float64)
        xty += cross.to("cpu", torch.float64)
    xtx, xty = all_reduce_sum(xtx, ctx), all_reduce_sum(xty, ctx)
    reg = ridge * float(xtx.diagonal().mean().clamp_min(1e-12))
    a = xtx + reg * torch.eye(d, dtype=torch.float64)
    chol, info = torch.linalg.cholesky_ex(a)  # symmetric positive definite: half the work of a general solve
    w = torch.cholesky_solve(xty, chol) if int(info) == 0 else torch.linalg.solve(a, xty)  # (d, C_b)
    weight = w.T.reshape(y.shape[1], x.shape[1], k, k).to(torch.float32)
    return LinearMap(weight, k)


def r2_score(pred: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """1 − Σ(y − pred)² / Σ(y − channel mean of y)², over all images and units (float64)."""
    sse, mom = 0.0, ChannelMoments(y.shape[1])
    for i in range(0, y.shape[0], batch_size):
        yb, pb = y[i : i + batch_size].to(torch.float64), pred[i : i + batch_size].to(torch.float64)
        sse += float(((yb - pb) ** 2).sum())
        mom.update(yb)
    sst = float(mom.m2.sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear CKA (Kornblith et al., 2019) between ``x`` (N, …) and ``y`` (N, …), images as examples.

    Uses the feature-space form ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on centred, flattened features when that is
    cheaper, else the Gram form ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖); both are the same quantity. float64.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same images: got N={x.shape[0]} and N={y.shape[0]}.")
    if x.shape[0] < 2:
        raise ValueError(f"linear CKA needs at least 2 images; got {x.shape[0]}.")
    a = x.reshape(x.shape[0], -1).to(torch.float64)
    b = y.reshape(y.shape[0], -1).to(torch.float64)
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    n = a.shape[0]
    if n <= max(a.shape[1], b.shape[1]):
        ka, kb = a @ a.T, b @ b.T
        num = (ka * kb).sum()
        den = ka.norm() * kb.norm()
    else:
        num = ((b.T @ a) ** 2).sum()
        den = (a.T @ a).norm() * (b.T @ b).norm()
    return float(num / den) if float(den) > 0 else float("nan")


@dataclass(frozen=True)
class Baseline:
    """The 0-order baseline beside the non-linear result, on held-out images.

    Attributes:
        linear_r2: held-out R² of the closed-form least-squares convolution fitted on the training split.
        linear_kernel: its kernel size.
        cka: linear CKA between x (resampled) and x* on the held-out images.
    """

    linear_r2: float
    linear_kernel: int
    cka: float

    @property
    def linear_error(self) -> float:
        """Held-out error of the least-squares map, in the units of g_θ's ``heldout_error``.

        Both are Σ(x* − prediction)² / Σ(x* − channel mean of x*)² over the held-out images
        (:func:`kcore.fit.evaluate.relative_error`), and R² is 1 minus it, so this is ``1 − linear_r2``.
        """
        return 1.0 - self.linear_r2

    def as_dict(self) -> dict:
        """The metrics.json form (``linear_error`` beside ``linear_r2``; :meth:`from_dict` reads it back)."""
        return {"linear_r2": self.linear_r2, "linear_error": self.linear_error, "linear_kernel": self.linear_kernel,
                "cka": self.cka}

    @classmethod
    def from_dict(cls, data: dict) -> Baseline:
        """The baseline from :meth:`as_dict`'s form (``linear_error`` is derived, so it is not read)."""
        return cls(linear_r2=data["linear_r2"], linear_kernel=data["linear_kernel"], cka=data["cka"])


def linear_baseline(
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    kernel_size: int = 3,
    batch_size: int = 256,
    lin: LinearMap | None = None,
) -> Baseline:
    """Fit the least-squares convolution on the training split and score it, with linear CKA, held out.

    All inputs are prepared features (x resampled to y's H×W and normalised as for g_θ). ``lin``, when given,
    is the map :func:`fit_linear_map` already fitted on exactly ``(x_train, y_train, kernel_size)`` (the fit's
    least-squares start), reused instead of solving the same normal equations twice.
    """
    if lin is None:
        lin = fit_linear_map(x_train, y_train, kernel_size, batch_size=batch_size)
    preds = torch.cat([lin(x_test[i : i + batch_size]) for i in range(0, x_test.shape[0], batch_size)])
    cka = linear_cka(x_test, y_test) if x_test.shape[0] >= 2 else float("nan")
    return Baseline(r2_score(preds, y_test), lin.kernel_size, cka)
