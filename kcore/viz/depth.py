"""Instability and the additive order shares against depth (a layer sweep) or across saved runs, with intervals
and the chance baselines.

One figure serves both: its x axis is whatever the rows' ``position``/``label`` say (a sweep's layer pairs, or the
names of runs compared side by side). :func:`depth_figure` is the matplotlib figure (exports: PDF, SVG, PNG);
:func:`depth_figure_interactive` draws the same series, limits and labels with Plotly for the dashboard.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from matplotlib.figure import Figure

from kcore.baselines import BASELINE_LABELS
from kcore.sweep import SweepRow
from kcore.viz.style import (
    RESIDUAL_TEX,
    TARGET_TEX,
    TEXT_PT,
    TITLE_PT,
    _caption,
    _order_colours,
    order_label,
    order_tex,
)

DIRECTION_STYLE: dict[str, tuple[str, str, str, str]] = {
    # key: (name, colour, marker, line style)
    "A_to_B": ("A → B", "#c0392b", "o", "-"),
    "B_to_A": ("B → A", "#2c6fbb", "s", "--"),
}
#: colour of each chance baseline's reference series
CHANCE_COLOURS: dict[str, str] = {"random_b": "#7f8c8d", "shuffled": "#8e44ad"}
_OFFSET = 0.08  # horizontal shift between directions, so their intervals do not hide each other


@dataclass(frozen=True)
class Series:
    """One line of the depth plot: x positions, values and their intervals (``None`` where there is none).

    Attributes:
        panel: ``"instability"`` or ``"shares"``. name: the legend entry. direction: ``"A_to_B"``/``"B_to_A"``.
        kind: ``"fit"``, ``"chance"`` or an order's name (``"x0"`` … ``"residual"``).
        x, y: positions (already shifted per direction) and values. lo, hi: interval ends (``None``: none).
    """

    panel: str
    name: str
    direction: str
    kind: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    lo: tuple[float | None, ...]
    hi: tuple[float | None, ...]


def depth_series(rows: Sequence[SweepRow]) -> list[Series]:
    """Every series the depth plot draws, from :class:`~kcore.sweep.SweepRow` rows.

    Per direction: the instability with its interval, each chance baseline's instability with its interval, and
    the additive share of every order x⁽ᵏ⁾ and of x^Δ with their intervals.

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("rows is empty: pass at least one comparison's rows (kcore.sweep.comparison_rows).")
    out: list[Series] = []
    directions = [d for d in DIRECTION_STYLE if any(r.direction == d for r in rows)]
    for n, key in enumerate(directions):
        mine = sorted((r for r in rows if r.direction == key), key=lambda r: r.position)
        shift = (n - (len(directions) - 1) / 2) * 2 * _OFFSET
        xs = tuple(r.position + shift for r in mine)
        name = DIRECTION_STYLE[key][0]

        def series(panel: str, label: str, kind: str, values: list[tuple[float | None, Any]], x=xs) -> None:
            keep = [(xv, v, iv) for xv, (v, iv) in zip(x, values) if v is not None]
            if keep:
                out.append(Series(panel, label, key, kind, tuple(k[0] for k in keep), tuple(float(k[1]) for k in keep),
                                  tuple(None if k[2] is None else k[2][0] for k in keep),
                                  tuple(None if k[2] is None else k[2][1] for k in keep)))

        series("instability", f"{name}", "fit", [(r.instability, r.instability_ci) for r in mine])
        for kind in sorted({k for r in mine for k in r.baselines}):
            series("instability", f"{name} chance: {BASELINE_LABELS.get(kind, kind)}", f"chance:{kind}",
                   [r.baselines.get(kind, (None, None)) for r in mine])
        orders = max(len(r.share_orders) for r in mine)
        for k in range(orders):
            series("shares", f"{name} {order_label(k)}", f"x{k}",
                   [(r.share_orders[k], r.share_orders_ci[k]) if k < len(r.share_orders) else (None, None)
                    for r in mine])
        series("shares", f"{name} x^Δ", "residual", [(r.share_residual, r.share_residual_ci) for r in mine])
    return out


