"""Variance metrics of Sec. 4.2, per-channel profiles, and the 0-order baselines.

Var(·) follows the paper's definition (Sec. 4.2): the mean squared deviation of every element (over images
and all units c, h, w) from the mean over all images and units,

    Var(x) = E_{I,i} [ (x_{I,i} − E_{I',i'} x_{I',i'})^2 ]          (population variance, one global mean)

The authors' ``Variance.py`` instead centres each channel on its own mean; that variant is reported too,
under ``*_channel_centred``. Both come from one streaming pass of per-channel moments (Chan et al.'s
parallel update in float64), so memory does not grow with the number of images.

Instability (Sec. 4.2) = Var(x^Δ) / Var(x*).

Shares. The paper's Var(x⁽ᵏ⁾)/Var(x*) do not add up (the components are correlated, so a ratio can exceed 1).
The additive share of a part p ∈ {x⁽⁰⁾, …, x⁽ᴷ⁾, x^Δ} is s(p) = Cov(p, x*)/Var(x*), with the same single
global mean; since Σₖ x⁽ᵏ⁾ + x^Δ = x*, the shares sum to exactly 1 (a share can be negative when a part
points against x*). Results are the frozen :class:`VarianceReport` and :class:`ChannelProfile`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kcore.distributed import all_reduce_sum
from kcore.streaming import batch_slices


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


def paper_cov(x: Tensor, y: Tensor) -> float:
    """Cov(x, y) with the paper's single global mean of each tensor, computed directly (reference for the stream)."""
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    return float(((x - x.mean()) * (y - y.mean())).mean())


