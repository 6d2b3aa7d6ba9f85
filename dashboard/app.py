"""kcore dashboard: a router over one page per workflow step, with a shared sidebar. No computation here.

    streamlit run dashboard/app.py --server.headless true --server.address 127.0.0.1
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `streamlit run dashboard/app.py` puts only dashboard/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from dashboard import sidebar  # noqa: E402
from dashboard.state import jobs, startup  # noqa: E402

# the icon is a file of this project (assets/, drawn by tools/make_icon.py): nothing is fetched from the internet
st.set_page_config(page_title="kcore · knowledge consistency", page_icon=str(ROOT / "assets" / "icon.png"),
                   layout="wide")

PAGES = {
    "Set up": [
        st.Page("app_pages/setup.py", title="Models & images", icon=":material/tune:", default=True),
        st.Page("app_pages/fit.py", title="Fit", icon=":material/play_arrow:"),
    ],
    "Results": [
        st.Page("app_pages/overview.py", title="Overview", icon=":material/bar_chart:"),
        st.Page("app_pages/explorer.py", title="Explorer", icon=":material/image_search:"),
        st.Page("app_pages/filters.py", title="Filters", icon=":material/grid_on:"),
        st.Page("app_pages/figure1.py", title="Figure 1", icon=":material/view_module:"),
        st.Page("app_pages/export.py", title="Export", icon=":material/download:"),
    ],
    "Studies": [
        st.Page("app_pages/studies.py", title="Paper studies", icon=":material/science:"),
        st.Page("app_pages/sweep.py", title="Layer sweep", icon=":material/stacked_line_chart:"),
        st.Page("app_pages/compare_runs.py", title="Compare runs", icon=":material/compare_arrows:"),
    ],
}

page = st.navigation(PAGES)
startup.freeze_startup_objects()
startup.ensure_defaults()
jobs.adopt_finished_jobs()
sidebar.draw(show_progress=page.title != "Fit")
page.run()
