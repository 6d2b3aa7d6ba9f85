"""The frozen results of the variance metrics (Sec. 4.2): :class:`VarianceReport`, its :class:`ChannelProfile`
and bootstrap :class:`ConfidenceIntervals`, their JSON form, and their plain-text summary.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from torch import Tensor


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
        n_groups: groups of images resampled whole (a cluster bootstrap), ``None`` when images were resampled
            one by one (every image its own group).
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
    n_groups: int | None = None

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
        """The metrics.json form (tuples as lists)."""
        return {k: _nested_list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_dict(d: Mapping) -> "ConfidenceIntervals":
        """The intervals from their :meth:`as_dict` form."""
        return ConfidenceIntervals(
            level=float(d["level"]), n_boot=int(d["n_boot"]), seed=int(d["seed"]), n_heldout=int(d["n_heldout"]),
            instability=_floats(d["instability"]), share_orders=_floats(d["share_orders"]),
            share_residual=_floats(d["share_residual"]),
            channel_share_orders=_opt(d.get("channel_share_orders")),
            channel_share_residual=_opt(d.get("channel_share_residual")),
            channel_instability=_opt(d.get("channel_instability")),
            n_groups=None if d.get("n_groups") is None else int(d["n_groups"]),
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
        """The number of channels."""
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
        """The metrics.json form, with the Var ratios."""
        return {
            "var_orders": _nested_list(self.var_orders), "var_residual": list(self.var_residual),
            "var_target": list(self.var_target),
            "var_ratio_orders": _nested_list(self.var_ratio_orders), "var_ratio_residual": list(self.var_ratio_residual),
            "share_orders": _nested_list(self.share_orders), "share_residual": _nested_list(self.share_residual),
        }

    @staticmethod
    def from_dict(d: Mapping) -> "ChannelProfile":
        """The profile from its :meth:`as_dict` form (also format 1's)."""
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
        """The number of held-out images (``n_images``)."""
        return self.n_images

    @property
    def var_ratio_orders(self) -> tuple[float, ...]:
        """The paper's Var(x⁽ᵏ⁾)/Var(x*): not additive (the components are correlated; may exceed 1)."""
        return tuple(_ratio(v, self.var_target) for v in self.var_orders)

    @property
    def has_shares(self) -> bool:
        """Whether the additive shares were computed."""
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
        elif self.ci.n_groups is not None and self.ci.n_groups < CI_MIN_GROUPS:
            out.append(f"the held-out images form only {self.ci.n_groups} groups (fewer than {CI_MIN_GROUPS}): the "
                       "intervals resample whole groups, so they rest on that few observations. Fix: use more groups.")
        if self.ci is not None:
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
#: warn when fewer held-out images than this are used, or when a run-level interval is wider than CI_WARN_WIDTH
CI_MIN_IMAGES, CI_WARN_WIDTH = 50, 0.1
#: warn when a cluster bootstrap resamples fewer held-out groups than this
CI_MIN_GROUPS = 10


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
    grouped = f" in {ci.n_groups} groups, resampled whole" if ci is not None and ci.n_groups else ""
    lines = [f"instability Var(x^D)/Var(x*) = {plus_minus(report.instability, inst, '.4f')}{rng} "
             f"({level}, {report.n_images} held-out images{grouped})"]
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
