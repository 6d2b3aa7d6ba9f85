"""Figures of a knowledge-consistency result: overlays, variance bars, loss curves, channel shares, Figure 1.

Every function returns a :class:`matplotlib.figure.Figure` built with the object-oriented API (no pyplot,
no global state, never shown), so the dashboard displays and :mod:`kcore.export` saves the very same
object, offline, as PNG, SVG or PDF. The interactive Explorer views return Plotly figures.

This package is the face; each concept lives in its module:

- :mod:`kcore.viz.style`: colour maps, the option dicts the UI reads (scalings, backgrounds), labels,
  colour limits and captions shared by every figure;
- :mod:`kcore.viz.maps`: which map of a decomposition to draw (:class:`MapSpec`), its values and limits;
- :mod:`kcore.viz.overlays`: maps over their images (the Explorer's figures, side-by-side panels);
- :mod:`kcore.viz.charts`: variances, instability and shares, loss curves, the per-channel share heatmap;
- :mod:`kcore.viz.gains`: the order-wise gains of nested fits per channel (table and heatmap);
- :mod:`kcore.viz.figure1`: the paper's Figure 1 grid.
"""
from __future__ import annotations

from kcore.viz.charts import (
    NO_VARIANCE,
    SHARE_SORTS,
    ShareSort,
    channel_order,
    channel_share_figure,
    channel_share_table,
    instability_figure,
    loss_figure,
    metric_summary_text,
    share_matrix,
    variance_figure,
)
from kcore.viz.figure1 import figure1_grid
from kcore.viz.gains import (
    GAIN_SORTS,
    channel_gain_figure,
    channel_gain_order,
    channel_gain_table,
    gain_label,
    gain_matrix,
)
from kcore.viz.maps import (
    MAP_KINDS,
    MapKind,
    MapSpec,
    blind_spot_energy,
    feature_cells,
    feature_map,
    is_nested,
    map_limits,
    upsample,
)
from kcore.viz.overlays import (
    blend_overlay,
    component_overlay,
    component_overlay_interactive,
    map_view_interactive,
    overlay_figure,
    side_by_side_figure,
)
from kcore.viz.style import (
    BACKGROUNDS,
    DIVERGING_CMAP,
    DIVERGING_CMAPS,
    RESIDUAL_TEX,
    SCALE_NAMES,
    SCALES,
    SEQUENTIAL_CMAP,
    SHARE_CMAP,
    TARGET_TEX,
    Background,
    Scale,
    limits_of,
    nested_label,
    order_label,
    order_tex,
    plotly_colorscale,
)

__all__ = [
    "GAIN_SORTS", "channel_gain_figure", "channel_gain_order", "channel_gain_table", "gain_label", "gain_matrix",
    "is_nested", "nested_label",
    "BACKGROUNDS", "DIVERGING_CMAP", "NO_VARIANCE", "DIVERGING_CMAPS", "MAP_KINDS", "RESIDUAL_TEX", "SCALES", "SCALE_NAMES",
    "SEQUENTIAL_CMAP", "SHARE_CMAP", "SHARE_SORTS", "TARGET_TEX", "Background", "MapKind", "MapSpec", "Scale",
    "ShareSort", "blend_overlay", "blind_spot_energy", "channel_order", "channel_share_figure", "channel_share_table",
    "component_overlay", "component_overlay_interactive", "feature_cells", "feature_map", "figure1_grid",
    "instability_figure", "limits_of", "loss_figure", "map_limits", "map_view_interactive", "metric_summary_text",
    "order_label", "order_tex", "overlay_figure", "plotly_colorscale", "share_matrix", "side_by_side_figure",
    "upsample", "variance_figure",
]
