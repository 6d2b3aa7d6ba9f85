"""This session's background fits: starting one, the latest job, and adopting finished results as runs.

The process-wide :class:`~dashboard.jobs.JobRegistry` (fits and studies share its queue) knows each browser
session by :func:`session_key`: Streamlit's session id plus a random part. Every page run touches it (the router
calls :func:`adopt_finished_jobs`, the sidebar's fragment :func:`current_job`), and the registry's reaper also
asks Streamlit's runtime whether the session's browser is still connected (:func:`_session_connected`), so a
job is cancelled ``KCORE_JOB_ORPHAN_SECONDS`` after its tab is closed, not while its page merely sits idle."""
from __future__ import annotations

import atexit
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import streamlit as st

from dashboard.jobs import Job, JobRegistry, check_fit_request
from dashboard.state._images import ImageChoice
from dashboard.state._models import ModelSlot
from dashboard.state._paths import runs_dir
from dashboard.state._runs import RunEntry, add_run, counters

if TYPE_CHECKING:
    from kcore.fit import FitConfig

REAPER_SECONDS = 5.0
"""How often the registry looks for jobs whose session has ended."""


@dataclass(frozen=True)
class FitRequest:
    """The Fit page's settings, typed: what :func:`start_fit` checks on the server and turns into a FitConfig.

    Attributes:
        orders, lam, seed: K, λ and the seed of :class:`kcore.FitConfig`.
        epochs: a number of epochs taken literally, or ``None`` for the preset's schedule.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        preset: a name of :data:`kcore.fit.PRESETS`.
        both_directions: also fit B → A.
        baselines: also fit the chance baselines.
        fit_seeds: fits per direction with seeds ``seed …`` (1 = one fit).
        nested: fit the orders as nested models (:mod:`kcore.fit.nested`, linear gates) and report their gains.
    """

    orders: int = 2
    lam: float = 0.1
    epochs: int | None = None
    seed: int = 0
    device: str = "auto"
    preset: str = "fast"
    both_directions: bool = False
    baselines: bool = False
    fit_seeds: int = 1
    nested: bool = False

    @staticmethod
    def from_params(params: Mapping[str, Any]) -> "FitRequest":
        """A request from a mapping of its fields (what a browser could send).

        Raises:
            TypeError: a name that is not a field; the message lists the valid ones.
        """
        names = [f.name for f in dataclasses.fields(FitRequest)]
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise TypeError(f"fit request got unknown setting(s) {unknown}; expected only {names}. "
                            "Fix: send the Fit page's settings only.")
        return FitRequest(**params)

    def as_params(self) -> dict[str, Any]:
        """The settings by name, as :func:`dashboard.jobs.check_fit_request` reads them."""
        return dataclasses.asdict(self)

    def config(self) -> FitConfig:
        """The :class:`kcore.FitConfig` of the request: its preset with K, λ, the epochs and the seed replaced."""
        from kcore.fit import make_config

        return make_config(self.preset, orders=self.orders, lam=self.lam, epochs=self.epochs, seed=self.seed,
                           nested=self.nested or None, gate="linear" if self.nested else None)


def _session_connected(key: str) -> bool:
    """Whether the browser of the session ``key`` (see :func:`session_key`) is connected to this server now."""
    from streamlit.runtime import Runtime

    if not Runtime.exists():
        return False
    return Runtime.instance().get_client(key.split("/", 1)[0]) is not None  # thread-safe, per Streamlit


@st.cache_resource(show_spinner=False)
def registry() -> JobRegistry:
    """The process-wide job registry (one per server), bounded by :func:`kcore.limits.limits` at its creation."""
    reg = JobRegistry.from_limits(session_alive=_session_connected)
    reg.start_reaper(REAPER_SECONDS)
    atexit.register(reg.shutdown)  # a stopping server stops its study processes too
    return reg


def session_key() -> str:
    """This browser session's key in the registry (Streamlit's session id / a random part), marked as seen now."""
    key = st.session_state.get("kc_session")
    if key is None:
        from streamlit.runtime.scriptrunner import get_script_run_ctx

        ctx = get_script_run_ctx()
        # the random part keeps sessions apart where Streamlit gives them one id (AppTest)
        key = st.session_state.setdefault("kc_session", f"{ctx.session_id if ctx else 'none'}/{uuid.uuid4().hex[:8]}")
    registry().touch(key)
    return key


def session_jobs() -> list[str]:
    """Ids of this session's jobs, oldest first."""
    return st.session_state.setdefault("kc_jobs", [])


def current_job() -> Job | None:
    """This session's latest job, if any."""
    session_key()
    ids = session_jobs()
    return registry().get(ids[-1]) if ids else None


def job_running() -> bool:
    """Whether this session's latest fit is queued or running (Start fit stays disabled meanwhile)."""
    job = current_job()
    return job is not None and job.running


def cancel_job(job: Job) -> None:
    """Cancel a fit: a queued one never starts; a running one stops after its current batch."""
    registry().cancel(job.id)


def _adopted() -> set[str]:
    return st.session_state.setdefault("kc_adopted", set())