def axis_range(series: Sequence[Series], panel: str, floor: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float]:
    """The y range of ``panel`` that holds every value, every interval and every reference line, and ``floor``.

    Returns:
        ``(low, high)`` with 5 % of the span added at each end.
    """
    values = [v for s in series if s.panel == panel for v in (*s.y, *s.lo, *s.hi) if v is not None]
    lo, hi = min([floor[0], *values]), max([floor[1], *values])
    pad = 0.05 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _ticks(rows: Sequence[SweepRow]) -> tuple[list[int], list[str]]:
    seen: dict[int, str] = {}
    for r in sorted(rows, key=lambda r: r.position):
        seen.setdefault(r.position, r.label)
    return list(seen), list(seen.values())


TICK_CHARS = 18
"""The longest x tick label (characters) of the depth plot; longer names are shortened by :func:`short_labels`."""


def short_labels(labels: Sequence[str], width: int = TICK_CHARS) -> list[str]:
    """Tick labels of at most ``width`` characters that stay distinct, from names such as run folders.

    The leading path parts all ``labels`` share are dropped (``sweep-…/pairs/00_a__a`` and ``sweep-…/pairs/01_b__b``
    become ``00_a__a`` and ``01_b__b``), then a name still too long keeps its start and end around an ellipsis.
    Where two labels would read the same, each is numbered by its place (``1: …``).

    Args:
        labels: the full names, in x order (fewer than 1000). width: the most characters a label may have
            (at least 8).

    Returns:
        One label per name, each at most ``width`` characters.

    Raises:
        ValueError: ``width`` is under 8.
    """
    if width < 8:
        raise ValueError(f"width must be at least 8 characters, got {width}. Fix: pass a larger width.")
    parts = [str(label).split("/") for label in labels]
    shared = 0
    while parts and all(len(p) > shared + 1 for p in parts) and len({p[shared] for p in parts}) == 1:
        shared += 1
    tails = ["/".join(p[shared:]) for p in parts]

    def cut(text: str, room: int) -> str:
        if len(text) <= room:
            return text
        head = room // 2
        return text[:head] + "…" + text[len(text) - (room - 1 - head):]

    out = [cut(t, width) for t in tails]
    if len(set(out)) < len(out):
        out = [f"{i + 1}: " + cut(t, width - len(f"{i + 1}: ")) for i, t in enumerate(tails)]
    return out


def _colour(s: Series, k_max: int) -> str:
    if s.kind == "fit":
        return DIRECTION_STYLE[s.direction][1]
    if s.kind.startswith("chance:"):
        return CHANCE_COLOURS.get(s.kind.split(":", 1)[1], "#16a085")
    if s.kind == "residual":
        return "#c0392b"
    import matplotlib.colors as mcolors

    return mcolors.to_hex(_order_colours(k_max)[int(s.kind[1:])])


