"""Charts that cannot mislead: every reference line on its axis, every baseline with its interval, clipped
error bars shown as clipped, the verdict against chance on the Overview and in the figure, per-channel shares
in % with intervals, searchable SVG text, and text at least 11 px where a 1024 px wide window shows it.

The planted run: a real small fit with chance baselines (tiny nets, random images), whose numbers are then
replaced by known ones: A → B's instability interval overlaps the random-init B's, the shuffled baseline is
1.507 with the interval [1.45, 1.56] (above 1: g over-fits), and A → B's x^Δ share is 0.97 with [0.90, 1.04]
(past 100 %).
"""
from __future__ import annotations

import dataclasses as dc
import os
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from dashboard.serve import CHROMIUM, CHROMIUM_ARGS, free_port, local_dashboard, wait_idle
from helpers import loaded, open_run_folder, tiny_net

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard import figures  # noqa: E402
from dashboard.state._runs import RunEntry  # noqa: E402
from kcore import export, viz  # noqa: E402
from kcore.verdict import verdict_from_intervals  # noqa: E402
from kcore.viz.style import MIN_SCREEN_PX, TEXT_PT, screen_px, text_sizes  # noqa: E402

SHUFFLED, SHUFFLED_CI = 1.507, (1.45, 1.56)
SHARE_RESIDUAL, SHARE_RESIDUAL_CI = 0.97, (0.90, 1.04)
DEAD = 1  # the channel of A → B planted without variance


def _report(rep, instability=None, ci=None, share_residual=None, dead: int | None = None):
    """``rep`` with planted numbers: the shares still add up to 1 (x⁽⁰⁾ takes the change of x^Δ's share)."""
    cis = rep.ci
    if instability is not None:
        rep, cis = dc.replace(rep, instability=instability), dc.replace(cis, instability=ci)
    if share_residual is not None:
        v, iv = share_residual
        shift = v - rep.share_residual
        orders = (rep.share_orders[0] - shift,) + tuple(rep.share_orders[1:])
        lo0, hi0 = cis.share_orders[0]
        cis = dc.replace(cis, share_residual=iv, share_orders=((lo0 - shift, hi0 - shift),) + cis.share_orders[1:])
        rep = dc.replace(rep, share_residual=v, share_orders=orders)
    if dead is not None:
        var_t = list(rep.per_channel.var_target)
        var_t[dead] = 0.0
        rep = dc.replace(rep, per_channel=dc.replace(rep.per_channel, var_target=tuple(var_t)))
    return dc.replace(rep, ci=cis)


def plant(comp):
    """The module's planted comparison (see the module docstring) from a real one with both baselines."""
    lo, hi = comp.baselines["random_b"].reports["A_to_B"].ci.instability
    mid = (lo + hi) / 2
    d = comp.directions["A_to_B"]
    rep = _report(d.fit.heldout_report, mid, (mid - 0.5 * (hi - lo), mid + (hi - lo)),
                  (SHARE_RESIDUAL, SHARE_RESIDUAL_CI), dead=DEAD)
    dirs = {**comp.directions, "A_to_B": dc.replace(d, fit=dc.replace(d.fit, heldout_report=rep))}
    sh = comp.baselines["shuffled"]
    reports = {k: _report(r, SHUFFLED, SHUFFLED_CI) for k, r in sh.reports.items()}
    return dc.replace(comp, directions=dirs, baselines={**comp.baselines, "shuffled": dc.replace(sh, reports=reports)})


@pytest.fixture(scope="module")
def real(random_images):
    from kcore.pipeline import compare

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    return compare(a, "2", b, "2", random_images(), orders=1, epochs=2, baselines=True, both_directions=True)


@pytest.fixture(scope="module")
def planted(real):
    return plant(real)


def _axes(fig):
    return [ax for ax in fig.axes if ax.get_ylabel()]


def _by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


# ------------------------------------------------------------------------------------------------ the verdict
def test_the_planted_run_has_the_verdicts_it_was_built_for(planted):
    v = planted.verdict("A_to_B")
    assert v.code == "like_random_b" and v.overfit
    assert v.headline == ("indistinguishable from chance (random-init B); "
                          "too few images: g over-fits (shuffled baseline > 1)")
    assert v.text.startswith("Indistinguishable from chance (a random-init B)")
    assert any(w.startswith("Too few images: g over-fits (shuffled pairing > 1)") for w in v.warnings)


