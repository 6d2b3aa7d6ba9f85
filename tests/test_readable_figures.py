"""Figure text that a person can read and search: the Figure 1 grid and the overlays keep their text at least
TEXT_PT, inside the figure and clear of each other (at every order count and colour scale), the grid is at most
GRID_IN wide so that a 1024 px window shows its text at least 11 px high (measured in a real Chromium), the
Explorer's interactive views draw no text under 11 px, and the studies' SVG figures keep each label in one
``<text>`` element (plain Unicode, no mathtext).
"""
from __future__ import annotations

import os
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dashboard.serve import CHROMIUM, CHROMIUM_ARGS, free_port, local_dashboard, wait_idle
from helpers import loaded, open_run_folder, tiny_net
from helpers import overlapping_texts as _overlaps
from helpers import texts_outside as _outside

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kcore import export, viz  # noqa: E402
from kcore.decompose import Decomposition  # noqa: E402
from kcore.viz.figure1 import GRID_IN  # noqa: E402
from kcore.viz.style import CAPTION_PT, MIN_SCREEN_PX, TEXT_PT, screen_px, text_sizes  # noqa: E402

NARROW_MAIN_PX = 564
"""The main area's width in a 1024 px window with the sidebar open (what the browser test below measures)."""
UNITS = "standardised units"


def _dec(orders: int, scale: float = 1.0) -> Decomposition:
    g = torch.Generator().manual_seed(orders)
    comps = [torch.randn(2, 3, 8, 8, generator=g) * 0.5 ** k for k in range(orders + 1)]
    target = torch.randn(2, 3, 8, 8, generator=g) * scale
    return Decomposition(comps, target - sum(comps), target)


def _image() -> np.ndarray:
    return (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)


def test_the_overlap_check_finds_overlapping_text():
    fig = Figure(figsize=(3, 2))
    fig.text(0.2, 0.5, "some words", fontsize=TEXT_PT)
    fig.text(0.25, 0.5, "more words", fontsize=TEXT_PT)
    fig.text(0.9, 0.1, "past the edge", fontsize=TEXT_PT)
    assert _overlaps(fig) == [("some words", "more words")]
    assert _outside(fig) == ["past the edge"]


# ------------------------------------------------------------------------------------------------ Figure 1
@pytest.mark.parametrize("orders", [0, 2, 6])
@pytest.mark.parametrize("scale", ["map", "image", "shared"])
def test_figure1_grid_text_is_readable_at_1024_px(orders, scale):
    """Any order count K (the limit allows 6) and scale: at most GRID_IN wide, text >= TEXT_PT (so >= 11 px
    in the narrow main area), nothing overlapping or cut, every map's colour bar with its numbers and units."""
    dec = _dec(orders, scale=300.0)  # x* and x^Δ in hundreds: the widest colour-bar numbers
    fig = viz.figure1_grid(dec, [0, 1], [2], [_image(), _image()], scale=scale, units=UNITS,
                           row_labels=["test/00012", "train/a_long_image_name_0042"])
    assert fig.get_figwidth() <= GRID_IN + 1e-9
    sizes = text_sizes(fig)
    assert min(s for _, s in sizes) >= TEXT_PT, [t for t in sizes if t[1] < TEXT_PT]
    assert screen_px(TEXT_PT, 150, NARROW_MAIN_PX, fig.get_figwidth() * 150) >= MIN_SCREEN_PX
    assert not _overlaps(fig), _overlaps(fig)
    assert not _outside(fig), _outside(fig)
    names = {t for t, _ in sizes}
    assert {viz.order_tex(k) for k in range(orders + 1)} | {"x*", "x^Δ", "image"} <= names  # every column titled
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>" and ax.get_visible()]
    n_maps = orders + 3
    assert len(bars) == {"map": 2 * n_maps, "image": 2, "shared": 1}[scale]
    for cax in bars:
        assert " ".join((cax.get_xlabel() or cax.get_ylabel()).split()) == UNITS
    if scale == "map":  # every map's own limits, in numbers at both ends of its bar
        for cax in bars:
            labels = [t.get_text() for t in cax.get_xticklabels()]
            lo, hi = sorted(cax.get_xlim())
            assert labels[0] == viz.figure1._short(lo) and labels[-1] == viz.figure1._short(hi)
            assert lo == -hi


def test_a_wide_grid_wraps_its_rows_instead_of_shrinking_text():
    fig = viz.figure1_grid(_dec(6), [0], [1], [_image()], scale="image", units=UNITS)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 6 + 4
    assert _lines(shown) == 2  # two lines of maps for one (image, channel) row
    narrow = viz.figure1_grid(_dec(1), [0], [1], [_image()], scale="image", units=UNITS)
    assert _lines([ax for ax in narrow.axes if ax.images]) == 1


