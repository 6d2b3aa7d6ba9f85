"""Time until the first result is visible in the dashboard, for the default fit with its chance baselines.

:func:`first_result` drives the dashboard itself (Streamlit's AppTest on ``dashboard/app.py``): the embedded
default (the sample pair at their cards' layers, the bundled images, the Fit page left at its settings) with
*Chance baselines* ticked, started with the Fit page's Start button, so the job is the one the page submits
(``dashboard.state.jobs.start_fit`` through the server's :class:`dashboard.jobs.JobRegistry`). While the job runs,
the benchmark reads the job's state every few milliseconds (it never writes to it) and records, from the moment the
job started running:

- ``fit_seconds``: the job's stage turns to ``saving``: extraction and g_θ are done (the fit's own time);
- ``published_seconds``: the job publishes its result (:meth:`dashboard.jobs.Job.publish`), with the run folder
  written: from here the result pages show it;
- ``shown_seconds``: the Overview, run once more after the publication, shows the fit's instability (this adds one
  page run under AppTest; a browser polls the job every second, so it sees it up to a second later);
- ``baselines_done_seconds``: the job ends with the chance baselines (what the first result waited for before the
  fit was published on its own).

The target: ``published_seconds`` ≤ ``fit_seconds`` + :data:`WRITE_ALLOWANCE_SECONDS` (the time to write the run
folder), not the fit plus its baselines.
"""
from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

WRITE_ALLOWANCE_SECONDS = 5.0
"""Seconds between the end of the fit and its publication that the target allows (writing the run folder)."""

POLL_SECONDS = 0.01
"""How often the benchmark reads the job's state."""


def _record(job: Any, touch: Any, timeline: list[tuple[float, str]], timeout: float) -> threading.Thread:
    """Start a thread that reads ``job`` every :data:`POLL_SECONDS` until it ends (or ``timeout`` seconds),
    appending (UNIX time, stage) to ``timeline`` at each change of stage and the final stage once it has ended;
    ``touch()`` keeps the session seen. It runs beside the page runs, so no stage is missed while the Overview
    is drawn (a smoke-size job can end its baselines meanwhile)."""
    def loop() -> None:
        t0, last_touch = time.monotonic(), 0.0
        while time.monotonic() - t0 < timeout:
            running, stage = job.running, job.stage
            if not timeline or timeline[-1][1] != stage:
                timeline.append((time.time(), stage))
            if not running:
                return
            if time.monotonic() - last_touch > 1.0:
                touch()
                last_touch = time.monotonic()
            time.sleep(POLL_SECONDS)

    thread = threading.Thread(target=loop, name="first-result-recorder", daemon=True)
    thread.start()
    return thread


def _wait(until: Any, timeout: float) -> None:
    """Wait until ``until()`` is true or ``timeout`` seconds have passed, checking every :data:`POLL_SECONDS`."""
    t0 = time.monotonic()
    while not until() and time.monotonic() - t0 < timeout:
        time.sleep(POLL_SECONDS)


def first_result(n_images: int | None = None, epochs: int | None = None, models_dir: Path | None = None,
                 timeout: float = 3600.0) -> dict[str, Any] | None:
    """Run the dashboard's default fit with chance baselines and time its first visible result.

    Args:
        n_images: bundled images (None: the Models page's default, 400); the page's slider takes 60 … 2000 in
            steps of 20.
        epochs: the Fit page's epochs (None: 0, the preset's schedule; a smoke test caps it).
        models_dir: where the sample models are (None: ``sample_models/``, the dashboard's own).
        timeout: seconds to wait for each of the publication and the end of the job.

    Returns:
        None without the sample models; else ``fit_seconds``, ``published_seconds``, ``shown_seconds``,
        ``baselines_done_seconds`` (see the module docstring), ``write_seconds`` (publication − fit),
        ``gtheta_seconds`` (g_θ's own training time, from the result), ``timeline`` (each stage with its start
        in seconds), the pair, images, epochs and whether the Fit page ticked the baselines by itself.

    Raises:
        RuntimeError: the job failed, was cancelled, or did not publish within ``timeout``.
    """
    from streamlit.testing.v1 import AppTest

    from bench.data import DEFAULT_PAIR, sample_model_paths

    if models_dir is not None and Path(models_dir).resolve() != (ROOT / "sample_models").resolve():
        raise ValueError(f"models_dir: the dashboard loads its sample models from {ROOT / 'sample_models'}; got "
                         f"{models_dir}. Fix: leave --models out for this section.")
    if not all(name in sample_model_paths() for name in DEFAULT_PAIR):
        return None
    from dashboard import state

    saved = os.environ.get("KCORE_RUNS_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KCORE_RUNS_DIR"] = str(Path(tmp) / "runs")
        try:
            at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=300).run()
            if n_images is not None:
                at.slider(key="kc_img_n").set_value(int(n_images)).run()
            n = int(at.slider(key="kc_img_n").value)
            at.switch_page("app_pages/fit.py").run()
            if epochs is not None:
                at.number_input(key="kc_fit_epochs").set_value(int(epochs)).run()
            box = at.checkbox(key="kc_fit_baselines")
            default_on = bool(box.value)
            box.check().run()
            at.button(key="kc_fit_start").click().run()
            if at.exception:
                raise RuntimeError(f"the Fit page failed: {[e.value for e in at.exception]}")
            job = state.registry().get(at.session_state["kc_jobs"][-1])
            session = at.session_state["kc_session"]
            touch = lambda: state.registry().touch(session)  # noqa: E731  (the tab stays open)
            timeline: list[tuple[float, str]] = []
            try:
                recorder = _record(job, touch, timeline, timeout)
                _wait(lambda: job.partial is not None or not job.running, timeout)
                published = time.time()
                if job.partial is None:
                    raise RuntimeError(f"the job did not publish its fit: {job.state} ({job.error})")
                at.switch_page("app_pages/overview.py").run()  # adopts the published fit, as a page run does
                inst = [m for m in at.metric if m.label.startswith("Instability")]
                shown = time.time()
                if at.exception or not inst:
                    raise RuntimeError(f"the Overview did not show the fit: {[e.value for e in at.exception]}")
                recorder.join(timeout)
                if job.state != "done":
                    raise RuntimeError(f"the job ended {job.state}: {job.error}")
            finally:
                state.registry().cancel(job.id)
                state.registry().wait(job.id, timeout=60)
        finally:
            if saved is None:
                os.environ.pop("KCORE_RUNS_DIR", None)
            else:
                os.environ["KCORE_RUNS_DIR"] = saved
    start = job.started
    stages = [(round(t - start, 3), s) for t, s in timeline]
    fit_done = next((t for t, s in stages if s == "saving"), None)
    comp = job.result.comparison
    fit = comp.directions["A_to_B"].fit
    return {
        "pair": [comp.a.name, comp.a.layer, comp.b.name, comp.b.layer],
        "n_images": n,
        "epochs": len(fit.history),
        "baselines": sorted(comp.baselines),
        "baselines_default_on": default_on,
        "fit_seconds": fit_done,
        "gtheta_seconds": fit.seconds,
        "published_seconds": published - start,
        "shown_seconds": shown - start,
        "baselines_done_seconds": job.finished - start,
        "write_seconds": None if fit_done is None else published - start - fit_done,
        "timeline": [{"seconds": t, "stage": re.sub(r"\s+", " ", s)} for t, s in stages],
    }
