"""The dashboard's figures: kcore.viz calls with a run's data and the page's choices.

Pages display these and the Export page saves the very same figures (PNG, SVG, PDF). Each builder has a
``*_stem`` twin that names the exported file deterministically from the same choices. The Explorer shows its
two maps as interactive Plotly views (``*_view``: the same arrays, limits and colour maps, drawn by the browser
so that a redraw stays well under 150 ms); Export saves them as the matplotlib figures. The provenance
footer under a figure is optional (``footer``): the JSON sidecar of every exported figure always has it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from matplotlib.figure import Figure

from dashboard import state
from kcore import export, viz


@dataclass(frozen=True)
class MapChoice:
    """The explorer's choices (also what the Export page re-draws)."""

    direction: str
    image: int  # index into the run's held-out decomposition view
    channel: int
    spec: viz.MapSpec
    scale: viz.Scale = "map"
    alpha: float = 0.6
    background: viz.Background = "gray"
    cmap: str = viz.DIVERGING_CMAP
    view: str = "map"  # "map": the map and the blind-spot energy; "a_vs_b": x and x* side by side
    source_channel: int | None = None  # channel of x in the "a_vs_b" view (default: ``channel``)
    parts: str = "split"  # "split": Eq. 3–4 components of g_K; "nested": the nested components of nested fits


PARTS = {"split": "Eq. 3–4 split of g_K", "nested": "nested components"}
"""The Explorer's choice of components for a nested run (:data:`kcore.decompose.PARTS`)."""


def is_nested(run: state.RunEntry, direction: str) -> bool:
    """Whether ``direction`` of ``run`` is a nested fit (it has gains and nested components)."""
    return run.comparison.directions[direction].fit.nested is not None


def view_of(run: state.RunEntry, m: MapChoice) -> state.DecompositionView:
    """The decomposition ``m`` draws from: the split, or the nested components of a nested fit."""
    return state.decomposition(run, m.direction, m.parts)


VIEWS = {"map": "Map and blind spots", "a_vs_b": "x and x* side by side"}
"""The Explorer's views."""


def short_id(image_id: str, parts: int = 2) -> str:
    """The last ``parts`` components of an image id, e.g. ``"test/00012"``."""
    return "/".join(str(image_id).split("/")[-parts:])


def units(view: state.DecompositionView) -> str:
    """The units the decomposition's maps are in (the fit's convention)."""
    return "standardised units" if view.dec.convention == "paper" else "target units"


def _caption(run: state.RunEntry, direction: str | None, footer: bool) -> str | None:
    return export.caption(run.comparison, direction) if footer else None


def _titles(run: state.RunEntry) -> dict[str, str]:
    return {d: f"{state.DIRECTION_TITLES[d]}: {r.meaning.split(':')[0]}" for d, r in run.comparison.directions.items()}


def variance(run: state.RunEntry, footer: bool = False) -> Figure:
    """Var per order of every fitted direction (held-out report), one panel each."""
    c = run.comparison
    return viz.variance_figure({d: r.fit.heldout_report for d, r in c.directions.items()}, titles=_titles(run),
                               caption=_caption(run, None, footer))


def instability(run: state.RunEntry, footer: bool = False) -> Figure:
    """Instability and additive shares of every direction, with intervals, the chance baselines and the verdict."""
    c = run.comparison
    verdicts = {d: c.verdict(d) for d in c.directions} if c.baselines else None
    return viz.instability_figure({d: r.fit.heldout_report for d, r in c.directions.items()}, baselines=c.baselines,
                                  titles={d: state.DIRECTION_TITLES[d] for d in c.directions}, preset=c.preset,
                                  caption=_caption(run, None, footer), verdicts=verdicts)


def loss(run: state.RunEntry, footer: bool = False) -> Figure:
    """The training curves of every direction, the best epoch marked."""
    c = run.comparison
    return viz.loss_figure({d: r.fit.history for d, r in c.directions.items()},
                           best_epochs={d: r.fit.best_epoch for d, r in c.directions.items()}, titles=_titles(run),
                           caption=_caption(run, None, footer))


