"""Studies run from the Studies page: a ``kcore <study>`` process per run, its progress read from its log
(steps, elapsed time, an estimate of the time left from the last finished run of the same settings), Cancel,
and the quick settings the page offers by default.

A study is a job of the server's one queue (:func:`dashboard.state._jobs.registry`, shared with the fits): its
process starts only when its turn comes, a thread waits for it, and it is stopped (SIGTERM, then SIGKILL) when
cancelled or when its browser session has ended."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import streamlit as st

from dashboard.jobs import Job, wait_for_process
from dashboard.state._jobs import registry, session_key
from dashboard.state._paths import ROOT, studies_dir
from kcore._io import open_new_file, write_file_atomic
from kcore.study_options import StudyPlan, TimeEstimate, UnitCosts, estimate_time, probe_unit_costs, study_plan

QUICK: dict[str, dict[str, object]] = {
    "diagnosis": {"repeats": 1, "n_train": 600, "n_test": 200, "fit_epochs": 5, "epochs": 12},
    "stability": {"epochs": 3, "n_train": 1500, "n_test": 200, "n_images": 300, "fit_epochs": 5, "one_direction": True},
    "refinement": {"n_train": 600, "n_test": 200, "fit_epochs": 5, "epochs": 4},
    "compression": {"n_train": 300, "n_test": 200, "n_images": 200, "fit_epochs": 5},
    "distillation": {"generations": 2, "epochs": 2, "n_train": 800, "n_test": 200, "n_images": 200, "fit_epochs": 5},
    "cross_task": {"epochs": 2, "n_train": 800, "n_test": 200, "n_images": 200, "fit_epochs": 5},
}
"""The Studies page's default settings: smaller than each command's own defaults, meant to finish in a few
minutes on two CPU cores (the command's defaults, nearer the paper's scale, are one click away). Measured:
diagnosis with these settings took 147 s (``OMP_NUM_THREADS=2 kcore diagnosis --repeats 1 --n-train 600
--n-test 200 --fit-epochs 5 --epochs 12``, on a 2-core machine shared with other jobs); the other studies' quick
settings are sized alike but not timed yet."""
SCALES = {"quick": "Quick (a few minutes on 2 CPU cores)",
          "full": "Full (the command's own defaults, nearer the paper's scale: often much longer)"}
TIMINGS_FILE = ".timings.json"
"""Beside the study folders: per study and settings, how many log lines and seconds the last finished run took, and
its plan (:class:`kcore.study_options.StudyPlan`), which calibrates the time estimates of later runs."""
JOB_STATES = {"queued": "queued", "running": "running", "done": "finished", "cancelled": "cancelled",
              "failed": "failed"}


@dataclass(eq=False)
class StudyJob:
    """One ``kcore <study>`` process started from the page.

    Attributes:
        study: the study's name.
        out: its study folder (written when it finishes).
        proc: the process (None while the study waits in the server's queue).
        log: its stdout and stderr.
        args: the command-line arguments after ``kcore <study>`` (for the page and the timings' key).
        started: UNIX time (of the submission, then of the process's start).
        cancelled: set by :func:`cancel_study` (its exit is then reported as cancelled, not as a failure).
        job: its job in the server's queue (None for a process started by hand).
        plan: what it trains and fits (:func:`kcore.study_options.study_plan`), kept with its timing when it ends.
    """

    study: str
    out: Path
    proc: subprocess.Popen | None
    log: Path
    args: tuple[str, ...]
    started: float = field(default_factory=time.time)
    cancelled: bool = False
    finished: float | None = None
    job: Job | None = None
    plan: StudyPlan | None = None

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def position(self) -> int | None:
        """Its place in the server's queue (1 = next), or None when it is not waiting."""
        return registry().position(self.job.id) if self.job is not None and self.proc is None else None

    @property
    def state(self) -> str:
        """One of :data:`JOB_STATES`."""
        if self.proc is None:  # never started: waiting, cancelled in the queue, or the process failed to start
            return self.job.state if self.job is not None and self.job.state != "done" else "failed"
        code = self.proc.poll()
        if code is None:
            return "running"
        if self.finished is None:
            self.finished = time.time()
            if code == 0:
                _record_timing(self)
        if code == 0:
            return "done"
        return "cancelled" if self.cancelled or code in (-signal.SIGTERM, -signal.SIGINT) else "failed"

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def elapsed(self) -> float:
        return (self.finished or time.time()) - self.started

    def lines(self) -> list[str]:
        """The log's non-empty lines so far."""
        try:
            return [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return []


@dataclass(frozen=True)
class StudyProgress:
    """How far a study is: ``steps`` log lines so far (each a step it reported) of ``expected`` (from the last
    finished run of the same settings, None for a first run), elapsed seconds and the estimated time left."""

    steps: int
    expected: int | None
    elapsed: float
    eta: float | None
    last: str
    basis: str = "last_run"
    """What ``eta`` rests on: ``"last_run"`` (the last finished run of the same settings) or ``"plan"`` (the
    study's plan at this server's measured cost, :func:`expected_time`, when these settings never ran here)."""

    @property
    def fraction(self) -> float | None:
        return None if not self.expected else min(0.99, self.steps / self.expected)


def _key(study: str, args: tuple[str, ...]) -> str:
    return f"{study} {' '.join(a for a in args)}"


def _timings() -> dict:
    try:
        return json.loads((studies_dir() / TIMINGS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _record_timing(job: StudyJob) -> None:
    table = _timings()
    entry: dict = {"lines": len(job.lines()), "seconds": round(job.elapsed, 1)}
    if job.plan is not None:
        entry["plan"] = dataclasses.asdict(job.plan)
    table[_key(job.study, job.args)] = entry
    try:
        write_file_atomic(studies_dir() / TIMINGS_FILE, json.dumps(table, indent=1))
    except (OSError, ValueError):
        pass  # no estimate next time; nothing else depends on it


def progress(job: StudyJob) -> StudyProgress:
    lines = job.lines()
    last = _timings().get(_key(job.study, job.args))
    expected = int(last["lines"]) if last else None
    eta, basis = None, "last_run"
    if last and job.state == "running":
        eta = max(0.0, float(last["seconds"]) - job.elapsed)
    elif job.plan is not None and job.state == "running":
        eta, basis = max(0.0, estimate_time(job.plan, unit_costs(), history()).seconds - job.elapsed), "plan"
    return StudyProgress(len(lines), expected, job.elapsed, eta, lines[-1] if lines else "", basis)


def study_jobs() -> dict[str, StudyJob]:
    """This session's study runs, by folder name (oldest first)."""
    session_key()  # the page polls this while a study runs: the session is alive
    return st.session_state.setdefault("kc_study_jobs", {})


def study_running() -> bool:
    """Whether a study of this session is queued or running (the page's Run stays disabled meanwhile)."""
    return any(j.state in ("queued", "running") for j in study_jobs().values())


def start_study(study: str, values: Mapping[str, object]) -> StudyJob:
    """Queue ``kcore <study>`` with the checked ``values``, into a new folder under :func:`studies_dir`; its
    process starts when the server's queue lets it (at once when fewer than ``KCORE_MAX_JOBS`` jobs run).

    Raises:
        ValueError: a value the study does not accept (see :func:`kcore.study_options.study_command`).
        kcore.limits.LimitExceeded: a value over its cap (the message names the option, the cap and its
            environment variable), or this session already has its jobs (``KCORE_MAX_SESSION_JOBS``).
    """
    from kcore.study_options import new_study_folder, study_command

    out = new_study_folder(studies_dir(), study)
    cmd = study_command(study, values, out)  # checked on the server: typed values under their caps, no path
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".{out.name}.log"
    args = tuple(cmd[4:-2])  # between `python -m kcore.cli <study>` and `--out DIR`
    sj = StudyJob(study, out, None, log, args, plan=study_plan(study, values))
    return _submit(sj, cmd)


def _submit(sj: StudyJob, cmd: list[str]) -> StudyJob:
    """Queue ``cmd`` as the process of ``sj`` in the server's registry: started by ``prepare`` when its turn comes,
    then waited for (and stopped when cancelled) by the job's thread."""

    def launch(job: Job) -> subprocess.Popen:
        with open_new_file(sj.log, mode=0o600) as fh:  # never through a link planted at the log's name
            sj.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        sj.started = time.time()
        return sj.proc

    def wait(job: Job) -> int:
        try:
            code = wait_for_process(job, sj.proc)
        except Exception:
            sj.cancelled = sj.cancelled or job.cancel.is_set()
            raise
        if code != 0:
            raise ValueError(f"kcore {sj.study.replace('_', '-')} ended with exit code {code}; see its log.")
        return code

    sj.job = registry().submit(f"study {sj.name}", wait, session=session_key(), prepare=launch)
    study_jobs()[sj.name] = sj
    return sj


def cancel_study(job: StudyJob) -> None:
    """Stop a study: a queued one never starts; a running one gets SIGTERM now (SIGKILL if it lingers).
    It is then reported as cancelled."""
    if job.job is not None and job.job.running:
        job.cancelled = True
        registry().cancel(job.job.id)
    if job.proc is not None and job.proc.poll() is None:
        job.cancelled = True
        job.proc.terminate()


@st.cache_resource(show_spinner="Timing a short probe on this server (once) …")
def unit_costs() -> UnitCosts:
    """This server's cost of training and fitting per image-epoch (:func:`kcore.study_options.probe_unit_costs`),
    measured once per server process."""
    return probe_unit_costs()


def history() -> list[tuple[StudyPlan, float]]:
    """Finished runs on this server with their plan: (plan, seconds taken), from :data:`TIMINGS_FILE`."""
    found = []
    for entry in _timings().values():
        try:
            found.append((StudyPlan(**entry["plan"]), float(entry["seconds"])))
        except (KeyError, TypeError, ValueError):
            continue  # a run recorded before plans were kept, or an edited entry: no calibration from it
    return found


def expected_time(study: str, values: Mapping[str, object]) -> tuple[StudyPlan, TimeEstimate]:
    """The plan of ``kcore <study>`` with ``values`` and its expected run time on this server
    (:func:`kcore.study_options.estimate_time`: the probe's costs, calibrated by the finished runs kept here).

    Raises:
        ValueError: an unknown study.
    """
    plan = study_plan(study, values)
    return plan, estimate_time(plan, unit_costs(), history())


def needs_page_rerun(drawn_busy: bool) -> bool:
    """Whether a study of this session that was queued or running when the page was drawn (``drawn_busy``) has
    ended since: then the whole page must be drawn again (its Run button and its list of finished studies)."""
    return drawn_busy and not study_running()


def finished_studies() -> list[Path]:
    """The study folders under :func:`studies_dir` (each with its ``result.json``), newest first."""
    root = studies_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if not p.name.startswith(".") and (p / "result.json").is_file()]
    return sorted(found, key=lambda p: ((p / "result.json").stat().st_mtime, p.name), reverse=True)


def open_chosen_study() -> None:
    """The Studies page's choice among the finished studies (``kc_st_found``) opens it: its path goes into the path
    field (``kc_st_path``), which the page opens (a callback of the choice)."""
    st.session_state["kc_st_path"] = st.session_state.get("kc_st_found") or ""
