"""Figures of a knowledge-consistency result: overlays, variance bars, loss curves, channel shares, Figure 1.

Every function returns a :class:`matplotlib.figure.Figure` built with the object-oriented API (no pyplot,
no global state, never shown), so the dashboard displays and :mod:`kcore.export` saves the very same
object, offline, as PNG, SVG or PDF.

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
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kcore.conventions import resample
from kcore.decompose import Decomposition
from kcore.metrics import VarianceReport

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

MapKind = Literal["component", "target", "output", "residual", "blind_spot"]
MAP_KINDS: dict[str, str] = {
    "component": "x⁽ᵏ⁾, or a sum of chosen orders: the part of x* that A reconstructs at those orders",
    "target": "x*: the target network's feature, which g_θ reconstructs",
    "output": "g(x) = x⁽⁰⁾ + … + x⁽ᴷ⁾: everything the source network reconstructs",
    "residual": "x^Δ = x* − g(x): what the source network cannot reconstruct",
    "blind_spot": "blind-spot energy: mean over channels of (x^Δ)², where the source network fails",
}
"""Valid map kinds and what each shows."""

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
    """``3 -> "$x^{(3)}$"`` (matplotlib mathtext, for figures)."""
    return f"$x^{{({k})}}$"


RESIDUAL_TEX = r"$x^{\Delta}$"
TARGET_TEX = r"$x^{*}$"


@dataclass(frozen=True)
class MapSpec:
    """Which map of a decomposition to draw.

    Attributes:
        kind: one of :data:`MAP_KINDS`.
        orders: for ``"component"``: the orders summed, e.g. ``(1,)`` for x⁽¹⁾ or ``(0, 1)`` for x⁽⁰⁾ + x⁽¹⁾.
    """

    kind: MapKind = "component"
    orders: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"kind must be one of {sorted(MAP_KINDS)}; got {self.kind!r}.")
        if self.kind == "component":
            if not self.orders:
                raise ValueError("orders must name at least one order for kind='component', e.g. orders=(0,).")
            if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in self.orders):
                raise ValueError(f"orders must be non-negative integers; got {self.orders!r}.")
            object.__setattr__(self, "orders", tuple(sorted({int(k) for k in self.orders})))

    @property
    def signed(self) -> bool:
        """True for maps drawn with the diverging colour map around zero."""
        return self.kind != "blind_spot"

    @property
    def label(self) -> str:
        """Short mathematical label, e.g. ``"x⁽⁰⁾+x⁽¹⁾"`` or ``"x^Δ"``."""
        if self.kind == "component":
            return "+".join(order_label(k) for k in self.orders)
        return {"target": "x*", "output": "g(x)", "residual": "x^Δ", "blind_spot": "mean_c (x^Δ)²"}[self.kind]

    @property
    def tex(self) -> str:
        """The label in matplotlib mathtext, e.g. ``"$x^{(0)}$+$x^{(1)}$"``."""
        if self.kind == "component":
            return "+".join(order_tex(k) for k in self.orders)
        return {"target": TARGET_TEX, "output": r"$g(x)$", "residual": RESIDUAL_TEX,
                "blind_spot": r"mean$_c\,(x^{\Delta})^2$"}[self.kind]

    @property
    def slug(self) -> str:
        """File-name friendly label, e.g. ``"x0+1"``, ``"target"``."""
        if self.kind == "component":
            return "x" + "+".join(str(k) for k in self.orders)
        return self.kind


def _np(t: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


def _check_index(dec: Decomposition, image: int, channel: int | None) -> None:
    n, c = dec.target.shape[:2]
    if not 0 <= image < n:
        raise ValueError(f"image must be an index in [0, {n - 1}] of the decomposition's {n} images; got {image}.")
    if channel is not None and not 0 <= channel < c:
        raise ValueError(f"channel must be in [0, {c - 1}] (x* has {c} channels); got {channel}.")


def _check_orders(dec: Decomposition, spec: MapSpec) -> None:
    if spec.kind == "component" and max(spec.orders) > dec.orders:
        raise ValueError(f"orders {spec.orders} go beyond K = {dec.orders} of this fit; valid orders are 0…{dec.orders}.")


def blind_spot_energy(residual: torch.Tensor) -> torch.Tensor:
    """Channel-aggregated blind-spot map: mean over channels of (x^Δ)².

    Args:
        residual: x^Δ, (N, C, H, W).

    Returns:
        (N, H, W), non-negative, in squared target units.
    """
    if residual.dim() != 4:
        raise ValueError(f"residual must be (N, C, H, W); got shape {tuple(residual.shape)}.")
    return (residual.double() ** 2).mean(1)


def _maps(dec: Decomposition, spec: MapSpec, channel: int | None) -> torch.Tensor:
    """(N, H, W) of ``spec`` at ``channel`` for every image of ``dec``."""
    _check_orders(dec, spec)
    if spec.kind == "blind_spot":
        return blind_spot_energy(dec.residual)
    if channel is None:
        raise ValueError(f"channel is required for {spec.label} (only the blind-spot map aggregates channels).")
    if spec.kind == "component":
        return sum(dec.components[k][:, channel].double() for k in spec.orders)
    if spec.kind == "target":
        return dec.target[:, channel].double()
    if spec.kind == "residual":
        return dec.residual[:, channel].double()
    return sum(c[:, channel].double() for c in dec.components)  # output


def feature_map(dec: Decomposition, spec: MapSpec, image: int, channel: int | None) -> np.ndarray:
    """One map at feature resolution.

    Args:
        dec: the decomposition of some images.
        spec: which map.
        image: index into ``dec``'s images.
        channel: channel of x* (ignored by ``"blind_spot"``, which aggregates all channels).

    Returns:
        (H, W) float64 array in the fit's target units (squared for the blind-spot energy).
    """
    _check_index(dec, image, channel if spec.kind != "blind_spot" else None)
    return _np(_maps(dec, spec, channel)[image])


def _family(dec: Decomposition, spec: MapSpec, channel: int | None) -> list[torch.Tensor]:
    """The maps that share limits with ``spec`` under the "image" and "shared" scalings, each (N, H, W)."""
    if not spec.signed:
        return [_maps(dec, spec, channel)]
    members = [MapSpec("target"), MapSpec("output"), MapSpec("residual")]
    members += [MapSpec("component", (k,)) for k in range(dec.orders + 1)]
    if spec not in members:
        members.append(spec)
    return [_maps(dec, m, channel) for m in members]


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


def map_limits(
    dec: Decomposition,
    spec: MapSpec,
    image: int,
    channel: int | None,
    scale: Scale = "map",
    images: Sequence[int] | None = None,
) -> tuple[float, float]:
    """Colour limits of one map under a scaling (:data:`SCALES`).

    Args:
        dec: the decomposition.
        spec: the map drawn.
        image: its image (index into ``dec``).
        channel: its channel (ignored for the blind-spot energy).
        scale: ``"map"``: ±max|this map|; ``"image"``: ±max over x*, every x⁽ᵏ⁾, g(x), x^Δ (and ``spec``) of
            this image and channel; ``"shared"``: the same over ``images`` (default: every image of ``dec``).
            The blind-spot energy is one map per image: ``"image"`` equals ``"map"``, and ``"shared"`` takes
            the maximum over ``images``.
        images: the images that share limits under ``"shared"``.

    Returns:
        ``(vmin, vmax)``: symmetric around 0 for signed maps, ``(0, max)`` for the energy.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}; got {scale!r}.")
    ch = channel if spec.kind != "blind_spot" else None
    _check_index(dec, image, ch)
    if scale == "map":
        return limits_of(feature_map(dec, spec, image, channel), spec.signed)
    family = _family(dec, spec, channel)
    if scale == "image":
        return limits_of([f[image] for f in family], spec.signed)
    sel = list(range(dec.target.shape[0])) if images is None else [int(i) for i in images]
    for i in sel:
        _check_index(dec, i, None)
    idx = torch.as_tensor(sel, dtype=torch.long)
    return limits_of([f[idx] for f in family], spec.signed)


