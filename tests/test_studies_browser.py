"""In a real browser, the Studies page redraws itself when its study ends: Run is enabled again and the new folder
is listed, with no click (the part that polls a running study asks for the whole page), and choosing it opens it.

Drives Debian's /usr/bin/chromium through Playwright (never `playwright install`); skipped without it."""
from __future__ import annotations

import time

import pytest

from dashboard.serve import CHROMIUM, local_dashboard, wait_idle

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")
STUDY_TIMEOUT_MS = 900_000  # a guard against a hang: the tiny study takes ~30 s idle, minutes on a busy machine


@pytest.fixture(scope="module")
def studies_dir(tmp_path_factory):
    """The server's studies folder."""
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="module")
def server(studies_dir, tmp_path_factory):
    env = {"KCORE_STUDIES_DIR": str(studies_dir), "KCORE_RUNS_DIR": str(tmp_path_factory.mktemp("runs")),
           "KCORE_EXPORTS_DIR": str(tmp_path_factory.mktemp("exports"))}
    with local_dashboard(env, log=tmp_path_factory.mktemp("log") / "streamlit.log") as url:
        yield url


def test_a_finished_study_refreshes_the_page_by_itself_and_opens(server, browser, studies_dir):
    expect = sync_api.expect
    page = browser.new_page(viewport={"width": 1024, "height": 700})
    page.goto(f"{server}/studies")
    page.get_by_text("Expected run time").wait_for(timeout=180_000)  # the first view times the probe
    wait_idle(page)
    page.get_by_role("combobox", name="Study", exact=True).click()
    page.get_by_role("option", name="cross-task").click()
    wait_idle(page)
    page.get_by_text("Options", exact=True).click()
    for label, value in (("n-train", 200), ("n-test", 100), ("n-images", 60), ("epochs", 1), ("fit-epochs", 1)):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
        wait_idle(page)
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
    wait_idle(page)
    expect(page.get_by_label("… or a folder path")).to_have_value(str(folder), timeout=60_000)
    expect(page.get_by_text("fine_to_coarse").first).to_be_visible(timeout=60_000)  # the folder's table is open
    print(f"the study ended and the page showed it {time.monotonic() - t0:.0f} s after it started running")