def test_overfit_needs_the_whole_interval_above_1():
    """'exceeds 1 by more than its interval': an interval reaching down to 1 is no finding."""
    base = {"random_b": (0.5, 0.6)}
    assert verdict_from_intervals((0.2, 0.3), {**base, "shuffled": (1.001, 1.2)}).overfit
    assert not verdict_from_intervals((0.2, 0.3), {**base, "shuffled": (0.999, 1.2)}).overfit
    assert verdict_from_intervals((0.2, 0.3), {**base, "shuffled": (0.8, 0.9)}).headline == "consistent beyond chance"


# ------------------------------------------------------------------------------------------------ the chart
def test_every_reference_line_and_baseline_interval_is_inside_the_axis(planted):
    fig = figures.instability(RunEntry("planted", planted, None))
    ax = _axes(fig)[0]
    lo, hi = ax.get_ylim()
    lines = _by_gid(ax, "kcore-baseline")
    bands = _by_gid(ax, "kcore-baseline-band")
    n_refs = sum(len(b.reports) for b in planted.baselines.values())
    assert len(lines) == n_refs == 4 and len(bands) == n_refs  # every baseline with its interval
    ys = [seg[0][1] for line in lines for seg in line.get_segments()]
    assert SHUFFLED in [pytest.approx(y) for y in ys]
    band_ys = [y for band in bands for y in band.get_paths()[0].vertices[:, 1]]
    assert min(band_ys) == pytest.approx(min(b.reports[k].ci.instability[0] for b in planted.baselines.values()
                                             for k in b.reports))
    assert max(band_ys) == pytest.approx(SHUFFLED_CI[1])
    assert lo <= min(ys + band_ys) and max(ys + band_ys) < hi  # nothing drawn off the axis


def test_a_share_interval_past_100_percent_is_clipped_and_marked(planted, real):
    ax2 = _axes(figures.instability(RunEntry("planted", planted, None)))[1]
    lo, hi = ax2.get_ylim()
    assert (lo, hi) == (0.0, 1.0)
    tops = [y for coll in ax2.collections for seg in coll.get_segments() for _, y in seg]
    assert tops and max(tops) == pytest.approx(1.0) and min(tops) >= 0.0  # no error bar leaves [0, 1]
    marks = _by_gid(ax2, "kcore-clipped")
    assert marks and all(m.get_ydata()[0] == pytest.approx(1.0) and m.get_marker() == "^" for m in marks)
    # control: the same figure of a run whose intervals stay inside has no clipping mark (B → A's x^Δ interval
    # here is narrow, but its bar tops out at exactly 1: drop the intervals of the real run to none clipped)
    calm = dc.replace(real, directions={k: dc.replace(d, fit=dc.replace(d.fit, heldout_report=_report(
        d.fit.heldout_report, share_residual=(d.fit.heldout_report.share_residual,
                                              (d.fit.heldout_report.share_residual - 0.01,) * 2))))
        for k, d in real.directions.items()})
    assert not _by_gid(_axes(figures.instability(RunEntry("calm", calm, None)))[1], "kcore-clipped")


def test_the_figure_carries_the_verdict_and_its_svg_keeps_phrases_whole(planted, tmp_path):
    fig = figures.instability(RunEntry("planted", planted, None))
    title = fig.get_suptitle().replace("\n   ", " ")
    assert "A → B: indistinguishable from chance (random-init B); too few images: g over-fits" in title
    svg = export.figure_bytes(fig, "svg")
    texts = ["".join(el.itertext()) for el in ET.fromstring(svg).iter() if el.tag.endswith("}text")]
    assert "instability Var(x^Δ)/Var(x*)" in texts  # one element, not one glyph each
    assert any("indistinguishable from chance (random-init B)" in t for t in texts)
    assert not any(el.tag.endswith("}tspan") for el in ET.fromstring(svg).iter())
    assert b"<path" not in svg.split(b"instability Var")[0][-200:]  # no glyph outlines in front of the phrase


def test_figure_labels_are_plain_unicode():
    assert viz.order_tex(2) == "x⁽²⁾" == viz.order_label(2)
    assert (viz.RESIDUAL_TEX, viz.TARGET_TEX) == ("x^Δ", "x*")
    assert "$" not in viz.MapSpec("component", (0, 1)).tex + viz.MapSpec("blind_spot").tex