class CrossMoments:
    """Streaming per-channel co-moment Σ(a − mean_a)(b − mean_b) of two (N, C, H, W) tensors (float64)."""

    def __init__(self, channels: int):
        self.n = 0
        self.mean_a = torch.zeros(channels, dtype=torch.float64)
        self.mean_b = torch.zeros(channels, dtype=torch.float64)
        self.c2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, a: Tensor, b: Tensor) -> None:
        """Merge a batch of paired tensors (float64 on any device) into the running co-moment."""
        nb = a.shape[0] * a.shape[2] * a.shape[3]
        if nb == 0:
            return
        ma, mb = a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3))
        c2b = ((a - ma.view(1, -1, 1, 1)) * (b - mb.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        ma, mb, c2b = ma.cpu(), mb.cpu(), c2b.cpu()
        n = self.n + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        self.mean_a = self.mean_a + da * (nb / n)
        self.mean_b = self.mean_b + db * (nb / n)
        self.c2 = self.c2 + c2b + da * db * (self.n * nb / n)
        self.n = n

    def channel_cov(self) -> Tensor:
        """(C,) covariance of each channel around its own means."""
        return self.c2 / max(self.n, 1)

    def global_cov(self) -> float:
        """Cov with the paper's single mean over images and units for each of the two tensors."""
        ga, gb = self.mean_a.mean(), self.mean_b.mean()
        num = self.c2.sum() + self.n * ((self.mean_a - ga) * (self.mean_b - gb)).sum()
        return float(num / (self.n * self.mean_a.numel()))


def _floats(v) -> tuple:
    """Nested lists/tuples/tensors of numbers -> nested tuples of floats."""
    if isinstance(v, Tensor):
        v = v.tolist()
    if isinstance(v, (list, tuple)):
        return tuple(_floats(x) if isinstance(x, (list, tuple, Tensor)) else float(x) for x in v)
    raise TypeError(f"expected a sequence of numbers; got {type(v).__name__}.")


def _opt(v):
    return None if v is None else _floats(v)


def _nested_list(v):
    return None if v is None else [_nested_list(x) if isinstance(x, tuple) else x for x in v]


@dataclass(frozen=True)
class ConfidenceIntervals:
    """Bootstrap intervals over held-out images (resampled with replacement; no refit).

    Each interval is ``(lo, hi)``, the percentile interval at ``level``. Per-channel intervals are ``None``
    when the per-image moments were not kept (too many images × channels).

    Attributes:
        level: e.g. 0.95. n_boot: bootstrap resamples. seed: their seed. n_heldout: images resampled.
        instability: Var(x^Δ)/Var(x*). share_orders: one per order k. share_residual: x^Δ's share.
        channel_share_orders: (K+1) × C intervals. channel_share_residual: C intervals.
        channel_instability: C intervals of Var(x^Δ_c)/Var(x*_c).
    """

    level: float
    n_boot: int
    seed: int
    n_heldout: int
    instability: tuple[float, float]
    share_orders: tuple[tuple[float, float], ...]
    share_residual: tuple[float, float]
    channel_share_orders: tuple[tuple[tuple[float, float], ...], ...] | None = None
    channel_share_residual: tuple[tuple[float, float], ...] | None = None
    channel_instability: tuple[tuple[float, float], ...] | None = None

    def headline(self) -> dict[str, tuple[float, float]]:
        """Name → interval of the run-level quantities (instability and every share)."""
        out = {"instability": self.instability}
        out.update({f"share_x{k}": v for k, v in enumerate(self.share_orders)})
        out["share_residual"] = self.share_residual
        return out

    def widest(self) -> tuple[str, float]:
        """The run-level quantity with the widest interval, and that width."""
        name, (lo, hi) = max(self.headline().items(), key=lambda kv: kv[1][1] - kv[1][0])
        return name, hi - lo

    def as_dict(self) -> dict:
        return {k: _nested_list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_dict(d: Mapping) -> "ConfidenceIntervals":
        return ConfidenceIntervals(
            level=float(d["level"]), n_boot=int(d["n_boot"]), seed=int(d["seed"]), n_heldout=int(d["n_heldout"]),
            instability=_floats(d["instability"]), share_orders=_floats(d["share_orders"]),
            share_residual=_floats(d["share_residual"]),
            channel_share_orders=_opt(d.get("channel_share_orders")),
            channel_share_residual=_opt(d.get("channel_share_residual")),
            channel_instability=_opt(d.get("channel_instability")),
        )


@dataclass(frozen=True)
class ChannelProfile:
    """Per-channel values of a :class:`VarianceReport` (each channel of x* around its own mean).

    Attributes:
        var_orders: (K+1) × C, Var(x⁽ᵏ⁾_c). var_residual: C, Var(x^Δ_c). var_target: C, Var(x*_c).
        share_orders: (K+1) × C additive shares Cov(x⁽ᵏ⁾_c, x*_c)/Var(x*_c).
        share_residual: C, Cov(x^Δ_c, x*_c)/Var(x*_c); with the orders they sum to 1 per channel.
            ``None`` in reports read from runs written before shares existed.
    """

    var_orders: tuple[tuple[float, ...], ...]
    var_residual: tuple[float, ...]
    var_target: tuple[float, ...]
    share_orders: tuple[tuple[float, ...], ...] | None = None
    share_residual: tuple[float, ...] | None = None

    @property
    def channels(self) -> int:
        return len(self.var_target)

    @property
    def var_ratio_orders(self) -> tuple[tuple[float, ...], ...]:
        """The paper's Var(x⁽ᵏ⁾_c)/Var(x*_c): not additive (components are correlated; may exceed 1)."""
        return tuple(tuple(_ratio(v, t) for v, t in zip(row, self.var_target)) for row in self.var_orders)

    @property
    def var_ratio_residual(self) -> tuple[float, ...]:
        """Var(x^Δ_c)/Var(x*_c), the instability of each channel."""
        return tuple(_ratio(v, t) for v, t in zip(self.var_residual, self.var_target))

    def as_dict(self) -> dict:
        return {
            "var_orders": _nested_list(self.var_orders), "var_residual": list(self.var_residual),
            "var_target": list(self.var_target),
            "var_ratio_orders": _nested_list(self.var_ratio_orders), "var_ratio_residual": list(self.var_ratio_residual),
            "share_orders": _nested_list(self.share_orders), "share_residual": _nested_list(self.share_residual),
        }

    @staticmethod
    def from_dict(d: Mapping) -> "ChannelProfile":
        # format 1 stored the Var ratios as "order_share"/"residual_share"; they are recomputed from the Vars
        return ChannelProfile(
            var_orders=_floats(d["var_orders"]), var_residual=_floats(d["var_residual"]),
            var_target=_floats(d["var_target"]),
            share_orders=_opt(d.get("share_orders")), share_residual=_opt(d.get("share_residual")),
        )


def _ratio(v: float, t: float) -> float:
    return v / t if t > 0 else 0.0


REPORT_FORMAT = "kcore-report/2"
REPORT_DEFINITION = (
    "Var = mean over images and units of (value - mean over images and units)^2 (paper, Sec. 4.2); "
    "instability = Var(x^D)/Var(x*); share_orders[k] = Cov(x^(k), x*)/Var(x*) and share_residual = "
    "Cov(x^D, x*)/Var(x*) (additive: they sum to 1); var_ratio_orders = the paper's Var(x^(k))/Var(x*) (not "
    "additive: the components are correlated); per_channel: the same per channel of x* around its own mean; "
    "*_channel_centred = variance around per-channel means (authors' Variance.py); ci = bootstrap over held-out images."
)


@dataclass(frozen=True)
class VarianceReport:
    """The variances of Sec. 4.2 and the additive shares on a set of images (usually the held-out ones).

    Attributes:
        n_images: images the numbers are computed on (``n_heldout`` in ``as_dict()``). orders: K.
        var_orders: Var(x⁽⁰⁾) … Var(x⁽ᴷ⁾) (the paper's metric). var_output: Var(g(x)).
        var_residual: Var(x^Δ). var_target: Var(x*). instability: Var(x^Δ)/Var(x*).
        mse: mean of (x^Δ)² over all elements.
        var_*_channel_centred: the authors' variant (variance around per-channel means).
        share_orders, share_residual: additive shares Cov(·, x*)/Var(x*); they sum to 1. ``None`` in reports
            of runs written before they existed.
        per_channel: the :class:`ChannelProfile`.
        ci: bootstrap :class:`ConfidenceIntervals`, or ``None`` when not computed.

    Examples::

        rep = fit_result.heldout_report
        rep.instability, rep.share_orders, rep.per_channel.share_residual[3]
        VarianceReport.from_dict(rep.as_dict()) == rep
    """

    n_images: int
    orders: int
    var_orders: tuple[float, ...]
    var_output: float
    var_residual: float
    var_target: float
    instability: float
    mse: float
    var_orders_channel_centred: tuple[float, ...]
    var_residual_channel_centred: float
    var_target_channel_centred: float
    per_channel: ChannelProfile
    share_orders: tuple[float, ...] | None = None
    share_residual: float | None = None
    ci: ConfidenceIntervals | None = None

    def __getitem__(self, key: str):
        raise TypeError(
            f"a VarianceReport is a typed result, not a dict: got report[{key!r}]. "
            f"Fix: use report.{key} (or report.as_dict()[{key!r}] for the metrics.json form)."
        )

    @property
    def n_heldout(self) -> int:
        return self.n_images

    @property
    def var_ratio_orders(self) -> tuple[float, ...]:
        """The paper's Var(x⁽ᵏ⁾)/Var(x*): not additive (the components are correlated; may exceed 1)."""
        return tuple(_ratio(v, self.var_target) for v in self.var_orders)

    @property
    def has_shares(self) -> bool:
        return self.share_orders is not None and self.share_residual is not None

    def interval(self, name: str) -> tuple[float, float] | None:
        """The interval of ``instability``, ``share_x<k>`` or ``share_residual``, or None without intervals."""
        return None if self.ci is None else self.ci.headline().get(name)

    def warnings(self) -> list[str]:
        """Plain-language warnings about the uncertainty of these numbers (empty when there is nothing to say)."""
        out = []
        if self.n_images < CI_MIN_IMAGES:
            out.append(f"only {self.n_images} held-out images (fewer than {CI_MIN_IMAGES}): the numbers are uncertain. "
                       "Fix: use more images (the fit holds out 20 %, so 250 images give 50 held out).")
        if self.ci is None:
            out.append("no confidence intervals were computed for these numbers.")
        else:
            name, width = self.ci.widest()
            if width > CI_WARN_WIDTH:
                out.append(f"the {self.ci.level:.0%} interval of {name} is {width:.2f} wide (> {CI_WARN_WIDTH}): "
                           "differences smaller than that are not resolved. Fix: use more images.")
        return out

    def as_dict(self) -> dict:
        """The JSON form (``metrics.json``, ``fit.json``); :meth:`from_dict` reads it back."""
        return {
            "report_format": REPORT_FORMAT,
            "n_images": self.n_images, "n_heldout": self.n_images, "orders": self.orders,
            "var_orders": list(self.var_orders), "var_output": self.var_output, "var_residual": self.var_residual,
            "var_target": self.var_target, "instability": self.instability, "mse": self.mse,
            "var_ratio_orders": list(self.var_ratio_orders),
            "share_orders": _nested_list(self.share_orders), "share_residual": self.share_residual,
            "var_orders_channel_centred": list(self.var_orders_channel_centred),
            "var_residual_channel_centred": self.var_residual_channel_centred,
            "var_target_channel_centred": self.var_target_channel_centred,
            "per_channel": self.per_channel.as_dict(),
            "ci": self.ci.as_dict() if self.ci is not None else None,
            "definition": REPORT_DEFINITION,
        }

    @staticmethod
    def from_dict(d: Mapping) -> "VarianceReport":
        """Read :meth:`as_dict` output back; also reads format 1 (runs written before shares and intervals)."""
        if not isinstance(d, Mapping) or "var_orders" not in d or "per_channel" not in d:
            got = sorted(d)[:8] if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"not a variance report: expected keys var_orders, per_channel, …; got {got}. "
                             "Fix: pass the 'heldout_report' of a fit.json or a direction block of metrics.json.")
        fmt = d.get("report_format", "kcore-report/1")
        if fmt not in ("kcore-report/1", REPORT_FORMAT):
            raise ValueError(f"variance report format {fmt!r} is not known to this kcore (reads "
                             f"kcore-report/1 and {REPORT_FORMAT}). Fix: upgrade kcore.")
        return VarianceReport(
            n_images=int(d["n_images"]), orders=int(d["orders"]), var_orders=_floats(d["var_orders"]),
            var_output=float(d["var_output"]), var_residual=float(d["var_residual"]),
            var_target=float(d["var_target"]), instability=float(d["instability"]), mse=float(d["mse"]),
            var_orders_channel_centred=_floats(d["var_orders_channel_centred"]),
            var_residual_channel_centred=float(d["var_residual_channel_centred"]),
            var_target_channel_centred=float(d["var_target_channel_centred"]),
            per_channel=ChannelProfile.from_dict(d["per_channel"]),
            share_orders=_opt(d.get("share_orders")),
            share_residual=None if d.get("share_residual") is None else float(d["share_residual"]),
            ci=ConfidenceIntervals.from_dict(d["ci"]) if d.get("ci") else None,
        )


#: default bootstrap: 95 % percentile intervals from 1000 resamples of the held-out images, seed 0
CI_LEVEL, CI_BOOTSTRAPS, CI_SEED = 0.95, 1000, 0
#: per-image, per-channel moments are kept up to this many float64 values (images × channels × (2K+7));
#: beyond it only the per-image sums over channels are kept (run-level intervals only)
MAX_IMAGE_MOMENTS = 2**25
#: warn when fewer held-out images than this are used, or when a run-level interval is wider than CI_WARN_WIDTH
CI_MIN_IMAGES, CI_WARN_WIDTH = 50, 0.1


class ImageMoments:
    """Per-image sums that let a bootstrap over images recompute every variance and share without a refit.

    For each image and channel, with one fixed shift per part (taken from the first batch, for precision):
    Σ(p − s_p) for the parts p = x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ, x*; Σ(p − s_p)(x* − s_*) for the same parts; Σ(x^Δ − s_Δ)²
    (2K+7 numbers). Covariances are shift-invariant, so any resample's Var and Cov follow from weighted sums.
    """

    def __init__(self, orders: int, channels: int):
        self.orders, self.channels = orders, channels
        self.shifts: list[float] | None = None
        self.batches: list[Tensor] = []  # (n, 2K+7, C) or, once too large, (n, 2K+7, 1)
        self.per_channel = True
        self.units = 0  # elements per image per channel (H·W)
        self.kept = 0

    def update(self, comps: Sequence[Tensor], r: Tensor, t: Tensor) -> None:
        parts = list(comps) + [r, t]
        if self.shifts is None:
            self.shifts = [float(p.mean()) for p in parts]
        self.units = t.shape[2] * t.shape[3]
        cen = [p - s for p, s in zip(parts, self.shifts)]
        tc, rc = cen[-1], cen[-2]
        rows = [p.sum(dim=(2, 3)) for p in cen] + [(p * tc).sum(dim=(2, 3)) for p in cen] + [(rc * rc).sum(dim=(2, 3))]
        block = torch.stack(rows, 1).cpu()  # (n, 2K+7, C)
        self.kept += block.numel()
        if self.per_channel and self.kept > MAX_IMAGE_MOMENTS:
            self.per_channel = False
            self.batches = [b.sum(-1, keepdim=True) for b in self.batches]
        self.batches.append(block if self.per_channel else block.sum(-1, keepdim=True))

    def bootstrap(self, level: float = CI_LEVEL, n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED
                  ) -> ConfidenceIntervals | None:
        """Percentile intervals from ``n_boot`` resamples (with replacement) of the images; None below 2 images."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}.")
        if n_boot < 10:
            raise ValueError(f"n_boot must be at least 10; got {n_boot}.")
        if not self.batches:
            return None
        s = torch.cat(self.batches)  # (N, 2K+7, C')
        n = s.shape[0]
        if n < 2:
            return None
        gen = torch.Generator().manual_seed(int(seed))
        q = (1 - level) / 2
        k1 = self.orders + 1

        def stats(tot: Tensor, m: float) -> tuple[Tensor, Tensor, Tensor]:
            """tot (..., 2K+7) weighted sums over m elements → (instability, shares of orders (…, K+1), x^Δ share)."""
            mean = tot[..., : k1 + 2] / m
            cross = tot[..., k1 + 2 : 2 * k1 + 4] / m
            cov = cross - mean * mean[..., -1:]  # Cov(part, x*), the last one Var(x*)
            var_t = cov[..., -1]
            var_r = tot[..., -1] / m - mean[..., k1] ** 2
            safe = torch.where(var_t > 0, var_t, torch.ones_like(var_t))
            return var_r / safe, cov[..., :k1] / safe.unsqueeze(-1), cov[..., k1] / safe

        def interval(x: Tensor) -> Tensor:  # (B, …) -> (…, 2)
            return torch.stack([torch.quantile(x, q, dim=0), torch.quantile(x, 1 - q, dim=0)], -1)

        idx = torch.randint(n, (n_boot, n), generator=gen)
        w = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
        glob = w @ s.sum(-1)  # (B, 2K+7)
        inst, sh, shr = stats(glob, n * self.units * self.channels)
        out = dict(instability=_floats(interval(inst)), share_orders=_floats(interval(sh)),
                   share_residual=_floats(interval(shr)))
        if self.per_channel and s.shape[-1] == self.channels:
            flat = s.reshape(n, -1)
            chunk = max(1, 2**24 // max(flat.shape[1], 1))
            tot = torch.cat([w[i : i + chunk] @ flat for i in range(0, n_boot, chunk)])
            tot = tot.view(n_boot, s.shape[1], self.channels).transpose(1, 2)  # (B, C, 2K+7)
            inst_c, sh_c, shr_c = stats(tot, n * self.units)
            out.update(channel_instability=_floats(interval(inst_c)),
                       channel_share_orders=_floats(interval(sh_c).transpose(0, 1)),  # (K+1, C, 2)
                       channel_share_residual=_floats(interval(shr_c)))
        return ConfidenceIntervals(level=float(level), n_boot=int(n_boot), seed=int(seed), n_heldout=n, **out)


def plus_minus(value: float, interval: tuple[float, float] | None, fmt: str = ".3f", percent: bool = False) -> str:
    """``0.231 ± 0.012`` (half the interval's width; the interval need not be symmetric), or the value alone."""
    scale, unit = (100.0, " %") if percent else (1.0, "")
    text = f"{value * scale:{fmt}}"
    if interval is not None:
        text += f" ± {(interval[1] - interval[0]) * scale / 2:{fmt}}"
    return text + unit


def summary_lines(report: VarianceReport, preset: str | None = None) -> list[str]:
    """Plain-text lines of a report for the CLI and logs: instability and shares with their intervals,
    the paper's Var ratios labelled as such, and the uncertainty warnings."""
    ci = report.ci
    level = f"{ci.level:.0%} CI" if ci is not None else "no CI"
    inst = report.interval("instability")
    rng = f" [{inst[0]:.4f}, {inst[1]:.4f}]" if inst else ""
    lines = [f"instability Var(x^D)/Var(x*) = {plus_minus(report.instability, inst, '.4f')}{rng} "
             f"({level}, {report.n_images} held-out images)"]
    if report.has_shares:
        parts = [f"x{k} {plus_minus(s, report.interval(f'share_x{k}'), '.1f', True)}"
                 for k, s in enumerate(report.share_orders)]
        parts.append(f"x^D {plus_minus(report.share_residual, report.interval('share_residual'), '.1f', True)}")
        lines.append(f"shares of Var(x*) (Cov(part, x*)/Var(x*), add up to 100 %"
                     f"{', preset ' + preset if preset else ''}): " + ", ".join(parts))
    lines.append("paper's Var(x^(k))/Var(x*) (not additive): "
                 + ", ".join(f"{v:.3f}" for v in report.var_ratio_orders))
    lines += [f"warning: {w}" for w in report.warnings()]
    return lines


class VarianceAccumulator:
    """One streaming pass over batches of (components, residual, target) -> a :class:`VarianceReport`.

    Moments are float64 whatever the input dtype. The shares sum to 1 as exactly as the caller's x^Δ equals
    x* − Σₖ x⁽ᵏ⁾ (float64 inputs: ~1e-15; float32 ones: ~1e-7).
    """

    def __init__(self, orders: int, channels: int):
        self.orders = orders
        self.comp = [ChannelMoments(channels) for _ in range(orders + 1)]
        self.output = ChannelMoments(channels)
        self.residual = ChannelMoments(channels)
        self.target = ChannelMoments(channels)
        self.cross = [CrossMoments(channels) for _ in range(orders + 2)]  # Cov(x^(k), x*) …, Cov(x^Δ, x*)
        self.sq_err = 0.0
        self.images = 0
        self.image_moments = ImageMoments(orders, channels)

    def update(self, components: Sequence[Tensor], residual: Tensor, target: Tensor) -> None:
        """Add one batch: ``components`` K+1 tensors (n, C_b, H, W), ``residual`` and ``target`` (n, C_b, H, W)."""
        if len(components) != self.orders + 1:
            raise ValueError(f"expected {self.orders + 1} components (K = {self.orders}); got {len(components)}.")
        t64 = target.detach().to(torch.float64)
        out = None
        for acc, cross, c in zip(self.comp, self.cross, components):
            c64 = c.detach().to(torch.float64)
            acc.update(c64)
            cross.update(c64, t64)
            out = c64 if out is None else out + c64
        r64 = residual.detach().to(torch.float64)
        self.output.update(out)
        self.residual.update(r64)
        self.cross[-1].update(r64, t64)
        self.target.update(t64)
        self.sq_err += float((r64**2).sum())
        self.images += int(target.shape[0])
        self.image_moments.update([c.detach().to(torch.float64) for c in components], r64, t64)

    def report(self, ci: bool = True, level: float = CI_LEVEL, n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED
               ) -> VarianceReport:
        """The :class:`VarianceReport` of everything added so far, with bootstrap intervals when ``ci``."""
        var_t = self.target.global_var()
        ch_t = self.target.channel_var()
        safe_t = torch.where(ch_t > 0, ch_t, torch.ones_like(ch_t))
        numel = self.target.n * self.target.mean.numel()
        covs = [c.global_cov() for c in self.cross]
        ch_cov = torch.stack([c.channel_cov() for c in self.cross])  # (K+2, C)
        ch_share = torch.where(ch_t > 0, ch_cov / safe_t, torch.zeros_like(ch_cov))
        profile = ChannelProfile(
            var_orders=_floats(torch.stack([a.channel_var() for a in self.comp])),
            var_residual=_floats(self.residual.channel_var()),
            var_target=_floats(ch_t),
            share_orders=_floats(ch_share[:-1]),
            share_residual=_floats(ch_share[-1]),
        )
        nan = float("nan")
        return VarianceReport(
            n_images=self.images,
            orders=self.orders,
            var_orders=tuple(a.global_var() for a in self.comp),
            var_output=self.output.global_var(),
            var_residual=self.residual.global_var(),
            var_target=var_t,
            instability=self.residual.global_var() / var_t if var_t > 0 else nan,
            mse=self.sq_err / numel if numel else nan,
            var_orders_channel_centred=tuple(a.channel_centred_var() for a in self.comp),
            var_residual_channel_centred=self.residual.channel_centred_var(),
            var_target_channel_centred=self.target.channel_centred_var(),
            per_channel=profile,
            share_orders=tuple(c / var_t if var_t > 0 else nan for c in covs[:-1]),
            share_residual=covs[-1] / var_t if var_t > 0 else nan,
            ci=self.image_moments.bootstrap(level, n_boot, seed) if ci else None,
        )


def variance_report(components: Sequence[Tensor], residual: Tensor, target: Tensor, batch_size: int = 256) -> VarianceReport:
    """:class:`VarianceReport` for whole tensors, computed by streaming over batches.

    ``components``: K+1 tensors (N, C, H, W); ``residual``: x^Δ = x* − Σ x⁽ᵏ⁾; ``target``: x*.
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
