"""Finished comparisons of this browser session (fits made here and run folders re-opened), and which is shown."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import streamlit as st

from dashboard.state._paths import runs_dir

DIRECTION_TITLES = {"A_to_B": "A → B", "B_to_A": "B → A"}
DIRECTION_HELP = {
    "A_to_B": r"A's feature $x$ reconstructs B's $x^*$: $x^\Delta$ = blind spots of A (what B encodes and A misses)",
    "B_to_A": r"B's feature $x$ reconstructs A's $x^*$: $x^\Delta$ = unreliable features of A (what only A encodes)",
}


@dataclass(frozen=True, eq=False)
class RunEntry:
    """A finished comparison kept for this browser session.

    Attributes:
        id: run id (the folder name under :func:`runs_dir` for fits made here).
        comparison: the :class:`kcore.pipeline.Comparison`.
        run_dir: its run folder, if written.
        raw_images: held-out image id → input image (H, W, 3) uint8 RGB, for overlays (may be empty).
        origin: ``"fit"`` (made in this session) or ``"folder"`` (re-opened).
        created: UNIX time.
    """

    id: str
    comparison: Any
    run_dir: Path | None
    raw_images: Mapping[str, np.ndarray] = field(default_factory=dict)
    origin: str = "fit"
    created: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        c = self.comparison
        k = next(iter(c.directions.values())).fit.config.orders
        dirs = " + ".join(DIRECTION_TITLES.get(d, d) for d in c.directions)
        when = time.strftime("%H:%M", time.localtime(self.created))
        return f"{when} · {Path(c.a.name).stem}:{c.a.layer} vs {Path(c.b.name).stem}:{c.b.layer} · K={k} · {dirs}"


def counters() -> dict[str, int]:
    """Per-session counts of expensive calls (shown in the Fit page's details; read by tests)."""
    return st.session_state.setdefault("kc_counters", {"fits_started": 0, "decompositions": 0})


def runs() -> dict[str, RunEntry]:
    """This session's finished runs, by id (oldest first)."""
    return st.session_state.setdefault("kc_runs", {})


def add_run(entry: RunEntry, activate: bool = True) -> None:
    runs()[entry.id] = entry
    if activate:  # the sidebar's picker (key ACTIVE_RUN_KEY) takes it over on its next draw
        st.session_state["kc_active_request"] = entry.id


ACTIVE_RUN_KEY = "kc_active_run"
"""The widget key of the sidebar's 'Result shown' picker."""


def apply_active_request() -> None:
    """Before the sidebar's picker is drawn: show the run that :func:`add_run` asked for (else keep a valid one)."""
    rid = st.session_state.pop("kc_active_request", None)
    table = runs()
    if rid in table:
        st.session_state[ACTIVE_RUN_KEY] = rid
    elif table and st.session_state.get(ACTIVE_RUN_KEY) not in table:
        st.session_state[ACTIVE_RUN_KEY] = next(reversed(table))


def active_run() -> RunEntry | None:
    """The run the result pages show (the sidebar picks it)."""
    rid = st.session_state.get("kc_active_request") or st.session_state.get(ACTIVE_RUN_KEY)
    table = runs()
    if rid in table:
        return table[rid]
    return next(reversed(table.values()), None) if table else None


def open_run_folder(path: str | Path) -> RunEntry:
    """Re-open a run folder written by the dashboard or ``kcore fit --out`` (no checkpoints needed).

    The folder must lie under the allowed roots; its files are read like uploads (:func:`kcore.read_run`: regular
    files inside it, size caps, every field type-checked, finite features and weights).

    Raises:
        ValueError: outside the roots, not a run folder, or a file unsafe, too large, edited or corrupt (the message
            names the file and the field); an unreadable file (e.g. permissions) too.
    """
    import os

    from dashboard.state._paths import allowed_folder
    from kcore.pipeline import read_heldout_images, read_run

    d = allowed_folder(path, "run folder")
    try:
        comparison = read_run(d)
        images = read_heldout_images(d)
        created = os.stat(d / "provenance.json", follow_symlinks=False).st_mtime
    except ValueError:
        raise
    except OSError as exc:
        raise ValueError(f"run folder {str(d)!r} could not be read: {exc.strerror or exc} ({type(exc).__name__}). "
                         "Fix: check that the folder and its files are readable by the server.") from None
    return RunEntry(f"{d.name}-opened", comparison, d, images, "folder", created)


def run_folders() -> list[Path]:
    """Run folders found under :func:`runs_dir`, newest first."""
    root = runs_dir()
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if (p / "provenance.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