# ------------------------------------------------------------------------------------------------ text sizes
@pytest.mark.parametrize("name", ["instability", "variance", "loss"])
def test_overview_figures_have_no_text_below_the_floor(planted, name):
    fig = getattr(figures, name)(RunEntry("planted", planted, None))
    sizes = text_sizes(fig)
    assert sizes and min(s for _, s in sizes) >= TEXT_PT, [t for t in sizes if t[1] < TEXT_PT]


def test_screen_px_is_points_at_dpi_scaled_to_the_shown_width():
    assert screen_px(9.0, 144, 500, 1000) == pytest.approx(9.0 * 2 * 0.5)
    assert screen_px(12.0, 72, 300, 300) == 12.0


# ------------------------------------------------------------------------------------------------ filters
def test_channel_share_table_in_percent_with_the_bootstrap_intervals(planted):
    rep = planted.directions["A_to_B"].fit.heldout_report
    table = viz.channel_share_table(rep)
    K = rep.orders
    names = [viz.order_label(k) for k in range(K + 1)] + ["x^Δ"]
    assert list(table.columns) == ["channel", *names, "Var(x*)", "main order"]
    m = viz.share_matrix(rep)
    cso, csr = rep.ci.channel_share_orders, rep.ci.channel_share_residual
    for c in range(len(table)):
        if c == DEAD:
            continue
        for j, n in enumerate(names):
            iv = cso[j][c] if j <= K else csr[c]
            half = round(100 * (iv[1] - iv[0]) / 2)
            value = round(100 * m[c, j])
            assert table.loc[c, n] == f"{value if value else 0} ± {half if half else 0} %"
    assert all(table.loc[DEAD, n] == viz.NO_VARIANCE for n in names)
    assert table["main order"].isna().tolist() == [c == DEAD for c in range(len(table))]
    assert not any(cell.startswith("-0 ") for n in names for cell in table[n])
    rows = viz.channel_order(rep, "residual")
    assert viz.channel_share_table(rep, rows)["channel"].tolist() == rows


def test_channel_share_table_without_per_channel_intervals_shows_values_alone(planted):
    rep = planted.directions["B_to_A"].fit.heldout_report
    bare = dc.replace(rep, ci=dc.replace(rep.ci, channel_share_orders=None, channel_share_residual=None))
    cell = viz.channel_share_table(bare).loc[0, "x^Δ"]
    assert cell.endswith(" %") and "±" not in cell


# ------------------------------------------------------------------------------------------------ diagnosis
def test_diagnosis_colour_bars_sit_under_their_columns():
    from kcore.experiments.diagnosis import DiagnosisResult

    rng = np.random.default_rng(0)
    fake = types.SimpleNamespace(
        map_ids=["a", "b"], images=rng.random((2, 16, 16, 3)), blind_energy=rng.random((2, 4, 4)),
        unreliable_energy=rng.random((2, 4, 4)) * 5, map_labels=[0, 1], class_names=["x", "y"],
        energy_units="units²", weak=types.SimpleNamespace(name="w"), strong=types.SimpleNamespace(name="s"),
        layer_weak="l1", layer_strong="l2")
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = DiagnosisResult.maps_figure(fake)
    FigureCanvasAgg(fig).draw()
    maps = [ax for ax in fig.axes if ax.images]
    bars = [ax for ax in fig.axes if not ax.images]
    assert len(bars) == 2
    for j, cb in enumerate(bars, start=1):
        col = [ax.get_position() for ax in maps[j::3]]
        pos = cb.get_position()
        left, right = min(p.x0 for p in col), max(p.x1 for p in col)
        assert left <= (pos.x0 + pos.x1) / 2 <= right  # centred under its own column
        others = [ax.get_position() for i, ax in enumerate(maps) if i % 3 != j]
        assert all(pos.x1 <= o.x0 or o.x1 <= pos.x0 for o in others)  # not reaching under another column
        assert pos.y1 <= min(p.y0 for p in col)  # below the column, not floating beside it
    assert min(s for _, s in text_sizes(fig)) >= TEXT_PT


