"""Background jobs of the dashboard: one queue for the whole server, a worker thread per job, and the budget of a fit.

Streamlit reruns the page script on every click; a fit inside the script would be interrupted (or would
block every rerun). So the Fit page submits a :class:`Job`: a ``threading.Thread`` runs
:func:`kcore.pipeline.compare` with a progress callback that only writes to the job, and a
``threading.Event`` that the Cancel button sets. A study from the Studies page is a job too: its ``prepare``
step starts the ``kcore <study>`` process and its thread waits for it, stopping it (SIGTERM, then SIGKILL)
when the job is cancelled. The registry lives in ``st.cache_resource`` (one per server process); each browser
session remembers its own job ids in ``st.session_state``. A fragment with ``run_every`` reads the job's
progress and draws ``st.progress``.

One budget for all sessions (:mod:`kcore.limits`):

- at most ``max_running`` jobs run at once (``KCORE_MAX_JOBS``); the others wait in one FIFO queue, and a
  queued job's message says its place ("queued: 2nd in line");
- a session may have at most ``per_session`` jobs waiting or running (``KCORE_MAX_SESSION_JOBS``);
- a job ends with its session: each job carries its session's key; a session counts as seen when one of its
  pages runs (:meth:`JobRegistry.touch`) or when ``session_alive`` says its browser is still connected, and
  :meth:`JobRegistry.sweep` (every few seconds, from :meth:`JobRegistry.start_reaper`) cancels the jobs of a
  session not seen for ``orphan_seconds`` (``KCORE_JOB_ORPHAN_SECONDS``);
- a fit request's options and cost are checked before it is queued (:func:`check_fit_request`).

Nothing here imports streamlit: the registry is a plain object, testable without a server (its clock and the
session probe are arguments).
"""
from __future__ import annotations

import collections
import logging
import math
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable

from kcore.features import ExtractionCancelled
from kcore.fit import FitCancelled
from kcore.limits import ENV_VARS, LimitExceeded, Limits, limits

log = logging.getLogger("kcore.dashboard")

#: job states and what each means (shown in the UI)
JOB_STATES: dict[str, str] = {
    "queued": "waiting for a free slot on the server",
    "running": "running in the background",
    "done": "finished",
    "failed": "stopped with an error",
    "cancelled": "cancelled",
}

TERM_GRACE_SECONDS = 10.0
"""How long a study process has after SIGTERM (to remove its half-written folder) before it is killed."""

ORPHAN_MESSAGE = "cancelled: its browser session ended"
SHUTDOWN_MESSAGE = "cancelled: the server is stopping"


class JobCancelled(Exception):
    """Raised by a task that stopped because its job was cancelled (the job then reads ``cancelled``)."""


@dataclass
class Job:
    """One background job. Written by its worker (progress, outcome) and by the registry (state, queue place).

    Attributes:
        id: unique job id (also the run id of a fit's result).
        label: what is being computed, for the UI.
        session: the key of the browser session that started it (None: no session, never orphaned).
        cancel: set by the Cancel button or the registry; the task checks it.
        state: one of :data:`JOB_STATES`.
        stage, fraction, message: the latest progress report (while queued, ``message`` gives the place).
        started: UNIX time it was submitted, then the time it started running.
        finished: UNIX time it ended (None while queued or running).
        result: what the task returned when ``state == "done"``.
        partial: a result the task published before it ended (:meth:`publish`: a fit's result before its chance
            baselines); kept when a later stage fails or is cancelled.
        eta, eta_total: the latest report's time left in its stage and in the whole job (:class:`kcore.progress.Eta`,
            None while not measured).
        error: a readable message when ``state == "failed"`` (or why it was cancelled).
        thread: its worker thread (None while queued).
        handle: what ``prepare`` returned (a study's process), None otherwise.
        done: set once the job has ended, whatever the outcome.
    """

    id: str
    label: str
    session: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"
    stage: str = "queued"
    fraction: float = 0.0
    message: str = "waiting for a free slot…"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    result: Any = None
    partial: Any = None
    eta: Any = None
    eta_total: Any = None
    error: str | None = None
    thread: threading.Thread | None = None
    handle: Any = None
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def running(self) -> bool:
        """Whether the job has not ended yet: queued or running (Start stays disabled meanwhile)."""
        return self.state in ("queued", "running")

    @property
    def queued(self) -> bool:
        """Whether the job still waits for a free slot."""
        return self.state == "queued"

    @property
    def elapsed(self) -> float:
        """Seconds since the job started (until it finished, once it has)."""
        return (self.finished or time.time()) - self.started

    def report(self, stage: str, fraction: float, message: str = "", *, eta: Any = None, eta_total: Any = None) -> None:
        """Progress callback for the worker (plain attribute writes; no ``st.*``)."""
        self.stage, self.fraction, self.message = stage, max(0.0, min(1.0, float(fraction))), message
        self.eta, self.eta_total = eta, eta_total

    def publish(self, result: Any) -> None:
        """Make ``result`` visible before the job ends (the worker's first result; the job goes on)."""
        self.partial = result


