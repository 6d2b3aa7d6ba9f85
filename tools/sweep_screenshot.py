"""Take the README's screenshot of the Layer sweep page: a sweep of the sample models in a real Chromium.

    .venv/bin/python tools/sweep_screenshot.py [--port 8606] [--epochs 5] [--out assets/screenshot-sweep.png]

Starts the dashboard (headless, on 127.0.0.1), opens it in Debian's /usr/bin/chromium through Playwright at
1024 px wide, runs the default sweep (the deepest stages of the default pair matched, both directions, chance
baselines) on the 400 bundled images with a short schedule, and saves the page once the depth plot is drawn.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python tools/sweep_screenshot.py` puts only tools/ on the path
    sys.path.insert(0, str(ROOT))

from dashboard.serve import CHROMIUM, CHROMIUM_ARGS, local_dashboard, wait_idle  # noqa: E402


def _idle(page) -> None:
    wait_idle(page, 120_000)


def _number(page, label: str, value: int) -> None:
    field = page.get_by_role("spinbutton", name=label)
    field.fill(str(value))
    field.press("Enter")
    _idle(page)


def main() -> int:
    """Start the dashboard, run the sweep in Chromium and save the depth plot's screenshot; returns 0."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8606)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot-sweep.png")
    args = p.parse_args()
    from playwright.sync_api import sync_playwright

    runs = tempfile.mkdtemp(prefix="kcore-sweep-shot-")
    with local_dashboard({"KCORE_RUNS_DIR": runs}, port=args.port, timeout=120) as url:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=list(CHROMIUM_ARGS))
            page = browser.new_page(viewport={"width": 1024, "height": 900})
            page.goto(url)
            page.get_by_role("heading", name="Models & images").wait_for(timeout=120_000)
            _idle(page)
            page.get_by_role("link", name="Layer sweep", exact=True).first.click()
            page.get_by_role("button", name="Start sweep").wait_for(timeout=120_000)
            _idle(page)
            _number(page, "Epochs (0 = preset schedule)", args.epochs)
            box = page.get_by_role("checkbox", name="Chance baselines")
            box.check(force=True)
            _idle(page)
            if not box.is_checked():
                raise SystemExit("could not tick 'Chance baselines'")
            page.get_by_role("button", name="Start sweep").click()
            page.get_by_text("Finished in").wait_for(timeout=1_200_000)
            _idle(page)
            chart = page.locator('[data-testid="stPlotlyChart"]').first
            chart.wait_for(timeout=120_000)
            chart.scroll_into_view_if_needed()
            time.sleep(1.0)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            chart.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