def test_accuracy_bars_start_at_zero():
    from kcore.experiments._arms import ArmResult, accuracy_figure

    arms = [ArmResult(n, "f", "u", 4, 0.1, acc, acc, (1.0,), 10, True, 0.1) for n, acc in
            (("x(0)", 0.91), ("x(0)+x(1)", 0.93))]
    ax = accuracy_figure(arms, "t", before=False).axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 93


# ------------------------------------------------------------------------------------------------ the pages
@pytest.fixture(scope="module")
def run_folder(planted, tmp_path_factory):
    from kcore.pipeline import write_run

    runs, exports = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("exports")
    return runs, exports, write_run(planted, runs / "planted")


@pytest.fixture()
def opened(run_folder, monkeypatch):
    from streamlit.testing.v1 import AppTest

    runs, exports, folder = run_folder
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    monkeypatch.setenv("KCORE_EXPORTS_DIR", str(exports))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    open_run_folder(at, folder)
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.mark.slow
def test_overview_warns_indistinguishable_and_overfit(opened):
    at = opened
    at.switch_page("app_pages/overview.py").run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any("Indistinguishable from chance (a random-init B)" in w for w in warnings), warnings
    assert sum("Too few images: g over-fits (shuffled pairing > 1)" in w for w in warnings) == 2, warnings
    captions = " ".join(img.caption for el in at.get("image") for img in el.proto.imgs)
    assert "A → B: indistinguishable from chance (random-init B); too few images" in captions