def ordinal(n: int) -> str:
    """``1`` -> ``'1st'``, ``2`` -> ``'2nd'``, ``11`` -> ``'11th'``, ``23`` -> ``'23rd'``."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class JobRegistry:
    """All jobs of this server process, by id, with one bounded FIFO queue (thread-safe).

    Args:
        max_running: jobs that may run at once (None: no bound).
        per_session: jobs one session may have waiting or running (None: no bound).
        orphan_seconds: a session not seen for longer has its jobs cancelled by :meth:`sweep` (None: never).
        clock: the clock of :meth:`touch` and :meth:`sweep`, in seconds (tests drive it by hand).
        session_alive: ``session -> bool``: whether the session's browser is connected now (counts as seen).

    Raises:
        ValueError: a bound below 1 (or a negative ``orphan_seconds``).
    """

    def __init__(self, max_running: int | None = None, per_session: int | None = None,
                 orphan_seconds: float | None = None, *, clock: Callable[[], float] = time.monotonic,
                 session_alive: Callable[[str], bool] | None = None) -> None:
        for name, value in (("max_running", max_running), ("per_session", per_session)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"JobRegistry: {name} must be None or an integer >= 1; got {value!r}. "
                                 "Fix: pass a positive number of jobs.")
        if orphan_seconds is not None and not (isinstance(orphan_seconds, (int, float)) and orphan_seconds >= 0):
            raise ValueError(f"JobRegistry: orphan_seconds must be None or a number >= 0; got {orphan_seconds!r}.")
        self.max_running, self.per_session, self.orphan_seconds = max_running, per_session, orphan_seconds
        self._clock, self._session_alive = clock, session_alive
        self._jobs: dict[str, Job] = {}
        self._queue: collections.deque[Job] = collections.deque()
        self._running: set[str] = set()
        self._seen: dict[str, float] = {}
        self._tasks: dict[str, tuple[Callable[[Job], Any], Callable[[Job], Any] | None]] = {}
        self._lock = threading.RLock()
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()

    @classmethod
    def from_limits(cls, caps: Limits | None = None, **kwargs: Any) -> JobRegistry:
        """A registry bounded by ``caps`` (default :func:`kcore.limits.limits`): ``max_jobs``,
        ``max_session_jobs`` and ``job_orphan_seconds``; ``kwargs`` go to the constructor."""
        caps = limits() if caps is None else caps
        return cls(caps.max_jobs, caps.max_session_jobs, caps.job_orphan_seconds, **kwargs)

    # -- reading -------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        """The job with id ``job_id``, or None."""
        with self._lock:
            return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """The job's place in the queue (1 = next to start), or None when it is not queued."""
        with self._lock:
            for i, job in enumerate(self._queue, 1):
                if job.id == job_id:
                    return i
        return None

    def running_jobs(self) -> list[Job]:
        """The jobs running now (at most ``max_running``)."""
        with self._lock:
            return [self._jobs[i] for i in self._running if i in self._jobs]

    def queued_jobs(self) -> list[Job]:
        """The jobs waiting, first in line first."""
        with self._lock:
            return list(self._queue)

    # -- submitting and ending -----------------------------------------------------------------------------

    def submit(self, label: str, task: Callable[[Job], Any], *, session: str | None = None,
               job_id: str | None = None, prepare: Callable[[Job], Any] | None = None) -> Job:
        """Queue ``task(job)``; it runs in a daemon thread as soon as a slot is free (at once if one is).

        ``prepare(job)``, if given, runs first, synchronously at the moment the job starts (in the submitting
        thread when a slot is free, else in the thread that freed the slot); its return value becomes
        ``job.handle``. ``task`` reports progress through ``job.report`` and must check ``job.cancel``. Its
        return value becomes ``job.result``. A ``ValueError`` or ``FileNotFoundError`` (bad input, with the
        core's readable message) or a cancellation ends the job cleanly; any other exception is logged with
        its traceback and shown as an unexpected error.

        Args:
            label: what is computed, for the UI.
            task: the work, ``job -> result``.
            session: the browser session's key (for the per-session bound and :meth:`sweep`).
            job_id: the job's id (default: a random one).
            prepare: started synchronously when the job's turn comes, e.g. a subprocess.

        Returns:
            The :class:`Job`, ``queued`` or ``running``.

        Raises:
            kcore.limits.LimitExceeded: the session already has ``per_session`` jobs waiting or running.
            ValueError: ``job_id`` is taken.
        """
        with self._lock:
            if job_id is not None and job_id in self._jobs:
                raise ValueError(f"job_id {job_id!r} is taken. Fix: leave job_id out for a fresh one.")
            if session is not None and self.per_session is not None:
                mine = [j for j in self._jobs.values() if j.session == session and j.running]
                if len(mine) >= self.per_session:
                    env = ENV_VARS["max_session_jobs"]
                    raise LimitExceeded(
                        f"this session already has {len(mine)} job(s) waiting or running ({mine[0].label}); this "
                        f"server allows at most {self.per_session} per browser session ({env}). Fix: wait for it "
                        f"to finish or cancel it; or, for the server's operator, raise the cap with {env}=<n>.",
                        cap_name="max_session_jobs", env=env, asked=len(mine) + 1, cap=self.per_session)
            job = Job(job_id or uuid.uuid4().hex[:10], label, session)
            self._tasks[job.id] = (task, prepare)
            self._jobs[job.id] = job
            self._queue.append(job)
            if session is not None:
                self._seen[session] = self._clock()
            starting = self._admit()
        self._launch(starting)
        return job

    def start(self, label: str, task: Callable[[Job], Any], job_id: str | None = None) -> Job:
        """:meth:`submit` without a session (kept for callers of the first API)."""
        return self.submit(label, task, job_id=job_id)

    def cancel(self, job_id: str, reason: str = "cancelled") -> Job | None:
        """Cancel a job: a queued one leaves the queue and never starts; a running one has its Event set.

        Returns:
            The job, or None for an unknown id.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                return None
            job.cancel.set()
            if job.state == "queued":
                self._queue.remove(job)
                self._tasks.pop(job.id, None)
                job.state, job.message, job.finished = "cancelled", reason, time.time()
                if reason != "cancelled":
                    job.error = reason
                job.done.set()
                self._number_queue()
            elif job.state == "running" and reason != "cancelled":
                job.error = reason
        return job

    def wait(self, job_id: str, timeout: float | None = None) -> Job | None:
        """Block until the job has ended (tests and the CLI); returns it (still running if ``timeout`` passed)."""
        job = self.get(job_id)
        if job is not None:
            job.done.wait(timeout)
            if job.thread is not None:
                job.thread.join(timeout)
        return job

    # -- sessions ------------------------------------------------------------------------------------------

    def touch(self, session: str) -> None:
        """Record that ``session`` is alive now (one of its pages ran)."""
        with self._lock:
            self._seen[session] = self._clock()

    def sweep(self) -> list[Job]:
        """Cancel the jobs of every session not seen for ``orphan_seconds``; forget its finished jobs.

        A session is seen when :meth:`touch` is called for it or when ``session_alive`` says it is connected
        (asked here, outside the lock).

        Returns:
            The jobs cancelled by this sweep.
        """
        if self.orphan_seconds is None:
            return []
        with self._lock:
            sessions = {j.session for j in self._jobs.values() if j.session is not None}
        alive = set()
        for s in sessions:
            try:
                if self._session_alive is not None and self._session_alive(s):
                    alive.add(s)
            except Exception:  # a probe that fails says nothing; the heartbeat still counts
                log.exception("session probe failed for %s", s)
        cancelled: list[Job] = []
        with self._lock:
            now = self._clock()
            for s in alive:
                self._seen[s] = now
            for s in sessions:
                if now - self._seen.get(s, now) <= self.orphan_seconds:
                    continue
                for job in [j for j in self._jobs.values() if j.session == s]:
                    if job.running and not job.cancel.is_set():
                        self.cancel(job.id, ORPHAN_MESSAGE)
                        cancelled.append(job)
                    elif not job.running:  # its session is gone: nobody will adopt the result
                        del self._jobs[job.id]
                if not any(j.session == s for j in self._jobs.values()):
                    self._seen.pop(s, None)
        for job in cancelled:
            log.info("job %s (%s) cancelled: session %s not seen for %s s", job.id, job.label, job.session,
                     self.orphan_seconds)
        return cancelled

    def start_reaper(self, interval: float = 5.0) -> None:
        """Run :meth:`sweep` every ``interval`` seconds in a daemon thread (once per registry)."""
        with self._lock:
            if self._reaper is not None:
                return

            def loop() -> None:
                while not self._stop.wait(interval):
                    try:
                        self.sweep()
                    except Exception:  # the reaper must outlive one bad sweep
                        log.exception("job sweep failed")

            self._reaper = threading.Thread(target=loop, name="kcore-job-reaper", daemon=True)
            self._reaper.start()

    def close(self) -> None:
        """Stop the reaper thread (jobs keep their state)."""
        self._stop.set()

    def shutdown(self, timeout: float = TERM_GRACE_SECONDS + 5.0) -> list[Job]:
        """Cancel every job that has not ended (the server is stopping) and wait up to ``timeout`` seconds in
        all for them to end, so that no study process outlives the server.

        Returns:
            The jobs that were cancelled.
        """
        self.close()
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.running]
            for job in jobs:
                self.cancel(job.id, SHUTDOWN_MESSAGE)
        deadline = time.monotonic() + timeout
        for job in jobs:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        return jobs

    # -- the queue (called with the lock held, except _launch and _run) -----------------------------------

    def _admit(self) -> list[Job]:
        starting = []
        while self._queue and (self.max_running is None or len(self._running) < self.max_running):
            job = self._queue.popleft()
            self._running.add(job.id)
            job.state, job.started = "running", time.time()
            job.report("starting", 0.0, "starting…")
            starting.append(job)
        self._number_queue()
        return starting

    def _number_queue(self) -> None:
        busy = len(self._running)
        for i, job in enumerate(self._queue, 1):
            job.message = f"queued: {ordinal(i)} in line ({busy} job(s) running on this server)"

    def _launch(self, jobs: list[Job]) -> None:
        for job in jobs:
            task, prepare = self._tasks.pop(job.id)
            if prepare is not None:
                try:
                    job.handle = prepare(job)
                except (ValueError, OSError) as exc:
                    job.state, job.error = "failed", f"could not start: {exc}"
                    self._finish(job)
                    continue
            job.thread = threading.Thread(target=self._run, args=(job, task), name=f"kcore-job-{job.id}",
                                          daemon=True)
            job.thread.start()

    def _run(self, job: Job, task: Callable[[Job], Any]) -> None:
        try:
            job.result = task(job)
            job.state = "done"
            job.report("done", 1.0, "finished")
        except (FitCancelled, ExtractionCancelled, JobCancelled):
            job.state = "cancelled"
            job.message = job.error or "cancelled"
        except (ValueError, FileNotFoundError) as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # the thread boundary: record it for the page, keep the traceback in the log
            log.exception("background job %s failed", job.id)
            job.state, job.error = "failed", f"unexpected error ({type(exc).__name__}): {exc}"
        finally:
            self._finish(job)

    def _finish(self, job: Job) -> None:
        job.finished = time.time()
        with self._lock:
            self._running.discard(job.id)
            starting = self._admit()
        job.done.set()
        self._launch(starting)


def stop_process(proc: subprocess.Popen, grace: float = TERM_GRACE_SECONDS) -> int:
    """Stop a process: SIGTERM, then SIGKILL if it is still alive after ``grace`` seconds.

    Returns:
        Its exit code (negative: the signal that ended it).
    """
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def wait_for_process(job: Job, proc: subprocess.Popen, poll: float = 0.5, grace: float = TERM_GRACE_SECONDS) -> int:
    """A job's task for a subprocess: wait for it to exit, stopping it when ``job.cancel`` is set.

    Returns:
        Its exit code.

    Raises:
        JobCancelled: the job was cancelled (the process has been stopped).
    """
    while proc.poll() is None:
        if job.cancel.wait(poll):
            stop_process(proc, grace)
            raise JobCancelled(job.error or "cancelled")
    return proc.returncode


def fit_work(n_images: int, epochs: int, *, both_directions: bool = False, n_baselines: int = 0,
             fit_seeds: int = 1) -> int:
    """The cost of a fit request in image-epochs: epochs × images × directions × (1 + baselines) × seeds."""
    return int(epochs) * int(n_images) * (2 if both_directions else 1) * (1 + int(n_baselines)) * int(fit_seeds)


def check_fit_request(params: Mapping[str, Any], n_images: int, caps: Limits | None = None) -> int:
    """Check a Fit page request against the server's caps before it is queued; the browser can send anything.

    Args:
        params: the keyword arguments for :func:`kcore.pipeline.compare`: ``orders``, ``lam``, ``epochs`` (None:
            the preset's), ``seed``, ``preset``, ``both_directions``, ``baselines`` (bool or kinds), and optionally
            ``fit_seeds``.
        n_images: images in the request.
        caps: the caps in force (default :func:`kcore.limits.limits`).

    Returns:
        The request's cost in image-epochs (:func:`fit_work`).

    Raises:
        TypeError: a number of the wrong type.
        ValueError: a negative or non-finite number, or an unknown preset.
        kcore.limits.LimitExceeded: K, λ, the epochs, the seed or the cost over its cap; the message names the
            setting, the cap, its environment variable and the fix.
    """
    from kcore.baselines import BASELINE_KINDS
    from kcore.fit import PRESETS

    caps = limits() if caps is None else caps

    def number(name: str, integer: bool) -> float:
        v = params.get(name)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok:
            raise TypeError(f"fit setting {name!r} must be {'an integer' if integer else 'a number'}; got {v!r} "
                            f"({type(v).__name__}). Fix: give a {'whole ' if integer else ''}number.")
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"fit setting {name!r} must be a finite number >= 0; got {v!r}. Fix: use 0 or more.")
        return v

    preset = params.get("preset", "fast")
    if preset not in PRESETS:
        raise ValueError(f"fit setting 'preset' must be one of {sorted(PRESETS)}; got {preset!r}.")
    caps.check("max_orders", number("orders", True), what="fit setting 'orders' (K)", fix="choose a smaller K")
    if params.get("lam") is not None:
        caps.check("max_coefficient", number("lam", False), what="fit setting 'lam' (λ)", fix="choose a smaller λ")
    caps.check("max_seed", number("seed", True), what="fit setting 'seed'", fix="choose a smaller seed")
    epochs = PRESETS[preset].epochs if params.get("epochs") is None else number("epochs", True)
    where = f"the {preset!r} preset's schedule" if params.get("epochs") is None else "as typed"
    caps.check("max_fit_epochs", epochs, what=f"fit setting 'epochs' ({where})",
               fix="choose fewer epochs (0 keeps the fast preset's schedule)")
    baselines = params.get("baselines", False)
    n_baselines = len(BASELINE_KINDS) if baselines is True else len(list(baselines or []))
    seeds = int(params.get("fit_seeds", 1) or 1)
    both = bool(params.get("both_directions", False))
    work = fit_work(n_images, int(epochs), both_directions=both, n_baselines=n_baselines, fit_seeds=seeds)
    nested = params.get("nested", False)
    if not isinstance(nested, bool):
        raise TypeError(f"fit setting 'nested' must be true or false; got {nested!r}. Fix: tick or untick the box.")
    if nested:  # g_1 … g_K are trained one after another, each with the schedule
        work *= max(1, int(params["orders"]))
    fits = (2 if both else 1) * (1 + n_baselines) * seeds
    caps.check("max_fit_work", work,
               what=(f"this fit request ({int(epochs)} epochs × {int(n_images)} images × {fits} fit(s): "
                     f"{'both directions' if both else 'one direction'}"
                     f"{f', each with {n_baselines} chance baselines' if n_baselines else ''}) costs"),
               shown=f"{work:,} image-epochs",
               fix="fewer epochs (0 = the preset's schedule), one direction, no chance baselines or fewer images")
    return work
