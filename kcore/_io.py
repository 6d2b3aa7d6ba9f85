"""Atomic output folders: written under a temporary sibling name, then moved into place with one rename."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out_dir``, on any error it is removed.

    Raises:
        ValueError: ``out_dir`` exists and ``overwrite`` is False (checked before anything is written).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise ValueError(f"out_dir {str(out)!r} already exists. Fix: choose a new folder or pass overwrite=True.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
