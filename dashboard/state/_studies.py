"""Studies run from the Studies page: a ``kcore <study>`` process per run, its progress read from its log
(steps, elapsed time, an estimate of the time left from the last finished run of the same settings), Cancel,
and the quick settings the page offers by default."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import streamlit as st

from dashboard.state._paths import ROOT, studies_dir

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
"""Beside the study folders: per study and settings, how many log lines and seconds the last finished run took."""
JOB_STATES = {"running": "running", "done": "finished", "cancelled": "cancelled", "failed": "failed"}


@dataclass(eq=False)
class StudyJob:
    """One ``kcore <study>`` process started from the page.

    Attributes:
        study: the study's name.
        out: its study folder (written when it finishes).
        proc: the process.
        log: its stdout and stderr.
        args: the command-line arguments after ``kcore <study>`` (for the page and the timings' key).
        started: UNIX time.
        cancelled: set by :func:`cancel_study` (its exit is then reported as cancelled, not as a failure).
    """

    study: str
    out: Path
    proc: subprocess.Popen
    log: Path
    args: tuple[str, ...]
    started: float = field(default_factory=time.time)
    cancelled: bool = False
    finished: float | None = None

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def state(self) -> str:
        """One of :data:`JOB_STATES`."""
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
        return self.proc.poll()

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
    table[_key(job.study, job.args)] = {"lines": len(job.lines()), "seconds": round(job.elapsed, 1)}
    try:
        (studies_dir() / TIMINGS_FILE).write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # no estimate next time; nothing else depends on it


def progress(job: StudyJob) -> StudyProgress:
    lines = job.lines()
    last = _timings().get(_key(job.study, job.args))
    expected = int(last["lines"]) if last else None
    eta = None
    if last and job.state == "running":
        eta = max(0.0, float(last["seconds"]) - job.elapsed)
    return StudyProgress(len(lines), expected, job.elapsed, eta, lines[-1] if lines else "")


def study_jobs() -> dict[str, StudyJob]:
    """This session's study runs, by folder name (oldest first)."""
    return st.session_state.setdefault("kc_study_jobs", {})


def study_running() -> bool:
    """Whether a study of this session is still running (the page's Run stays disabled meanwhile)."""
    return any(j.state == "running" for j in study_jobs().values())


def start_study(study: str, values: Mapping[str, object]) -> StudyJob:
    """Run ``kcore <study>`` with the checked ``values`` in the background, into a new folder under
    :func:`studies_dir`.

    Raises:
        ValueError: a value the study does not accept (see :func:`kcore.study_options.study_command`).
    """
    from kcore.study_options import new_study_folder, study_command

    out = new_study_folder(studies_dir(), study)
    cmd = study_command(study, values, out)  # checked on the server: typed values, never a path or --out
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f".{out.name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    args = tuple(cmd[4:-2])  # between `python -m kcore.cli <study>` and `--out DIR`
    job = StudyJob(study, out, proc, log, args)
    study_jobs()[job.name] = job
    return job


def cancel_study(job: StudyJob) -> None:
    """Stop a running study (SIGTERM); it is then reported as cancelled."""
    if job.proc.poll() is None:
        job.cancelled = True
        job.proc.terminate()
