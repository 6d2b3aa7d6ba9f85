"""The paper's Figure 1 as a grid: per (image, channel) row the image, x*, x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ over it."""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from kcore.decompose import Decomposition
from kcore.viz.maps import MapSpec, _check_index, feature_map, is_nested
from kcore.viz.overlays import _as_rgb, _draw_overlay, fold_text, text_width_in
from kcore.viz.style import (
    DIVERGING_CMAP,
    SCALES,
    TEXT_PT,
    TITLE_PT,
    Background,
    Scale,
    _caption,
    _check_alpha,
    _check_cmap,
    _norm,
    limits_of,
)


def figure1_grid(
    dec: Decomposition,
    image_indices: Sequence[int],
    channels: Sequence[int],
    images: Sequence[np.ndarray | None] | None = None,
    *,
    scale: Scale = "image",
    alpha: float = 0.85,
    background: Background = "gray",
    row_labels: Sequence[str] | None = None,
    caption: str | None = None,
    units: str = "target units",
    cmap: str = DIVERGING_CMAP,
) -> Figure:
    """The paper's Figure 1 as a grid: per (image, channel) row: image, x*, x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ.

    Args:
        dec: the decomposition (a nested one, :func:`kcore.decompose.decompose_comparison` with
            ``parts="nested"``, gives the columns x⁽⁰⁾ₙ … x⁽ᴷ⁾ₙ).
        image_indices: images (indices into ``dec``), one block of rows each.
        channels: channels of x*, one row per image and channel.
        images: the input images (H, W, 3) for ``image_indices`` (same order); None draws the maps alone.
        scale: ``"map"``: every cell its own limits and small colour bar; ``"image"``: one colour bar per
            row (±max over that row's maps, as :func:`map_limits` ``"image"``); ``"shared"``: one colour bar for
            the whole grid (±max over every map shown).
        alpha: opacity of the maps over the images.
        background: see :data:`BACKGROUNDS`.
        row_labels: one label per image (default ``"image i"``).
        caption: provenance line.
        units: unit name for the colour bars (every colour bar is labelled with it).
        cmap: colour map of the maps (:data:`DIVERGING_CMAPS`).

    Returns:
        The grid figure.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}; got {scale!r}.")
    _check_alpha(alpha)
    _check_cmap(cmap)
    image_indices = [int(i) for i in image_indices]
    channels = [int(c) for c in channels]
    if not image_indices or not channels:
        raise ValueError("figure1_grid needs at least one image and one channel.")
    for i in image_indices:
        _check_index(dec, i, None)
    for c in channels:
        _check_index(dec, 0, c)
    if images is not None and len(images) != len(image_indices):
        raise ValueError(f"images must hold one image per index: {len(image_indices)} expected, got {len(images)}.")
    nested = is_nested(dec)  # nested components x⁽ᵏ⁾ₙ of nested fits: labelled as such
    specs = ([MapSpec("target")] + [MapSpec("component", (k,), nested=nested) for k in range(dec.orders + 1)]
             + [MapSpec("residual")])
    rows = [(p, i, c) for p, i in enumerate(image_indices) for c in channels]
    cells = {(i, c, s): feature_map(dec, s, i, c) for _, i, c in rows for s in specs}
    names = ["image"] + [s.tex for s in specs]
    per_map = scale == "map"
    # at most as many cells a line as fit at MIN_CELL_IN: a wider row wraps onto further lines, so that its
    # text has room at TEXT_PT
    side = SIDE_BAR_IN if scale == "shared" else 0.0  # the grid's colour bar with its ticks and units
    fits = max(2, int((GRID_IN - side - 0.35) / MIN_CELL_IN))
    if per_map:  # as many cells a line as leave room for every bar's end numbers and the units' longest word
        ends = [_ends(limits_of(v, True)) for v in cells.values()]
        pitch = max(max(text_width_in(lo) + text_width_in(hi) for lo, hi in ends) + 0.25,  # numbers inside the bar
                    max(text_width_in(w) for w in units.split() or [units]) + 0.06)  # units within the cell's pitch
        fits = max(2, int((GRID_IN - 0.35) / pitch))
    per_line = min(len(names), fits)
    lines = math.ceil(len(names) / per_line)
    cell = min(MAX_CELL_IN, (GRID_IN - side - 0.35) / per_line)
    under = {"map": 0.62, "image": 0.5 / lines, "shared": 0.0}[scale]  # bars under the maps with their text
    title = 0.25
    height = len(rows) * lines * (cell + under) + (lines * title if per_map else title) + 0.2
    fig = Figure(figsize=(cell * per_line + side + 0.35, height), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)  # room for a vertical colour bar's end numbers above and below
    axes = fig.subplots(len(rows) * lines, per_line, squeeze=False)
    shared = limits_of(list(cells.values()), True) if scale == "shared" else None

    def at(r: int, j: int):
        return axes[r * lines + j // per_line, j % per_line]

    for r in range(len(rows)):
        for j in range(len(names), lines * per_line):
            at(r, j).set_visible(False)
    for r, (p, i, c) in enumerate(rows):
        img = images[p] if images is not None else None
        ax0 = at(r, 0)
        if img is not None:
            ax0.imshow(_as_rgb(img), interpolation="antialiased")
        ax0.set_xticks([])
        ax0.set_yticks([])
        label = row_labels[p] if row_labels is not None else f"image {i}"
        ax0.set_ylabel(_row_label(label, c, cell), fontsize=TEXT_PT, linespacing=1.1)
        if per_map:  # an invisible bar keeps the image the size of the maps beside it
            fig.colorbar(ScalarMappable(cmap=cmap), ax=ax0, orientation="horizontal", fraction=0.08,
                         pad=0.02, aspect=12).ax.set_visible(False)
        row_lim = limits_of([cells[(i, c, s)] for s in specs], True) if scale == "image" else shared
        for j, s in enumerate(specs, start=1):
            ax = at(r, j)
            lim = row_lim if row_lim is not None else limits_of(cells[(i, c, s)], True)
            norm = _norm(lim)
            _draw_overlay(ax, img, cells[(i, c, s)], norm, cmap, alpha, background)
            if per_map:
                cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal",
                                  fraction=0.08, pad=0.02, aspect=12)
                _end_ticks(cb, lim, cell)
                cb.set_label(fold_text(units, 0.85 * cell), fontsize=TEXT_PT, labelpad=1, linespacing=1.05)
        if scale == "image":  # one bar under the row's maps
            cb = fig.colorbar(ScalarMappable(norm=_norm(row_lim), cmap=cmap), ax=[at(r, j) for j in range(1, len(names))],
                              orientation="horizontal", shrink=0.6, aspect=30, pad=0.02)
            cb.ax.tick_params(labelsize=TEXT_PT, pad=1.5)
            cb.set_label(units, fontsize=TEXT_PT, labelpad=1)
    if scale == "shared":
        tall = len(rows) * lines * cell
        cb = fig.colorbar(ScalarMappable(norm=_norm(shared), cmap=cmap), ax=[a for a in axes.ravel() if a.images
                                                                            and a is not axes[0, 0]],
                          shrink=0.8, aspect=25, pad=0.01)
        cb.ax.tick_params(labelsize=TEXT_PT)
        cb.set_label(fold_text(units, 0.8 * tall), fontsize=TEXT_PT, linespacing=1.05)
    for j, name in enumerate(names):  # column titles over the first row (over each of its lines when wrapped)
        at(0, j).set_title(name, fontsize=TITLE_PT)
    _caption(fig, caption)
    return fig


GRID_IN = 6.3
"""The widest Figure 1 grid, in inches: its TEXT_PT text is then >= 11 px where a 1024 px window shows it."""
MAX_CELL_IN = 1.25
"""The largest map in the grid, in inches (few columns get no bigger maps than this)."""
SIDE_BAR_IN = 0.95
"""Room for the shared colour bar beside the maps (bar, tick labels, units), in inches."""
MIN_CELL_IN = 0.85
"""The smallest map in the grid, in inches (a row of more maps wraps onto further lines; per map, each map's
colour bar with its numbers and units may ask for more)."""


def _chars(inches: float) -> int:
    """About how many TEXT_PT characters fit in ``inches``."""
    return max(4, int(inches * 72 / (0.64 * TEXT_PT)))  # DejaVu Sans digits are 0.64 em wide


def _row_label(label: str, channel: int, inches: float) -> str:
    """The row's label (image id and channel), wrapped at "/" and spaces to the height of a cell."""
    width = _chars(inches)
    parts, line = [], ""
    pieces = [w[k:k + width] for w in re.split(r"(?<=/)|(?= )", str(label)) for k in range(0, max(len(w), 1), width)]
    for piece in pieces:
        if line and len(line) + len(piece) > width:
            parts.append(line.strip())
            line = piece
        else:
            line += piece
    parts.append(line.strip())
    return "\n".join([p for p in parts if p] + [f"ch {channel}"])


def _ends(lim: tuple[float, float]) -> tuple[str, str]:
    return _short(lim[0]), _short(lim[1])


def _end_ticks(cb, lim: tuple[float, float], inches: float) -> None:
    """A per-map colour bar's numbers: −m and m with the ends aligned inwards (neighbouring bars never touch),
    and 0 between them where it has room."""
    lo, hi = _ends(lim)
    free = 0.9 * inches - text_width_in(lo) - text_width_in(hi)
    mid = "0" if free >= text_width_in("0") + 0.2 else ""
    cb.set_ticks([lim[0], 0.0, lim[1]], labels=[lo, mid, hi])
    cb.ax.tick_params(labelsize=TEXT_PT, pad=1.5)
    first, _, last = cb.ax.xaxis.get_major_ticks()
    first.label1.set_horizontalalignment("left")
    last.label1.set_horizontalalignment("right")


def _short(v: float) -> str:
    """A colour-bar limit in at most five characters: ``0.12``, ``3.4``, ``120``, ``2e+03``."""
    a = abs(v)
    s = f"{v:.2g}" if a < 10 else f"{v:.0f}" if a < 1000 else f"{v:.0e}"
    return s.replace("-", "−")
