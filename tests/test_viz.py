"""Figures: colour limits and maps, scaling semantics, overlay upsampling, and input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from matplotlib import colors as mcolors
from matplotlib.figure import Figure

from kcore import viz
from kcore.decompose import Decomposition
from kcore.fit import EpochRecord


@pytest.fixture(scope="module")
def dec():
    g = torch.Generator().manual_seed(0)
    comps = [torch.randn(3, 4, 8, 8, generator=g) * s for s in (1.0, 0.5, 0.25)]
    target = torch.randn(3, 4, 8, 8, generator=g)
    return Decomposition(comps, target - sum(comps), target)


@pytest.fixture(scope="module")
def image():
    return (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def _colorbars(fig: Figure):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def _drawn(fig: Figure) -> np.ndarray:
    """The RGB raster the overlay axes show."""
    (im,) = fig.axes[0].images
    return np.asarray(im.get_array())


def test_signed_overlay_has_symmetric_colorbar_and_diverging_map(dec, image):
    spec = viz.MapSpec("component", (1,))
    fig = viz.component_overlay(dec, spec, 0, 2, image, scale="map", alpha=0.6)
    (cax,) = _colorbars(fig)
    m = float(dec.components[1][0, 2].abs().max())
    lo, hi = sorted(cax.get_ylim())
    assert lo == pytest.approx(-m) and hi == pytest.approx(m)
    # the pixels are the diverging map with those limits, blended over the grey image
    norm = mcolors.Normalize(-m, m)
    expected = viz.blend_overlay(image, dec.components[1][0, 2], norm, viz.DIVERGING_CMAP, 0.6)
    np.testing.assert_allclose(_drawn(fig), expected)
    assert not np.allclose(expected, viz.blend_overlay(image, dec.components[1][0, 2], norm, "viridis", 0.6))


def test_blind_spot_map_is_sequential_from_zero(dec, image):
    fig = viz.component_overlay(dec, viz.MapSpec("blind_spot"), 1, None, image, alpha=0.7)
    (cax,) = _colorbars(fig)
    energy = (dec.residual[1].double() ** 2).mean(0)
    lo, hi = sorted(cax.get_ylim())
    assert lo == 0.0 and hi == pytest.approx(float(energy.max()))
    expected = viz.blend_overlay(image, energy, mcolors.Normalize(0, float(energy.max())), viz.SEQUENTIAL_CMAP, 0.7)
    np.testing.assert_allclose(_drawn(fig), expected)
    np.testing.assert_allclose(viz.feature_map(dec, viz.MapSpec("blind_spot"), 1, None), energy.numpy())


def test_overlay_upsamples_the_map_to_the_image(dec, image):
    fig = viz.overlay_figure(image, dec.target[0, 0], alpha=0.5)
    assert _drawn(fig).shape == (*image.shape[:2], 3)
    up = viz.upsample(np.arange(16.0).reshape(4, 4), (16, 12))
    assert up.shape == (16, 12)
    # bilinear with align_corners=False keeps the mean of a linear ramp and stays within its range
    assert up.min() >= 0 and up.max() <= 15 and up.mean() == pytest.approx(7.5)


def test_blend_is_the_alpha_mix_of_background_and_colour_map(image):
    m = np.linspace(-1.0, 1.0, 16).reshape(4, 4)
    norm = mcolors.Normalize(-1.0, 1.0)
    grey = image.astype(float) / 255 @ np.array([0.299, 0.587, 0.114])
    colours = colormaps[viz.DIVERGING_CMAP](norm(viz.upsample(m, image.shape[:2])))[..., :3]
    np.testing.assert_allclose(viz.blend_overlay(image, m, norm, viz.DIVERGING_CMAP, 0.0), np.repeat(grey[..., None], 3, 2))
    np.testing.assert_allclose(viz.blend_overlay(image, m, norm, viz.DIVERGING_CMAP, 1.0), colours)
    half = viz.blend_overlay(image, m, norm, viz.DIVERGING_CMAP, 0.5, background="rgb")
    np.testing.assert_allclose(half, 0.5 * image / 255 + 0.5 * colours)
    # no image, or nothing under the map: the colour map alone at full opacity, at the map's own size
    alone = viz.blend_overlay(None, m, norm, viz.DIVERGING_CMAP, 0.3)
    np.testing.assert_allclose(alone, colormaps[viz.DIVERGING_CMAP](norm(m))[..., :3])
    np.testing.assert_allclose(viz.blend_overlay(image, m, norm, viz.DIVERGING_CMAP, 0.3, background="none"), colours)
    # zero sits at the diverging map's white centre
    centre = viz.blend_overlay(None, np.zeros((2, 2)), norm, viz.DIVERGING_CMAP, 1.0)
    assert centre.min() > 0.95


def test_interactive_overlay_shows_the_same_map_limits_and_colours(dec, image):
    spec = viz.MapSpec("component", (2,))
    fig = viz.component_overlay_interactive(dec, spec, 1, 3, image, scale="image", alpha=0.4)
    bg, heat = fig.data
    assert bg.type == "image" and heat.type == "heatmap"
    grey = viz.blend_overlay(image, np.zeros((2, 2)), mcolors.Normalize(-1, 1), viz.DIVERGING_CMAP, 0.0)
    np.testing.assert_array_equal(np.asarray(bg.z), np.round(grey * 255).astype(np.uint8))
    lo, hi = viz.map_limits(dec, spec, 1, 3, "image")
    assert (heat.zmin, heat.zmax) == (lo, hi) and heat.opacity == 0.4
    np.testing.assert_allclose(np.asarray(heat.z), viz.upsample(viz.feature_map(dec, spec, 1, 3), image.shape[:2]))
    # the colour scale is the matplotlib colour map: ends and centre
    cmap = colormaps[viz.DIVERGING_CMAP]
    stops = heat.colorscale
    for pos in (0.0, 0.5, 1.0):
        (colour,) = [c for p, c in stops if abs(p - pos) < 1e-9]
        want = np.round(np.asarray(cmap(pos)[:3]) * 255)
        assert np.abs(np.array([float(v) for v in colour[4:-1].split(",")]) - want).max() <= 1.0
    assert "x⁽²⁾ · channel 3" in fig.layout.title.text
    # blind spot: sequential from 0; without an image the map alone, fully opaque
    fig = viz.component_overlay_interactive(dec, viz.MapSpec("blind_spot"), 0, None, None, alpha=0.3)
    (heat,) = fig.data
    energy = (dec.residual[0].double() ** 2).mean(0)
    assert heat.zmin == 0.0 and heat.zmax == pytest.approx(float(energy.max())) and heat.opacity == 1.0
    np.testing.assert_allclose(np.asarray(heat.z), energy.numpy())


def test_scaling_limits_follow_the_documented_definitions(dec):
    spec = viz.MapSpec("component", (2,))
    per_map = viz.map_limits(dec, spec, 0, 1, "map")
    assert per_map[1] == pytest.approx(float(dec.components[2][0, 1].abs().max()))
    per_image = viz.map_limits(dec, spec, 0, 1, "image")
    fam = [dec.target, dec.residual, sum(dec.components)] + list(dec.components)
    assert per_image[1] == pytest.approx(max(float(t[0, 1].abs().max()) for t in fam))
    shared = viz.map_limits(dec, spec, 0, 1, "shared")
    assert shared[1] == pytest.approx(max(float(t[:, 1].abs().max()) for t in fam))
    assert per_map[1] <= per_image[1] <= shared[1]
    assert all(lo == -hi for lo, hi in (per_map, per_image, shared))
    # the shared scale is the same for every image and order of a channel
    assert viz.map_limits(dec, viz.MapSpec("residual"), 2, 1, "shared") == shared
    # "shared" over a subset of images
    sub = viz.map_limits(dec, spec, 0, 1, "shared", images=[0])
    assert sub == per_image


def test_sum_of_orders_and_output(dec):
    both = viz.feature_map(dec, viz.MapSpec("component", (1, 0)), 0, 3)
    np.testing.assert_allclose(both, (dec.components[0][0, 3] + dec.components[1][0, 3]).double().numpy())
    out = viz.feature_map(dec, viz.MapSpec("output"), 0, 3)
    np.testing.assert_allclose(out, sum(c[0, 3] for c in dec.components).double().numpy(), atol=1e-5)
    assert viz.MapSpec("component", (1, 0)).label == "x⁽⁰⁾+x⁽¹⁾"
    assert viz.MapSpec("component", (1, 0)).slug == "x0+1"


def test_figure1_grid_layout_and_colorbars(dec, image):
    fig = viz.figure1_grid(dec, [0, 2], [1], [image, image], scale="image")
    K = dec.orders
    cols = 1 + 1 + (K + 1) + 1  # image, x*, x0..xK, xΔ
    assert len([a for a in fig.axes if a.get_label() != "<colorbar>"]) == 2 * cols
    assert len(_colorbars(fig)) == 2  # one per row
    fig = viz.figure1_grid(dec, [0], [1, 2], None, scale="shared")
    (cax,) = _colorbars(fig)
    lo, hi = sorted(cax.get_ylim())
    assert lo == -hi and hi > 0


def test_summary_figures(dec):
    rep = dec.report()
    fig = viz.variance_figure({"A_to_B": rep, "B_to_A": rep})
    assert len(fig.axes) == 2
    assert [p.get_height() for p in fig.axes[0].patches][-1] == pytest.approx(rep.var_target)
    hist = [EpochRecord(e, 1.0 / e, 1.0 / e, 1.1 / e, 1e-3, (0.1,), 0.01) for e in range(1, 6)]
    assert len(viz.loss_figure({"A_to_B": hist}, best_epochs={"A_to_B": 4}).axes) == 1
    fig = viz.channel_share_figure(rep, sort="residual", highlight=0)
    assert _colorbars(fig)
    order = viz.channel_order(rep, "residual")
    shares = rep.per_channel.share_residual
    assert [shares[i] for i in order] == sorted(shares, reverse=True)


def test_errors_name_the_argument(dec, image):
    with pytest.raises(ValueError, match="kind must be one of"):
        viz.MapSpec("nope")
    with pytest.raises(ValueError, match="channel must be in"):
        viz.feature_map(dec, viz.MapSpec("target"), 0, 99)
    with pytest.raises(ValueError, match="beyond K = 2"):
        viz.feature_map(dec, viz.MapSpec("component", (3,)), 0, 0)
    with pytest.raises(ValueError, match="scale must be one of"):
        viz.map_limits(dec, viz.MapSpec("target"), 0, 0, "global")
    with pytest.raises(ValueError, match="alpha must lie in"):
        viz.overlay_figure(image, np.zeros((4, 4)), alpha=2)


@pytest.mark.parametrize("scale", ["map", "image", "shared"])
def test_every_figure1_colour_bar_names_its_units(dec, image, scale):
    fig = viz.figure1_grid(dec, [0, 1], [2], [image, image], scale=scale, units="standardised units")
    bars = [ax for ax in _colorbars(fig) if ax.get_visible()]
    assert bars
    for cax in bars:
        label = cax.get_xlabel() or cax.get_ylabel()
        assert " ".join(label.split()) == "standardised units"  # a narrow bar's label wraps at its spaces


def test_colour_map_choice_reaches_both_renderers(dec, image):
    spec = viz.MapSpec("component", (0,))
    fig = viz.component_overlay(dec, spec, 0, 1, image, alpha=0.5, cmap="PuOr_r")
    lim = viz.map_limits(dec, spec, 0, 1, "map")
    expected = viz.blend_overlay(image, dec.components[0][0, 1], viz.style._norm(lim), "PuOr_r", 0.5)
    np.testing.assert_allclose(_drawn(fig), expected)
    heat = viz.component_overlay_interactive(dec, spec, 0, 1, image, cmap="PuOr_r").data[-1]
    assert heat.colorscale == tuple(tuple(s) for s in viz.plotly_colorscale("PuOr_r")) or \
        [list(s) for s in heat.colorscale] == viz.plotly_colorscale("PuOr_r")
    with pytest.raises(ValueError, match="cmap must be one of"):
        viz.component_overlay(dec, spec, 0, 1, image, cmap="jet")


def test_hover_names_the_feature_cell_and_units(dec, image):
    cells = viz.feature_cells((8, 8), (32, 32))
    assert cells.shape == (32, 32, 2)
    assert tuple(cells[0, 0]) == (0, 0) and tuple(cells[31, 31]) == (7, 7) and tuple(cells[4, 3]) == (1, 0)
    assert tuple(viz.feature_cells((7, 7), (224, 224))[223, 0]) == (6, 0)  # 32 pixels per cell
    heat = viz.component_overlay_interactive(dec, viz.MapSpec("residual"), 0, 1, image, units="raw units").data[-1]
    np.testing.assert_array_equal(np.asarray(heat.customdata), cells)
    assert "raw units" in heat.hovertemplate and "feature cell" in heat.hovertemplate


def test_wide_channel_share_heatmap_has_one_column_per_channel(dec):
    rep = dec.report()
    fig = viz.channel_share_figure(rep, sort="residual", highlight=1, wide=True)
    ax = fig.axes[0]
    (im,) = ax.images
    assert im.get_array().shape == (dec.orders + 2, dec.target.shape[1])
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in viz.channel_order(rep, "residual")]


def test_side_by_side_figure_draws_each_map_on_its_own_scale(dec, image):
    a, b = dec.target[0, 1].numpy(), 3.0 * dec.residual[0, 2].numpy()
    fig = viz.side_by_side_figure([(a, "A: x", "A's units"), (b, "B: x*", "B's units")], image, alpha=0.5)
    bars = _colorbars(fig)
    assert [c.get_ylabel() for c in bars] == ["A's units", "B's units"]
    for cax, m in zip(bars, (a, b)):
        lo, hi = sorted(cax.get_ylim())
        assert hi == pytest.approx(float(np.abs(m).max())) and lo == -hi
    view = viz.map_view_interactive(b, (-1.0, 1.0), image, title="B", unit="B's units", value_label="x*")
    assert "x* = " in view.data[-1].hovertemplate and "B's units" in view.data[-1].hovertemplate
    with pytest.raises(ValueError, match="at least one panel"):
        viz.side_by_side_figure([], image)