def overlay(run: state.RunEntry, m: MapChoice, footer: bool = False) -> Figure:
    """The map ``m`` chooses over its image, as a matplotlib figure (what Export saves)."""
    view = view_of(run, m)
    return viz.component_overlay(
        view.dec, m.spec, m.image, m.channel, view.raw[m.image], scale=m.scale, alpha=m.alpha,
        background=m.background, image_label=short_id(view.image_ids[m.image]), units=units(view),
        caption=_caption(run, m.direction, footer), cmap=m.cmap,
    )


def overlay_view(run: state.RunEntry, m: MapChoice, spec: viz.MapSpec | None = None):
    """The Explorer's interactive view of :func:`overlay` (Plotly; the same map, limits and colours)."""
    view = view_of(run, m)
    return viz.component_overlay_interactive(
        view.dec, spec or m.spec, m.image, m.channel, view.raw[m.image], scale=m.scale, alpha=m.alpha,
        background=m.background, image_label=short_id(view.image_ids[m.image]), units=units(view), cmap=m.cmap,
    )


def _pair_panels(run: state.RunEntry, m: MapChoice) -> list[tuple]:
    """(map, title, colour-bar label, value label) of x (the source's feature) and x* (the target's), raw."""
    x_src, x_tgt = state.feature_maps(run, m.direction, m.image)
    d = run.comparison.directions[m.direction]
    info = {"A": run.comparison.a, "B": run.comparison.b}
    cs = m.channel if m.source_channel is None else m.source_channel
    cs = min(int(cs), x_src.shape[0] - 1)
    out = []
    for x, net, ch, sym in ((x_src, d.source, cs, "x"), (x_tgt, d.target, m.channel, "x*")):
        layer = info[net].layer
        out.append((x[ch].numpy(), f"{sym}: {net}'s {layer}, channel {ch}", f"activation of {net}'s {layer} (raw)",
                    f"{sym} ({net})"))
    return out


def pair_views(run: state.RunEntry, m: MapChoice) -> list:
    """The Explorer's A-vs-B view: x and x* of the same image as two interactive maps (raw activations)."""
    view = state.decomposition(run, m.direction)
    image_label = short_id(view.image_ids[m.image])
    figs = []
    for m2d, title, label, value in _pair_panels(run, m):
        lim = viz.limits_of(m2d, True)
        figs.append(viz.map_view_interactive(m2d, lim, view.raw[m.image], title=f"{title}<br>{image_label}",
                                             colorbar_label=label, unit="(raw activation)", value_label=value,
                                             alpha=m.alpha, background=m.background, cmap=m.cmap))
    return figs


def pair(run: state.RunEntry, m: MapChoice, footer: bool = False) -> Figure:
    """The A-vs-B view as one matplotlib figure (what the Explorer's download and Export save)."""
    view = state.decomposition(run, m.direction)
    panels = [(m2d, f"{title}\n{short_id(view.image_ids[m.image])}", label)
              for m2d, title, label, _ in _pair_panels(run, m)]
    return viz.side_by_side_figure(panels, view.raw[m.image], alpha=m.alpha, background=m.background, cmap=m.cmap,
                                   caption=_caption(run, m.direction, footer))


def pair_stem(run: state.RunEntry, m: MapChoice) -> str:
    """The file stem of :func:`pair` for ``m``."""
    view = state.decomposition(run, m.direction)
    cs = m.channel if m.source_channel is None else m.source_channel
    return export.figure_stem("x-vs-xstar", m.direction, image_id=view.image_ids[m.image], channel=[cs, m.channel])


def explorer_stem(run: state.RunEntry, m: MapChoice) -> str:
    """The file stem of what the Explorer shows now."""
    return pair_stem(run, m) if m.view == "a_vs_b" else overlay_stem(run, m)


def explorer_figure(run: state.RunEntry, m: MapChoice, footer: bool = False) -> tuple[str, Figure]:
    """(file stem, figure) of what the Explorer shows now: the map, or x and x* side by side."""
    return explorer_stem(run, m), (pair(run, m, footer) if m.view == "a_vs_b" else overlay(run, m, footer))


def blind_spot_view(run: state.RunEntry, m: MapChoice):
    """The Explorer's interactive view of :func:`blind_spot`."""
    return overlay_view(run, m, viz.MapSpec("blind_spot"))