def upsample(map2d: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Resample a feature map (H, W) to the image size ``(H_img, W_img)`` bilinearly (``align_corners=False``).

    The same resampling :mod:`kcore.conventions` uses for features (antialiased when shrinking).
    """
    a = torch.as_tensor(_np(map2d))
    if a.dim() != 2:
        raise ValueError(f"map2d must be 2-D (H, W); got shape {tuple(a.shape)}.")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be (H, W) with positive integers; got {size!r}.")
    out = resample(a[None, None], (int(size[0]), int(size[1])))[0, 0]
    return out.numpy()


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
        fig.supxlabel(_wrap(caption, _caption_width(fig)), fontsize=6, color="0.35", x=0.01, ha="left",
                      linespacing=1.3)


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


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1]; got {alpha}.")


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
        ax.set_title(title, fontsize=9, y=1.0, pad=4)  # a fixed y skips matplotlib's search for tick labels
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
    cb.ax.tick_params(labelsize=7)
    if colorbar_label:
        cb.set_label(colorbar_label, fontsize=8)
    _caption(fig, caption)
    return fig


def _overlay_axes(fig: Figure, aspect: float, title: str | None, caption: str | None):
    """Image and colour-bar axes of an overlay, placed in inches from the text around them.

    A fixed layout instead of matplotlib's constrained layout, which measures every text twice and was a
    third of a redraw. Margins: the title's lines above, the wrapped caption's lines below, the colour bar
    with its tick labels and label on the right; the image keeps its aspect ratio (height / width).
    """
    w, h = fig.get_size_inches()
    top = 0.1 + (0.17 * (title.count("\n") + 1) if title else 0.0)
    lines = _wrap(caption, _caption_width(fig)).count("\n") + 1 if caption else 0
    bottom = 0.1 + 0.11 * lines
    left, right = 0.1, 0.95  # right: gap, colour bar, tick labels, label
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
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (m, title, label) in zip(axes, panels):
        lim = limits_of(m, True)
        norm = _norm(lim)
        _draw_overlay(ax, image, m, norm, cmap, alpha, background)
        _hide_axis_lines(ax)
        ax.set_title(title, fontsize=9)
        cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.85, pad=0.02)
        cb.ax.tick_params(labelsize=7)
        cb.set_label(label, fontsize=8)
    _caption(fig, caption)
    return fig


def feature_cells(map_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """For each pixel of an ``size`` (H, W) upsampled map: the (row, column) of the ``map_shape`` (h, w)
    feature-map cell it lies in, as an ``(H, W, 2)`` int array (what the Explorer's hover shows)."""
    h, w = int(map_shape[0]), int(map_shape[1])
    H, W = int(size[0]), int(size[1])
    rows = np.minimum((np.arange(H) * h) // max(H, 1), h - 1)
    cols = np.minimum((np.arange(W) * w) // max(W, 1), w - 1)
    return np.stack(np.broadcast_arrays(rows[:, None], cols[None, :]), axis=-1).astype(np.int32)


def plotly_colorscale(cmap: str, n: int = 33) -> list[list]:
    """A matplotlib colour map as a Plotly colour scale (``n`` evenly spaced stops, linear in between)."""
    lut = colormaps[cmap](np.linspace(0.0, 1.0, n))[:, :3]
    return [[i / (n - 1), "rgb({:.0f},{:.0f},{:.0f})".format(*(255 * c))] for i, c in enumerate(lut)]


def _order_colours(k_max: int) -> list:
    cmap = mcolors.LinearSegmentedColormap.from_list("orders", ["#1f4e79", "#6aa9d6"])
    return [cmap(k / max(k_max, 1)) for k in range(k_max + 1)]


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


def metric_summary_text(report: VarianceReport, heldout_error: float, baseline: Mapping) -> str:
    """One line of the key numbers of a direction (for captions and tables)."""
    return (
        f"Var(x^Δ)/Var(x*) = {report.instability:.3f} · held-out error {heldout_error:.3f} · "
        f"0-order baseline R² {baseline.get('linear_r2', float('nan')):.3f}, CKA {baseline.get('cka', float('nan')):.3f}"
    )
