"""The order-wise gains of nested fits per channel (:class:`kcore.fit.nested.NestedGains`): as a matrix, as a
table in % with intervals, and as the heatmap the Filters page shows beside the shares' one.

Each channel's gains Δ₀ … Δ_K and its x^Δ (Var(x*_c − g_K(x)_c)/Var(x*_c)) add up to 1, like its shares; unlike the
shares, a gain is what order k adds to the held-out R² of the best fit without it, and it can be below 0 (gₖ
reconstructs that channel worse than gₖ₋₁).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from kcore.viz.charts import WIDE_IN, ShareSort, channel_text_table, percent_text
from kcore.viz.style import RESIDUAL_TEX, SHARE_CMAP, TARGET_TEX, TEXT_PT, TITLE_PT, _caption

if TYPE_CHECKING:
    import pandas as pd

_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")

GAIN_SORTS: dict[str, str] = {
    "channel": "channel index",
    "residual": "x^Δ, largest first (least reconstructable channels on top)",
    "order": "gain of the chosen order, largest first",
}
"""How the per-channel gains can be sorted (the same keys as :data:`kcore.viz.SHARE_SORTS`)."""


def gain_label(k: int) -> str:
    """``1 -> "Δ₁"``: the order-wise gain of order k (plain Unicode)."""
    return "Δ" + str(int(k)).translate(_SUB)


def _check_gains(gains: Any) -> None:
    if not all(hasattr(gains, a) for a in ("channel_gain_orders", "channel_instability", "orders")):
        raise TypeError(f"gains must be kcore.fit.nested.NestedGains (FitResult.nested.gains); got "
                        f"{type(gains).__name__}. Fix: pass the gains of a nested fit (kcore.fit(..., nested=True)).")


def gain_matrix(gains: Any) -> np.ndarray:
    """(C, K+2) per-channel gains: columns Δ₀ … Δ_K, then x^Δ = Var(x*_c − g_K(x)_c)/Var(x*_c); rows sum to 1.

    Raises:
        TypeError: ``gains`` is not a :class:`~kcore.fit.nested.NestedGains`.
    """
    _check_gains(gains)
    orders = np.asarray(gains.channel_gain_orders, dtype=np.float64)  # (K+1, C)
    resid = np.asarray(gains.channel_instability, dtype=np.float64)  # (C,)
    return np.concatenate([orders.T, resid[:, None]], axis=1)


def channel_gain_order(gains: Any, sort: ShareSort = "channel", order: int = 0) -> list[int]:
    """Channel indices sorted as ``sort`` says (:data:`GAIN_SORTS`); ``order`` picks Δₖ for ``"order"``."""
    if sort not in GAIN_SORTS:
        raise ValueError(f"sort must be one of {sorted(GAIN_SORTS)}; got {sort!r}.")
    m = gain_matrix(gains)
    K = m.shape[1] - 2
    if not 0 <= int(order) <= K:
        raise ValueError(f"order must be in 0…{K} (the fit's K = {K}); got {order}.")
    if sort == "channel":
        return list(range(m.shape[0]))
    col = m[:, -1] if sort == "residual" else m[:, int(order)]
    return [int(i) for i in np.argsort(-col, kind="stable")]


def percent_1(value: float, interval: tuple[float, float] | None) -> str:
    """``"11.3 ± 0.4 %"`` (one decimal, ± half the interval's width), never ``"-0.0 %"``."""
    return percent_text(value, interval, 1)


def channel_gain_table(gains: Any, rows: Sequence[int] | None = None,
                       var_target: Sequence[float] | None = None) -> "pd.DataFrame":
    """Per-channel gains as text in % with their bootstrap intervals, for tables people read.

    Args:
        gains: a nested fit's :class:`~kcore.fit.nested.NestedGains`.
        rows: channel indices in the order to show (default: all, by index; see :func:`channel_gain_order`).
        var_target: each channel's Var(x*) on the held-out images (the report's ``per_channel.var_target``):
            adds a ``Var(x*)`` column, and a channel with none reads :data:`~kcore.viz.NO_VARIANCE`.

    Returns:
        One row per channel: ``channel``, ``Δ₀`` … ``Δ_K`` and ``x^Δ`` as ``"11.3 ± 0.4 %"`` (one decimal, ± half
        the width of the 95 % bootstrap interval of that channel; the value alone when the run kept no
        per-channel intervals), ``Var(x*)`` (with ``var_target``) and ``main order`` (the largest gain).
    """
    m = gain_matrix(gains)
    ci = gains.ci
    names = [gain_label(k) for k in range(m.shape[1] - 1)] + [RESIDUAL_TEX]
    return channel_text_table(m, names, ci.channel_gain_orders if ci is not None else None,
                              ci.channel_instability if ci is not None else None, var_target, rows, decimals=1)


def channel_gain_figure(
    gains: Any,
    *,
    sort: ShareSort = "channel",
    order: int = 0,
    max_channels: int = 64,
    highlight: int | None = None,
    title: str | None = None,
    caption: str | None = None,
    wide: bool = True,
) -> Figure:
    """The per-channel gains as a heatmap: channels × (Δ₀ … Δ_K, x^Δ), on the shares' scale (0 to 1, viridis).

    A negative gain (gₖ worse than gₖ₋₁ on that channel) is drawn as 0 in colour and hatched, so it is never
    read as a small positive one.

    Args:
        gains: a nested fit's :class:`~kcore.fit.nested.NestedGains`.
        sort, order: row order (:data:`GAIN_SORTS`) and the Δₖ it sorts by.
        max_channels: show at most this many channels (the first ones after sorting).
        highlight: a channel to outline.
        title: axes title. caption: provenance line.
        wide: channels along x (the Filters page's layout); else one channel per row with the values written.

    Returns:
        The figure.
    """
    m = gain_matrix(gains)
    K = m.shape[1] - 2
    rows = channel_gain_order(gains, sort, order)[: max(1, int(max_channels))]
    data = m[rows]
    n = len(rows)
    norm = mcolors.Normalize(0.0, 1.0)
    labels = [gain_label(k) for k in range(K + 1)] + [RESIDUAL_TEX]
    if wide:
        width = min(WIDE_IN, 2.4 + 0.3 * n)
        fig = Figure(figsize=(width, 1.9 + 0.36 * (K + 2)), layout="constrained")
        ax = fig.add_subplot()
        shown = data.T  # (K+2, n)
        ax.imshow(np.clip(shown, 0, None), cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(K + 2), labels, fontsize=TEXT_PT)
        fits = max(1, int((width - 1.6) * 72 / (1.4 * TEXT_PT)))
        step = max(1, math.ceil(n / fits))
        ax.set_xticks(range(0, n, step), [str(c) for c in rows[::step]], fontsize=TEXT_PT,
                      rotation=90 if n * 2 > fits else 0)
        ax.set_xlabel(f"channel of {TARGET_TEX}" + (f" (every {step}th labelled)" if step > 1 else ""),
                      fontsize=TEXT_PT)
    else:
        h = min(9.0, 1.2 + 0.2 * n)
        fig = Figure(figsize=(2.2 + 0.55 * (K + 2), h), layout="constrained")
        ax = fig.add_subplot()
        shown = data  # (n, K+2)
        ax.imshow(np.clip(shown, 0, None), cmap=SHARE_CMAP, norm=norm, aspect="auto", interpolation="nearest")
        ax.set_xticks(range(K + 2), labels, fontsize=TEXT_PT)
        step = max(1, math.ceil(n * 1.3 * TEXT_PT / 72 / max(h - 1.2, 0.5)))
        ax.set_yticks(range(0, n, step), [str(c) for c in rows[::step]], fontsize=TEXT_PT)
        ax.set_ylabel(f"channel of {TARGET_TEX}", fontsize=TEXT_PT)
        if n <= 24:
            for i in range(n):
                for j in range(K + 2):
                    v = data[i, j]
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=TEXT_PT,
                            color="white" if norm(max(v, 0.0)) < 0.55 else "black")
    from matplotlib.patches import Rectangle

    negative = np.argwhere(shown < 0)
    for r, c in negative:  # (row, column) of the drawn image: a hatched cell
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, hatch="///", edgecolor="white",
                               linewidth=0.0))
    if highlight is not None and highlight in rows:
        i = rows.index(highlight)
        box = (Rectangle((i - 0.5, -0.5), 1, K + 2, fill=False, edgecolor="red", linewidth=1.5, clip_on=False) if wide
               else Rectangle((-0.5, i - 0.5), K + 2, 1, fill=False, edgecolor="red", linewidth=1.5, clip_on=False))
        ax.add_patch(box)
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SHARE_CMAP), ax=ax, shrink=0.9, pad=0.01)
    cb.set_label("gain, share of Var(x*)" + ("\n(hatched: below 0)" if len(negative) else ""), fontsize=TEXT_PT)
    cb.ax.tick_params(labelsize=TEXT_PT)
    ax.set_title(title or "order-wise gain of nested fits per channel", fontsize=TITLE_PT)
    _caption(fig, caption)
    return fig