def _early(job_id: str) -> str:
    return f"{job_id}#early"  # the mark of a job whose early result (the fit before its baselines) is adopted


def is_adopted(job: Job) -> bool:
    """Whether everything the job has published is already among this session's runs (else the page should rerun):
    its early result while it runs, its final one once it has ended."""
    if job.running:
        return job.partial is None or _early(job.id) in _adopted()
    return job.id in _adopted()


def adopt_finished_jobs() -> list[RunEntry]:
    """Move the results of this session's jobs into its runs (once each): a fit's own result as soon as it is
    published (its baselines still running), then the final one in its place (same run id, so the page shown stays
    shown); a job cancelled or failed after publishing keeps its early result."""
    session_key()
    adopted = _adopted()
    new = []
    for jid in session_jobs():
        job = registry().get(jid)
        if job is None or jid in adopted:
            continue
        early = job.partial
        if early is not None and _early(jid) not in adopted:
            adopted.add(_early(jid))
            add_run(early)
            new.append(early)
        if job.running:
            continue
        adopted.add(jid)
        if job.state == "done" and job.result is not None:
            add_run(job.result, activate=early is None)  # replaces the early entry: nobody is moved elsewhere
            new.append(job.result)
    return new


def baseline_job(run_id: str) -> Job | None:
    """This session's job still fitting the chance baselines of run ``run_id`` (its fit already shown), or None."""
    job = registry().get(run_id) if run_id in session_jobs() else None
    return job if job is not None and job.running and job.partial is not None else None


def start_fit(a: ModelSlot, layer_a: str, b: ModelSlot, layer_b: str, choice: ImageChoice,
              request: FitRequest | Mapping[str, Any]) -> Job:
    """Start a comparison in the background; its result becomes a :class:`RunEntry` in two steps.

    :func:`kcore.pipeline.compare_fit` first: its result is written as a run folder and published
    (:meth:`Job.publish`) at once, so the result pages work while :func:`kcore.pipeline.add_baselines` fits the
    chance baselines as their own stages; then the run folder gets them (:func:`kcore.pipeline.update_run_baselines`)
    and the final entry replaces the first. Cancelling during the baselines keeps the fit.

    ``request`` (a :class:`FitRequest`, or a mapping of its fields) is checked against the server's caps first,
    then becomes the :class:`kcore.FitConfig` of the fit (:meth:`FitRequest.config`).

    The worker only touches the job (progress, cancel, result), never ``st.*``. The comparison is
    written as a run folder under :func:`runs_dir` (with the held-out input images, for overlays); if that
    fails the result is still kept for the session. The job waits in the server's queue when
    ``KCORE_MAX_JOBS`` jobs already run.

    Raises:
        kcore.limits.LimitExceeded: a setting or the request's cost over the server's caps
            (:func:`dashboard.jobs.check_fit_request`), or this session already has its jobs
            (``KCORE_MAX_SESSION_JOBS``).
        TypeError, ValueError: a setting of the wrong type or sign.
    """
    from kcore.pipeline import add_baselines, compare_fit, heldout_images, update_run_baselines, write_run

    params = request.as_params() if isinstance(request, FitRequest) else dict(request)
    check_fit_request(params, choice.n)  # the browser can send anything: checked here, on the server
    request = FitRequest.from_params(params)
    config = request.config()

    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    label = f"{a.loaded.name}:{layer_a} vs {b.loaded.name}:{layer_b}"
    images_ = choice.images
    out = runs_dir() / run_id

    def task(job: Job) -> RunEntry:
        log = logging.getLogger("kcore.dashboard")

        def report(p: Any) -> None:
            job.report(p.stage, p.fraction, p.message, eta=p.eta, eta_total=p.eta_total)

        comp = compare_fit(
            a.loaded, layer_a, b.loaded, layer_b, images_, config, preset=request.preset, device=request.device,
            both_directions=request.both_directions, baselines=request.baselines, fit_seeds=request.fit_seeds,
            image_source=choice.description, paths=(a.path, b.path), progress=report, cancel=job.cancel,
        )
        job.report("saving", 1.0, "saving the run folder")
        raw = heldout_images(comp, images_)
        run_dir = None
        try:
            run_dir = write_run(comp, out, images=raw)
        except OSError as exc:
            log.warning("could not write the run folder: %s", exc)
        entry = RunEntry(run_id, comp, run_dir, raw, "fit")
        if not comp.provenance.get("baselines_pending"):
            return entry
        job.publish(entry)  # the fit's result is shown now; the chance baselines follow as their own stages
        full = add_baselines(comp, b.loaded, images_, progress=report, cancel=job.cancel)
        if run_dir is not None:
            try:
                update_run_baselines(run_dir, full)
            except (OSError, ValueError) as exc:
                log.warning("could not add the baselines to the run folder: %s", exc)
        return dataclasses.replace(entry, comparison=full)

    job = registry().submit(label, task, session=session_key(), job_id=run_id)
    session_jobs().append(job.id)
    counters()["fits_started"] += 1
    return job
