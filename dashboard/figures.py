"""The dashboard's figures: kcore.viz calls with a run's data and the page's choices.

Pages display these and the Export page saves the very same figures (PNG, SVG, PDF). Each builder has a
``*_stem`` twin that names the exported file deterministically from the same choices. The Explorer shows its
two maps as interactive Plotly views (``*_view``: the same arrays, limits and colour maps, drawn by the browser
so that a redraw stays well under 150 ms); Export saves them as the matplotlib figures.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def short_id(image_id: str, parts: int = 2) -> str:
    """The last ``parts`` components of an image id, e.g. ``"test/00012"``."""
    return "/".join(str(image_id).split("/")[-parts:])


def _titles(run: state.RunEntry) -> dict[str, str]:
    return {d: f"{state.DIRECTION_TITLES[d]}: {r.meaning.split(':')[0]}" for d, r in run.comparison.directions.items()}


def variance(run: state.RunEntry) -> Figure:
    c = run.comparison
    return viz.variance_figure({d: r.fit.heldout_report for d, r in c.directions.items()}, titles=_titles(run),
                               caption=export.caption(c))


def loss(run: state.RunEntry) -> Figure:
    c = run.comparison
    return viz.loss_figure({d: r.fit.history for d, r in c.directions.items()},
                           best_epochs={d: r.fit.best_epoch for d, r in c.directions.items()}, titles=_titles(run),
                           caption=export.caption(c))


def overlay(run: state.RunEntry, m: MapChoice) -> Figure:
    view = state.decomposition(run, m.direction)
    units = "standardised units" if view.dec.convention == "paper" else "target units"
    return viz.component_overlay(
        view.dec, m.spec, m.image, m.channel, view.raw[m.image], scale=m.scale, alpha=m.alpha,
        background=m.background, image_label=short_id(view.image_ids[m.image]), units=units,
        caption=export.caption(run.comparison, m.direction),
    )


def overlay_view(run: state.RunEntry, m: MapChoice, spec: viz.MapSpec | None = None):
    """The Explorer's interactive view of :func:`overlay` (Plotly; the same map, limits and colours)."""
    view = state.decomposition(run, m.direction)
    units = "standardised units" if view.dec.convention == "paper" else "target units"
    return viz.component_overlay_interactive(
        view.dec, spec or m.spec, m.image, m.channel, view.raw[m.image], scale=m.scale, alpha=m.alpha,
        background=m.background, image_label=short_id(view.image_ids[m.image]), units=units,
    )


def blind_spot_view(run: state.RunEntry, m: MapChoice):
    """The Explorer's interactive view of :func:`blind_spot`."""
    return overlay_view(run, m, viz.MapSpec("blind_spot"))


def overlay_stem(run: state.RunEntry, m: MapChoice) -> str:
    view = state.decomposition(run, m.direction)
    ch = None if m.spec.kind == "blind_spot" else m.channel
    return export.figure_stem("overlay", m.direction, image_id=view.image_ids[m.image], channel=ch,
                              what=m.spec.slug, scale=m.scale)


def blind_spot(run: state.RunEntry, m: MapChoice) -> Figure:
    return overlay(run, MapChoice(m.direction, m.image, m.channel, viz.MapSpec("blind_spot"), m.scale, m.alpha,
                                  m.background))


def shares(run: state.RunEntry, direction: str, sort: str = "channel", order: int = 0,
           highlight: int | None = None, max_channels: int = 64) -> Figure:
    rep = run.comparison.directions[direction].fit.heldout_report
    return viz.channel_share_figure(rep, sort=sort, order=order, highlight=highlight, max_channels=max_channels,
                                    title=f"{state.DIRECTION_TITLES[direction]}: variance share per channel",
                                    caption=export.caption(run.comparison, direction))


def grid(run: state.RunEntry, direction: str, images: Sequence[int], channels: Sequence[int],
         scale: viz.Scale = "image", alpha: float = 0.85, background: viz.Background = "gray") -> Figure:
    view = state.decomposition(run, direction)
    return viz.figure1_grid(view.dec, list(images), list(channels), [view.raw[i] for i in images], scale=scale,
                            alpha=alpha, background=background, row_labels=[short_id(view.image_ids[i]) for i in images],
                            caption=export.caption(run.comparison, direction))


def grid_stem(run: state.RunEntry, direction: str, images: Sequence[int], channels: Sequence[int],
              scale: str) -> str:
    view = state.decomposition(run, direction)
    ids = "+".join(view.image_ids[i] for i in images) if len(images) <= 3 else f"{len(images)}images"
    return export.figure_stem("figure1", direction, image_id=ids, channel=list(channels), scale=scale)
