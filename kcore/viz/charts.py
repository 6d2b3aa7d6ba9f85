"""Charts of a report's numbers: variances per order, instability and shares with intervals, loss curves and
the per-channel share heatmap (Sec. 4.2).
"""
from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kcore.metrics import VarianceReport
from kcore.viz.style import (
    RESIDUAL_TEX,
    SHARE_CMAP,
    TARGET_TEX,
    TEXT_PT,
    TITLE_PT,
    _caption,
    _order_colours,
    order_label,
    order_tex,
)

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class _VarRow:
    """The four numbers :func:`variance_figure` draws, from a flat study row (``var_x0…``) or a report dict."""

    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    instability: float

    @staticmethod
    def of(row: Mapping) -> "_VarRow":
        orders = row.get("var_orders")
        if orders is None:
            orders = [row[f"var_x{k}"] for k in range(len([k for k in row if str(k).startswith("var_x")]))]
        return _VarRow(tuple(orders), row["var_residual"], row["var_target"], row["instability"])


def variance_figure(
    reports: Mapping[str, "VarianceReport | Mapping"],
    *,
    titles: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> Figure:
    """Var of every component per direction (bar charts side by side), the paper's Sec. 4.2 quantities.

    Args:
        reports: direction key → :class:`~kcore.metrics.VarianceReport` (``FitResult.heldout_report``), or a
            flat study row with ``var_x0 … var_xK`` (or ``var_orders``), ``var_residual``, ``var_target``,
            ``instability``.
        titles: direction key → panel title (default: the key).
        caption: provenance line.

    Returns:
        One panel per direction: bars x⁽⁰⁾…x⁽ᴷ⁾ (blue), x^Δ (red) and x* (grey, the total), each labelled
        with its value; the title gives the instability Var(x^Δ)/Var(x*).
    """
    if not reports:
        raise ValueError("reports is empty: pass at least one direction's variance report.")
    n = len(reports)
    fig = Figure(figsize=(PANEL_IN * n + 0.35, 3.2), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    reports = {k: r if isinstance(r, VarianceReport) else _VarRow.of(r) for k, r in reports.items()}
    top = max(max(max(r.var_orders), r.var_residual, r.var_target) for r in reports.values())
    for ax, (key, rep) in zip(axes, reports.items()):
        K = len(rep.var_orders) - 1
        labels = [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX, TARGET_TEX]
        values = list(rep.var_orders) + [rep.var_residual, rep.var_target]
        colours = _order_colours(K) + ["#c0392b", "#9e9e9e"]
        bars = ax.bar(labels, values, color=colours, edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.2g}" for v in values], fontsize=TEXT_PT, padding=1)
        name = (titles or {}).get(key, key)
        ax.set_title(f"{name}\ninstability {rep.instability:.3f}", fontsize=TITLE_PT)
        ax.tick_params(labelsize=TEXT_PT)
        ax.set_ylim(0, top * 1.18 if top > 0 else 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Var on held-out images", fontsize=TITLE_PT)
    _caption(fig, caption)
    return fig


PANEL_IN = 2.75
"""Width in inches of one direction's panel in the per-direction charts (variance, loss): with :data:`TEXT_PT`
text, two panels shown in the Overview at a 1024 px wide window keep every text at least 11 px high."""
SHARE_RANGE = (0.0, 1.0)
"""Where the stacked additive shares live (they add up to exactly 1): share error bars are clipped to it."""


def _clipped(lo: float, hi: float, bounds: tuple[float, float]) -> tuple[float, float, bool, bool]:
    """``(lo, hi)`` clipped to ``bounds`` and whether the low and the high end were clipped."""
    return max(lo, bounds[0]), min(hi, bounds[1]), lo < bounds[0], hi > bounds[1]


def _clip_marks(ax, x: float, lo: float, hi: float, clip_lo: bool, clip_hi: bool, colour) -> bool:
    """Open triangles at the clipped ends of an error bar (pointing the way it goes on); True if any."""
    for y, flag, marker in ((lo, clip_lo, "v"), (hi, clip_hi, "^")):
        if flag:
            (mark,) = ax.plot([x], [y], marker=marker, ms=7, mfc="white", mec=colour, mew=1.2, ls="none",
                              clip_on=False, zorder=5)
            mark.set_gid("kcore-clipped")
    return clip_lo or clip_hi


def _verdict_line(name: str, verdict: Any) -> str:
    """``"A → B: indistinguishable from chance (random-init B)"`` from a verdict's headline."""
    head = getattr(verdict, "headline", None) or str(verdict)
    return f"{name}: {head}"


def instability_figure(
    reports: Mapping[str, VarianceReport],
    *,
    baselines: Mapping[str, Any] | None = None,
    titles: Mapping[str, str] | None = None,
    preset: str | None = None,
    caption: str | None = None,
    verdicts: Mapping[str, Any] | None = None,
) -> Figure:
    """Instability and additive shares per direction with their bootstrap intervals, and the chance baselines.

    Nothing is drawn outside its axis: the instability axis reaches past every baseline and every interval
    (a shuffled baseline above 1 included); the share axis is :data:`SHARE_RANGE`, and a share's interval that
    would leave it is clipped there with an open triangle at the clipped end (and a legend entry).

    Args:
        reports: direction key → :class:`~kcore.metrics.VarianceReport`.
        baselines: kind → :class:`~kcore.baselines.ChanceBaseline`; each is drawn per direction as a line at
            its instability inside a shaded band, its bootstrap interval.
        titles: direction key → label. preset: the fit preset (named in the shares' title: the order split
            depends on the recipe). caption: provenance line.
        verdicts: direction key → :class:`~kcore.verdict.ChanceVerdict` (or a string); its headline is printed
            above the panels, so an exported figure carries it.

    Returns:
        Left: instability per direction, a point with its interval, and the baselines with theirs. Right: the
        additive shares of x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ (stacked to 100 %) with the interval of each share.
        Artists carry gids for checks: ``kcore-baseline`` (lines), ``kcore-baseline-band`` (intervals),
        ``kcore-clipped`` (the triangles at clipped interval ends).
    """
    if not reports:
        raise ValueError("reports is empty: pass at least one direction's variance report.")
    keys = list(reports)
    names = [(titles or {}).get(k, k) for k in keys]
    fig = Figure(figsize=(1.9 + 2.2 * len(keys), 3.6), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.25])
    ref_styles = [("#7f8c8d", "--"), ("#8e44ad", ":"), ("#16a085", "-.")]
    highest = 1.0
    handles: dict[str, Any] = {}
    for i, key in enumerate(keys):
        rep = reports[key]
        for j, (kind, ref) in enumerate((baselines or {}).items()):
            r = ref.reports.get(key) if hasattr(ref, "reports") else None
            if r is None:
                continue
            colour, ls = ref_styles[j % len(ref_styles)]
            line = ax.hlines(r.instability, i - 0.38, i + 0.38, colors=colour, linestyles=ls, lw=1.6, zorder=3)
            line.set_gid("kcore-baseline")
            highest = max(highest, r.instability)
            riv = r.interval("instability")
            if riv is not None:
                band = ax.fill_between([i - 0.38, i + 0.38], riv[0], riv[1], color=colour, alpha=0.25, lw=0, zorder=2)
                band.set_gid("kcore-baseline-band")
                highest = max(highest, riv[1])
            handles.setdefault(f"chance: {getattr(ref, 'label', kind)}" + (" (band: CI)" if riv else ""), line)
        iv = rep.interval("instability")
        if iv is not None:
            lo, hi, clip_lo, _ = _clipped(iv[0], iv[1], (0.0, math.inf))
            err = [[rep.instability - lo], [hi - rep.instability]]
            highest = max(highest, hi)
        else:
            err, clip_lo = None, False
        point = ax.errorbar([i], [rep.instability], yerr=err, fmt="o", color="#c0392b", capsize=4, ms=5, zorder=4)
        highest = max(highest, rep.instability)
        if clip_lo:
            _clip_marks(ax, i, 0.0, 0.0, True, False, "#c0392b")
        handles.setdefault(f"this fit ({rep.ci.level:.0%} CI)" if rep.ci else "this fit", point)
    ax.set_xticks(range(len(keys)), names, fontsize=TEXT_PT)
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylim(0, highest * 1.08)
    ax.set_ylabel(f"instability Var({RESIDUAL_TEX})/Var({TARGET_TEX})", fontsize=TITLE_PT)
    ax.grid(axis="y", alpha=0.3)
    ax.tick_params(labelsize=TEXT_PT)
    K = max(r.orders for r in reports.values())
    colours = _order_colours(K) + ["#c0392b"]
    labels = [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX]
    share_handles: dict[str, Any] = {}
    any_clipped = False
    lowest = 0.0
    for i, key in enumerate(keys):
        rep = reports[key]
        if not rep.has_shares:
            continue
        vals = list(rep.share_orders) + [rep.share_residual]
        ivs = [rep.interval(f"share_x{k}") for k in range(rep.orders + 1)] + [rep.interval("share_residual")]
        bottom = 0.0
        for j, (v, iv) in enumerate(zip(vals, ivs)):
            idx = j if j <= rep.orders else K + 1
            bar = ax2.bar(i, v, bottom=bottom, color=colours[idx], edgecolor="black", linewidth=0.4, width=0.5)
            share_handles.setdefault(labels[idx], bar)
            top = bottom + v
            lowest = min(lowest, top, bottom)
            if iv is not None:
                bounds = (min(SHARE_RANGE[0], lowest), SHARE_RANGE[1])
                lo, hi, clip_lo, clip_hi = _clipped(top - (v - iv[0]), top + (iv[1] - v), bounds)
                ax2.errorbar([i + 0.32], [top], yerr=[[max(top - lo, 0.0)], [max(hi - top, 0.0)]], fmt="none",
                             ecolor=colours[idx], capsize=2, lw=1.2)
                any_clipped |= _clip_marks(ax2, i + 0.32, lo, hi, clip_lo, clip_hi, colours[idx])
            if abs(v) >= 0.08:
                ax2.text(i, bottom + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=TEXT_PT,
                         color="white" if j <= rep.orders else "black")
            bottom = top
    ax2.set_xticks(range(len(keys)), names, fontsize=TEXT_PT)
    ax2.set_xlim(-0.5, len(keys) - 0.3)
    ax2.set_ylim(min(SHARE_RANGE[0], lowest), SHARE_RANGE[1])
    ax2.set_ylabel(f"share of Var({TARGET_TEX})", fontsize=TITLE_PT)
    ax2.set_title("additive shares" + (f", preset {preset}" if preset else ""), fontsize=TITLE_PT)
    ax2.tick_params(labelsize=TEXT_PT)
    ax.set_title("instability vs chance", fontsize=TITLE_PT)
    if any_clipped:
        (tri,) = ax2.plot([], [], marker="^", mfc="white", mec="0.3", ls="none", ms=7)
        share_handles["interval clipped at the axis"] = tri
    every = {**handles, **share_handles}
    fig.legend(list(every.values()), list(every), loc="outside lower center", ncol=2 if len(keys) > 1 else 1,
               fontsize=TEXT_PT, frameon=False)
    if verdicts:
        width = int(fig.get_figwidth() * 72 / (0.6 * TEXT_PT))  # characters of TEXT_PT text per line
        lines = [textwrap.fill(_verdict_line(n, verdicts[k]), width, subsequent_indent="   ",
                               break_on_hyphens=False)
                 for k, n in zip(keys, names) if k in verdicts]
        fig.suptitle("\n".join(lines), fontsize=TEXT_PT, x=0.01, ha="left", color="#7a4a00"
                     if any(getattr(verdicts[k], "code", "") != "beyond_chance" for k in keys if k in verdicts)
                     else "#1e6b3a")
    _caption(fig, caption)
    return fig


def loss_figure(
    histories: Mapping[str, Sequence],
    *,
    best_epochs: Mapping[str, int] | None = None,
    titles: Mapping[str, str] | None = None,
    caption: str | None = None,
) -> Figure:
    """Training loss (Eq. 2) and monitor error per epoch, one panel per direction.

    Args:
        histories: direction key → sequence of records with ``epoch``, ``train_loss``, ``monitor_error``
            (``FitResult.history``).
        best_epochs: direction key → epoch whose weights were kept (a dashed line).
        titles: direction key → panel title.
        caption: provenance line.
    """
    if not histories:
        raise ValueError("histories is empty: pass at least one direction's fit history.")
    n = len(histories)
    fig = Figure(figsize=(PANEL_IN * n + 0.35, 3.3), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    handles: dict[str, Any] = {}
    for ax, (key, hist) in zip(axes, histories.items()):
        ep = [r.epoch for r in hist]
        (h,) = ax.plot(ep, [r.train_loss for r in hist], color="#1f4e79", lw=1.2)
        handles.setdefault("training loss (Eq. 2)", h)
        mon = [r.monitor_error for r in hist]
        if any(math.isfinite(v) for v in mon):
            (h,) = ax.plot(ep, mon, color="#e67e22", lw=1.2)
            handles.setdefault("monitor error (1 − R²)", h)
        if best_epochs and key in best_epochs:
            h = ax.axvline(best_epochs[key], color="0.4", ls="--", lw=0.8)
            handles.setdefault("kept epoch", h)
        vals = [v for r in hist for v in (r.train_loss, r.monitor_error) if math.isfinite(v) and v > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("epoch", fontsize=TITLE_PT)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        kept = f"\nkept epoch {best_epochs[key]}" if best_epochs and key in best_epochs else ""
        ax.set_title((titles or {}).get(key, key) + kept, fontsize=TITLE_PT)
        ax.tick_params(which="both", labelsize=TEXT_PT)
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(len(handles), 2),
               fontsize=TEXT_PT, frameon=False)
    _caption(fig, caption)
    return fig


ShareSort = Literal["channel", "residual", "order"]
SHARE_SORTS: dict[str, str] = {
    "channel": "channel index",
    "residual": "x^Δ share, largest first (least reconstructable channels on top)",
    "order": "share of the chosen order, largest first",
}


def share_matrix(report: "VarianceReport") -> np.ndarray:
    """(C, K+2) per-channel additive shares Cov(·_c, x*_c)/Var(x*_c): columns x⁽⁰⁾ … x⁽ᴷ⁾, then x^Δ; rows sum to 1.

    Raises:
        ValueError: the report predates shares (re-open the run with :func:`kcore.pipeline.read_run`, which
            recomputes them from the stored held-out features).
    """
    pc = report.per_channel
    if pc.share_orders is None or pc.share_residual is None:
        raise ValueError("this report has no additive shares (written by an older kcore). "
                         "Fix: re-open the run folder with kcore.pipeline.read_run, which recomputes them.")
    orders = np.asarray(pc.share_orders, dtype=np.float64)  # (K+1, C)
    resid = np.asarray(pc.share_residual, dtype=np.float64)  # (C,)
    return np.concatenate([orders.T, resid[:, None]], axis=1)


NO_VARIANCE = "no variance"
"""What the share cells of a channel with Var(x*_c) = 0 on the held-out images say (its shares are undefined)."""


def percent_text(value: float, interval: tuple[float, float] | None, decimals: int = 0) -> str:
    """``"39 ± 3 %"`` (± half the interval's width; ``decimals`` after the point), never ``"-0 %"``."""
    def text(v: float) -> str:
        t = f"{100.0 * v:.{decimals}f}"
        return t[1:] if t.startswith("-") and float(t) == 0 else t

    if interval is None:
        return f"{text(value)} %"
    return f"{text(value)} ± {text((interval[1] - interval[0]) / 2)} %"


def channel_text_table(m: np.ndarray, names: Sequence[str], order_ci: Any, residual_ci: Any,
                       var_target: Sequence[float] | None, rows: Sequence[int] | None, decimals: int = 0
                       ) -> "pd.DataFrame":
    """The table :func:`channel_share_table` and :func:`kcore.viz.gains.channel_gain_table` draw: one row per
    channel of ``m`` (channels × (orders 0 … K, x^Δ)), its cells :func:`percent_text` with ``order_ci[k][c]`` or
    ``residual_ci[c]`` (``None``: no intervals), then ``Var(x*)`` (with ``var_target``; a channel with none
    reads :data:`NO_VARIANCE`) and ``main order`` (the largest of orders 0 … K)."""
    import pandas as pd

    K = m.shape[1] - 2
    var_t = None if var_target is None else np.asarray(var_target, dtype=np.float64)
    rows = list(range(m.shape[0])) if rows is None else [int(r) for r in rows]
    out: dict[str, list] = {"channel": rows, **{n: [] for n in names}}
    if var_t is not None:
        out["Var(x*)"] = []
    out["main order"] = []
    for c in rows:
        alive = var_t is None or var_t[c] > 0  # the same test as the shares' own computation (0 variance: none)
        for j, n in enumerate(names):
            if not alive:
                out[n].append(NO_VARIANCE)
                continue
            ci = order_ci if j <= K else residual_ci
            iv = None if ci is None else (ci[j][c] if j <= K else ci[c])
            out[n].append(percent_text(m[c, j], iv, decimals))
        if var_t is not None:
            out["Var(x*)"].append(float(var_t[c]))
        out["main order"].append(int(np.argmax(m[c, : K + 1])) if alive else None)
    return pd.DataFrame(out)


def channel_share_table(report: "VarianceReport", rows: Sequence[int] | None = None) -> "pd.DataFrame":
    """Per-channel additive shares as text in % with their bootstrap intervals, for tables people read.

    Args:
        report: a held-out :class:`~kcore.metrics.VarianceReport` with shares (``per_channel``).
        rows: channel indices in the order to show (default: all, by index; see :func:`channel_order`).

    Returns:
        One row per channel: ``channel``, ``x⁽⁰⁾`` … ``x⁽ᴷ⁾`` and ``x^Δ`` as ``"39 ± 3 %"`` (± half the
        width of the same bootstrap interval the Overview uses, per channel; the value alone when the run kept
        no per-channel intervals), ``Var(x*)`` (a number) and ``main order`` (the order with the largest share).
        A channel without variance on the held-out images reads :data:`NO_VARIANCE` in every share cell and has
        no main order.

    Raises:
        ValueError: the report has no shares (see :func:`share_matrix`).
    """
    m = share_matrix(report)
    ci = report.ci
    names = [order_label(k) for k in range(m.shape[1] - 1)] + [RESIDUAL_TEX]
    return channel_text_table(m, names, ci.channel_share_orders if ci is not None else None,
                              ci.channel_share_residual if ci is not None else None,
                              report.per_channel.var_target, rows)


def channel_order(report: Mapping, sort: ShareSort = "channel", order: int = 0) -> list[int]:
    """Channel indices sorted as ``sort`` says (:data:`SHARE_SORTS`)."""
    if sort not in SHARE_SORTS:
        raise ValueError(f"sort must be one of {sorted(SHARE_SORTS)}; got {sort!r}.")
    m = share_matrix(report)
    if sort == "channel":
        return list(range(m.shape[0]))
    col = m[:, -1] if sort == "residual" else m[:, order]
    return [int(i) for i in np.argsort(-col, kind="stable")]


def channel_share_figure(
    report: Mapping,
    *,
    sort: ShareSort = "channel",
    order: int = 0,
    max_channels: int = 64,
    highlight: int | None = None,
    title: str | None = None,
    caption: str | None = None,
    wide: bool = False,
) -> Figure:
    """Per-filter fuzziness: a channels × (orders, x^Δ) heatmap of each channel's variance shares.

    Args:
        report: a variance report with ``per_channel`` (``FitResult.heldout_report``).
        sort: row order (:data:`SHARE_SORTS`); ``order`` picks the column for ``"order"``.
        max_channels: show at most this many rows (the first ones after sorting).
        highlight: a channel to outline.
        title: axes title.
        caption: provenance line.
        wide: channels along x and (orders, x^Δ) along y: a wide, short figure that reads well across a
            page (the default puts one channel per row).

    Returns:
        The heatmap of the additive shares Cov(x⁽ᵏ⁾_c, x*_c)/Var(x*_c) and Cov(x^Δ_c, x*_c)/Var(x*_c) (each row
        sums to 1) on a sequential scale from 0 to 1 (a rare negative share, a part pointing against x*, shows
        as 0 in colour and with its sign in the cell text).
    """
    m = share_matrix(report)
    K = m.shape[1] - 2
    if not 0 <= order <= K:
        raise ValueError(f"order must be in 0…{K}; got {order}.")
    rows = channel_order(report, sort, order)[: max(1, int(max_channels))]
    data = m[rows]
    vmax = 1.0
    if wide:
        return _channel_share_wide(data, rows, K, vmax, highlight, title, caption)
    h = min(9.0, 1.2 + 0.2 * len(rows))
    fig = Figure(figsize=(2.2 + 0.55 * (K + 2), h), layout="constrained")
    ax = fig.add_subplot()
    norm = mcolors.Normalize(0.0, vmax)
    ax.imshow(data, cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(K + 2), [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX], fontsize=TEXT_PT)
    step = max(1, math.ceil(len(rows) * 1.3 * TEXT_PT / 72 / max(h - 1.2, 0.5)))
    ax.set_yticks(range(0, len(rows), step), [str(c) for c in rows[::step]], fontsize=TEXT_PT)
    ax.set_ylabel(f"channel of {TARGET_TEX}", fontsize=TEXT_PT)
    if highlight is not None and highlight in rows:
        r = rows.index(highlight)
        ax.add_patch(_rect(r, K + 2))
    if len(rows) <= 24:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=TEXT_PT - 1.5,
                        color="white" if norm(v) < 0.55 else "black")
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SHARE_CMAP), ax=ax, shrink=0.8)
    cb.set_label(f"additive share of the channel's Var({TARGET_TEX})", fontsize=TEXT_PT)
    cb.ax.tick_params(labelsize=TEXT_PT)
    ax.set_title(title or "additive share per channel and order", fontsize=TITLE_PT)
    _caption(fig, caption)
    return fig


