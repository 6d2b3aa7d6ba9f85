"""A person's view: a real Chromium opens the dashboard, runs the default comparison and sees the overlay.

Drives Debian's /usr/bin/chromium through Playwright (never `playwright install`); skipped without it.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from dashboard.serve import CHROMIUM, free_port, local_dashboard, wait_idle

ROOT = Path(__file__).resolve().parents[1]
FIT_TIMEOUT_MS = 300_000
EPOCHS = int(os.environ.get("KCORE_BROWSER_EPOCHS", "3"))
"""Epochs typed into the Fit page (0 keeps the preset's full schedule: minutes on a busy 2-core machine)."""
REVIEW_COPY = Path("/tmp/kcore_screenshot.png")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    env = {**os.environ, "KCORE_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
           "KCORE_EXPORTS_DIR": str(tmp_path_factory.mktemp("exports"))}
    log = tmp_path_factory.mktemp("log") / "streamlit.log"
    with local_dashboard(env, port=port, log=log, timeout=60) as url:
        yield url


def test_default_fit_shows_the_overlay(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(server)
    page.get_by_role("heading", name="Models & images").wait_for(timeout=60_000)
    page.get_by_text("kshapes_tinynet_s0.safetensors").first.wait_for(timeout=60_000)  # the default, no upload
    wait_idle(page)
    page.get_by_role("link", name="Fit", exact=True).first.click()
    start = page.get_by_role("button", name="Start fit")
    start.wait_for(timeout=60_000)
    wait_idle(page)
    if EPOCHS:  # the default models, layers and images, with a short schedule (see EPOCHS)
        field = page.get_by_role("spinbutton", name="Epochs (0 = preset schedule)")
        field.fill(str(EPOCHS))
        field.press("Enter")
        wait_idle(page)
    t0 = time.perf_counter()
    start.click()
    page.get_by_text("Finished in").wait_for(timeout=FIT_TIMEOUT_MS)
    print(f"default fit seen finished in the browser after {time.perf_counter() - t0:.1f} s")
    wait_idle(page)

    page.get_by_role("link", name="Explorer", exact=True).first.click()
    page.get_by_role("heading", name="Explorer").wait_for(timeout=60_000)
    page.get_by_text("Blind-spot energy").first.wait_for(timeout=60_000)  # the caption under the second map
    charts = page.locator('[data-testid="stPlotlyChart"]')
    sync_api.expect(charts).to_have_count(2, timeout=60_000)
    # Plotly has drawn each view: the heat map's raster layer and its colour bar
    for i in range(2):
        chart = charts.nth(i)
        chart.locator("g.colorbar").first.wait_for(state="attached", timeout=60_000)
        chart.locator("g.heatmaplayer image, g.imagelayer image").first.wait_for(state="attached", timeout=60_000)
        assert chart.bounding_box()["width"] > 100
    wait_idle(page)
    shot = tmp_path / "explorer.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    try:
        shutil.copyfile(shot, REVIEW_COPY)
    except OSError:
        pass
    page.close()


ASSETS = ROOT / "assets"
# the README's screenshots are refreshed only on request (a test run leaves the checkout as it found it):
# KCORE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_browser.py
SCREENSHOTS_ENV = "KCORE_SCREENSHOTS"
PAGES = [  # (link in the sidebar, heading, screenshot name)
    ("Models & images", "Models & images", "models"),
    ("Fit", "Fit", "fit"),
    ("Overview", "Overview", "overview"),
    ("Explorer", "Explorer", "explorer"),
    ("Filters", "Filters", "filters"),
    ("Figure 1", "Figure 1", "figure1"),
    ("Export", "Export", "export"),
    ("Paper studies", "Studies", "studies"),
    ("Layer sweep", "Layer sweep", "sweep-page"),  # not "sweep": assets/screenshot-sweep.png is the depth plot's
    ("Compare runs", "Compare runs", "compare-runs"),
]


def _local(url: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    return u.scheme in ("data", "blob", "about") or u.hostname == "127.0.0.1"


def _check_depth_plot(page, shot: str) -> None:
    """The depth plot uses its whole width, its two panel titles do not overlap, its x tick labels neither each
    other nor the legend (which lies wholly under them): boxes of the drawn text, as the browser lays it out."""
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"stPlotlyChart\"] .legendtext').length",
                           timeout=30_000)
    got = page.evaluate("""() => {
        const chart = document.querySelector('[data-testid="stPlotlyChart"]');
        const box = e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        return {chart: box(chart), svg: box(chart.querySelector('.main-svg')),
                titles: [...chart.querySelectorAll('.annotation-text')].map(box),
                ticks: [...chart.querySelectorAll('.xtick text')].map(box),
                legend: [...chart.querySelectorAll('.legendtext')].map(box)};
    }""")

    def apart(a, b) -> bool:
        return a[2] <= b[0] + 1 or b[2] <= a[0] + 1 or a[3] <= b[1] + 1 or b[3] <= a[1] + 1

    assert got["svg"][2] - got["svg"][0] >= 0.9 * (got["chart"][2] - got["chart"][0]), (shot, got)
    assert len(got["titles"]) == 2 and apart(*got["titles"]), (shot, got["titles"])
    assert all(apart(a, b) for i, a in enumerate(got["ticks"]) for b in got["ticks"][i + 1:]), (shot, got["ticks"])
    assert min(b[1] for b in got["legend"]) >= max(b[3] for b in got["ticks"]), (shot, got)


def test_every_page_fits_1024x700_and_nothing_leaves_the_machine(server, browser, tmp_path):
    """At 1024×700 no page scrolls sideways, no request goes anywhere but 127.0.0.1 (no icon or font from the
    internet), and a screenshot of every page is taken: into assets/ (the README shows them) with
    ``KCORE_SCREENSHOTS=1``, otherwise into the test's temporary folder."""
    shots_dir = ASSETS if os.environ.get(SCREENSHOTS_ENV) == "1" else tmp_path
    page = browser.new_page(viewport={"width": 1024, "height": 700})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(server)
    page.get_by_role("heading", name="Models & images").wait_for(timeout=60_000)
    page.get_by_text("kshapes_tinynet_s0.safetensors").first.wait_for(timeout=60_000)
    wait_idle(page)
    # a short fit so that the result pages have something to show
    page.get_by_role("link", name="Fit", exact=True).first.click()
    start = page.get_by_role("button", name="Start fit")
    start.wait_for(timeout=60_000)
    wait_idle(page)
    field = page.get_by_role("spinbutton", name="Epochs (0 = preset schedule)")
    field.fill("2")
    field.press("Enter")
    wait_idle(page)
    start.click()
    page.get_by_text("Finished in").wait_for(timeout=FIT_TIMEOUT_MS)
    wait_idle(page)
    # a short layer sweep, so that the Layer sweep page shows its result and Compare runs has pairs to pick
    page.get_by_role("link", name="Layer sweep", exact=True).first.click()
    start = page.get_by_role("button", name="Start sweep")
    start.wait_for(timeout=60_000)
    wait_idle(page)
    for label, value in (("K (highest order)", "1"), ("Epochs (0 = preset schedule)", "1")):
        field = page.get_by_role("spinbutton", name=label)
        field.fill(value)
        field.press("Enter")
        wait_idle(page)
    start.click()
    page.get_by_text("Reproduce this sweep").wait_for(timeout=FIT_TIMEOUT_MS)  # drawn with the finished result
    wait_idle(page)
    ASSETS.mkdir(exist_ok=True)
    too_wide = {}
    for link, heading, shot in PAGES:
        page.get_by_role("link", name=link, exact=True).first.click()
        page.get_by_role("heading", name=heading).first.wait_for(timeout=60_000)
        wait_idle(page)
        if shot == "explorer":
            charts = page.locator('[data-testid="stPlotlyChart"]')
            sync_api.expect(charts).to_have_count(2, timeout=60_000)
            assert charts.first.bounding_box()["width"] > 250  # the maps are not shrunk to thumbnails
        if shot == "compare-runs":  # two pairs of the sweep side by side
            for _ in range(2):
                page.locator('[data-testid="stMultiSelect"]').first.click()
                page.get_by_role("option").first.click()
                wait_idle(page)
            page.keyboard.press("Escape")
            wait_idle(page)
        if shot in ("sweep-page", "compare-runs"):  # the depth plot is drawn
            sync_api.expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(1, timeout=60_000)
            assert page.locator('[data-testid="stPlotlyChart"]').first.bounding_box()["width"] > 250
            _check_depth_plot(page, shot)
        widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        if widths[0] > widths[1]:
            too_wide[shot] = widths
        # nothing drawn past the window's right edge either (Streamlit scrolls inside its main area)
        cut = page.evaluate("""() => [...document.querySelectorAll('[data-testid="stMain"] img, '
            + '[data-testid="stMain"] .js-plotly-plot, [data-testid="stMain"] [data-testid="stDataFrame"]')]
            .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1).length""")
        if cut:
            too_wide[f"{shot} (elements cut at the right)"] = cut
        # Streamlit scrolls inside its main area, so a taller window shows the whole page in the screenshot
        page.set_viewport_size({"width": 1024, "height": 1500})
        wait_idle(page)
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        time.sleep(1.0)
        page.screenshot(path=str(shots_dir / f"screenshot-{shot}.png"))
        page.set_viewport_size({"width": 1024, "height": 700})
    page.close()
    assert not too_wide, f"pages that scroll sideways at 1024 px (scrollWidth, innerWidth): {too_wide}"
    outside = sorted({u for u in requests if not _local(u)})
    assert not outside, f"requests that left 127.0.0.1: {outside[:10]}"
    assert not [u for u in failed if not _local(u)]
