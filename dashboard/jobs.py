"""Background fits: a worker thread per job that never calls ``st.*``, and a registry the pages poll.

Streamlit reruns the page script on every click; a fit inside the script would be interrupted (or would
block every rerun). So the Fit page starts a :class:`Job`: a ``threading.Thread`` runs
:func:`kcore.pipeline.compare` with a progress callback that only writes to the job, and a
``threading.Event`` that the Cancel button sets. The registry lives in ``st.cache_resource`` (one per
server process); each browser session remembers its own job ids in ``st.session_state``. A fragment with
``run_every`` reads the job's progress and draws ``st.progress``.

Nothing here imports streamlit: the registry is a plain object, testable without a server.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from kcore.features import ExtractionCancelled
from kcore.fit import FitCancelled

log = logging.getLogger("kcore.dashboard")

#: job states and what each means (shown in the UI)
JOB_STATES: dict[str, str] = {
    "running": "running in the background",
    "done": "finished",
    "failed": "stopped with an error",
    "cancelled": "cancelled",
}


@dataclass
class Job:
    """One background run. Written only by its worker (progress, outcome) and read by the pages.

    Attributes:
        id: unique job id (also the run id of its result).
        label: what is being compared, for the UI.
        cancel: set by the Cancel button; the core checks it every batch.
        state: one of :data:`JOB_STATES`.
        stage, fraction, message: the latest progress report.
        result: what the task returned (a :class:`RunEntry`-like object) when ``state == "done"``.
        error: a readable message when ``state == "failed"``.
    """

    id: str
    label: str
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "running"
    stage: str = "queued"
    fraction: float = 0.0
    message: str = "starting…"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: Any = None
    error: str | None = None
    thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def report(self, stage: str, fraction: float, message: str = "") -> None:
        """Progress callback for the worker (plain attribute writes; no ``st.*``)."""
        self.stage, self.fraction, self.message = stage, max(0.0, min(1.0, float(fraction))), message


class JobRegistry:
    """All jobs of this server process, by id (thread-safe)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(self, label: str, task: Callable[[Job], Any], job_id: str | None = None) -> Job:
        """Run ``task(job)`` in a daemon thread; its return value becomes ``job.result``.

        ``task`` reports progress through ``job.report`` and must check ``job.cancel``. A ``ValueError``
        (bad input, with the core's readable message) or a cancellation ends the job cleanly; any other
        exception is logged with its traceback and shown as an unexpected error.
        """
        job = Job(job_id or uuid.uuid4().hex[:10], label)
        with self._lock:
            self._jobs[job.id] = job

        def run() -> None:
            try:
                job.result = task(job)
                job.state = "done"
                job.report("done", 1.0, "finished")
            except (FitCancelled, ExtractionCancelled):
                job.state = "cancelled"
                job.message = "cancelled"
            except (ValueError, FileNotFoundError) as exc:
                job.state, job.error = "failed", str(exc)
            except Exception as exc:  # the thread boundary: record it for the page, keep the traceback in the log
                log.exception("background job %s failed", job.id)
                job.state, job.error = "failed", f"unexpected error ({type(exc).__name__}): {exc}"
            finally:
                job.finished = time.time()

        job.thread = threading.Thread(target=run, name=f"kcore-job-{job.id}", daemon=True)
        job.thread.start()
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job's thread ends (tests and the CLI)."""
        job = self.get(job_id)
        if job is not None and job.thread is not None:
            job.thread.join(timeout)
        return job
