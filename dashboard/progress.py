"""A background fit's progress as the pages show it: the bar of its current stage, and the chance baselines that
run after the fit's own result is shown (the Overview's "baselines running" state)."""
from __future__ import annotations

from typing import Any

import streamlit as st

from dashboard.state import jobs, runs
from kcore.baselines import BASELINE_LABELS

POLL_SECONDS = 1.0
"""How often a running job's progress is redrawn."""


def progress_text(job: Any) -> str:
    """The line under a job's bar: its message (stage i of n, steps, time left in the stage), the time left in all
    (a range measured from the steps already run) and the seconds since it started."""
    text = job.message
    if job.eta_total is not None and job.eta is not None and job.eta_total.high > job.eta.high:
        text += f" · {job.eta_total.span()} left in all"
    return f"{text} · {job.elapsed:.0f} s"


def draw_progress(job: Any) -> None:
    """The bar of the job's current stage (its fraction is the stage's: step 110 of 800 shows 14 %)."""
    st.progress(job.fraction, text=progress_text(job))


def baseline_stage(stage: str) -> str | None:
    """``"baseline random_b A_to_B"`` → ``"random-init B, A → B"``; None for a stage that is not a baseline."""
    parts = stage.split(" ")
    if len(parts) != 3 or parts[0] != "baseline":
        return None
    return f"{BASELINE_LABELS.get(parts[1], parts[1])}, {runs.DIRECTION_TITLES.get(parts[2], parts[2])}"


def baselines_text(job: Any) -> str:
    """One line: which baseline runs, how far its stage is, and the time left (measured, as a range)."""
    which = baseline_stage(job.stage)
    if which is None:  # between stages (saving, starting the random network's features)
        return f"Chance baselines running: {job.message}"
    left = ""
    if job.eta_total is not None:
        left = f", about {job.eta_total.span()} left for the baselines"
    elif job.eta is not None:
        left = f", about {job.eta.span()} left in this stage"
    return f"Chance baselines running: {which} {job.fraction:.0%}{left}"


def _baselines_fragment(run_id: str) -> None:
    job = jobs.baseline_job(run_id)
    if job is None:  # ended since the last poll: redraw the page with the baselines (or the fit alone)
        st.rerun()
    st.info(baselines_text(job) + ". The fit's numbers below are final; the chance baselines, their lines on the "
            "chart and the verdict against chance appear here when they finish (Cancel on **Fit** stops them, "
            "the fit stays).", icon=":material/hourglass_top:")
    draw_progress(job)


def baselines_running(run: runs.RunEntry) -> bool:
    """Whether this session is still fitting the chance baselines of ``run``."""
    return jobs.baseline_job(run.id) is not None


def baselines_state(run: runs.RunEntry) -> None:
    """On a result page: while this run's chance baselines are still being fitted, say so with their progress (and
    redraw the page when they end); for a run whose baselines were asked for and never finished, say that."""
    if jobs.baseline_job(run.id) is not None:
        st.fragment(_baselines_fragment, run_every=POLL_SECONDS)(run.id)
        return
    pending = run.comparison.provenance.get("baselines_pending")
    if pending and not run.comparison.baselines:
        names = ", ".join(BASELINE_LABELS.get(k, k) for k in pending)
        st.caption(f"Chance baselines ({names}) were asked for but did not finish (cancelled or stopped): this run "
                   "has the fit's numbers only.")
