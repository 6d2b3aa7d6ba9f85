"""Variance metrics of Sec. 4.2, per-channel profiles, and the 0-order baselines.

Var(·) follows the paper's definition (Sec. 4.2): the mean squared deviation of every element (over images
and all units c, h, w) from the mean over all images and units,

    Var(x) = E_{I,i} [ (x_{I,i} − E_{I',i'} x_{I',i'})^2 ]          (population variance, one global mean)

The authors' ``Variance.py`` instead centres each channel on its own mean; that variant is reported too,
under ``*_channel_centred``. Both come from one streaming pass of per-channel moments (Chan et al.'s
parallel update in float64), so memory does not grow with the number of images.

Instability (Sec. 4.2) = Var(x^Δ) / Var(x*).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class ChannelMoments:
    """Streaming per-channel count, mean and sum of squared deviations of (N, C, H, W) tensors (float64)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Merge a batch ``x`` (N, C, H, W) into the running moments."""
        xb = x.detach().to(dtype=torch.float64)
        nb = xb.shape[0] * xb.shape[2] * xb.shape[3]
        if nb == 0:
            return
        mb = xb.mean(dim=(0, 2, 3))
        m2b = ((xb - mb.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        mb, m2b = mb.cpu(), m2b.cpu()
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def channel_var(self) -> Tensor:
        """(C,) variance of each channel around its own mean."""
        return self.m2 / max(self.n, 1)

    def global_var(self) -> float:
        """The paper's Var: every element around the single mean over images and units."""
        grand = self.mean.mean()
        return float((self.m2.sum() + self.n * ((self.mean - grand) ** 2).sum()) / (self.n * self.mean.numel()))

    def channel_centred_var(self) -> float:
        """Variance pooled over channels around per-channel means (the authors' ``Variance.py``)."""
        return float(self.channel_var().mean())


def paper_var(x: Tensor) -> float:
    """Var(x) of the paper for a whole tensor (N, C, H, W), computed directly (reference for the stream)."""
    x = x.detach().to(torch.float64)
    return float(((x - x.mean()) ** 2).mean())


class VarianceAccumulator:
    """One streaming pass over batches of (components, residual, target) -> the variance report."""

    def __init__(self, orders: int, channels: int):
        self.orders = orders
        self.comp = [ChannelMoments(channels) for _ in range(orders + 1)]
        self.output = ChannelMoments(channels)
        self.residual = ChannelMoments(channels)
        self.target = ChannelMoments(channels)
        self.sq_err = 0.0
        self.images = 0

    def update(self, components: Sequence[Tensor], residual: Tensor, target: Tensor) -> None:
        """Add one batch: ``components`` K+1 tensors (n, C_b, H, W), ``residual`` and ``target`` (n, C_b, H, W)."""
        out = None
        for acc, c in zip(self.comp, components):
            acc.update(c)
            out = c if out is None else out + c
        self.output.update(out)
        self.residual.update(residual)
        self.target.update(target)
        self.sq_err += float((residual.detach().to(torch.float64) ** 2).sum())
        self.images += int(target.shape[0])

    def report(self) -> dict:
        """The report dict (see :func:`variance_report` for the keys)."""
        var_t = self.target.global_var()
        ch_t = self.target.channel_var()
        ch_r = self.residual.channel_var()
        ch_k = torch.stack([a.channel_var() for a in self.comp])  # (K+1, C)
        safe_t = torch.where(ch_t > 0, ch_t, torch.ones_like(ch_t))
        numel = self.target.n * self.target.mean.numel()
        return {
            "n_images": self.images,
            "orders": self.orders,
            "var_orders": [a.global_var() for a in self.comp],
            "var_output": self.output.global_var(),
            "var_residual": self.residual.global_var(),
            "var_target": var_t,
            "instability": self.residual.global_var() / var_t if var_t > 0 else float("nan"),
            "mse": self.sq_err / numel if numel else float("nan"),
            "var_orders_channel_centred": [a.channel_centred_var() for a in self.comp],
            "var_residual_channel_centred": self.residual.channel_centred_var(),
            "var_target_channel_centred": self.target.channel_centred_var(),
            "per_channel": {
                "var_orders": ch_k.tolist(),
                "var_residual": ch_r.tolist(),
                "var_target": ch_t.tolist(),
                "order_share": (ch_k / safe_t).tolist(),
                "residual_share": (ch_r / safe_t).tolist(),
            },
            "definition": "Var = mean over images and units of (value - mean over images and units)^2 "
            "(paper, Sec. 4.2); shares = channel variance / Var(x*) of that channel; "
            "*_channel_centred = variance around per-channel means (authors' Variance.py).",
        }


