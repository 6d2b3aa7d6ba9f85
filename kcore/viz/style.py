"""The shared look of kcore's figures: colour maps, the option dicts the UI reads, labels, colour limits, captions.

Colour conventions (Sec. 3 components are signed; energies and shares are not):

- signed maps (x*, x^(k), sums of orders, g(x), x^Δ) use the diverging :data:`DIVERGING_CMAP`, centred at
  zero with symmetric limits ±m;
- magnitudes (the blind-spot energy mean_c (x^Δ)², variance shares) use a sequential map from 0;
- nothing is silently rescaled to [0, 1]: every map has a colour bar with its numbers, in the fit's
  target units (standardised per channel in the paper convention).

Scaling (:data:`SCALES`) decides which maps share the limits m, in the spirit of CNN Explainer's
local / module / global switch.
"""
from __future__ import annotations

import math
import textwrap
from typing import Literal, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

DIVERGING_CMAP = "RdBu_r"
"""Colour map of signed maps (red > 0, blue < 0, white at 0): the default, safe for colour-blind readers."""
DIVERGING_CMAPS: dict[str, str] = {
    "RdBu_r": "red–blue (colour-blind safe; default)",
    "PuOr_r": "orange–purple (colour-blind safe)",
    "BrBG_r": "brown–teal (colour-blind safe)",
    "PiYG_r": "green–pink (safe for most colour-blind readers)",
    "coolwarm": "cool–warm (smooth; less safe for colour-blind readers)",
    "seismic": "seismic (strong contrast; not colour-blind safe)",
}
"""Valid colour maps of signed maps, all diverging with white (or light grey) at 0."""
SEQUENTIAL_CMAP = "magma"
"""Colour map of non-negative magnitudes (blind-spot energy)."""
SHARE_CMAP = "viridis"
"""Colour map of variance shares in the channel heatmap."""

Scale = Literal["map", "image", "shared"]
SCALES: dict[str, str] = {
    "map": "per map: each map gets its own limits ±max|map| (shapes comparable, magnitudes not)",
    "image": "per image: one set of limits for every map of an image and channel (x*, each x⁽ᵏ⁾, g(x), x^Δ), "
    "so the orders of one image compare directly",
    "shared": "shared: one set of limits across all orders and all images shown (per channel), "
    "so everything compares directly",
}
"""Valid scalings of the colour limits and what each means."""
SCALE_NAMES: dict[str, str] = {"map": "per map", "image": "per image", "shared": "shared"}

Background = Literal["gray", "rgb", "none"]
BACKGROUNDS: dict[str, str] = {
    "gray": "the input image in grey levels (the colours then belong to the map alone)",
    "rgb": "the input image in colour",
    "none": "no image under the map",
}
"""Valid backgrounds under an overlay."""

_SUP = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_TINY = 1e-12


def order_label(k: int) -> str:
    """``3 -> "x⁽³⁾"`` (plain text, for the UI)."""
    return f"x⁽{str(k).translate(_SUP)}⁾"


def order_tex(k: int) -> str:
    """``3 -> "x⁽³⁾"``: the figure label of order k, plain Unicode like :func:`order_label`.

    Figures use no mathtext: an SVG export then keeps every phrase in one ``<text>`` element (searchable,
    editable), where mathtext would place each glyph on its own.
    """
    return order_label(k)


def nested_label(k: int) -> str:
    """``1 -> "x⁽¹⁾ₙ"``: the nested component gₖ(x) − gₖ₋₁(x) of nested fits (plain Unicode, like
    :func:`order_label`; the subscript n tells it from the Eq. 3–4 component x⁽ᵏ⁾ of one g_θ)."""
    return order_label(k) + "ₙ"


RESIDUAL_TEX = "x^Δ"
"""The figure label of the residual x^Δ (plain Unicode, see :func:`order_tex`)."""
TARGET_TEX = "x*"
"""The figure label of the target feature x* (plain Unicode, see :func:`order_tex`)."""

TEXT_PT = 9.5
"""The smallest font size of a chart's text, in points."""
TITLE_PT = 10.0
"""The font size of panel titles and axis labels, in points."""
MIN_SCREEN_PX = 11.0
"""Figure text must be at least this many CSS pixels high where the dashboard shows it (1024 px wide window)."""


