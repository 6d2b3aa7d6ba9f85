"""The paper's Figure 1 as a grid: per (image, channel) row the image, x*, x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ over it."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from kcore.decompose import Decomposition
from kcore.viz.maps import MapSpec, _check_index, feature_map
from kcore.viz.overlays import _as_rgb, _draw_overlay
from kcore.viz.style import (
    DIVERGING_CMAP,
    SCALES,
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
        dec: the decomposition.
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
    specs = [MapSpec("target")] + [MapSpec("component", (k,)) for k in range(dec.orders + 1)] + [MapSpec("residual")]
    rows = [(p, i, c) for p, i in enumerate(image_indices) for c in channels]
    cells = {(i, c, s): feature_map(dec, s, i, c) for _, i, c in rows for s in specs}
    ncols = len(specs) + 1
    cell = 1.25
    extra = 0.35 if scale == "map" else 0.0
    fig = Figure(figsize=(cell * ncols + 1.0, (cell + extra) * len(rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(rows), ncols, squeeze=False)
    shared = limits_of(list(cells.values()), True) if scale == "shared" else None
    for r, (p, i, c) in enumerate(rows):
        img = images[p] if images is not None else None
        ax0 = axes[r, 0]
        if img is not None:
            ax0.imshow(_as_rgb(img), interpolation="antialiased")
        ax0.set_xticks([])
        ax0.set_yticks([])
        label = row_labels[p] if row_labels is not None else f"image {i}"
        ax0.set_ylabel(f"{label}\nch {c}", fontsize=7)
        if scale == "map":  # an invisible bar keeps the image the size of the maps beside it
            fig.colorbar(ScalarMappable(cmap=cmap), ax=ax0, orientation="horizontal", fraction=0.08,
                         pad=0.02, aspect=12).ax.set_visible(False)
        row_lim = limits_of([cells[(i, c, s)] for s in specs], True) if scale == "image" else shared
        for j, s in enumerate(specs, start=1):
            ax = axes[r, j]
            lim = row_lim if row_lim is not None else limits_of(cells[(i, c, s)], True)
            norm = _norm(lim)
            _draw_overlay(ax, img, cells[(i, c, s)], norm, cmap, alpha, background)
            if scale == "map":
                cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, orientation="horizontal",
                                  fraction=0.08, pad=0.02, aspect=12)
                cb.ax.tick_params(labelsize=5)
                cb.set_ticks([lim[0], 0.0, lim[1]])
                cb.ax.xaxis.set_major_formatter(_fmt())
                cb.set_label(units, fontsize=5, labelpad=1)
        if scale == "image":
            norm = _norm(row_lim)
            cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[r, 1:]), shrink=0.9,
                              aspect=8, pad=0.01)
            cb.ax.tick_params(labelsize=6)
            cb.set_label(units, fontsize=6)
    if scale == "shared":
        cb = fig.colorbar(ScalarMappable(norm=_norm(shared), cmap=cmap), ax=list(axes[:, 1:].ravel()),
                          shrink=0.8, aspect=25, pad=0.01)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(units, fontsize=7)
    for j, s in enumerate(["image"] + [s.tex for s in specs]):
        axes[0, j].set_title(s, fontsize=9)
    _caption(fig, caption)
    return fig


def _fmt():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:.2g}")
