"""Study folders: written atomically by every ``kcore <study>`` command, read back like an upload.

A study folder holds ``result.json`` (the numbers), ``provenance.json`` (checkpoints, layers, seeds, versions,
command), one ``<table>.csv`` per table and ``<figure>.png/.svg/.pdf`` per figure. :func:`write_study` writes one,
:func:`read_study` re-opens one for the dashboard (regular files only, under size caps, JSON fields type-checked),
:func:`zip_study` packs one for download.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from kcore._io import atomic_folder
from kcore.provenance import json_default, versions

__all__ = [
    "STUDY_FIGURE_MAX_BYTES", "STUDY_FILE_MAX_BYTES", "STUDY_FORMAT", "STUDY_MAX_FILES", "STUDY_ZIP_MAX_BYTES",
    "StudyFolder", "read_study", "write_study", "zip_study",
]


STUDY_FORMAT = "kcore-study/1"


STUDY_FILE_MAX_BYTES = 16 * 2**20
"""Largest JSON or CSV file of a study folder that :func:`read_study` reads (a study's tables take kilobytes)."""
STUDY_FIGURE_MAX_BYTES = 32 * 2**20
"""Largest figure (PNG) of a study folder that is shown."""
STUDY_ZIP_MAX_BYTES = 512 * 2**20
"""Largest sum of the files put into a study folder's zip for download (:func:`zip_study`)."""
STUDY_MAX_FILES = 2000
"""Most entries of a study folder's top level that :func:`read_study` lists."""


@dataclass(frozen=True)
class StudyFolder:
    """What a study folder holds once read back (:func:`read_study`).

    Attributes:
        path: the folder.
        study: the study's name (``result.json``'s ``study``).
        result: ``result.json``.
        tables: name → pandas DataFrame, one per ``<name>.csv``.
        figures: name → path of ``<name>.png`` (a regular file inside the folder; read it with :meth:`read_file`).
        provenance: ``provenance.json`` (empty when the folder has none).
        files: the regular files of the folder's top level (what :func:`zip_study` puts into the zip).
        skipped: file name → why it was left out (a symlink, FIFO, device, or a file above its size cap).
    """

    path: Path
    study: str
    result: dict
    tables: dict[str, Any]
    figures: dict[str, Path]
    provenance: dict = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def read_file(self, name: str, max_bytes: int = STUDY_FIGURE_MAX_BYTES) -> bytes:
        """The bytes of the file ``name`` of the folder, read like an upload (regular file inside it, capped).

        Raises:
            ValueError: a symlink, FIFO, device, a file above ``max_bytes`` or outside the folder.
            FileNotFoundError: no such file.
        """
        from kcore import _readback as rb

        return rb.read_bytes(self.path, name, max_bytes)


def _study_entries(d: Path) -> tuple[list[Path], dict[str, str]]:
    """The regular files of a study folder's top level, and what was left out (name → why)."""
    from kcore.safe_files import scan_under

    files, skipped = [], {}
    for p, kind in scan_under(d, ".", max_files=STUDY_MAX_FILES, recursive=False):
        if kind == "file":
            files.append(p)
        else:
            skipped[p.name] = ("a symlink (never followed in a study folder)" if kind == "symlink"
                               else "not a regular file (a FIFO, device or socket)")
    return sorted(files), skipped


def read_study(path: str | os.PathLike) -> StudyFolder:
    """Re-open a study folder written by :func:`write_study`, reading it like an upload.

    Only regular files of the folder's top level are read (symlinks, FIFOs and devices are left out with a note in
    ``skipped``, never opened), each under a size cap (:data:`STUDY_FILE_MAX_BYTES` for JSON and CSV,
    :data:`STUDY_FIGURE_MAX_BYTES` for PNG; a larger table or figure is left out with a note); ``result.json`` must
    be an object whose ``study`` is a string, ``provenance.json`` an object.

    Args:
        path: the study folder.

    Returns:
        A :class:`StudyFolder`.

    Raises:
        ValueError: not a study folder, or ``result.json``/``provenance.json`` unsafe, too large, not JSON or of the
            wrong type (the message names the file and the field); a CSV that is not a table.
    """
    import io

    import pandas as pd

    from kcore import _readback as rb

    d = Path(path)
    if not os.path.lexists(d / "result.json"):
        raise ValueError(f"{str(d)!r} is not a kcore study folder (no result.json). Fix: pick a folder written by a `kcore <study>` command.")
    files, skipped = _study_entries(d)
    result = rb.read_json(d, "result.json", STUDY_FILE_MAX_BYTES)
    rb.check_fields(result, {"study": str | None, "format": str | None}, d, "result.json")
    prov = {}
    if os.path.lexists(d / "provenance.json"):
        prov = rb.read_json(d, "provenance.json", STUDY_FILE_MAX_BYTES)
        rb.check_fields(prov, dict, d, "provenance.json")
    tables, figures = {}, {}
    for p in files:
        cap = {".csv": STUDY_FILE_MAX_BYTES, ".png": STUDY_FIGURE_MAX_BYTES}.get(p.suffix)
        if cap is None:
            continue
        size = os.lstat(p).st_size
        if size > cap:
            skipped[p.name] = f"{size} bytes, above the limit of {cap} bytes for a {p.suffix[1:].upper()} file"
            continue
        if p.suffix == ".png":
            figures[p.stem] = p
            continue
        data = rb.read_bytes(d, p.name, cap)
        try:
            tables[p.stem] = pd.read_csv(io.BytesIO(data))
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
            raise rb.folder_error(d, p.name, f"is not a CSV table ({type(exc).__name__}: {str(exc)[:120]})") from None
    return StudyFolder(d, result.get("study") or "", result, tables, figures, prov, tuple(files), skipped)


def zip_study(folder: StudyFolder, max_bytes: int = STUDY_ZIP_MAX_BYTES) -> bytes:
    """A zip (in memory) of the regular files of a study folder's top level, each re-read like an upload.

    Args:
        folder: what :func:`read_study` returned (its ``files``; symlinks, FIFOs and devices are never among them).
        max_bytes: the largest sum of the files' sizes.

    Returns:
        The zip's bytes; entries are the files' names.

    Raises:
        ValueError: the files add up to more than ``max_bytes``, or one was swapped for a symlink, FIFO or device
            since the folder was read.
    """
    import io
    import zipfile

    from kcore import _readback as rb

    total = sum(os.lstat(p).st_size for p in folder.files)
    if total > max_bytes:
        raise ValueError(f"study folder {str(folder.path)!r}: its {len(folder.files)} files add up to {total} bytes, "
                         f"more than the limit of {max_bytes} bytes for a zip. Fix: download the files one by one, "
                         "or copy the folder on the server.")
    total = 0
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in folder.files:
            data = rb.read_bytes(folder.path, p.name, max(max_bytes - total, 0))
            total += len(data)
            zf.writestr(p.name, data)
    return buf.getvalue()


def write_study(
    out_dir: str | os.PathLike,
    study: str,
    result: dict,
    tables: Mapping[str, Any],
    figures: Mapping[str, Any],
    provenance: Mapping[str, Any],
    *,
    overwrite: bool = False,
    formats: tuple[str, ...] = ("png", "svg", "pdf"),
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a study folder atomically: ``result.json``, ``provenance.json``, ``<table>.csv``, ``<figure>.<fmt>``.

    Args:
        out_dir: the folder to create.
        study: the study's name (e.g. ``"stability"``).
        result: JSON-serialisable numbers of the study.
        tables: name → pandas DataFrame.
        figures: name → matplotlib Figure.
        provenance: checkpoints, layers, seeds, versions, command.
        overwrite: replace ``out_dir`` if it exists.
        formats: the file formats of every figure.
        extra: called with the folder being written, to add more files (e.g. a family of networks)
            before the folder is moved into place.
    """
    with atomic_folder(out_dir, overwrite=overwrite, kind="study") as tmp:
        (tmp / "result.json").write_text(json.dumps({"format": STUDY_FORMAT, "study": study, **result}, indent=1, default=json_default))
        prov = {"study": study, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **dict(provenance)}
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, default=json_default))
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        for name, fig in figures.items():
            for fmt in formats:
                fig.savefig(tmp / f"{name}.{fmt}", format=fmt, dpi=200, bbox_inches="tight", metadata=_fig_meta(fmt))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def _fig_meta(fmt: str) -> dict | None:
    # fixed metadata keeps SVG/PDF bytes deterministic across runs
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return None