def depth_figure(rows: Sequence[SweepRow], *, x_title: str = "layer pair, shallow → deep",
                 title: str | None = None, caption: str | None = None) -> Figure:
    """Instability ± interval and the additive order shares ± interval against depth, both directions, with the
    chance baselines (matplotlib; for exports).

    Args:
        rows: :class:`~kcore.sweep.SweepRow` rows (a sweep's :meth:`~kcore.sweep.SweepResult.rows`, or
            :func:`~kcore.sweep.comparison_rows` of saved runs); their ``position``/``label`` make the x axis.
        x_title: the x axis' title (e.g. ``"run"`` when comparing runs). title: above both panels.
        caption: provenance line.

    Returns:
        Left: instability Var(x^Δ)/Var(x*) per direction (A → B solid, B → A dashed) with its intervals, and each
        chance baseline with its interval (dotted); the y axis holds every value, interval and reference line.
        Right: the additive shares of x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ (they add up to 1) with their intervals.

    Raises:
        ValueError: ``rows`` is empty.
    """
    series = depth_series(rows)
    ticks, names = _ticks(rows)
    labels = short_labels(names)
    k_max = max((len(r.share_orders) for r in rows), default=1) - 1
    legend_rows = max(sum(s.panel == "instability" for s in series), math.ceil(sum(s.panel == "shares" for s in series) / 2))
    fig = Figure(figsize=(max(7.0, 3.0 + 1.1 * len(ticks)), 3.4 + 0.2 * legend_rows), layout="constrained")
    axes = fig.subplots(1, 2)
    for s in series:
        ax = axes[0] if s.panel == "instability" else axes[1]
        _, _, marker, ls = DIRECTION_STYLE[s.direction]
        chance = s.kind.startswith("chance:")
        colour = _colour(s, max(k_max, 0))
        err = None
        if any(v is not None for v in s.lo):
            err = [[y - (lo if lo is not None else y) for y, lo in zip(s.y, s.lo)],
                   [(hi if hi is not None else y) - y for y, hi in zip(s.y, s.hi)]]
        ax.errorbar(s.x, s.y, yerr=err, color=colour, marker="_" if chance else marker, ms=9 if chance else 4,
                    ls=":" if chance else ls, lw=1.0 if chance else 1.3, capsize=2.5, elinewidth=0.9, label=s.name)
    for ax, panel, ylabel in ((axes[0], "instability", f"instability Var({RESIDUAL_TEX})/Var({TARGET_TEX})"),
                              (axes[1], "shares", f"share of Var({TARGET_TEX}) (adds up to 1)")):
        ax.set_ylim(*axis_range(series, panel))
        ax.set_xticks(ticks, labels, fontsize=TEXT_PT)
        ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
        ax.set_xlabel(x_title, fontsize=TITLE_PT)
        ax.set_ylabel(ylabel, fontsize=TITLE_PT)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(labelsize=TEXT_PT)
    axes[0].axhline(1.0, color="0.6", lw=0.6)
    axes[1].axhline(0.0, color="0.6", lw=0.6)
    axes[0].set_title("instability (lower: more consistent)", fontsize=TITLE_PT)
    axes[1].set_title("additive shares " + ", ".join(order_tex(k) for k in range(k_max + 1)) + f", {RESIDUAL_TEX}",
                      fontsize=TITLE_PT)
    if title:
        fig.suptitle(title, fontsize=TITLE_PT)
    _caption(fig, caption)
    _upright_if_crowded(fig, axes)
    _legends_under_axis_titles(fig, axes)
    return fig


def _upright_if_crowded(fig: Figure, axes: Sequence[Any]) -> None:
    """Turn the x tick labels upright (90°) where, drawn level, two of them would touch (their boxes measured)."""
    fig.draw_without_rendering()
    grow = 0.0
    for ax in axes:
        boxes = sorted((t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()), key=lambda b: b.x0)
        if any(a.x1 + 2 > b.x0 for a, b in zip(boxes, boxes[1:])):
            ax.tick_params(axis="x", labelrotation=90)
            grow = max(grow, max(b.width - b.height for b in boxes) / fig.dpi)
    if grow:  # upright labels are taller: the panels keep their height
        fig.set_figheight(fig.get_figheight() + grow)


def _legends_under_axis_titles(fig: Figure, axes: Sequence[Any], gap_pt: float = 4.0) -> None:
    """Put each panel's legend under the panel, below its tick labels and x axis title (not over the data, where
    TEXT_PT entries would cover it): the drop is measured from the drawn text, in inches, so it holds at any size."""
    from matplotlib.transforms import ScaledTranslation

    fig.draw_without_rendering()  # lays the figure out: the tick labels and axis titles now have their extents
    for ax, ncols in zip(axes, (1, 2)):
        drop = max(0.0, ax.bbox.y0 - ax.xaxis.get_tightbbox().y0) / fig.dpi + gap_pt / 72
        ax.legend(fontsize=TEXT_PT, frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncols=ncols,
                  bbox_transform=ax.transAxes + ScaledTranslation(0, -drop, fig.dpi_scale_trans))


PANEL_TITLES = ("instability<br>(lower: more consistent)", "additive shares<br>(add up to 1)")
"""The Plotly panels' titles: two short lines each, so that side by side they fit a 1024 px window's main area."""
_PX_PER_CHAR = 7.0  # an 11–12 px sans-serif character, wide end (for the layout's margins; a browser measures)