def _lines(axes) -> int:
    """How many lines of cells: vertical centres more than a quarter cell apart start a new line."""
    ys = sorted((ax.get_position().y0 + ax.get_position().y1) / 2 for ax in axes)
    tall = min(ax.get_position().height for ax in axes)
    return 1 + sum(b - a > tall / 4 for a, b in zip(ys, ys[1:]))


def test_short_colour_bar_numbers():
    short = viz.figure1._short
    assert [short(v) for v in (0.123, -0.0371, 4.06, -334.2, 2500.0)] == ["0.12", "−0.037", "4.1", "−334", "2e+03"]


# ------------------------------------------------------------------------------------------------ overlays
@pytest.mark.parametrize("kind", ["target", "blind_spot"])
def test_overlay_text_is_readable_and_inside_its_fixed_layout(kind):
    dec = _dec(2, scale=1e-3)  # small values: the longest tick labels (−0.0010)
    channel = None if kind == "blind_spot" else 1
    caption = "A: resnet18 `3f2a9c1d0e4b` layer3 · B: vgg11 `0a1b2c3d4e5f` features.10 · preset fast K=2 · 40 images"
    fig = viz.component_overlay(dec, viz.MapSpec(kind), 0, channel, _image(), units=UNITS,
                                image_label="test/00012", caption=caption)
    sizes = text_sizes(fig)
    assert min(s for t, s in sizes if s != CAPTION_PT) >= TEXT_PT, sizes
    assert not _overlaps(fig), _overlaps(fig)
    assert not _outside(fig), _outside(fig)
    ax, cax = fig.axes
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    img_box = ax.get_window_extent(canvas.get_renderer())
    label_box = cax.yaxis.label.get_window_extent(canvas.get_renderer())
    assert label_box.x0 > img_box.x1  # the bar's label beside the image, not over it
    assert "scale: per map" in " ".join(cax.get_ylabel().split())
    # the export keeps the figure's own size (no tight bounding box re-crops it)
    svg = ET.fromstring(export.figure_bytes(fig, "svg"))
    assert svg.get("width") == f"{fig.get_figwidth() * 72:g}pt"


def test_side_by_side_text_is_readable_and_inside():
    g = torch.Generator().manual_seed(0)
    panels = [(torch.randn(8, 8, generator=g), "A: x · channel 3", "A's raw activation units"),
              (torch.randn(8, 8, generator=g), "B: x* · channel 5", "B's raw activation units")]
    fig = viz.side_by_side_figure(panels, _image())
    assert min(s for _, s in text_sizes(fig)) >= TEXT_PT
    assert not _overlaps(fig), _overlaps(fig)
    assert not _outside(fig), _outside(fig)


# ------------------------------------------------------------------------------------------------ studies
def _svg_texts(fig: Figure) -> list[str]:
    root = ET.fromstring(export.figure_bytes(fig, "svg"))
    return ["".join(el.itertext()) for el in root.iter() if el.tag.endswith("}text")]


def _row(v: float):
    return types.SimpleNamespace(var_residual=v)


def _study_figures() -> dict[str, tuple[Figure, list[str]]]:
    """Each study's figure drawn from small planted results, with the labels it must hold whole."""
    from kcore.experiments.compression import compression_figure
    from kcore.experiments.distillation import distillation_figure
    from kcore.experiments.stability import StabilityResult

    comp = types.SimpleNamespace(
        points=[types.SimpleNamespace(ratio=r, row=_row(0.1 + r), accuracy=0.9 - r / 2, accuracy_pruned=0.8 - r / 2)
                for r in (0.2, 0.5, 0.8)], finetune_epochs=1, scope="layer", layer="layer2")
    gens = [types.SimpleNamespace(generation=i, row=_row(0.3 - 0.1 * i) if i < 2 else None, accuracy=0.8 + 0.05 * i)
            for i in range(3)]
    dist = types.SimpleNamespace(generations=gens, newest=2, layer="layer3")
    summary = [types.SimpleNamespace(layer=name, var_orders=(0.5, 0.2, 0.1), var_residual=0.2, var_target=1.0)
               for name in ("conv1", "conv2")]
    stab = types.SimpleNamespace(
        layers=["conv1", "conv2"], orders=2, case="seeds", directions=[], random_reference={"conv1": {"instability": 0.9}},
        pair_instability=lambda layer: {"a-b": 0.3, "a-c": 0.35}, summary=lambda: summary)
    return {
        "compression": (compression_figure(comp), ["Var(x^Δ) (held out, standardised units)",
                                                    "Var(x^Δ): knowledge discarded"]),
        "distillation": (distillation_figure(dist), ["Var(x^Δ), held out"]),
        "stability": (StabilityResult.figures(stab)["instability"],
                      ["instability  Var(x^Δ)/Var(x*)", "x⁽⁰⁾", "x⁽¹⁾", "x⁽²⁾", "x^Δ"]),
    }


