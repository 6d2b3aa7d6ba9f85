"""In a real browser, the Studies page redraws itself when its study ends: Run is enabled again and the new folder
is listed, with no click (the part that polls a running study asks for the whole page), and choosing it opens it.

Drives Debian's /usr/bin/chromium through Playwright (never `playwright install`); skipped without it."""
from __future__ import annotations

import os
import time

import pytest

from test_browser import CHROMIUM, _idle, browser, server  # noqa: F401  (fixtures: a server and a browser)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")
STUDY_TIMEOUT_MS = 900_000  # a guard against a hang: the tiny study takes ~30 s idle, minutes on a busy machine


@pytest.fixture(scope="module", autouse=True)
def studies_dir(tmp_path_factory):
    """The server's studies folder (set before the server starts: the fixture is autouse, so it runs first)."""
    folder = tmp_path_factory.mktemp("studies")
    old = os.environ.get("KCORE_STUDIES_DIR")
    os.environ["KCORE_STUDIES_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("KCORE_STUDIES_DIR", None)
    else:
        os.environ["KCORE_STUDIES_DIR"] = old


def test_a_finished_study_refreshes_the_page_by_itself_and_opens(server, browser, studies_dir):  # noqa: F811
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1024, "height": 700})
    page.goto(f"{server}/studies")
    page.get_by_text("Expected run time").wait_for(timeout=180_000)  # the first view times the probe
    _idle(page)
    page.get_by_role("combobox", name="Study", exact=True).click()
    page.get_by_role("option", name="cross-task").click()
    _idle(page)
    page.get_by_text("Options", exact=True).click()
    for label, value in (("n-train", 200), ("n-test", 100), ("n-images", 60), ("epochs", 1), ("fit-epochs", 1)):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
        _idle(page)
    page.get_by_role("button", name="Run").click()
    expect(page.get_by_role("button", name="Run")).to_be_disabled(timeout=60_000)
    t0 = time.monotonic()
    expect(page.get_by_text("finished in").first).to_be_visible(timeout=STUDY_TIMEOUT_MS)  # no click meanwhile
    expect(page.get_by_role("button", name="Run")).to_be_enabled(timeout=30_000)
    (folder,) = [p for p in studies_dir.iterdir() if (p / "result.json").is_file()]
    box = page.get_by_label("Finished studies on this server")
    box.scroll_into_view_if_needed()
    box.click()
    page.get_by_role("option", name=folder.name).click()
    _idle(page)
    expect(page.get_by_label("… or a folder path")).to_have_value(str(folder), timeout=60_000)
    expect(page.get_by_text("fine_to_coarse").first).to_be_visible(timeout=60_000)  # the folder's table is open
    print(f"the study ended and the page showed it {time.monotonic() - t0:.0f} s after it started running")
