"""Where the dashboard writes on the server (read at every call, so a test or deployment can move them)."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (sample_models/ and the default runs/ live here)."""


def runs_dir() -> Path:
    """Where finished fits are written as run folders (re-openable from the Fit page): ``$KCORE_RUNS_DIR``
    or ``runs/dashboard``."""
    return Path(os.environ.get("KCORE_RUNS_DIR", ROOT / "runs" / "dashboard"))


def exports_dir() -> Path:
    """Default folder for exports on the server: ``$KCORE_EXPORTS_DIR`` or ``runs/exports``."""
    return Path(os.environ.get("KCORE_EXPORTS_DIR", ROOT / "runs" / "exports"))


def studies_dir() -> Path:
    """Where the Studies page writes study folders: ``$KCORE_STUDIES_DIR`` or beside the run folders."""
    return Path(os.environ.get("KCORE_STUDIES_DIR", runs_dir().parent / "studies"))
