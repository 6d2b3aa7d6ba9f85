"""Which map of a decomposition to draw (:class:`MapSpec`), its values at feature resolution and its colour limits.

A map is one channel of x*, x⁽ᵏ⁾ (or a sum of orders), g(x) or x^Δ, or the blind-spot energy over all
channels; :func:`map_limits` gives the limits a scaling (:data:`~kcore.viz.style.SCALES`) assigns it, and
:func:`upsample` brings it to the image's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from kcore.conventions import resample
from kcore.decompose import Decomposition
from kcore.viz.style import SCALES, Scale, _np, limits_of, nested_label, order_label

MapKind = Literal["component", "target", "output", "residual", "blind_spot"]
MAP_KINDS: dict[str, str] = {
    "component": "x⁽ᵏ⁾, or a sum of chosen orders: the part of x* that A reconstructs at those orders",
    "target": "x*: the target network's feature, which g_θ reconstructs",
    "output": "g(x) = x⁽⁰⁾ + … + x⁽ᴷ⁾: everything the source network reconstructs",
    "residual": "x^Δ = x* − g(x): what the source network cannot reconstruct",
    "blind_spot": "blind-spot energy: mean over channels of (x^Δ)², where the source network fails",
}
"""Valid map kinds and what each shows."""


@dataclass(frozen=True)
class MapSpec:
    """Which map of a decomposition to draw.

    Attributes:
        kind: one of :data:`MAP_KINDS`.
        orders: for ``"component"``: the orders summed, e.g. ``(1,)`` for x⁽¹⁾ or ``(0, 1)`` for x⁽⁰⁾ + x⁽¹⁾.
        nested: for ``"component"``: the nested components x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x) of nested fits (a
            decomposition from :func:`kcore.decompose.decompose_comparison` with ``parts="nested"``) instead of
            the Eq. 3–4 split of one g_θ; x⁽⁰⁾ₙ + … + x⁽ᵏ⁾ₙ = gₖ(x). A map refuses a decomposition of the other kind.
    """

    kind: MapKind = "component"
    orders: tuple[int, ...] = (0,)
    nested: bool = False

    def __post_init__(self) -> None:
        if self.kind not in MAP_KINDS:
            raise ValueError(f"kind must be one of {sorted(MAP_KINDS)}; got {self.kind!r}.")
        if self.kind == "component":
            if not self.orders:
                raise ValueError("orders must name at least one order for kind='component', e.g. orders=(0,).")
            if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0 for k in self.orders):
                raise ValueError(f"orders must be non-negative integers; got {self.orders!r}.")
            object.__setattr__(self, "orders", tuple(sorted({int(k) for k in self.orders})))
        if not isinstance(self.nested, bool):
            raise TypeError(f"nested must be True or False; got {self.nested!r}.")
        if self.nested and self.kind != "component":
            raise ValueError(f"nested=True applies to kind='component' only (x*, g(x), x^Δ and the blind-spot "
                             f"energy are the same for both decompositions); got kind={self.kind!r}. "
                             "Fix: pass nested=False.")

    @property
    def signed(self) -> bool:
        """True for maps drawn with the diverging colour map around zero."""
        return self.kind != "blind_spot"

    @property
    def label(self) -> str:
        """Short mathematical label, e.g. ``"x⁽⁰⁾+x⁽¹⁾"`` or ``"x^Δ"``."""
        if self.kind == "component":
            return "+".join((nested_label if self.nested else order_label)(k) for k in self.orders)
        return {"target": "x*", "output": "g(x)", "residual": "x^Δ", "blind_spot": "mean_c (x^Δ)²"}[self.kind]

    @property
    def tex(self) -> str:
        """The figure label: :attr:`label` (plain Unicode, so an SVG export keeps it as one searchable text)."""
        return self.label

    @property
    def slug(self) -> str:
        """File-name friendly label, e.g. ``"x0+1"``, ``"target"``."""
        if self.kind == "component":
            return ("xn" if self.nested else "x") + "+".join(str(k) for k in self.orders)
        return self.kind


def is_nested(dec: Decomposition) -> bool:
    """Whether ``dec`` holds nested components (:func:`kcore.fit.nested_decompose`) rather than the Eq. 3–4 split."""
    return dec.meta.get("kind") == "nested"


def _check_index(dec: Decomposition, image: int, channel: int | None) -> None:
    n, c = dec.target.shape[:2]
    if not 0 <= image < n:
        raise ValueError(f"image must be an index in [0, {n - 1}] of the decomposition's {n} images; got {image}.")
    if channel is not None and not 0 <= channel < c:
        raise ValueError(f"channel must be in [0, {c - 1}] (x* has {c} channels); got {channel}.")


def _check_orders(dec: Decomposition, spec: MapSpec) -> None:
    if spec.kind == "component" and max(spec.orders) > dec.orders:
        raise ValueError(f"orders {spec.orders} go beyond K = {dec.orders} of this fit; valid orders are 0…{dec.orders}.")
    if spec.kind == "component" and spec.nested != is_nested(dec):
        have = "nested components" if is_nested(dec) else "the Eq. 3–4 split of one g_θ"
        raise ValueError(f"spec {spec.label} has nested={spec.nested}, but the decomposition holds {have}. Fix: "
                         f"pass MapSpec('component', {spec.orders}, nested={is_nested(dec)}), or the other "
                         "decomposition (kcore.decompose.decompose_comparison's parts).")


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
    members += [MapSpec("component", (k,), nested=is_nested(dec)) for k in range(dec.orders + 1)]
    if spec not in members:
        members.append(spec)
    return [_maps(dec, m, channel) for m in members]


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


def feature_cells(map_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """For each pixel of an ``size`` (H, W) upsampled map: the (row, column) of the ``map_shape`` (h, w)
    feature-map cell it lies in, as an ``(H, W, 2)`` int array (what the Explorer's hover shows)."""
    h, w = int(map_shape[0]), int(map_shape[1])
    H, W = int(size[0]), int(size[1])
    rows = np.minimum((np.arange(H) * h) // max(H, 1), h - 1)
    cols = np.minimum((np.arange(W) * w) // max(W, 1), w - 1)
    return np.stack(np.broadcast_arrays(rows[:, None], cols[None, :]), axis=-1).astype(np.int32)