@pytest.mark.slow
def test_filters_table_in_percent_with_intervals_and_no_variance(opened):
    at = opened
    at.switch_page("app_pages/filters.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="kc_fl_dir").set_value("A_to_B").run()
    df = at.dataframe[0].value
    assert "x^Δ" in df.columns and df.loc[df["channel"] == DEAD, "x^Δ"].item() == viz.NO_VARIANCE
    live = df[df["channel"] != DEAD]["x^Δ"]
    assert live.str.fullmatch(r"-?\d+ ± \d+ %").all(), live.tolist()
    assert any("no variance on the held-out images" in c.value for c in at.caption)


# ------------------------------------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def server(run_folder, tmp_path_factory):
    runs, exports, _ = run_folder
    port = free_port()
    env = {**os.environ, "KCORE_RUNS_DIR": str(runs), "KCORE_EXPORTS_DIR": str(exports)}
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    with local_dashboard(env, port=port, log=log, timeout=90) as url:
        yield url


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_at_1024_px_overview_text_is_11_px_and_labels_are_whole(server, run_folder, planted):
    """A real Chromium at 1024×700: each Overview figure's smallest text, scaled to the width the browser gives
    its image, is at least 11 px; the Models page's source choices and the Filters table are not cut."""
    sync_api = pytest.importorskip("playwright.sync_api")
    _, _, folder = run_folder
    run = RunEntry("planted", planted, None)
    smallest = [min(s for _, s in text_sizes(getattr(figures, n)(run))) for n in ("instability", "variance", "loss")]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
        try:
            page = browser.new_page(viewport={"width": 1024, "height": 700})
            page.goto(server)
            page.get_by_role("heading", name="Models & images").wait_for(timeout=90_000)
            wait_idle(page)
            page.get_by_role("radio", name="Server", exact=True).nth(1).wait_for(timeout=90_000)
            groups = page.get_by_role("radiogroup", name="Source")
            for i in range(groups.count()):  # every source choice shows whole, no scrolling inside the control
                group = groups.nth(i)
                assert group.evaluate("g => g.scrollWidth <= g.clientWidth + 1"), group.evaluate(
                    "g => [g.scrollWidth, g.clientWidth]")
                box = group.bounding_box()
                for radio in group.get_by_role("radio").all():
                    b = radio.bounding_box()
                    assert box["x"] <= b["x"] and b["x"] + b["width"] <= box["x"] + box["width"] + 1, radio.inner_text()
            page.get_by_role("link", name="Fit", exact=True).first.click()
            field = page.get_by_placeholder("/path/to/run")
            field.wait_for(timeout=90_000)
            wait_idle(page)
            field.fill(str(folder))
            field.press("Enter")
            wait_idle(page)
            page.get_by_role("button", name="Open", exact=True).last.click()
            page.locator("code", has_text=str(folder)).first.wait_for(timeout=90_000)  # listed: it is open
            wait_idle(page)
            page.get_by_role("link", name="Overview", exact=True).first.click()
            page.get_by_role("heading", name="Overview").wait_for(timeout=90_000)
            wait_idle(page)
            images = page.locator('[data-testid="stMain"] img')
            sync_api.expect(images).to_have_count(3, timeout=90_000)
            shown = []
            for i in range(3):  # images below the fold load when scrolled to
                img = images.nth(i)
                img.scroll_into_view_if_needed()
                page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=img.element_handle(),
                                       timeout=90_000)
                shown.append(img.evaluate("i => [i.clientWidth, i.naturalWidth]"))
            from dashboard.ui import DISPLAY_DPI

            px = [screen_px(pt, DISPLAY_DPI, w, nat) for pt, (w, nat) in zip(smallest, shown)]
            for name, pt, (w, nat), h in zip(("instability", "variance", "loss"), smallest, shown, px):
                print(f"overview {name}: smallest text {pt} pt, PNG {nat} px shown {w} px wide -> {h:.1f} px")
            assert min(px) >= MIN_SCREEN_PX, list(zip(("instability", "variance", "loss"), px, shown))
            page.get_by_role("link", name="Filters", exact=True).first.click()
            page.get_by_role("heading", name="Filters").wait_for(timeout=90_000)
            wait_idle(page)
            grid = page.locator('[data-testid="stDataFrame"]').first
            grid.wait_for(timeout=90_000)
            # every column fits: the grid's scroller is no wider than its box (no sideways scrollbar inside it)
            scroller = grid.locator(".dvn-scroller").first
            scroller.wait_for(state="attached", timeout=90_000)
            assert scroller.evaluate("s => s.scrollWidth <= s.clientWidth + 1"), scroller.evaluate(
                "s => [s.scrollWidth, s.clientWidth]")
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------------ models page
@pytest.mark.slow
def test_models_page_classes_box_is_empty_until_typed_and_an_earlier_upload_is_named(monkeypatch, tmp_path):
    """'Classes' shows no 0 beside '10 classes (inferred)'; after a page change the (new, empty) upload box
    says which uploaded network is still in use."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    slot = at.session_state["kc_slot_A"]
    at.segmented_control(key="kc_src_A").set_value("upload").run()  # a new source empties the slot
    assert "kc_slot_A" not in at.session_state or at.session_state["kc_slot_A"] is None
    at.session_state["kc_slot_A"] = dc.replace(slot, source="upload", path=None)  # as an upload leaves it
    at.switch_page("app_pages/fit.py").run()
    at.switch_page("app_pages/setup.py").run()  # back: the upload box is a new, empty widget
    assert not at.exception, [e.value for e in at.exception]
    assert at.segmented_control(key="kc_src_A").value == "upload"
    box = at.number_input(key="kc_ncls_A")
    assert box.value is None and box.placeholder == "auto"
    assert any(f"In use: **{slot.loaded.name}**, uploaded earlier" in c.value for c in at.caption)
    box.set_value(7).run()
    assert at.number_input(key="kc_ncls_A").value == 7


def test_the_filters_heatmap_of_64_channels_stays_readable(planted):
    """64 channels across the page: at most WIDE_IN wide, text >= TEXT_PT, so >= 11 px in a 564 px wide main area
    (a 1024 px window with the sidebar open); every other channel is labelled, and the axis says so."""
    from dashboard.ui import DISPLAY_DPI
    from kcore.viz.charts import WIDE_IN

    rep = planted.directions["B_to_A"].fit.heldout_report
    wide = dc.replace(rep, per_channel=dc.replace(
        rep.per_channel, share_orders=tuple(tuple(v) * 13 for v in rep.per_channel.share_orders),
        share_residual=tuple(rep.per_channel.share_residual) * 13))
    fig = viz.channel_share_figure(wide, wide=True, max_channels=64)
    assert fig.get_figwidth() <= WIDE_IN
    assert min(s for _, s in text_sizes(fig)) >= TEXT_PT
    assert screen_px(TEXT_PT, DISPLAY_DPI, 564, fig.get_figwidth() * DISPLAY_DPI) >= MIN_SCREEN_PX
    ax = fig.axes[0]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert 16 <= len(ticks) < 64 and "labelled" in ax.get_xlabel()
