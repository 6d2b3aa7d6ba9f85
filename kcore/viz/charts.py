"""Charts of a report's numbers: variances per order, instability and shares with intervals, loss curves and
the per-channel share heatmap (Sec. 4.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kcore.metrics import VarianceReport
from kcore.viz.style import RESIDUAL_TEX, SHARE_CMAP, TARGET_TEX, _caption, _order_colours, order_tex


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
    fig = Figure(figsize=(3.4 * n + 0.4, 3.0), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False, sharey=True)[0]
    reports = {k: r if isinstance(r, VarianceReport) else _VarRow.of(r) for k, r in reports.items()}
    top = max(max(max(r.var_orders), r.var_residual, r.var_target) for r in reports.values())
    for ax, (key, rep) in zip(axes, reports.items()):
        K = len(rep.var_orders) - 1
        labels = [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX, TARGET_TEX]
        values = list(rep.var_orders) + [rep.var_residual, rep.var_target]
        colours = _order_colours(K) + ["#c0392b", "#9e9e9e"]
        bars = ax.bar(labels, values, color=colours, edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7, padding=1)
        name = (titles or {}).get(key, key)
        ax.set_title(f"{name}\ninstability Var({RESIDUAL_TEX})/Var({TARGET_TEX}) = {rep.instability:.3f}", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_ylim(0, top * 1.15 if top > 0 else 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Var on held-out images", fontsize=8)
    _caption(fig, caption)
    return fig


def instability_figure(
    reports: Mapping[str, VarianceReport],
    *,
    baselines: Mapping[str, Any] | None = None,
    titles: Mapping[str, str] | None = None,
    preset: str | None = None,
    caption: str | None = None,
) -> Figure:
    """Instability and additive shares per direction with their bootstrap intervals, and the chance baselines.

    Args:
        reports: direction key → :class:`~kcore.metrics.VarianceReport`.
        baselines: kind → :class:`~kcore.baselines.ChanceBaseline`; each is drawn as a dashed reference line
            at its instability (per direction).
        titles: direction key → label. preset: the fit preset (named in the shares' title: the order split
            depends on the recipe). caption: provenance line.

    Returns:
        Left: instability per direction, a point with its interval and the reference lines. Right: the
        additive shares of x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ (stacked to 100 %) with the interval of each share.
    """
    if not reports:
        raise ValueError("reports is empty: pass at least one direction's variance report.")
    keys = list(reports)
    fig = Figure(figsize=(3.0 + 2.2 * len(keys), 3.1), layout="constrained")
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.3])
    names = [(titles or {}).get(k, k) for k in keys]
    ref_styles = [("#7f8c8d", "--"), ("#8e44ad", ":"), ("#16a085", "-.")]
    for i, key in enumerate(keys):
        rep = reports[key]
        iv = rep.interval("instability")
        err = [[rep.instability - iv[0]], [iv[1] - rep.instability]] if iv else None
        ax.errorbar([i], [rep.instability], yerr=err, fmt="o", color="#c0392b", capsize=4, ms=5,
                    label=f"this fit ({rep.ci.level:.0%} CI)" if i == 0 and rep.ci else ("this fit" if i == 0 else None))
        for j, (kind, ref) in enumerate((baselines or {}).items()):
            r = ref.reports.get(key) if hasattr(ref, "reports") else None
            if r is None:
                continue
            colour, ls = ref_styles[j % len(ref_styles)]
            ax.hlines(r.instability, i - 0.35, i + 0.35, colors=colour, linestyles=ls, lw=1.4,
                      label=f"chance: {getattr(ref, 'label', kind)}" if i == 0 else None)
    ax.set_xticks(range(len(keys)), names, fontsize=7)
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"instability Var({RESIDUAL_TEX})/Var({TARGET_TEX})", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=6, frameon=False, loc="lower right")
    ax.tick_params(labelsize=7)
    K = max(r.orders for r in reports.values())
    colours = _order_colours(K) + ["#c0392b"]
    labels = [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX]
    for i, key in enumerate(keys):
        rep = reports[key]
        if not rep.has_shares:
            continue
        vals = list(rep.share_orders) + [rep.share_residual]
        ivs = [rep.interval(f"share_x{k}") for k in range(rep.orders + 1)] + [rep.interval("share_residual")]
        bottom = 0.0
        for j, (v, iv) in enumerate(zip(vals, ivs)):
            idx = j if j <= rep.orders else K + 1
            ax2.bar(i, v, bottom=bottom, color=colours[idx], edgecolor="black", linewidth=0.4, width=0.5,
                    label=labels[idx] if i == 0 else None)
            if iv is not None:
                top = bottom + v
                ax2.errorbar([i + 0.3], [top], yerr=[[v - iv[0]], [iv[1] - v]], fmt="none", ecolor=colours[idx],
                             capsize=2, lw=1)
            if abs(v) >= 0.04:
                ax2.text(i, bottom + v / 2, f"{v:.0%}", ha="center", va="center", fontsize=6,
                         color="white" if j <= rep.orders else "black")
            bottom += v
    ax2.set_xticks(range(len(keys)), names, fontsize=7)
    ax2.set_ylim(min(0.0, ax2.get_ylim()[0]), max(1.0, ax2.get_ylim()[1]))
    ax2.set_ylabel(f"share of Var({TARGET_TEX}) (adds up to 1)", fontsize=8)
    ax2.set_title("additive shares" + (f" · preset {preset}" if preset else ""), fontsize=8)
    ax2.legend(fontsize=6, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax2.tick_params(labelsize=7)
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
    fig = Figure(figsize=(3.4 * n + 0.4, 2.8), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, (key, hist) in zip(axes, histories.items()):
        ep = [r.epoch for r in hist]
        ax.plot(ep, [r.train_loss for r in hist], color="#1f4e79", lw=1.2, label="training loss (Eq. 2)")
        mon = [r.monitor_error for r in hist]
        if any(math.isfinite(v) for v in mon):
            ax.plot(ep, mon, color="#e67e22", lw=1.2, label="monitor error (1 − R²)")
        if best_epochs and key in best_epochs:
            ax.axvline(best_epochs[key], color="0.4", ls="--", lw=0.8, label=f"kept epoch {best_epochs[key]}")
        vals = [v for r in hist for v in (r.train_loss, r.monitor_error) if math.isfinite(v) and v > 0]
        if vals and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title((titles or {}).get(key, key), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, frameon=False)
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
    h = min(9.0, 1.2 + 0.16 * len(rows))
    fig = Figure(figsize=(2.2 + 0.55 * (K + 2), h), layout="constrained")
    ax = fig.add_subplot()
    norm = mcolors.Normalize(0.0, vmax)
    ax.imshow(data, cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(K + 2), [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX], fontsize=8)
    ax.set_yticks(range(len(rows)), [str(c) for c in rows], fontsize=6 if len(rows) > 24 else 7)
    ax.set_ylabel(f"channel of {TARGET_TEX}", fontsize=8)
    if highlight is not None and highlight in rows:
        r = rows.index(highlight)
        ax.add_patch(_rect(r, K + 2))
    if len(rows) <= 24:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                v = data[i, j]
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if norm(v) < 0.55 else "black")
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SHARE_CMAP), ax=ax, shrink=0.8)
    cb.set_label(f"additive share of the channel's Var({TARGET_TEX})", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    ax.set_title(title or "additive share per channel and order", fontsize=8)
    _caption(fig, caption)
    return fig


def _channel_share_wide(data: np.ndarray, rows: list[int], K: int, vmax: float, highlight: int | None,
                        title: str | None, caption: str | None) -> Figure:
    """:func:`channel_share_figure` with channels along x (one column each) and the parts along y."""
    from matplotlib.patches import Rectangle

    n = len(rows)
    fig = Figure(figsize=(min(14.0, 2.4 + 0.22 * n), 1.5 + 0.32 * (K + 2)), layout="constrained")
    ax = fig.add_subplot()
    norm = mcolors.Normalize(0.0, vmax)
    ax.imshow(data.T, cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(K + 2), [order_tex(k) for k in range(K + 1)] + [RESIDUAL_TEX], fontsize=9)
    step = 1 if n <= 40 else 2
    ax.set_xticks(range(0, n, step), [str(c) for c in rows[::step]], fontsize=7, rotation=90 if n > 24 else 0)
    ax.set_xlabel(f"channel of {TARGET_TEX}", fontsize=9)
    if highlight is not None and highlight in rows:
        c = rows.index(highlight)
        ax.add_patch(Rectangle((c - 0.5, -0.5), 1, K + 2, fill=False, edgecolor="red", linewidth=1.5, clip_on=False))
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SHARE_CMAP), ax=ax, shrink=0.9, pad=0.01)
    cb.set_label(f"additive share of Var({TARGET_TEX})", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    ax.set_title(title or "additive share per channel and order", fontsize=9)
    _caption(fig, caption)
    return fig


def _rect(row: int, ncols: int):
    from matplotlib.patches import Rectangle

    return Rectangle((-0.5, row - 0.5), ncols, 1, fill=False, edgecolor="red", linewidth=1.5, clip_on=False)


def metric_summary_text(report: VarianceReport, heldout_error: float, baseline: Mapping) -> str:
    """One line of the key numbers of a direction (for captions and tables)."""
    return (
        f"Var(x^Δ)/Var(x*) = {report.instability:.3f} · held-out error {heldout_error:.3f} · "
        f"0-order baseline R² {baseline.get('linear_r2', float('nan')):.3f}, CKA {baseline.get('cka', float('nan')):.3f}"
    )
