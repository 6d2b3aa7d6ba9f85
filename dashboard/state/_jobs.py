"""This session's background fits: starting one, the latest job, and adopting finished results as runs."""
from __future__ import annotations

import logging
import time
import uuid

import streamlit as st

from dashboard.jobs import Job, JobRegistry
from dashboard.state._images import ImageChoice
from dashboard.state._models import ModelSlot
from dashboard.state._paths import runs_dir
from dashboard.state._runs import RunEntry, add_run, counters


@st.cache_resource(show_spinner=False)
def registry() -> JobRegistry:
    """The process-wide job registry (one per server)."""
    return JobRegistry()


def session_jobs() -> list[str]:
    """Ids of this session's jobs, oldest first."""
    return st.session_state.setdefault("kc_jobs", [])


def current_job() -> Job | None:
    """This session's latest job, if any."""
    ids = session_jobs()
    return registry().get(ids[-1]) if ids else None


def job_running() -> bool:
    """Whether this session's latest fit is still running (Start fit stays disabled meanwhile)."""
    job = current_job()
    return job is not None and job.running


def _adopted() -> set[str]:
    return st.session_state.setdefault("kc_adopted", set())


def is_adopted(job: Job) -> bool:
    """Whether a finished job's result is already among this session's runs (else the page should rerun)."""
    return job.id in _adopted()


def adopt_finished_jobs() -> list[RunEntry]:
    """Move the results of this session's finished jobs into its runs (once each)."""
    adopted = _adopted()
    new = []
    for jid in session_jobs():
        job = registry().get(jid)
        if job is None or jid in adopted or job.running:
            continue
        adopted.add(jid)
        if job.state == "done" and job.result is not None:
            add_run(job.result)
            new.append(job.result)
    return new


def start_fit(a: ModelSlot, layer_a: str, b: ModelSlot, layer_b: str, choice: ImageChoice, params: dict) -> Job:
    """Start :func:`kcore.pipeline.compare` in the background; the result becomes a :class:`RunEntry`.

    The worker only touches the job (progress, cancel, result), never ``st.*``. The finished comparison is
    written as a run folder under :func:`runs_dir` (with the held-out input images, for overlays); if that
    fails the result is still kept for the session.
    """
    from kcore.pipeline import compare, heldout_images, write_run

    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    label = f"{a.loaded.name}:{layer_a} vs {b.loaded.name}:{layer_b}"
    images_ = choice.images
    out = runs_dir() / run_id

    def task(job: Job) -> RunEntry:
        comp = compare(
            a.loaded, layer_a, b.loaded, layer_b, images_, image_source=choice.description, paths=(a.path, b.path),
            progress=lambda p: job.report(p.stage, p.fraction, p.message), cancel=job.cancel, **params,
        )
        job.report("saving", 1.0, "saving the run folder")
        raw = heldout_images(comp, images_)
        run_dir = None
        try:
            run_dir = write_run(comp, out, images=raw)
        except OSError as exc:
            logging.getLogger("kcore.dashboard").warning("could not write the run folder: %s", exc)
        return RunEntry(run_id, comp, run_dir, raw, "fit")

    job = registry().start(label, task, job_id=run_id)
    session_jobs().append(job.id)
    counters()["fits_started"] += 1
    return job
