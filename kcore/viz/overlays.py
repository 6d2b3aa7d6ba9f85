"""Maps over their images: the blended raster, the Explorer's figure (matplotlib and interactive Plotly) and
side-by-side panels.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from kcore.decompose import Decomposition
from kcore.viz.maps import MapSpec, feature_cells, feature_map, map_limits, upsample
from kcore.viz.style import (
    BACKGROUNDS,
    CAPTION_PT,
    DIVERGING_CMAP,
    SCALE_NAMES,
    SEQUENTIAL_CMAP,
    TEXT_PT,
    TITLE_PT,
    Background,
    Scale,
    _caption,
    _caption_width,
    _check_alpha,
    _check_cmap,
    _norm,
    _np,
    _wrap,
    limits_of,
    plotly_colorscale,
)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W, 3) RGB (uint8 or float in [0, 1]); got shape {img.shape}.")
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[..., :3]
    if img.dtype == np.uint8:
        return img.astype(np.float64) / 255.0
    return np.clip(img.astype(np.float64), 0.0, 1.0)


def _background(image: np.ndarray | None, background: Background, size: tuple[int, int]) -> np.ndarray:
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {sorted(BACKGROUNDS)}; got {background!r}.")
    if image is None or background == "none":
        return np.ones((*size, 3))
    rgb = _as_rgb(image)
    if background == "gray":
        grey = rgb @ np.array([0.299, 0.587, 0.114])
        rgb = np.repeat(grey[..., None], 3, axis=2)
    return rgb


def blend_overlay(
    image: np.ndarray | None,
    map2d: np.ndarray | torch.Tensor,
    norm: mcolors.Normalize,
    cmap: str,
    alpha: float,
    background: Background = "gray",
) -> np.ndarray:
    """The map upsampled (bilinear) to the image, colour-mapped and alpha-blended over the background.

    Args:
        image: the input image (H, W, 3); None gives the colour-mapped map alone (at full opacity).
        map2d: the map (h, w) at feature resolution.
        norm: maps values to [0, 1] for ``cmap`` (values outside take the colour map's ends).
        cmap: a matplotlib colour-map name.
        alpha: opacity of the map, in [0, 1] (ignored, i.e. 1, when there is no image under it).
        background: see :data:`BACKGROUNDS`.

    Returns:
        (H, W, 3) float RGB in [0, 1]: ``(1 - alpha) · background + alpha · cmap(norm(map))``. One raster,
        so a figure draws (and a PDF/SVG embeds) one image instead of two layers.
    """
    _check_alpha(alpha)
    m = _np(map2d)
    size = (m.shape[0], m.shape[1]) if image is None else np.asarray(image).shape[:2]
    under = _background(image, background, size)
    colours = colormaps[cmap](norm(upsample(m, size)))[..., :3]
    if image is None or background == "none":
        return colours
    return (1.0 - alpha) * under + alpha * colours


def _draw_overlay(ax, image, map2d, norm, cmap, alpha, background) -> None:
    ax.imshow(blend_overlay(image, map2d, norm, cmap, alpha, background), interpolation="antialiased")
    ax.set_xticks([])
    ax.set_yticks([])


def _hide_axis_lines(ax) -> None:
    """No tick machinery on an image axes (the frame stays): even empty tick machinery costs drawing time."""
    ax.xaxis.set_visible(False)
    ax.yaxis.set_visible(False)


def overlay_figure(
    image: np.ndarray | None,
    map2d: np.ndarray | torch.Tensor,
    *,
    limits: tuple[float, float] | None = None,
    signed: bool = True,
    alpha: float = 0.6,
    background: Background = "gray",
    title: str | None = None,
    colorbar_label: str | None = None,
    caption: str | None = None,
    size_inches: tuple[float, float] = (4.2, 3.6),
    cmap: str = DIVERGING_CMAP,
) -> Figure:
    """A feature map upsampled (bilinear) to the image and overlaid on it, with a colour bar.

    Args:
        image: the input image (H, W, 3) RGB, uint8 or float in [0, 1]; None draws the map alone.
        map2d: the map (h, w) at feature resolution.
        limits: colour limits; default :func:`limits_of` the map itself (symmetric when ``signed``).
        signed: diverging map centred at 0 (components) or sequential from 0 (energies).
        alpha: opacity of the map over the image, in [0, 1].
        background: see :data:`BACKGROUNDS`.
        title: axes title.
        colorbar_label: label of the colour bar (units).
        caption: small provenance line under the figure (which checkpoints, layers, fit).
        size_inches: figure size.
        cmap: colour map of signed maps (:data:`DIVERGING_CMAPS`); unsigned ones use :data:`SEQUENTIAL_CMAP`.

    Returns:
        The figure: one image axes and one colour bar whose limits are ``limits``.
    """
    _check_alpha(alpha)
    _check_cmap(cmap)
    lim = limits_of(map2d, signed) if limits is None else limits
    norm = _norm(lim)
    cmap = cmap if signed else SEQUENTIAL_CMAP
    fig = Figure(figsize=size_inches)
    shape = np.shape(map2d) if image is None else np.shape(image)
    ax, cax = _overlay_axes(fig, shape[0] / shape[1], title, caption)
    _draw_overlay(ax, image, map2d, norm, cmap, alpha, background)
    _hide_axis_lines(ax)
    if title:
        ax.set_title(title, fontsize=TITLE_PT, y=1.0, pad=4)  # a fixed y skips matplotlib's search for tick labels
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.ax.tick_params(labelsize=TEXT_PT)
    if colorbar_label:  # along the bar, on a second line where it is longer than the bar
        height = cax.get_position().height * fig.get_figheight()
        cb.set_label(fold_text(colorbar_label, height), fontsize=TEXT_PT, linespacing=1.1)
    _caption(fig, caption)
    return fig


def text_width_in(text: str, size: float = TEXT_PT) -> float:
    """The width of one line of ``text`` at ``size`` points, in inches (measured with matplotlib's own font)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    return TextToPath().get_text_width_height_descent(text, FontProperties(size=size), ismath=False)[0] / 72


def fold_text(text: str, inches: float, size: float = TEXT_PT) -> str:
    """``text`` wrapped at its spaces into lines at most ``inches`` long at ``size`` points (a longer word
    keeps its own line)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width_in(f"{lines[-1]} {word}", size) <= inches:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return "\n".join(lines) or text


def _overlay_axes(fig: Figure, aspect: float, title: str | None, caption: str | None):
    """Image and colour-bar axes of an overlay, placed in inches from the text around them.

    A fixed layout instead of matplotlib's constrained layout, which measures every text twice and was a
    third of a redraw. Margins: the title's lines above, the wrapped caption's lines below, the colour bar
    with its tick labels and label on the right; the image keeps its aspect ratio (height / width).
    """
    w, h = fig.get_size_inches()
    line = 1.25 / 72  # inches a line of one point takes
    top = 0.1 + (line * TITLE_PT * (title.count("\n") + 1) if title else 0.0)
    lines = _wrap(caption, _caption_width(fig)).count("\n") + 1 if caption else 0
    bottom = 0.1 + line * CAPTION_PT * 1.05 * lines + (line * TEXT_PT / 2 if lines else 0.0)  # + the bar's end number
    # right: gap, colour bar, tick labels (up to "−0.0012"), its label on up to two lines
    left, right = 0.1, 0.1 + 0.12 + 0.06 + text_width_in("−0.0012") + 2 * line * TEXT_PT + 0.08
    avail_w, avail_h = w - left - right, h - top - bottom
    ax_h = min(avail_h, avail_w * aspect)
    ax_w = ax_h / aspect
    x0, y0 = left + (avail_w - ax_w) / 2, bottom + (avail_h - ax_h) / 2
    ax = fig.add_axes((x0 / w, y0 / h, ax_w / w, ax_h / h))
    cax = fig.add_axes(((x0 + ax_w + 0.1) / w, (y0 + 0.05 * ax_h) / h, 0.12 / w, 0.9 * ax_h / h), label="<colorbar>")
    return ax, cax


def component_overlay(
    dec: Decomposition,
    spec: MapSpec,
    image_index: int,
    channel: int | None,
    image: np.ndarray | None = None,
    *,
    scale: Scale = "map",
    images: Sequence[int] | None = None,
    alpha: float = 0.6,
    background: Background = "gray",
    image_label: str | None = None,
    caption: str | None = None,
    units: str = "target units",
    cmap: str = DIVERGING_CMAP,
) -> Figure:
    """The explorer's figure: one map of ``dec`` (``spec`` at ``image_index``, ``channel``) over its image.

    Limits follow :func:`map_limits` with ``scale`` (and ``images`` for ``"shared"``). See
    :func:`overlay_figure` for the drawing.
    """
    m, lim, title, label = _overlay_parts(dec, spec, image_index, channel, scale, images, image_label, units, tex=True)
    return overlay_figure(
        image, m, limits=lim, signed=spec.signed, alpha=alpha, background=background, title=title,
        colorbar_label=label, caption=caption, cmap=cmap,
    )


def _overlay_parts(dec, spec, image_index, channel, scale, images, image_label, units, tex):
    """(map, limits, title, colour-bar label) of one Explorer map; the title in mathtext or in Unicode."""
    m = feature_map(dec, spec, image_index, channel)
    lim = map_limits(dec, spec, image_index, channel, scale, images)
    where = f"channel {channel}" if spec.kind != "blind_spot" else "all channels"
    title = f"{spec.tex if tex else spec.label} · {where}" + (f"\n{image_label}" if image_label else "")
    unit = f"({units})²" if spec.kind == "blind_spot" else units
    return m, lim, title, f"{unit} · scale: {SCALE_NAMES[scale]}"


def component_overlay_interactive(
    dec: Decomposition,
    spec: MapSpec,
    image_index: int,
    channel: int | None,
    image: np.ndarray | None = None,
    *,
    scale: Scale = "map",
    images: Sequence[int] | None = None,
    alpha: float = 0.6,
    background: Background = "gray",
    image_label: str | None = None,
    units: str = "target units",
    height: int = 420,
    cmap: str = DIVERGING_CMAP,
):
    """:func:`component_overlay` as an interactive Plotly figure (the dashboard's Explorer).

    The same map, limits, colour map, opacity and background as the matplotlib figure; the browser draws
    it (the server only sends the arrays, much cheaper than rendering a PNG) and shows each
    pixel's value on hover. The map is drawn as a heat map over the (grey) image with opacity ``alpha``;
    exports use :func:`component_overlay`.

    Hovering a pixel shows its value with the units and the feature-map cell (row, column of the h × w map
    at feature resolution) it was upsampled from.

    Returns:
        A ``plotly.graph_objects.Figure``: an ``Image`` trace (the background, absent without an image or
        with ``background="none"``) and a ``Heatmap`` trace whose ``zmin``/``zmax`` are the limits.
    """
    m, lim, title, label = _overlay_parts(dec, spec, image_index, channel, scale, images, image_label, units, tex=False)
    unit = f"({units})²" if spec.kind == "blind_spot" else units
    return map_view_interactive(m, lim, image, title=title, colorbar_label=label, unit=unit, value_label=spec.label,
                                signed=spec.signed, alpha=alpha, background=background, cmap=cmap, height=height)


def map_view_interactive(
    m: np.ndarray | torch.Tensor,
    limits: tuple[float, float],
    image: np.ndarray | None = None,
    *,
    title: str = "",
    colorbar_label: str = "",
    unit: str = "",
    value_label: str = "value",
    signed: bool = True,
    alpha: float = 0.6,
    background: Background = "gray",
    cmap: str = DIVERGING_CMAP,
    height: int = 420,
):
    """One feature map (h, w) as an interactive Plotly view over its image (the Explorer's panels).

    Hovering a pixel shows ``value_label = value unit``, the feature-map cell (row, column of the h × w map)
    it was upsampled from, and the pixel.
    """
    import plotly.graph_objects as go

    _check_alpha(alpha)
    _check_cmap(cmap)
    m = _np(m)
    size = m.shape if image is None else np.asarray(image).shape[:2]
    cells = feature_cells(m.shape, size)
    under = _background(image, background, size)
    fig = go.Figure()
    opacity = 1.0
    if image is not None and background != "none":
        fig.add_trace(go.Image(z=np.round(under * 255).astype(np.uint8), hoverinfo="skip", name="image"))
        opacity = float(alpha)
    fig.add_trace(go.Heatmap(
        z=upsample(m, size), zmin=limits[0], zmax=limits[1],
        colorscale=plotly_colorscale(cmap if signed else SEQUENTIAL_CMAP),
        opacity=opacity, name=value_label, customdata=cells,
        colorbar={"title": {"text": colorbar_label, "side": "right", "font": {"size": 11}}, "thickness": 12, "len": 0.9},
        hovertemplate=(f"{value_label} = %{{z:.4g}} {unit}<br>feature cell (row %{{customdata[0]}}, col "
                       f"%{{customdata[1]}}) of {m.shape[0]}×{m.shape[1]}<br>pixel (x %{{x}}, y %{{y}})<extra></extra>"),
    ))
    fig.update_xaxes(visible=False, constrain="domain")
    fig.update_yaxes(visible=False, autorange="reversed", scaleanchor="x", constrain="domain")
    # the title sits left and the mode bar top right, in a band of its own above the plot
    text = title.replace("\n", "<br>").replace("x^Δ", "x<sup>Δ</sup>")  # rendered as a superscript
    fig.update_layout(title={"text": text, "font": {"size": 13}, "x": 0.0, "xanchor": "left",
                             "y": 0.97, "yanchor": "top"},
                      height=height, margin={"l": 0, "r": 0, "t": 76, "b": 0}, plot_bgcolor="white")
    return fig


def side_by_side_figure(
    panels: Sequence[tuple[np.ndarray | torch.Tensor, str, str]],
    image: np.ndarray | None = None,
    *,
    alpha: float = 0.6,
    background: Background = "gray",
    cmap: str = DIVERGING_CMAP,
    caption: str | None = None,
    panel_inches: float = 3.2,
) -> Figure:
    """Several signed maps of one image next to each other, each over the image with its own colour bar
    (e.g. A's feature x and B's feature x* of the same image: the Explorer's A-vs-B view).

    Args:
        panels: ``(map2d (h, w), title, colour-bar label)`` per panel; each gets limits ±max|map|.
        image: the input image (H, W, 3); None draws the maps alone.
        alpha, background, cmap: as in :func:`overlay_figure`.
        caption: optional provenance line under the figure.
    """
    _check_alpha(alpha)
    _check_cmap(cmap)
    if not panels:
        raise ValueError("side_by_side_figure needs at least one panel (map, title, colour-bar label).")
    fig = Figure(figsize=(panel_inches * len(panels) + 0.6, panel_inches * 0.95 + 0.3), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.1)  # room for the colour bars' end numbers above and below
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (m, title, label) in zip(axes, panels):
        lim = limits_of(m, True)
        norm = _norm(lim)
        _draw_overlay(ax, image, m, norm, cmap, alpha, background)
        _hide_axis_lines(ax)
        ax.set_title(title, fontsize=TITLE_PT)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.85, pad=0.02)
        cb.ax.tick_params(labelsize=TEXT_PT)
        cb.set_label(fold_text(label, 0.8 * panel_inches), fontsize=TEXT_PT, linespacing=1.1)
    _caption(fig, caption)
    return fig
