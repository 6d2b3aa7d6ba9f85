"""The shared sidebar: what is being compared, the background fit's progress, and which result is shown."""
from __future__ import annotations

import streamlit as st

from dashboard import progress
from dashboard.state import jobs, models, runs, startup

POLL_SECONDS = 1.0


def _job_status() -> None:
    job = jobs.current_job()
    if job is None:
        return
    if not jobs.is_adopted(job):
        st.rerun()  # a result since the last poll (the fit's own, or the final one): redraw the whole app with it
    if job.running:
        progress.draw_progress(job)


def draw(show_progress: bool = True) -> None:
    """Draw the sidebar (called by the router on every page; the Fit page shows its own progress)."""
    with st.sidebar:
        st.markdown("### :material/biotech: kcore")
        st.caption("Knowledge consistency between two networks (Liang et al., ICLR 2020): what B's features "
                   "share with A's at each order of non-linearity, and what A misses.")
        if err := startup.default_error():
            st.warning(f"The default models could not be loaded: {err}")
        job = jobs.current_job()
        if show_progress and job is not None and job.running:
            what = "Chance baselines of" if job.partial is not None else "Fitting:"
            st.markdown(f"**{what}** {job.label}")
            st.fragment(_job_status, run_every=POLL_SECONDS)()
        table = runs.runs()
        if table:
            ids = list(table)[::-1]
            runs.apply_active_request()
            st.selectbox("Result shown", ids, format_func=lambda r: table[r].label, key=runs.ACTIVE_RUN_KEY,
                         help="Every fit of this session (newest first), and runs re-opened from folders.",
                         persist_state="session")
        else:
            a, b = models.slot("A"), models.slot("B")
            if a is not None and b is not None:
                st.caption(f"Ready: **A** {a.loaded.name} vs **B** {b.loaded.name}. Start on **Fit**.")