def _channel_share_wide(data: np.ndarray, rows: list[int], K: int, vmax: float, highlight: int | None,
                        title: str | None, caption: str | None) -> Figure:
    """:func:`channel_share_figure` with channels along x (one column each) and the parts along y."""
    from matplotlib.patches import Rectangle

    n = len(rows)
    width = min(WIDE_IN, 2.4 + 0.3 * n)
    fig = Figure(figsize=(width, 1.9 + 0.36 * (K + 2)), layout="constrained")
    ax = fig.add_subplot()
    norm = mcolors.Normalize(0.0, vmax)
    ax.imshow(data.T, cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(K + 2), [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX], fontsize=TEXT_PT)
    fits = max(1, int((width - 1.6) * 72 / (1.4 * TEXT_PT)))  # rotated labels TEXT_PT high, spaced 1.4×
    step = max(1, math.ceil(n / fits))
    ax.set_xticks(range(0, n, step), [str(c) for c in rows[::step]], fontsize=TEXT_PT,
                  rotation=90 if n * 2 > fits else 0)
    ax.set_xlabel(f"channel of {TARGET_TEX}" + (f" (every {step}th labelled)" if step > 1 else ""), fontsize=TEXT_PT)
    if highlight is not None and highlight in rows:
        c = rows.index(highlight)
        ax.add_patch(Rectangle((c - 0.5, -0.5), 1, K + 2, fill=False, edgecolor="red", linewidth=1.5, clip_on=False))
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SHARE_CMAP), ax=ax, shrink=0.9, pad=0.01)
    cb.set_label("share of Var(x*)", fontsize=TEXT_PT)
    cb.ax.tick_params(labelsize=TEXT_PT)
    ax.set_title(title or "additive share per channel and order", fontsize=TITLE_PT)
    _caption(fig, caption)
    return fig


WIDE_IN = 6.3
"""The widest wide channel heatmap, in inches (its text stays readable where the dashboard shows it)."""


def _rect(row: int, ncols: int):
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), ncols, 1, fill=False, edgecolor="red", linewidth=1.5, clip_on=False)


def metric_summary_text(report: VarianceReport, heldout_error: float, baseline: Mapping) -> str:
    """One line of the key numbers of a direction (for captions and tables)."""
    return (
        f"Var(x^Δ)/Var(x*) = {report.instability:.3f} · held-out error {heldout_error:.3f} · "
        f"0-order baseline R² {baseline.get('linear_r2', float('nan')):.3f}, CKA {baseline.get('cka', float('nan')):.3f}"
    )