def overlay_stem(run: state.RunEntry, m: MapChoice) -> str:
    """The file stem of :func:`overlay` for ``m`` (a nested component's ``what`` is ``xn<k>``)."""
    view = view_of(run, m)
    ch = None if m.spec.kind == "blind_spot" else m.channel
    return export.figure_stem("overlay", m.direction, image_id=view.image_ids[m.image], channel=ch,
                              what=m.spec.slug, scale=m.scale)


def blind_spot(run: state.RunEntry, m: MapChoice, footer: bool = False) -> Figure:
    """The blind-spot energy map of ``m``'s image, as a matplotlib figure."""
    return overlay(run, replace(m, spec=viz.MapSpec("blind_spot"), view="map"), footer)


def shares(run: state.RunEntry, direction: str, sort: str = "channel", order: int = 0,
           highlight: int | None = None, max_channels: int = 64, footer: bool = False, wide: bool = True) -> Figure:
    """The additive share of each channel in ``direction`` (the Filters page's chart)."""
    rep = run.comparison.directions[direction].fit.heldout_report
    return viz.channel_share_figure(rep, sort=sort, order=order, highlight=highlight, max_channels=max_channels,
                                    title=f"{state.DIRECTION_TITLES[direction]}: additive share per channel (preset {run.comparison.preset})",
                                    caption=_caption(run, direction, footer), wide=wide)


def gains(run: state.RunEntry, direction: str, sort: str = "channel", order: int = 0,
          highlight: int | None = None, max_channels: int = 64, footer: bool = False) -> Figure:
    """The order-wise gains of each channel of a nested fit in ``direction`` (the Filters page's other chart)."""
    g = run.comparison.directions[direction].fit.nested.gains
    return viz.channel_gain_figure(g, sort=sort, order=order, highlight=highlight, max_channels=max_channels,
                                   title=f"{state.DIRECTION_TITLES[direction]}: order-wise gain per channel "
                                         "(nested fits)", caption=_caption(run, direction, footer))


def nested_items(run: state.RunEntry, direction: str, m: MapChoice | None = None,
                 footer: bool = False) -> list[export.FigureItem]:
    """The export's figures of a nested fit in ``direction``: the per-channel gains and the nested components of
    the Explorer's image and channel (``m``; default: the first image, channel 0), on their images."""
    view = state.decomposition(run, direction, "nested")
    image, channel = (m.image, m.channel) if m is not None and m.direction == direction else (0, 0)
    return export.nested_figures(run.comparison, direction, dec=view.dec, image_ids=view.image_ids, images=[image],
                                 channels=[channel], raw=[view.raw[image]],
                                 cmap=m.cmap if m is not None else None, footer=footer)


def grid(run: state.RunEntry, direction: str, images: Sequence[int], channels: Sequence[int],
         scale: viz.Scale = "image", alpha: float = 0.85, background: viz.Background = "gray",
         cmap: str = viz.DIVERGING_CMAP, footer: bool = False, parts: str = "split") -> Figure:
    """The paper's Figure 1 grid: ``images`` × ``channels``, each row x*, x⁽⁰⁾ … x⁽ᴷ⁾ and x^Δ (``parts="nested"``:
    the nested components x⁽⁰⁾ₙ … x⁽ᴷ⁾ₙ of a nested fit)."""
    view = state.decomposition(run, direction, parts)
    return viz.figure1_grid(view.dec, list(images), list(channels), [view.raw[i] for i in images], scale=scale,
                            alpha=alpha, background=background, row_labels=[short_id(view.image_ids[i]) for i in images],
                            caption=_caption(run, direction, footer), units=units(view), cmap=cmap)


def grid_stem(run: state.RunEntry, direction: str, images: Sequence[int], channels: Sequence[int],
              scale: str) -> str:
    """The file stem of :func:`grid` for the same choices."""
    view = state.decomposition(run, direction)
    ids = "+".join(view.image_ids[i] for i in images) if len(images) <= 3 else f"{len(images)}images"
    return export.figure_stem("figure1", direction, image_id=ids, channel=list(channels), scale=scale)