def variance_report(components: Sequence[Tensor], residual: Tensor, target: Tensor, batch_size: int = 256) -> dict:
    """Variance report for whole tensors, computed by streaming over batches.

    Returns a dict with ``var_orders`` (K+1 floats), ``var_output``, ``var_residual``, ``var_target``,
    ``instability`` = Var(x^Δ)/Var(x*), ``mse``, the ``*_channel_centred`` variants, and ``per_channel``
    (lists of per-channel variances per order, of x^Δ and x*, and each channel's shares).
    """
    acc = VarianceAccumulator(len(components) - 1, target.shape[1])
    for i in range(0, target.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        acc.update([c[sl] for c in components], residual[sl], target[sl])
    return acc.report()


# ----------------------------------------------------------------------------------------------------------
# 0-order baselines
# ----------------------------------------------------------------------------------------------------------

#: above this many patch features (C_a·k²) the least-squares map uses the centre tap only (1×1), to bound its
#: cost: 4608 = 512 channels with a 3×3 kernel (a 4608² normal-equation matrix, 170 MB in float64)
MAX_LSTSQ_FEATURES = 4608
#: patch products are computed in float32 (about twice as fast on the CPU as float64) and summed per batch
#: into float64 normal equations; against float64 products the weights differ by ~5e-4 relative at 2304
#: features, far below the ridge's effect (``bench/`` measures it)
GRAM_DTYPE = torch.float32
#: patch rows per batch of the normal equations (bounds the unfolded patches to 8192 × C_a·k² floats)
GRAM_ROWS = 8192


def _patches(x: Tensor, kernel_size: int) -> Tensor:
    """(N, C, H, W) -> (N·H·W, C·k·k) rows of 'same'-padded patches."""
    n, c, h, w = x.shape
    cols = F.unfold(x, kernel_size, padding=kernel_size // 2)  # (N, C·k·k, H·W)
    return cols.transpose(1, 2).reshape(n * h * w, c * kernel_size * kernel_size)


def _rows(y: Tensor) -> Tensor:
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def effective_kernel(channels: int, kernel_size: int) -> int:
    """Kernel used by the least-squares map: ``kernel_size`` unless C·k² exceeds MAX_LSTSQ_FEATURES, then 1."""
    return kernel_size if channels * kernel_size**2 <= MAX_LSTSQ_FEATURES else 1


@dataclass(frozen=True)
class LinearMap:
    """A bias-free convolution (C_b, C_a, k, k) fitted in closed form by ridge least squares."""

    weight: Tensor
    kernel_size: int

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.kernel_size // 2)


def fit_linear_map(
    x: Tensor, y: Tensor, kernel_size: int = 3, ridge: float = 1e-4, batch_size: int = 256, max_rows: int | None = None
) -> LinearMap:
    """Closed-form least-squares convolution ``y ≈ W * x`` (the best 0-order reconstruction).

    Args:
        x: (N, C_a, H, W) source, already resampled to y's H×W.
        y: (N, C_b, H, W) target.
        kernel_size: k of W (odd); falls back to 1 when C_a·k² > MAX_LSTSQ_FEATURES.
        ridge: Tikhonov regulariser, relative to the mean diagonal of XᵀX.
        max_rows: optional cap on patch rows used (a strided subsample), for speed.

    Returns:
        The fitted map; normal equations are accumulated in float64 batch by batch.
    """
    k = effective_kernel(x.shape[1], kernel_size)
    d = x.shape[1] * k * k
    xtx = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, y.shape[1], dtype=torch.float64)
    n_rows_total = x.shape[0] * x.shape[2] * x.shape[3]
    stride = max(1, n_rows_total // max_rows) if max_rows else 1
    batch_size = max(1, min(batch_size, GRAM_ROWS // (x.shape[2] * x.shape[3])))
    for i in range(0, x.shape[0], batch_size):
        px = _patches(x[i : i + batch_size].to(GRAM_DTYPE), k)
        py = _rows(y[i : i + batch_size].to(GRAM_DTYPE))
        if stride > 1:
            px, py = px[::stride].contiguous(), py[::stride].contiguous()
        xtx += (px.T @ px).to("cpu", torch.float64)
        xty += (px.T @ py).to("cpu", torch.float64)
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

    def as_dict(self) -> dict:
        return {"linear_r2": self.linear_r2, "linear_kernel": self.linear_kernel, "cka": self.cka}


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
