"""Layer sweeps started from the dashboard (background jobs of the shared queue) and saved runs picked to compare.

A sweep runs :func:`kcore.sweep.sweep` in the process-wide :class:`~dashboard.jobs.JobRegistry` (the queue fits and
studies share) and writes a sweep folder under the runs folder. Its jobs are kept apart from the Fit page's (their
result is a :class:`SweepDone`, not a run), and the pairs it has fitted so far are readable while it runs. Saved
runs to compare are the run folders under the runs folder, also those inside sweep folders; they are opened with
:func:`dashboard.state.runs.open_run_folder` (paths stay under the allowed roots).
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import streamlit as st

from dashboard.jobs import Job, check_fit_request
from dashboard.state._images import ImageChoice
from dashboard.state._jobs import FitRequest, registry, session_key
from dashboard.state._models import ModelSlot
from dashboard.state._paths import runs_dir
from dashboard.state._runs import RunEntry, open_run_folder

__all__ = ["SweepDone", "cancel_sweep", "comparable_runs", "current_sweep", "first_sight", "opened_runs", "pair_entry",
           "pairs_so_far", "run_name", "start_sweep"]


@dataclass(frozen=True, eq=False)
class SweepDone:
    """A finished sweep of this session: the result, its folder (None if it could not be written) and the images."""

    result: Any
    folder: Path | None
    images: Any


def _jobs() -> list[str]:
    return st.session_state.setdefault("kc_sweep_jobs", [])


def _pairs() -> dict[str, list]:
    return st.session_state.setdefault("kc_sweep_pairs", {})


def current_sweep() -> Job | None:
    """This session's latest sweep job, if any."""
    session_key()
    ids = _jobs()
    return registry().get(ids[-1]) if ids else None


def first_sight(job: Job) -> bool:
    """Whether this is the first time the page sees ``job`` ended (then it redraws itself with the result)."""
    shown = st.session_state.setdefault("kc_sweep_shown", set())
    if job.running or job.id in shown:
        return False
    shown.add(job.id)
    return True


def pairs_so_far(job: Job) -> list:
    """The :class:`kcore.sweep.SweepPair` results of ``job`` fitted so far, in order."""
    return list(_pairs().get(job.id, []))


def start_sweep(a: ModelSlot, layers_a: Sequence[str], b: ModelSlot, layers_b: Sequence[str], choice: ImageChoice,
                request: FitRequest | Mapping[str, Any], pairs: str = "diagonal") -> Job:
    """Queue a layer sweep; the finished result is written as a sweep folder under :func:`runs_dir`.

    The request is checked against the server's caps as one fit over all pairs' images (the cost of a sweep is
    that of its pairs together).

    Raises:
        kcore.limits.LimitExceeded: a setting or the whole sweep's cost over the server's caps, or this session
            already has its jobs.
        ValueError, TypeError: a setting of the wrong type, an unknown layer or pair mode.
    """
    from kcore.sweep import layer_pairs

    params = request.as_params() if isinstance(request, FitRequest) else dict(request)
    plan = layer_pairs(list(layers_a), list(layers_b), pairs)  # type: ignore[arg-type]
    check_fit_request(params, choice.n * len(plan))  # the browser can send anything: checked here, on the server
    request = FitRequest.from_params(params)
    config = request.config()
    run_id = time.strftime("sweep-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    out = runs_dir() / run_id
    found: list = []
    images_ = choice.images

    def task(job: Job) -> SweepDone:
        from kcore.sweep import sweep, write_sweep

        result = sweep(a.loaded, list(layers_a), b.loaded, list(layers_b), images_, config, pairs=pairs,  # type: ignore[arg-type]
                       both_directions=request.both_directions, baselines=request.baselines, preset=request.preset,
                       device=request.device, image_source=choice.description, paths=(a.path, b.path),
                       progress=lambda p: job.report(p.stage, p.fraction, p.message), on_pair=found.append,
                       cancel=job.cancel)
        job.report("saving", 1.0, "saving the sweep folder")
        folder = None
        try:
            folder = write_sweep(result, out, images=images_)
        except OSError as exc:
            logging.getLogger("kcore.dashboard").warning("could not write the sweep folder: %s", exc)
        return SweepDone(result, folder, images_)

    label = f"sweep {a.loaded.name} vs {b.loaded.name} ({len(plan)} pairs)"
    job = registry().submit(label, task, session=session_key(), job_id=run_id)
    _pairs()[job.id] = found
    _jobs().append(job.id)
    return job


def cancel_sweep(job: Job) -> None:
    """Cancel a sweep: a queued one never starts; a running one stops after its current batch."""
    registry().cancel(job.id)


def pair_entry(done: SweepDone, pair: Any) -> RunEntry:
    """A sweep's pair as a run of this session (so every result page can show it), with its held-out images."""
    from kcore.pipeline import heldout_images

    folder = None if done.folder is None else Path(done.folder) / "pairs" / pair.folder_name
    raw = heldout_images(pair.comparison, done.images)
    return RunEntry(f"{Path(done.folder or 'sweep').name}-{pair.folder_name}", pair.comparison, folder, raw, "fit")


def comparable_runs() -> list[Path]:
    """Run folders under :func:`runs_dir`, also the pairs inside sweep folders, newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if (p / "provenance.json").is_file():
            found.append(p)
        elif (p / "sweep.json").is_file() and (p / "pairs").is_dir():
            found.extend(q for q in sorted((p / "pairs").iterdir()) if (q / "provenance.json").is_file())
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def run_name(path: Path) -> str:
    """A run folder's name relative to the runs folder (e.g. ``sweep-…/pairs/00_stem__stem``)."""
    try:
        return str(Path(path).relative_to(runs_dir()))
    except ValueError:
        return Path(path).name


def opened_runs(paths: Sequence[str | Path]) -> dict[str, Any]:
    """The comparisons of the run folders ``paths`` by :func:`run_name`, each opened once per session and mtime.

    Raises:
        ValueError: a folder outside the allowed roots or not a readable run folder
            (:func:`dashboard.state.runs.open_run_folder`).
    """
    cache: dict = st.session_state.setdefault("kc_compare_cache", {})
    out = {}
    for p in paths:
        path = Path(p)
        key = (str(path), (path / "provenance.json").stat().st_mtime if (path / "provenance.json").exists() else 0)
        if key not in cache:
            cache[key] = open_run_folder(path).comparison
        out[run_name(path)] = cache[key]
    return out