def test_study_figures_keep_each_label_in_one_svg_text():
    for name, (fig, labels) in _study_figures().items():
        texts = _svg_texts(fig)
        for label in labels:
            assert label in texts, (name, label, texts)
        assert not any("$" in t for t in texts), name
        assert not any(len(t) == 1 and t in "xΔ*()" for t in texts), (name, texts)  # no glyph on its own


def test_study_figure_code_has_no_mathtext():
    """A label typed with $…$ would come back as one SVG element per glyph: none is left in figure code."""
    import re

    for folder in ("kcore/experiments", "kcore/viz"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""["'][^"']*\$[^"'\s]*[\\^{][^"']*\$""", line):
                    pytest.fail(f"{path.relative_to(ROOT)}:{n} has a mathtext label: {line.strip()}")


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def run_folder(random_images, tmp_path_factory):
    from kcore.pipeline import compare, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=2, epochs=2)
    runs = tmp_path_factory.mktemp("runs")
    return runs, write_run(comp, runs / "run")


@pytest.fixture(scope="module")
def server(run_folder, tmp_path_factory):
    runs, _ = run_folder
    port = free_port()
    env = {**os.environ, "KCORE_RUNS_DIR": str(runs), "KCORE_EXPORTS_DIR": str(tmp_path_factory.mktemp("exports"))}
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    with local_dashboard(env, port=port, log=log, timeout=90) as url:
        yield url


def _goto(page, name: str) -> None:
    page.get_by_role("link", name=name, exact=True).first.click()
    page.get_by_role("heading", name=name).first.wait_for(timeout=90_000)
    wait_idle(page)


def _shown(page, img) -> tuple[int, int]:
    img.scroll_into_view_if_needed()
    page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=90_000)
    return tuple(img.evaluate("i => [i.clientWidth, i.naturalWidth]"))


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_at_1024_px_figure1_and_explorer_text_is_11_px(server, run_folder):
    """A real Chromium at 1024×700: the Figure 1 grid (every scale) and the Filters page's grid, scaled to the
    width the browser gives their images, show their smallest text at least 11 px; every text of the Explorer's
    interactive views is at least 11 px."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from dashboard import figures
    from dashboard.state._runs import RunEntry
    from dashboard.ui import DISPLAY_DPI
    from kcore.run_folder import read_run

    _, folder = run_folder
    run = RunEntry("run", read_run(folder), None)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 700})
            page.goto(server)
            page.get_by_role("heading", name="Models & images").wait_for(timeout=90_000)
            wait_idle(page)
            _goto(page, "Fit")
            field = page.get_by_placeholder("/path/to/run")
            field.fill(str(folder))
            field.press("Enter")
            wait_idle(page)
            page.get_by_role("button", name="Open", exact=True).last.click()
            page.locator("code", has_text=str(folder)).first.wait_for(timeout=90_000)
            wait_idle(page)
            _goto(page, "Figure 1")
            direction = next(iter(run.comparison.directions))
            rep = run.comparison.directions[direction].fit.heldout_report.per_channel
            chans = sorted(range(rep.channels), key=lambda c: -rep.var_target[c])[:2]
            px = {}
            for scale, label in (("image", "per row"), ("map", "per map"), ("shared", "shared")):
                fig = figures.grid(run, direction, [0, 1], chans, scale)
                page.get_by_text(label, exact=True).first.click()
                wait_idle(page)
                img = page.locator('[data-testid="stMain"] [data-testid="stImage"] img').first
                expected = round(fig.get_figwidth() * DISPLAY_DPI)  # the page shows this very figure
                page.wait_for_function(
                    "([e, n]) => { const i = document.querySelector(e); return i && i.complete && i.naturalWidth == n; }",
                    arg=['[data-testid="stMain"] [data-testid="stImage"] img', expected], timeout=90_000)
                w, nat = _shown(page, img)
                pt = min(s for _, s in text_sizes(fig))
                px[scale] = screen_px(pt, DISPLAY_DPI, w, nat)
                print(f"figure 1 ({scale}): smallest text {pt} pt, PNG {nat} px shown {w} px wide -> "
                      f"{px[scale]:.1f} px")
            assert min(px.values()) >= MIN_SCREEN_PX, px
            _goto(page, "Filters")
            fig = figures.grid(run, direction, [0, 1, 2], [0], "image")  # its default: 3 images, channel 0
            imgs = page.locator('[data-testid="stMain"] [data-testid="stImage"] img')
            sync_api.expect(imgs).to_have_count(2, timeout=90_000)  # the share heatmap, then the grid
            w, nat = _shown(page, imgs.nth(1))
            assert nat == round(fig.get_figwidth() * DISPLAY_DPI)
            got = screen_px(min(s for _, s in text_sizes(fig)), DISPLAY_DPI, w, nat)
            print(f"filters grid: PNG {nat} px shown {w} px wide -> {got:.1f} px")
            assert got >= MIN_SCREEN_PX
            _goto(page, "Explorer")
            plots = page.locator('[data-testid="stMain"] .js-plotly-plot')
            sync_api.expect(plots).to_have_count(2, timeout=90_000)
            sizes = []
            for i in range(2):
                plots.nth(i).scroll_into_view_if_needed()
                sizes += plots.nth(i).evaluate(
                    """p => [...p.querySelectorAll('svg text')].filter(t => t.textContent.trim()
                             && t.getBoundingClientRect().width > 0)
                         .map(t => [t.textContent, parseFloat(getComputedStyle(t).fontSize)])""")
            assert sizes
            print(f"explorer: {len(sizes)} texts, smallest {min(s for _, s in sizes)} px")
            assert min(s for _, s in sizes) >= MIN_SCREEN_PX, [t for t in sizes if t[1] < MIN_SCREEN_PX]
        finally:
            browser.close()


@pytest.mark.slow
def test_figure1_page_shows_the_provenance_footer_as_page_text(run_folder, monkeypatch, tmp_path):
    """The grid's footer would be its smallest text: the page shows it as a caption instead (downloads keep it
    in the figure)."""
    from streamlit.testing.v1 import AppTest

    from dashboard.state import views
    from kcore.run_folder import read_run

    runs, folder = run_folder
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    monkeypatch.setenv("KCORE_EXPORTS_DIR", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    open_run_folder(at, folder, "figure1")
    assert not at.exception, [e.value for e in at.exception]
    comp = read_run(folder)
    line = export.caption(comp, next(iter(comp.directions)))
    assert not any(c.value == line for c in at.caption)
    at.toggle(key=views.FOOTER_KEY).set_value(True).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(c.value == line for c in at.caption)


# ------------------------------------------------------------------------------------------------ depth plot
def _sweep_rows():
    from kcore.sweep import SweepRow

    def row(pos, direction, inst, ref):
        return SweepRow(pos, f"layer{pos}", f"layer{pos}", f"layer{pos}", direction, inst, (inst - 0.05, inst + 0.05),
                        (0.7, -0.2), ((0.6, 0.8), (-0.45, 0.0)), 0.5, (0.4, 0.6),
                        {"random_b": (ref, (ref - 0.1, ref + 0.5)), "shuffled": (1.0, (0.9, 1.1))}, "unknown", "fast", 50)

    return [row(p, d, 0.2 + 0.1 * p, 1.0) for p in range(3) for d in ("A_to_B", "B_to_A")]


def test_depth_plot_text_is_readable_and_its_legends_leave_the_data_free():
    from kcore.viz.depth import depth_figure, depth_figure_interactive

    fig = depth_figure(_sweep_rows(), caption="A: a.pt layer1..3 · B: b.pt layer1..3")
    sizes = text_sizes(fig)
    assert min(s for _, s in sizes if s != CAPTION_PT) >= TEXT_PT, sizes
    assert not _overlaps(fig), _overlaps(fig)
    assert not _outside(fig), _outside(fig)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    for ax in fig.axes[:2]:
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) >= 4
        assert legend.get_window_extent(r).y1 <= ax.get_window_extent(r).y0  # under the panel, not over it
    plotly = depth_figure_interactive(_sweep_rows())
    assert plotly.layout.legend.font.size >= MIN_SCREEN_PX  # Plotly sizes are CSS pixels


RUN_NAMES = {  # names the depth plot's x axis gets: short layers, long layers, run folders of two sweeps
    "layers": ["layer0", "layer1", "layer2"],
    "long layers": ["features.denseblock1 ↔ features.denseblock1", "features.denseblock2 ↔ features.denseblock2",
                    "features.denseblock3 ↔ features.denseblock3"],
    "run folders": ["sweep-20261207-101010-abcdef/pairs/00_block1__layer1",
                    "sweep-20261207-121212-fedcba/pairs/00_block1__layer1", "run-20261207-131313-a1b2c3"],
}


def _named_rows(names):
    import dataclasses

    return [dataclasses.replace(r, label=names[r.position]) for r in _sweep_rows()]


@pytest.mark.parametrize("caption", [None, "A: a.pt · B: b.pt\nreproduce: kcore sweep a.pt b.pt --layers-a …"])
@pytest.mark.parametrize("names", list(RUN_NAMES))
def test_the_depth_plot_export_keeps_axis_titles_ticks_and_legends_apart(names, caption):
    """Measured on the drawn text: no two texts overlap (the x axis title and the legend under it included), none
    is cut, and each legend lies wholly under its panel's x axis title."""
    from kcore.viz.depth import TICK_CHARS, depth_figure

    fig = depth_figure(_named_rows(RUN_NAMES[names]), caption=caption)
    assert not _overlaps(fig), _overlaps(fig)
    assert not _outside(fig), _outside(fig)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    r = canvas.get_renderer()
    for ax in fig.axes[:2]:
        assert ax.get_legend().get_window_extent(r).y1 <= ax.xaxis.label.get_window_extent(r).y0
        assert all(len(t.get_text()) <= TICK_CHARS for t in ax.get_xticklabels())


