"""Nested fits of g_θ: the orders fitted one after another, and the order-wise gains they define.

g₀ has only the linear branch and is the closed-form least-squares map (its optimum, unique). gₖ adds order k to
gₖ₋₁: it starts from gₖ₋₁'s weights with its new gate at p⁽ᵏ⁾ = 0, which is the same function
(:func:`extend_order`), and is trained with the fit's schedule. The held-out R² of every gₖ, with the paper's
single global mean (Sec. 4.2), gives the order-wise gains

    Δₖ = R²(gₖ) − R²(gₖ₋₁),   R²(g₋₁) = 0,   so   Δ₀ + … + Δ_K + Var(x* − g_K(x))/Var(x*) = 1 exactly,

overall and per channel, with bootstrap intervals over the held-out images drawn from the same resamples as the
shares' (:func:`kcore.metrics.variance.resample_weights`). The nested components x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x)
(:func:`kcore.decompose.nested_components`) sum to g_K(x). Unlike the split of one g_θ into orders (Eq. 3–4),
which the optimiser's path decides, each gain is what order k adds to the best fit without it.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore.decompose import Decomposition, nested_components
from kcore.fit.config import FitConfig
from kcore.fit.data import FitData
from kcore.fit.evaluate import calibrate
from kcore.fit.result import StoppedBy
from kcore.fit.train import FitProgress, TrainRun, init_model, train
from kcore.gtheta import GTheta
from kcore.metrics import ChannelMoments
from kcore.metrics.report import CI_BOOTSTRAPS, CI_LEVEL, CI_SEED, _floats, _nested_list, _opt
from kcore.metrics.variance import MAX_IMAGE_MOMENTS, percentile_interval, resample_weights
from kcore.streaming import batch_slices, merge_moments, sum_by_position


def extend_order(prev: GTheta, seed: int = 0) -> GTheta:
    """gₖ from gₖ₋₁: the same weights, gates and Σ, plus a new order k whose gate starts at p⁽ᵏ⁾ = 0.

    With p⁽ᵏ⁾ = 0 the new branch adds exactly nothing (h⁽ᵏ⁻¹⁾ = W⁽ᵏ⁻¹⁾(x + 0)), so the returned model computes
    gₖ₋₁'s function; its new W⁽ᵏ⁾ has PyTorch's default initialisation, seeded by ``seed``.

    Args:
        prev: gₖ₋₁ with ``gate="linear"`` (any K ≥ 0).
        seed: seeds W⁽ᵏ⁾.

    Returns:
        A new :class:`GTheta` of K = k on ``prev``'s device and dtype, in ``prev``'s mode; ``prev`` is unchanged.

    Raises:
        TypeError: ``prev`` is not a GTheta. ValueError: its gate is not linear.
    """
    if not isinstance(prev, GTheta):
        raise TypeError(f"prev must be a kcore.gtheta.GTheta; got {type(prev).__name__}. Fix: pass gₖ₋₁.")
    if prev.spec.gate != "linear":
        raise ValueError(f"prev must have gate='linear' (a new order starts at p = 0); got gate={prev.spec.gate!r}. "
                         "Fix: fit the nested models with gate='linear'.")
    k = prev.orders + 1
    spec = dataclasses.replace(prev.spec, orders=k, p_init=0.0)
    ref = next(prev.parameters())
    torch.manual_seed(seed)
    model = GTheta(spec, momentum=prev.momentum).to(ref.device, ref.dtype)
    with torch.no_grad():
        for j in range(k):
            model.convs[j].weight.copy_(prev.convs[j].weight)
        model.p_param[: k - 1].copy_(prev.p_param)
        model.p_param[k - 1] = 0.0
        model.running_var[: k - 1].copy_(prev.running_var)
    model.train(prev.training)
    return model.to(memory_format=torch.channels_last) if _channels_last(prev) else model


def _channels_last(m: GTheta) -> bool:
    w = m.convs[0].weight
    return w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


@dataclass(frozen=True)
class GainIntervals:
    """Bootstrap intervals of the gains over the held-out images (the resamples of the shares' intervals).

    Attributes:
        level, n_boot, seed, n_heldout: as :class:`kcore.metrics.ConfidenceIntervals`.
        gain_orders: K+1 intervals (lo, hi) of Δ₀ … Δ_K. instability: the interval of Var(x* − g_K)/Var(x*).
        channel_gain_orders: (K+1) × C intervals, ``None`` when per-channel sums were too many to keep.
        channel_instability: C intervals, or ``None``.
    """

    level: float
    n_boot: int
    seed: int
    n_heldout: int
    gain_orders: tuple[tuple[float, float], ...]
    instability: tuple[float, float]
    channel_gain_orders: tuple[tuple[tuple[float, float], ...], ...] | None = None
    channel_instability: tuple[tuple[float, float], ...] | None = None

    def as_dict(self) -> dict:
        """The metrics.json form (tuples as lists)."""
        return {k: _nested_list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_dict(d: Any) -> "GainIntervals":
        """The intervals from their :meth:`as_dict` form."""
        return GainIntervals(level=float(d["level"]), n_boot=int(d["n_boot"]), seed=int(d["seed"]),
                             n_heldout=int(d["n_heldout"]), gain_orders=_floats(d["gain_orders"]),
                             instability=_floats(d["instability"]),
                             channel_gain_orders=_opt(d.get("channel_gain_orders")),
                             channel_instability=_opt(d.get("channel_instability")))


@dataclass(frozen=True)
class NestedGains:
    """The held-out R² of the nested fits g₀ … g_K and the order-wise gains, overall and per channel.

    Attributes:
        n_images: held-out images. orders: K.
        r2_orders: R²(gₖ) = 1 − Var(x* − gₖ(x))/Var(x*), k = 0 … K (one global mean, Sec. 4.2).
        gain_orders: Δₖ = R²(gₖ) − R²(gₖ₋₁) (Δ₀ = R²(g₀)).
        instability: Var(x* − g_K(x))/Var(x*) = 1 − ΣΔₖ.
        channel_gain_orders: (K+1) × C, the same per channel (each channel around its own mean).
        channel_instability: C.
        ci: :class:`GainIntervals`, or ``None`` (fewer than 2 images).
        top_image: per order k, the held-out image (its index among the fit's inputs) whose own change of error
            between gₖ and gₖ₋₁ (gₖ and nothing, for k = 0) is the largest (:func:`image_gains`); ``-1`` when no
            image changes (a gain of exactly 0).
        top_image_gain: that image's contribution to Δₖ (the contributions of all images add up to Δₖ).
        top_image_share: its share of the change: |its contribution| / Σ |every image's contribution|.
        fragile: plain-language warnings, one per gain Δₖ (k ≥ 1) that one should not read as it is: its interval
            is wider than :data:`FRAGILE_CI_WIDTH` or one image holds more than :data:`FRAGILE_IMAGE_SHARE` of its
            change (:func:`fragile_gains`). Read from the held-out images after the fit, for the report only: the
            guard (:func:`guard_stage`) never sees them.

    Examples::

        g = kcore.fit(x_src, x_tgt, nested=True).nested.gains
        sum(g.gain_orders) + g.instability                      # 1.0
    """

    n_images: int
    orders: int
    r2_orders: tuple[float, ...]
    gain_orders: tuple[float, ...]
    instability: float
    channel_gain_orders: tuple[tuple[float, ...], ...]
    channel_instability: tuple[float, ...]
    ci: GainIntervals | None = None
    top_image: tuple[int, ...] = ()
    top_image_gain: tuple[float, ...] = ()
    top_image_share: tuple[float, ...] = ()
    fragile: tuple[str, ...] = ()

    def interval(self, k: int) -> tuple[float, float] | None:
        """The interval of Δₖ, or None without intervals."""
        return None if self.ci is None else self.ci.gain_orders[k]

    def as_dict(self) -> dict:
        """The metrics.json form: ``gain_orders``, ``gain_ci`` (K+1 intervals) and ``per_channel``."""
        ci = self.ci
        return {
            "n_heldout": self.n_images, "orders": self.orders, "r2_orders": list(self.r2_orders),
            "gain_orders": list(self.gain_orders), "instability": self.instability,
            "gain_ci": None if ci is None else _nested_list(ci.gain_orders),
            "per_channel": {"gain_orders": _nested_list(self.channel_gain_orders),
                            "instability": list(self.channel_instability),
                            "gain_ci": None if ci is None else _nested_list(ci.channel_gain_orders)},
            "ci": None if ci is None else ci.as_dict(),
            "top_image": list(self.top_image), "top_image_gain": list(self.top_image_gain),
            "top_image_share": list(self.top_image_share), "fragile": list(self.fragile),
            "definition": GAINS_DEFINITION,
        }

    @staticmethod
    def from_dict(d: Any) -> "NestedGains":
        """Read :meth:`as_dict` back.

        Raises:
            ValueError: not the form :meth:`as_dict` writes (the message names the missing key).
        """
        missing = [k for k in ("orders", "r2_orders", "gain_orders", "instability", "per_channel") if k not in d]
        if missing:
            raise ValueError(f"not nested gains: missing key(s) {missing}; expected the 'nested' block that "
                             "NestedGains.as_dict() writes. Fix: pass a metrics.json direction's 'nested' block.")
        pc = d["per_channel"]
        return NestedGains(
            n_images=int(d["n_heldout"]), orders=int(d["orders"]), r2_orders=_floats(d["r2_orders"]),
            gain_orders=_floats(d["gain_orders"]), instability=float(d["instability"]),
            channel_gain_orders=_floats(pc["gain_orders"]), channel_instability=_floats(pc["instability"]),
            ci=GainIntervals.from_dict(d["ci"]) if d.get("ci") else None,
            top_image=tuple(int(i) for i in d.get("top_image") or ()),
            top_image_gain=_floats(d.get("top_image_gain") or ()),
            top_image_share=_floats(d.get("top_image_share") or ()),
            fragile=tuple(str(w) for w in d.get("fragile") or ()),
        )

    def summary_line(self) -> str:
        """``gains (nested fits): Δ0 54.6 ± 2.1 %, Δ1 …, x^D …`` for the CLI and logs."""
        def pm(v: float, iv: tuple[float, float] | None) -> str:
            return f"{100 * v:.1f}" + (f" ± {100 * (iv[1] - iv[0]) / 2:.1f}" if iv else "") + " %"

        parts = [f"Δ{k} {pm(g, self.interval(k))}" for k, g in enumerate(self.gain_orders)]
        parts.append(f"x^D {pm(self.instability, None if self.ci is None else self.ci.instability)}")
        return "order-wise gains of nested fits (R²(g_k) - R²(g_k-1), add up to 100 %): " + ", ".join(parts)


GAINS_EXPLAINED = (
    "The shares split one fitted g_θ into orders (Eq. 3–4), and which g_θ the optimiser finds decides that split: "
    "the same two networks give x⁽⁰⁾ about half of Var(x*) with one recipe and a fifth with another. The gains come "
    "from nested fits instead: g₀ is the best linear map (closed form, unique), and each gₖ adds order k to gₖ₋₁ "
    "(started from it, with the new gate at 0) and is trained; Δₖ is what order k adds to the held-out R². A gain "
    "asks what order k explains that lower orders could not, so it depends on the networks more than on the "
    "recipe (a gain can be below 0 when gₖ over-fits the training images). Gains and x^Δ add up to 100 %."
)
"""One paragraph on how the nested gains differ from the shares of one g_θ (the dashboard and the CLI show it)."""

GAINS_DEFINITION = (
    "g_0 = closed-form least-squares map; g_k = g_(k-1) plus order k, started with p^(k) = 0 and trained; "
    "r2_orders[k] = 1 - Var(x* - g_k(x))/Var(x*) on held-out images (one global mean); gain_orders[k] = "
    "r2_orders[k] - r2_orders[k-1]; gain_orders sum to 1 - instability; per_channel: each channel around its own "
    "mean; ci: bootstrap over held-out images (the shares' resamples); top_image[k]: the held-out image whose own "
    "change of error moves gain_orders[k] most (top_image_gain: by how much; top_image_share: its share of the "
    "sum of every image's |change|); fragile: warnings for gains k >= 1 whose interval is wider than "
    "FRAGILE_CI_WIDTH or whose top_image_share exceeds FRAGILE_IMAGE_SHARE."
)

FRAGILE_CI_WIDTH = 0.10
"""A gain Δₖ (k ≥ 1) whose bootstrap interval is wider than this (10 points of Var(x*)) is flagged: on healthy
fits of the sample pair the gains' intervals are ±0.15–0.3 points at 400 images (widths 0.3–0.6), while the one
failed g₁ measured (200 images, seed 0) had [−87, +10], 97 points (docs/nested_fits.md); 10 points is ~15× the
healthy width, and a gain that uncertain says little whatever its cause."""

FRAGILE_IMAGE_SHARE = 0.5
"""… or when one held-out image holds more than half of the change in error between gₖ and gₖ₋₁ (its
|contribution| over the sum of every image's |contribution|, :func:`image_gains`): then that gain is about one
image, not about the images (the measured failure: one image of 40 moved Δ₁ by 30 points)."""


class GainAccumulator:
    """One streaming pass over held-out batches of (g₀(x) … g_K(x), x*) → :class:`NestedGains`.

    Moments are float64. Per image and channel it keeps, with one shift per part taken from the first batch,
    Σ(r − s) and Σ(r − s)² for every residual rₖ = x* − gₖ(x) and for x*: 2(K+2) numbers, so a bootstrap over
    images recomputes every R² without a refit. Images are placed by their position among the held-out images,
    so that the ranks of a torchrun job, each with its batches, merge into the same intervals as one process.
    """

    def __init__(self, orders: int, channels: int, n_images: int):
        self.orders, self.channels, self.n_images = orders, channels, n_images
        self.residual = [ChannelMoments(channels) for _ in range(orders + 1)]
        self.target = ChannelMoments(channels)
        rows = 2 * (orders + 2)
        self.per_channel = n_images * rows * channels <= MAX_IMAGE_MOMENTS
        self.sums = torch.zeros(n_images, rows, channels if self.per_channel else 1, dtype=torch.float64)
        self.shifts: Tensor | None = None
        self.units = 0
        self.placed: list[Tensor] = []  # the positions of the images this process added

    def set_shifts(self, outputs: Sequence[Tensor], target: Tensor) -> None:
        """Take the shift of every part (its mean, for precision) from this batch; every rank of a job must use
        the same batch (:func:`evaluate_gains` uses the first held-out batch)."""
        t = target.detach().to(torch.float64)
        parts = [t - o.detach().to(torch.float64) for o in outputs] + [t]
        self.shifts = torch.tensor([float(p.mean()) for p in parts], dtype=torch.float64)

    def update(self, outputs: Sequence[Tensor], target: Tensor, positions: slice) -> None:
        """Add one batch: ``outputs`` K+1 tensors gₖ(x) (n, C, H, W), ``target`` x* (n, C, H, W), and the
        batch's ``positions`` among the held-out images."""
        if len(outputs) != self.orders + 1:
            raise ValueError(f"outputs must hold K+1 = {self.orders + 1} tensors g_0(x) … g_K(x); got {len(outputs)}.")
        t = target.detach().to(torch.float64)
        parts = [t - o.detach().to(torch.float64) for o in outputs] + [t]
        for m, p in zip(self.residual + [self.target], parts):
            m.update(p)
        if self.shifts is None:
            self.set_shifts(outputs, target)
        self.units = t.shape[2] * t.shape[3]
        cen = [p - s for p, s in zip(parts, self.shifts.tolist())]
        block = torch.stack([p.sum((2, 3)) for p in cen] + [(p * p).sum((2, 3)) for p in cen], 1).cpu()
        self.sums[positions] = block if self.per_channel else block.sum(-1, keepdim=True)
        self.placed.append(torch.arange(self.n_images)[positions])

    def merged_sums(self, ctx: kd.Context | None = None) -> Tensor:
        """(N, 2(K+2), C') per-image sums of every rank, placed by position (the same on every rank)."""
        ctx = ctx or kd.Context()
        if not ctx.distributed and not self.placed:
            return self.sums
        # every rank took the same shifts (set_shifts), so its rows add up with the others' as they are
        mine = torch.cat(self.placed) if self.placed else torch.zeros(0, dtype=torch.long)
        return sum_by_position(self.sums[mine], mine, self.n_images, ctx)

    def result(self, ctx: kd.Context | None = None, ci: bool = True, level: float = CI_LEVEL,
               n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED, groups: Tensor | None = None,
               image_ids: Sequence[int] | None = None) -> NestedGains:
        """The :class:`NestedGains` of every image added (on every rank of ``ctx``: moments and sums merged);
        ``groups`` (one label per image, in position order) makes the bootstrap resample whole groups;
        ``image_ids`` (one per position, default the positions) name the images in ``top_image`` and the
        warnings of fragile gains."""
        sums = self.merged_sums(ctx)
        residual = [merge_moments(m, ctx) for m in self.residual]
        target = merge_moments(self.target, ctx)
        var_t = target.global_var()
        r2 = [1.0 - m.global_var() / var_t if var_t > 0 else float("nan") for m in residual]
        ch_t = target.channel_var()
        safe = torch.where(ch_t > 0, ch_t, torch.ones_like(ch_t))
        ch_r2 = torch.stack([torch.where(ch_t > 0, 1.0 - m.channel_var() / safe, torch.zeros_like(ch_t))
                             for m in residual])
        gains = [r2[0]] + [r2[k] - r2[k - 1] for k in range(1, len(r2))]
        ch_gains = torch.cat([ch_r2[:1], ch_r2[1:] - ch_r2[:-1]])
        intervals = self._bootstrap(sums, level, n_boot, seed, groups) if ci else None
        gains_t = tuple(gains)
        top, top_gain, top_share, fragile = fragile_gains(
            gains_t, intervals, image_gains(sums, self.units * self.channels), image_ids)
        return NestedGains(
            n_images=self.n_images, orders=self.orders,
            r2_orders=tuple(r2), gain_orders=gains_t, instability=1.0 - r2[-1],
            channel_gain_orders=_floats(ch_gains), channel_instability=_floats(1.0 - ch_r2[-1]), ci=intervals,
            top_image=top, top_image_gain=top_gain, top_image_share=top_share, fragile=fragile,
        )

    def _bootstrap(self, sums: Tensor, level: float, n_boot: int, seed: int,
                   groups: Tensor | None = None) -> GainIntervals | None:
        n = sums.shape[0]
        if n < 2:
            return None
        k1 = self.orders + 1
        w = resample_weights(n, n_boot, seed, groups)

        def r2_of(tot: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
            """tot (..., 2(K+2)) weighted sums over m elements → (R² (…, K+1), gains (…, K+1))."""
            mean, sq = tot[..., : k1 + 1] / m, tot[..., k1 + 1 :] / m
            var = sq - mean * mean  # Var of r₀ … r_K, x*
            var_t = var[..., -1:]
            r2 = 1.0 - var[..., :k1] / torch.where(var_t > 0, var_t, torch.ones_like(var_t))
            return r2, torch.cat([r2[..., :1], r2[..., 1:] - r2[..., :-1]], -1)

        m = w.sum(1, keepdim=True) * self.units  # elements per channel in each resample (groups differ in size)
        r2, gains = r2_of(w @ sums.sum(-1), m * self.channels)
        out: dict[str, Any] = dict(gain_orders=_floats(percentile_interval(gains, level)),
                                   instability=_floats(percentile_interval(1.0 - r2[:, -1], level)))
        if self.per_channel:
            tot = (w @ sums.reshape(n, -1)).view(n_boot, sums.shape[1], self.channels).transpose(1, 2)  # (B, C, D)
            r2_c, gains_c = r2_of(tot, m.unsqueeze(1))
            out.update(channel_gain_orders=_floats(percentile_interval(gains_c, level).transpose(0, 1)),
                       channel_instability=_floats(percentile_interval(1.0 - r2_c[..., -1], level)))
        return GainIntervals(level=float(level), n_boot=int(n_boot), seed=int(seed), n_heldout=n, **out)


def image_gains(sums: Tensor, elements: int) -> Tensor:
    """Each held-out image's contribution to every gain: (N, K+1), whose columns add up to Δ₀ … Δ_K exactly.

    With the paper's single global mean m_p of a part p (x* − gₖ(x) or x*) over all N·E elements, an image's
    share of N·E·Var(p) is cᵢ(p) = Σ over its elements of (p − m_p)² (these add up to N·E·Var(p) exactly), so
    R²(gₖ) = Σᵢ (cᵢ(x*) − cᵢ(x* − gₖ)) / Σᵢ cᵢ(x*) and image i's part of Δₖ is
    (cᵢ(x* − gₖ₋₁) − cᵢ(x* − gₖ)) / Σⱼ cⱼ(x*) (for Δ₀, cᵢ(x*) − cᵢ(x* − g₀)): how much its own error changed
    between gₖ₋₁ and gₖ, in points of the held-out Var(x*).

    Args:
        sums: (N, 2(K+2), C') per-image sums of :class:`GainAccumulator` (around any fixed shifts), C' = C or 1.
        elements: E, the elements of one image (channels × H × W).

    Returns:
        (N, K+1) float64; zeros when Var(x*) is 0 or there are no images.
    """
    a = sums.sum(-1)  # (N, 2(K+2)): Σ(p − s), Σ(p − s)² per image over every channel
    n, parts = a.shape[0], a.shape[1] // 2
    if n == 0:
        return torch.zeros(0, parts - 1, dtype=torch.float64)
    lin, sq = a[:, :parts], a[:, parts:]
    mean = lin.sum(0) / (n * elements)  # each part's global mean, minus its shift
    c = sq - 2 * mean * lin + elements * mean * mean  # (N, K+2) Σ(p − m_p)² per image
    total_t = float(c[:, -1].sum())
    if not total_t > 0:
        return torch.zeros(n, parts - 1, dtype=torch.float64)
    errs = torch.cat([c[:, -1:], c[:, :-1]], 1)  # cᵢ(x*) (the error of no model), cᵢ(x* − g₀), …
    return (errs[:, :-1] - errs[:, 1:]) / total_t


def fragile_gains(gains: Sequence[float], ci: GainIntervals | None, contributions: Tensor,
                  image_ids: Sequence[int] | None = None, max_width: float | None = None,
                  max_share: float | None = None) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...],
                                                           tuple[str, ...]]:
    """The image that moves each gain most, and a warning for each gain Δₖ (k ≥ 1) that is fragile.

    Δₖ is fragile when its bootstrap interval is wider than ``max_width`` or when one image holds more than
    ``max_share`` of its change (|its contribution| / Σ |every image's contribution|). Δ₀ is never flagged: g₀ is
    closed-form, and an R² (not a difference of two) has a wider interval by nature. A report for the reader,
    computed from the held-out images after every model is fixed; nothing here changes a fit.

    Args:
        gains: Δ₀ … Δ_K. ci: their intervals, or ``None``. contributions: (N, K+1) :func:`image_gains`.
        image_ids: the images' names (their indices among the fit's inputs), one per row; default the rows.
        max_width: default :data:`FRAGILE_CI_WIDTH`. max_share: default :data:`FRAGILE_IMAGE_SHARE`.

    Returns:
        ``(top_image, top_image_gain, top_image_share, warnings)``, the first three with K+1 entries.

    Raises:
        ValueError: ``image_ids`` does not name every image, or a threshold is not in its range.
    """
    max_width = FRAGILE_CI_WIDTH if max_width is None else max_width
    max_share = FRAGILE_IMAGE_SHARE if max_share is None else max_share
    if not (math.isfinite(max_width) and max_width > 0):
        raise ValueError(f"max_width must be a number > 0 (a share of Var(x*)); got {max_width!r}. "
                         f"Fix: use {FRAGILE_CI_WIDTH}.")
    if not 0 < max_share < 1:
        raise ValueError(f"max_share must be in (0, 1); got {max_share!r}. Fix: use {FRAGILE_IMAGE_SHARE}.")
    n = contributions.shape[0]
    ids = list(range(n)) if image_ids is None else [int(i) for i in image_ids]
    if len(ids) != n:
        raise ValueError(f"image_ids must name every held-out image: expected {n}, got {len(ids)}. Fix: pass "
                         "the held-out indices in position order.")
    rows: list[tuple[int, float, float]] = []  # (image, its contribution, its share) per order
    warnings = []
    for k, g in enumerate(gains):
        col = contributions[:, k]
        total = float(col.abs().sum()) if n else 0.0
        if not total > 0:  # no image changes (Δₖ = 0 exactly, e.g. a stage the guard did not keep)
            rows.append((-1, 0.0, 0.0))
            continue
        i = int(col.abs().argmax())
        share = float(col[i].abs()) / total
        rows.append((ids[i], float(col[i]), share))
        if k == 0:
            continue
        lo, hi = ci.gain_orders[k] if ci is not None else (float("nan"), float("nan"))
        wide, lone = hi - lo > max_width, share > max_share and n > 1
        if not (wide or lone):
            continue
        why = " and ".join(w for w, on in ((f"its interval is wider than {100 * max_width:g} points", wide),
                                           (f"one image holds more than {max_share:.0%} of its change", lone)) if on)
        iv = (f"its {ci.level:.0%} interval [{100 * lo:+.1f}, {100 * hi:+.1f}] is {100 * (hi - lo):.1f} points wide"
              if ci is not None else "it has no interval")
        warnings.append(
            f"Δ{k} = {100 * g:+.1f} points is fragile ({why}): {iv}, and held-out image {ids[i]} alone moves it by "
            f"{100 * float(col[i]):+.1f} points ({share:.0%} of the change in error between g_{k} and g_{k - 1} over "
            f"{n} images). Read Δ{k} as unsettled: look at image {ids[i]}, or fit with more images or another seed.")
    top, top_gain, top_share = (tuple(v) for v in zip(*rows)) if rows else ((), (), ())
    return top, top_gain, top_share, tuple(warnings)


@dataclass(frozen=True)
class NestedStage:
    """What one nested fit gₖ did.

    Attributes:
        order: k. seconds: its wall time (g₀: the least-squares solve).
        steps_run: optimiser steps (0 for g₀, which is closed-form). stopped_by: why training ended (``None``
            for g₀). start_monitor_error, best_monitor_error: the monitor error of the start (gₖ₋₁'s function)
            and of the kept weights (``None`` without a monitor split). gates: gₖ's (p⁽¹⁾, …, p⁽ᵏ⁾).
        accepted: False when the guard kept gₖ₋₁'s function (p⁽ᵏ⁾ = 0, so Δₖ = 0 exactly); always True for g₀.
        guard: why (:func:`guard_stage`'s reason), empty for g₀.
        monitor_gain, monitor_gain_se: the trained gₖ's mean improvement over gₖ₋₁ of the per-image relative
            error on the monitor images, and its standard error (``None`` without a monitor split).
    """

    order: int
    seconds: float
    steps_run: int = 0
    stopped_by: StoppedBy | None = None
    start_monitor_error: float | None = None
    best_monitor_error: float | None = None
    gates: tuple[float, ...] = ()
    accepted: bool = True
    guard: str = ""
    monitor_gain: float | None = None
    monitor_gain_se: float | None = None

    def as_dict(self) -> dict:
        """The JSON form."""
        return {**dataclasses.asdict(self), "gates": list(self.gates)}


def guard_rows(stages: Sequence[NestedStage]) -> list[dict[str, str]]:
    """One plain row per nested fit gₖ, for a table of what the guard decided (the dashboard's Overview).

    Returns:
        ``[{"model": "g_1", "kept": "yes" | "no (g_0's function)", "monitor gain": "+3.23 ± 0.46 points",
        "guard": the decision's reason}, …]``, g₀ first (closed form, never guarded).
    """
    rows = []
    for st in stages:
        if st.order == 0:
            rows.append({"model": "g_0", "kept": "yes", "monitor gain": "—",
                         "guard": "closed-form least-squares map (no guard)"})
            continue
        gain = ("—" if st.monitor_gain is None else f"{100 * st.monitor_gain:+.2f}"
                + ("" if st.monitor_gain_se is None else f" ± {100 * st.monitor_gain_se:.2f}") + " points")
        rows.append({"model": f"g_{st.order}", "kept": "yes" if st.accepted else f"no (g_{st.order - 1}'s function)",
                     "monitor gain": gain, "guard": st.guard or "accepted"})
    return rows


@dataclass(frozen=True)
class NestedFits:
    """The nested fits g₀ … g_K of one fit and their held-out gains.

    Attributes:
        models: (g₀, …, g_K), :class:`GTheta` of K = 0 … K on the CPU in eval mode; g_K is the fit's ``model``.
        gains: :class:`NestedGains` on the held-out images.
        stages: one :class:`NestedStage` per model.

    Examples::

        res = kcore.fit(x_src, x_tgt, orders=2, nested=True)
        res.nested.gains.gain_orders, res.nested.gains.ci.gain_orders
        dec = nested_decompose(res, x_src[:8], x_tgt[:8])        # x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x)
    """

    models: tuple[GTheta, ...]
    gains: NestedGains
    stages: tuple[NestedStage, ...]

    def as_dict(self) -> dict:
        """The metrics.json form: the gains' fields and ``stages``."""
        return {**self.gains.as_dict(), "stages": [s.as_dict() for s in self.stages]}


GUARD_Z = 2.0
"""A trained gₖ is kept only if its mean improvement over gₖ₋₁ on the monitor images exceeds this many standard
errors of the paired per-image differences (:func:`guard_stage`)."""

GUARD_MIN_GAIN = 0.005
"""… and exceeds half a point of the monitor's Var(x*): early stopping picked gₖ's weights on the same monitor
images, from a start equal to gₖ₋₁, so a tiny drop that is the same on every image (a standard error near 0) is
the selection, not an order's gain (a planted linear target shows it: tests/test_nested_guard.py)."""


GUARD_EXPLAINED = (
    "The guard of each nested fit: a trained gₖ is kept only if it lowers the error on the monitor images (training "
    f"images set aside, never the held-out ones) by more than {GUARD_Z:g} standard errors and more than "
    f"{100 * GUARD_MIN_GAIN:g} points of Var(x*); "
    "otherwise gₖ is gₖ₋₁'s function (its new gate at 0) and Δₖ is exactly 0. Monitor gain: the mean drop ± its "
    "standard error."
)
"""One paragraph under the table of the guard's decisions (:func:`guard_rows`)."""


@dataclass(frozen=True)
class GuardDecision:
    """The guard's decision on one trained gₖ (:func:`guard_stage`).

    Attributes:
        accepted: keep the trained gₖ (else gₖ₋₁'s function with p⁽ᵏ⁾ = 0). reason: one line saying why.
        gain, se: mean and standard error of dᵢ = eᵢ(gₖ₋₁) − eᵢ(gₖ) over the monitor images, eᵢ an image's squared
            error over the monitor split's mean Σ(x* − channel mean)² per image (``None`` without a monitor split).
        n_images: monitor images compared.
    """

    accepted: bool
    reason: str
    gain: float | None = None
    se: float | None = None
    n_images: int = 0


def per_image_errors(model: GTheta, xs: Tensor, xt: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Σ over channels and pixels of (x* − g(x))² per image (float64, CPU), for prepared maps, in eval mode.

    Every image is computed in this process (no sharing between ranks), so every rank reaches the same numbers.
    """
    out = []
    with torch.no_grad():
        for i in range(0, xs.shape[0], batch_size):
            xb, tb = xs[i : i + batch_size].to(device), xt[i : i + batch_size].to(device)
            out.append(((model(xb) - tb).double() ** 2).sum((1, 2, 3)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def guard_stage(prev: GTheta, new: GTheta, xs: Tensor | None, xt: Tensor | None, batch_size: int,
                device: torch.device, z: float = GUARD_Z, min_gain: float = GUARD_MIN_GAIN) -> GuardDecision:
    """Keep a trained gₖ only if it beats gₖ₋₁ on the monitor images by more than their noise.

    A paired comparison: dᵢ = eᵢ(gₖ₋₁) − eᵢ(gₖ) per monitor image (eᵢ: the image's squared error relative to the
    split's mean per-image Σ(x* − channel mean)², so mean(dᵢ) is the drop of the monitor's relative error);
    gₖ is accepted when mean(d) > max(z · sd(d)/√n, min_gain). The held-out images are never looked at.

    Args:
        prev, new: gₖ₋₁ and the trained gₖ, in eval mode on ``device``.
        xs, xt: the monitor split's prepared maps (``None``: no monitor split, gₖ is accepted unchecked).
        batch_size: images per batch. device: where the models run.
        z: standard errors the mean improvement must exceed.
        min_gain: the smallest drop of the monitor's relative error that counts (a share of Var(x*)).

    Returns:
        A :class:`GuardDecision`.

    Raises:
        ValueError: ``z`` or ``min_gain`` is negative or not finite.
    """
    for name, v, default in (("z", z, GUARD_Z), ("min_gain", min_gain, GUARD_MIN_GAIN)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0; got {v!r}. Fix: use {default}.")
    if xs is None or xt is None or xs.shape[0] < 2:
        return GuardDecision(True, "accepted unchecked: no monitor split (fewer than 2 monitor images)")
    e_prev = per_image_errors(prev, xs, xt, batch_size, device)
    e_new = per_image_errors(new, xs, xt, batch_size, device)
    mom = ChannelMoments(xt.shape[1])
    for i in range(0, xt.shape[0], batch_size):
        mom.update(xt[i : i + batch_size].to(device))
    sst = float(mom.m2.sum()) / xt.shape[0]
    n = int(e_prev.shape[0])
    if not sst > 0:
        return GuardDecision(False, "kept g_(k-1): the monitor targets are constant", None, None, n)
    d = (e_prev - e_new) / sst
    gain, se = float(d.mean()), float(d.std(unbiased=True)) / math.sqrt(n)
    if not math.isfinite(gain):
        return GuardDecision(False, "kept g_(k-1): the trained g_k's monitor error is not finite", None, None, n)
    bar = f"{z:g} × s.e. {100 * se:.2f} and {100 * min_gain:g} points, {n} images"
    if gain > z * se and gain > min_gain:
        return GuardDecision(True, f"accepted: monitor error {100 * gain:.2f} points lower than g_(k-1)'s "
                             f"(more than {bar})", gain, se, n)
    return GuardDecision(False, f"kept g_(k-1): monitor error {100 * gain:+.2f} points lower, not more than "
                         f"{bar}", gain, se, n)


def nested_outputs(models: Sequence[GTheta], x: Tensor) -> list[Tensor]:
    """[g₀(x), …, g_K(x)] for prepared source maps ``x`` (N, C_a, H, W), without gradients."""
    with torch.no_grad():
        return [m(x) for m in models]


def evaluate_gains(models: Sequence[GTheta], data: FitData) -> NestedGains:
    """The held-out :class:`NestedGains` of ``models`` (g₀ … g_K, eval mode, on the fit's device), one pass.

    Every rank of ``data.ctx`` passes its share of the batches; the result is the same on every rank.
    """
    held = data.heldout_idx
    if data.streamed:
        xs_h, xt_h = data.xs.take(held), data.xt.take(held)
    else:
        xs_h, xt_h = data.xs[held.to(data.xs.device)], data.xt[held.to(data.xt.device)]
    acc = GainAccumulator(len(models) - 1, data.xt.shape[1], len(held))
    # every rank takes the shifts of the per-image sums from the same (first) batch, so that the ranks' sums add up
    first = slice(0, min(data.eval_batch, len(held)))
    xb, tb = xs_h[first].to(data.device), xt_h[first].to(data.device)
    acc.set_shifts(nested_outputs(models, xb), tb)
    for sl in batch_slices(len(held), data.eval_batch, data.ctx):
        xb, tb = xs_h[sl].to(data.device), xt_h[sl].to(data.device)
        acc.update(nested_outputs(models, xb), tb, sl)
    return acc.result(data.ctx, groups=data.heldout_groups(), image_ids=[int(i) for i in held])


def train_nested(
    data: FitData,
    cfg: FitConfig,
    plan_for: Callable[[FitConfig], tuple[FitConfig, Any]],
    *,
    report: Callable[[FitProgress], None],
    t0: float,
    cancel: Any = None,
    on_epoch: Callable[[int, GTheta], None] | None = None,
) -> tuple[list[GTheta], list[NestedStage], TrainRun | None, Any]:
    """Fit g₀ (closed form) and g₁ … g_K (each from the one before, trained), calibrated, in eval mode.

    Args:
        data: the prepared maps (:func:`kcore.fit.prepare_data`).
        cfg: the fit's config (``nested=True``); stage k trains with ``orders=k`` and this schedule.
        plan_for: a stage's config → (the config as it runs, its :class:`~kcore.fit.plan.TrainPlan`).
        report, t0, cancel, on_epoch: as :func:`kcore.fit.train` (progress counts the steps of all stages;
            ``cfg.budget`` is shared: stage k must end by k/K of it).

    Returns:
        (models g₀ … g_K on the fit's device, one :class:`NestedStage` each, g_K's :class:`TrainRun` (``None``
        for K = 0), the least-squares map of g₀).
    """
    K = cfg.orders
    ts = time.perf_counter()
    g0, lin = init_model(data, dataclasses.replace(cfg, orders=0, init="lstsq", gate="linear", p_init=0.0))
    g0.eval()
    models, stages = [g0], [NestedStage(0, time.perf_counter() - ts)]
    # init="torch": the start is already the candidate "epoch 0" as it is (gₖ₋₁'s function); train() must not
    # close the lower orders' gates, which it does for a least-squares start
    stage_cfgs = [dataclasses.replace(cfg, orders=k, init="torch", gate="linear", p_init=0.0, nested=False,
                                      budget=None if cfg.budget is None else cfg.budget * k / K)
                  for k in range(1, K + 1)]
    planned = [plan_for(c) for c in stage_cfgs]
    total = sum(p.total_steps for _, p in planned)
    run = None
    done = 0
    for k, (stage_cfg, plan) in enumerate(planned, start=1):
        ts = time.perf_counter()
        model = extend_order(models[-1], seed=cfg.seed + k)
        offset = done

        def stage_report(p: FitProgress, offset: int = offset) -> None:
            report(dataclasses.replace(p, step=offset + p.step, steps=total) if p.phase == "train" else p)

        run = train(model, data, stage_cfg, plan, report=stage_report, t0=t0, cancel=cancel, on_epoch=on_epoch)
        done += plan.total_steps
        calibrate(model, data.xs_tr, data.eval_batch, data.device, data.ctx)
        model.eval()
        best = None
        if run.start_monitor_error is not None and run.history:
            best = run.start_monitor_error if run.best_epoch == 0 else run.history[run.best_epoch - 1].monitor_error
        check = guard_stage(models[-1], model, data.xs_mon, data.xt_mon, data.eval_batch, data.device)
        if not check.accepted:  # gₖ₋₁'s function: the new gate at exactly 0 adds exactly nothing
            model = extend_order(models[-1], seed=cfg.seed + k).eval()
        stages.append(NestedStage(k, time.perf_counter() - ts, run.steps_run, run.stopped_by,
                                  run.start_monitor_error, best, tuple(float(v) for v in model.gates().detach()),
                                  check.accepted, check.reason, check.gain, check.se))
        models.append(model)
    return models, stages, run, lin


def gains_on_images(result: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int = 256) -> NestedGains:
    """The :class:`NestedGains` of a nested fit's g₀ … g_K on other images (raw features, e.g. a study's test
    images), computed as the fit computes its held-out gains (the same per-image sums and bootstrap).

    Raises:
        ValueError: ``result`` is not a nested fit.
    """
    nested = getattr(result, "nested", None)
    if nested is None:
        raise ValueError("result must be a nested fit: its 'nested' field is None. Fix: fit with "
                         "kcore.fit(..., nested=True) (CLI: kcore fit --nested).")
    ref = next(result.model.parameters())
    models = [m.to(ref.device).eval() for m in nested.models]
    acc = GainAccumulator(len(models) - 1, x_tgt.shape[1], x_src.shape[0])

    def batch(i: int) -> tuple[list[Tensor], Tensor]:
        xs = result.norm.source(x_src[i : i + batch_size].to(ref.device, ref.dtype))
        return nested_outputs(models, xs), result.norm.target(x_tgt[i : i + batch_size].to(ref.device, ref.dtype))

    acc.set_shifts(*batch(0))
    for i in range(0, x_src.shape[0], batch_size):
        outputs, xt = batch(i)
        acc.update(outputs, xt, slice(i, i + xt.shape[0]))
    return acc.result()


def nested_decompose(result: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None) -> Decomposition:
    """The nested components x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x) and x^Δ = x* − g_K(x) of a nested fit, for raw features.

    Args:
        result: a :class:`~kcore.fit.FitResult` of ``kcore.fit(..., nested=True)``.
        x_src: (N, C_a, H_a, W_a) features of network A. x_tgt: (N, C_b, H, W) features of network B.
        batch_size: images per batch (default: the fit's evaluation batch).

    Returns:
        A :class:`~kcore.decompose.Decomposition` whose ``components`` are the nested ones (they sum to g_K(x)),
        ``meta={"kind": "nested"}``; its ``report()`` gives shares Cov(x⁽ᵏ⁾ₙ, x*)/Var(x*), not the gains.

    Raises:
        ValueError: ``result`` is not a nested fit (the fix says how to make one).
    """
    nested = getattr(result, "nested", None)
    if nested is None:
        raise ValueError("result must be a nested fit: its 'nested' field is None. Fix: fit with "
                         "kcore.fit(..., nested=True) (CLI: kcore fit --nested).")
    from kcore._validate import check_pair
    from kcore.fit.plan import eval_batch_size

    x_src, x_tgt = check_pair(x_src, x_tgt)
    result._check(x_src, x_tgt)
    batch_size = batch_size or max(1, min(eval_batch_size(x_src.shape), eval_batch_size(x_tgt.shape)))
    ref = next(result.model.parameters())
    models = [m.to(ref.device).eval() for m in nested.models]
    parts: list[list[Tensor]] = [[] for _ in models]
    res, tgt = [], []
    with torch.no_grad():
        for i in range(0, x_src.shape[0], batch_size):
            xs = result.norm.source(x_src[i : i + batch_size].to(ref.device, ref.dtype))
            xt = result.norm.target(x_tgt[i : i + batch_size].to(ref.device, ref.dtype))
            comps = nested_components(models, xs)
            for k, c in enumerate(comps):
                parts[k].append(c.cpu())
            res.append((xt - torch.stack(comps).sum(0)).cpu())
            tgt.append(xt.cpu())
    return Decomposition([torch.cat(p) for p in parts], torch.cat(res), torch.cat(tgt), result.norm.convention,
                         {"kind": "nested"})