def interactive_layout(names: Sequence[str], n_series: int, *, title: bool = False,
                       plot_px: int = 360) -> dict[str, Any]:
    """The Plotly depth plot's sizes from its tick names and legend entries, reserved so nothing shares a place.

    Args:
        names: the x tick names (full). n_series: the legend's entries. title: a title above the panels.
        plot_px: the panels' height in pixels.

    Returns:
        ``labels`` (the shortened tick labels), ``tickangle`` (0, or -90 when a label is over 8 characters or the
        ticks are many), ``tick_px`` (the tick labels' height), ``legend_px`` (the legend's height, rows of three),
        ``margin`` (``t``/``b``/``l``/``r``; ``b`` holds the tick labels, the x title and the legend, stacked) and
        ``height`` (the whole figure).
    """
    labels = short_labels(names)
    longest = max(map(len, labels), default=1)
    upright = longest > 8 or len(labels) * longest > 24
    tick_px = int(round(longest * _PX_PER_CHAR)) + 8 if upright else 22
    legend_px = 24 * math.ceil(n_series / 3) + 8
    margin = dict(t=110 if title else 80, b=tick_px + 28 + legend_px, l=10, r=10)
    return dict(labels=labels, tickangle=-90 if upright else 0, tick_px=tick_px, legend_px=legend_px, margin=margin,
                height=plot_px + margin["t"] + margin["b"])


def depth_figure_interactive(rows: Sequence[SweepRow], *, x_title: str = "layer pair, shallow → deep",
                             title: str | None = None):
    """:func:`depth_figure` drawn with Plotly for the dashboard: the same series, intervals and y ranges.

    The panels share the full width; tick labels are shortened (:func:`short_labels`) and each point's hover names
    its full x label; the legend sits under the x titles, in a bottom margin sized by :func:`interactive_layout`.

    Returns:
        A ``plotly.graph_objects.Figure`` with two panels; every trace has ``error_y`` where it has intervals, and
        each y axis' ``range`` is :func:`axis_range` (it holds every reference line).
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    series = depth_series(rows)
    ticks, names = _ticks(rows)
    full = dict(zip(ticks, names))
    size = interactive_layout(names, len(series), title=bool(title))
    k_max = max((len(r.share_orders) for r in rows), default=1) - 1
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14, subplot_titles=PANEL_TITLES)
    fig.update_annotations(font_size=13)
    dash = {"-": "solid", "--": "dash"}
    for s in series:
        col = 1 if s.panel == "instability" else 2
        _, _, marker, ls = DIRECTION_STYLE[s.direction]
        chance = s.kind.startswith("chance:")
        err = None
        if any(v is not None for v in s.lo):
            err = dict(type="data", symmetric=False,
                       array=[(hi if hi is not None else y) - y for y, hi in zip(s.y, s.hi)],
                       arrayminus=[y - (lo if lo is not None else y) for y, lo in zip(s.y, s.lo)], thickness=1, width=3)
        fig.add_trace(go.Scatter(
            x=list(s.x), y=list(s.y), name=s.name, mode="lines+markers", error_y=err,
            customdata=[full.get(round(x), "") for x in s.x],
            marker=dict(symbol="line-ew-open" if chance else ("circle" if marker == "o" else "square"),
                        size=10 if chance else 7),
            line=dict(color=_colour(s, max(k_max, 0)), dash="dot" if chance else dash[ls], width=1.5),
            hovertemplate="%{customdata}<br>%{y:.3f}<extra>" + s.name + "</extra>"), row=1, col=col)
    for col, panel, ylabel in ((1, "instability", "instability Var(x^Δ)/Var(x*)"),
                               (2, "shares", "share of Var(x*)")):
        fig.update_yaxes(range=list(axis_range(series, panel)), title_text=ylabel, row=1, col=col)
        fig.update_xaxes(tickmode="array", tickvals=ticks, ticktext=size["labels"], tickangle=size["tickangle"],
                         range=[min(ticks) - 0.5, max(ticks) + 0.5], title_text=x_title, title_standoff=6,
                         automargin=True, row=1, col=col)
    fig.update_layout(height=size["height"], autosize=True, margin=size["margin"], title=title,
                      legend=dict(font=dict(size=11), orientation="h", yref="container", yanchor="bottom", y=0,
                                  xanchor="left", x=0),
                      template="plotly_white")
    return fig
