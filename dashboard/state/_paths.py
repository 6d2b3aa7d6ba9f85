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


def allowed_folder(text: str | Path, what: str = "run folder") -> Path:
    """A folder typed into the browser, resolved: inside :func:`runs_dir`, :func:`studies_dir` or a server root.

    Raises:
        ServerPathError: anywhere else (see :func:`kcore.server_paths.resolve_server_path`).
    """
    from kcore.server_paths import resolve_server_path, server_roots

    own = tuple(p.resolve() for p in (runs_dir(), studies_dir()) if p.is_dir())
    return resolve_server_path(text, kind="folder", what=what, roots=own + server_roots())


def export_folder(name: str) -> Path:
    """The export folder wanted for ``name`` (sanitised to ``[A-Za-z0-9._-]``), always directly inside
    :func:`exports_dir`.

    :func:`kcore.export.export_comparison` writes a new folder there, or ``<name>-2``, ``-3``, ... beside it when the
    name is taken: an export never writes into an existing folder.

    Raises:
        ServerPathError: the name leads out of :func:`exports_dir` (e.g. a symlink already there).
    """
    from kcore.server_paths import child_path

    base = exports_dir()
    base.mkdir(parents=True, exist_ok=True)
    return child_path(base, name)


def studies_dir() -> Path:
    """Where the Studies page writes study folders: ``$KCORE_STUDIES_DIR`` or beside the run folders."""
    return Path(os.environ.get("KCORE_STUDIES_DIR", runs_dir().parent / "studies"))