def tick_rotation(labels: Sequence[str], slot_in: float, size_pt: float = TEXT_PT) -> int:
    """The rotation of tick labels: 0 where the longest fits its slot lying flat, else 90 (upright, never crossing).

    Args:
        labels: the tick labels.
        slot_in: the width one tick has, in inches (the axis' width over the number of ticks).
        size_pt: their font size in points.

    Returns:
        0 or 90 (degrees).
    """
    longest = max((len(s) for s in labels), default=0)
    return 0 if longest * 0.6 * size_pt / 72 <= 0.9 * slot_in else 90


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def limits_of(values: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor, signed: bool) -> tuple[float, float]:
    """Colour limits of some maps: ``(-m, m)`` with m = max |value| when signed, else ``(0, max value)``.

    A constant-zero input gets a tiny positive m so that the colour bar stays valid.
    """
    if isinstance(values, (np.ndarray, torch.Tensor)):
        values = [values]
    m = 0.0
    for v in values:
        a = _np(v)
        if a.size:
            finite = a[np.isfinite(a)]
            if finite.size:
                m = max(m, float(np.abs(finite).max() if signed else finite.max()))
    m = max(m, _TINY)
    return (-m, m) if signed else (0.0, m)


def _check_cmap(cmap: str) -> None:
    if cmap not in DIVERGING_CMAPS:
        raise ValueError(f"cmap must be one of {sorted(DIVERGING_CMAPS)} (diverging, white at 0); got {cmap!r}. "
                         f"Fix: use {DIVERGING_CMAP!r}, the colour-blind-safe default.")


def _norm(limits: tuple[float, float]) -> mcolors.Normalize:
    vmin, vmax = float(limits[0]), float(limits[1])
    if not (math.isfinite(vmin) and math.isfinite(vmax)) or vmax <= vmin:
        raise ValueError(f"limits must be finite with vmin < vmax; got {limits!r}.")
    return mcolors.Normalize(vmin=vmin, vmax=vmax)


def _wrap(text: str, width: int) -> str:
    """Wrap a provenance line at its " · " separators (then at spaces) to about ``width`` characters."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for part in para.split(" · "):
            candidate = f"{line} · {part}" if line else part
            if len(candidate) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = part
        lines.extend(textwrap.wrap(line, width) or [""])
    return "\n".join(lines)


def _caption_width(fig: Figure) -> int:
    return max(30, int(fig.get_figwidth() * 20))  # ~characters of 6 pt text per line


def _caption(fig: Figure, caption: str | None) -> None:
    if caption:
        fig.supxlabel(_wrap(caption, _caption_width(fig)), fontsize=CAPTION_PT, color="0.35", x=0.01, ha="left",
                      linespacing=1.3)


CAPTION_PT = 7.5
"""The font size of a figure's provenance caption (exports only; the dashboard shows it as page text)."""


def text_sizes(fig: Figure) -> list[tuple[str, float]]:
    """(text, font size in points) of every visible, non-empty text of ``fig`` (titles, labels, ticks, legends).

    Args:
        fig: a figure; it is drawn once (on a throw-away canvas) so that tick labels exist.

    Returns:
        The pairs in drawing order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    if fig.canvas is None or not hasattr(fig.canvas, "get_renderer"):
        FigureCanvasAgg(fig)
    fig.canvas.draw()
    return [(t.get_text(), float(t.get_fontsize())) for t in fig.findobj(Text)
            if t.get_visible() and t.get_text().strip() and t.get_figure() is not None]


def screen_px(points: float, dpi: float, shown_px: float, image_px: float) -> float:
    """The height in CSS pixels of ``points``-sized text in a PNG made at ``dpi`` and shown ``shown_px`` wide.

    Args:
        points: the font size. dpi: the PNG's resolution. shown_px: the width the browser gives the image.
        image_px: the PNG's own width in pixels.
    """
    return points * dpi / 72.0 * shown_px / image_px


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")


def plotly_colorscale(cmap: str, n: int = 33) -> list[list]:
    """A matplotlib colour map as a Plotly colour scale (``n`` evenly spaced stops, linear in between)."""
    lut = colormaps[cmap](np.linspace(0.0, 1.0, n))[:, :3]
    return [[i / (n - 1), "rgb({:.0f},{:.0f},{:.0f})".format(*(255 * c))] for i, c in enumerate(lut)]


def _order_colours(k_max: int) -> list:
    cmap = mcolors.LinearSegmentedColormap.from_list("orders", ["#1f4e79", "#6aa9d6"])
    return [cmap(k / max(k_max, 1)) for k in range(k_max + 1)]
