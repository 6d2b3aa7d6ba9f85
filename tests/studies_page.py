"""Open a study folder in the dashboard's Studies page under AppTest (used by the study tests)."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def open_in_dashboard(folder: str | Path):
    """Run the app, switch to the Studies page, open ``folder``; fail on any exception or error message."""
    import os

    from streamlit.testing.v1 import AppTest

    old = os.environ.get("KCORE_SERVER_ROOTS")
    os.environ["KCORE_SERVER_ROOTS"] = str(Path(folder).resolve().parent)  # typed paths must lie under a root
    try:
        at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
        at.switch_page("app_pages/studies.py").run()
        at.text_input(key="kc_st_path").set_value(str(folder)).run()
    finally:
        if old is None:
            os.environ.pop("KCORE_SERVER_ROOTS", None)
        else:
            os.environ["KCORE_SERVER_ROOTS"] = old
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at