def test_short_tick_labels_drop_shared_folders_stay_distinct_and_fit():
    from kcore.viz.depth import short_labels

    assert short_labels(["layer1", "layer2"]) == ["layer1", "layer2"]  # short names are kept as they are
    assert short_labels(["sweep-1/pairs/00_a__a", "sweep-1/pairs/01_b__b"]) == ["00_a__a", "01_b__b"]
    assert short_labels(["abcdefghijklmnopqrstuvwxyz"], width=9) == ["abcd…wxyz"]
    same_ends = short_labels(RUN_NAMES["run folders"][:2], width=12)  # they differ only in the middle
    assert same_ends == ["1: swee…yer1", "2: swee…yer1"]  # numbered, 12 characters each
    for names in RUN_NAMES.values():
        got = short_labels(names)
        assert len(set(got)) == len(got) and all(len(s) <= 18 for s in got)
    with pytest.raises(ValueError, match=r"width must be at least 8 characters, got 4\. Fix: "):
        short_labels(["a"], width=4)


@pytest.mark.parametrize("names", list(RUN_NAMES))
def test_the_interactive_depth_plot_uses_the_width_and_keeps_ticks_clear_of_the_legend(names):
    """Plotly's layout: both panels share the full width; titles of at most two lines that fit half of the narrow
    main area at 13 px; tick labels shortened with every full name in the hover; the legend under the ticks."""
    from kcore.viz.depth import TICK_CHARS, depth_figure_interactive

    full = RUN_NAMES[names]
    fig = depth_figure_interactive(_named_rows(full), x_title="run")
    lay = fig.layout
    assert lay.xaxis.domain[0] == 0 and lay.xaxis2.domain[1] == 1 and lay.margin.l <= 10 and lay.margin.r <= 10
    assert lay.width is None and lay.autosize  # the page's width, not a fixed one
    panel_px = NARROW_MAIN_PX * (lay.xaxis.domain[1] - lay.xaxis.domain[0])
    for title in lay.annotations:
        lines = title.text.split("<br>")
        assert len(lines) <= 2 and max(map(len, lines)) * 0.6 * title.font.size <= panel_px, title.text
    ticks = list(lay.xaxis.ticktext)
    assert all(len(t) <= TICK_CHARS for t in ticks) and len(set(ticks)) == len(ticks)
    assert {c for t in fig.data for c in t.customdata} == set(full)  # the hover names the full x label
    assert all("%{customdata}" in t.hovertemplate for t in fig.data)
    upright = lay.xaxis.tickangle == -90
    assert upright == (max(map(len, ticks)) > 8)
    tick_px = max(map(len, ticks)) * 0.6 * 12 if upright else 12  # 12 px tick text: its height on the page
    legend_rows = -(-len(fig.data) // 3)
    assert lay.legend.yref == "container" and lay.legend.y == 0 and lay.legend.yanchor == "bottom"
    assert lay.margin.b >= tick_px + 20 + legend_rows * 20  # ticks, the x title and the legend, stacked
