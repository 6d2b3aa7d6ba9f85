"""Atomic output folders: written under a temporary sibling name, then swapped into place.

Safety rules (what ``overwrite=True`` may replace):

* only a folder that carries kcore's marker file (:data:`MARKER`, written into every run and study folder),
  never a plain file, a symlink, ``.``, a parent of the working directory, the home folder or ``/``;
* the new folder is complete before it is swapped in: with Linux's atomic exchange (``renameat2``) the path
  always holds either the whole old or the whole new folder; elsewhere the old folder is renamed aside, the new
  one renamed in, and only then the old one is deleted (a kill in between is repaired on the next write);
* temporary folders left by killed writers (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``) are removed on the next
  write into the same parent when they carry kcore's marker and their process is gone; others are named in a
  warning and left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: Marker file of a finished kcore run/study folder (JSON: ``{"kcore": KIND, "format": 1}``).
MARKER = ".kcore-folder.json"
#: Marker file of a folder kcore is still writing (its temporary sibling).
TMP_MARKER = ".kcore-tmp"
FOLDER_KINDS = ("run", "study")

_RENAME_EXCHANGE = 2
_libc = None


def _pause(step: str) -> None:
    """Test hook: ``KCORE_TEST_IO_PAUSE=STEP`` stops the writer at STEP (announced on stderr) for a kill test."""
    if os.environ.get("KCORE_TEST_IO_PAUSE") == step:
        print(f"kcore-io-pause {step}", file=sys.stderr, flush=True)
        time.sleep(600)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    global _libc
    if sys.platform != "linux" or os.environ.get("KCORE_TEST_IO_NO_EXCHANGE"):
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018  (raises AttributeError on old glibc)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    at_fdcwd = -100
    rc = _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not swap {str(a)!r} and {str(b)!r}: {os.strerror(err)}")


def is_kcore_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a real folder (not a symlink) carrying kcore's marker file."""
    p = Path(path)
    return p.is_dir() and not p.is_symlink() and (p / MARKER).is_file()


def _protected(out: Path) -> str | None:
    """Why ``out`` may never be replaced, or None."""
    try:
        res = out.resolve()
    except (OSError, RuntimeError):
        return "it cannot be resolved"
    cwd = Path.cwd().resolve()
    if res == Path(res.anchor):
        return "it is the file-system root"
    if res == cwd:
        return "it is the current working directory"
    if res in cwd.parents:
        return "it is a parent of the current working directory"
    home = Path.home().resolve()
    if res == home or res in home.parents:
        return "it is the home folder or one of its parents"
    return None


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool = False, flag: str = "out_dir") -> Path:
    """Check before any work that ``out_dir`` may be written (and replaced when ``overwrite``).

    Raises:
        ValueError: ``out_dir`` exists and ``overwrite`` is False; or it exists and is not a kcore run/study folder
            (no marker file), is a symlink or a file, or is ``.``, a parent of the working directory, ``~`` or ``/``.
    """
    out = Path(out_dir)
    why = _protected(out)
    if why is not None:
        raise ValueError(f"{flag} {str(out_dir)!r} cannot be written: {why}. kcore writes a run into a new folder "
                         "of its own. Fix: choose a new folder, e.g. runs/my_run.")
    if not (out.exists() or out.is_symlink()):
        return out
    if not overwrite:
        raise ValueError(f"{flag} {str(out_dir)!r} already exists. Fix: choose a new folder or pass --overwrite "
                         "(overwrite=True) to replace a kcore run folder.")
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{flag} {str(out_dir)!r} is a {'symlink' if out.is_symlink() else 'file'}, not a kcore "
                         "run folder; --overwrite replaces only folders kcore wrote. Fix: choose a new folder.")
    if not (out / MARKER).is_file():
        raise ValueError(f"{flag} {str(out_dir)!r} is not a kcore run or study folder (it has no {MARKER} marker), "
                         "so --overwrite will not replace it: kcore deletes only what it wrote. Fix: choose a new "
                         "folder, or remove that folder yourself if you are sure.")
    return out


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _pid_of(name: str, prefix: str) -> int | None:
    rest = name[len(prefix):]
    head = rest.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def clean_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Repair and remove what killed writers of ``out_dir`` left behind; return the folders removed.

    A ``.NAME.old-PID-*`` folder whose process is gone while NAME is missing is renamed back to NAME (the kill
    came between the two renames of the fallback path). ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folders of
    dead processes that carry a kcore marker are deleted; anything else matching is named in a warning.
    """
    out = Path(out_dir)
    parent = out.parent
    if not parent.is_dir():
        return []
    removed: list[Path] = []
    tmp_prefix, old_prefix = f".{out.name}.tmp-", f".{out.name}.old-"
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    left = []
    for p in entries:
        name = p.name
        if not (name.startswith(tmp_prefix) or name.startswith(old_prefix)):
            continue
        prefix = tmp_prefix if name.startswith(tmp_prefix) else old_prefix
        pid = _pid_of(name, prefix)
        if pid is not None and _pid_alive(pid):
            continue  # another writer is at work
        ours = p.is_dir() and not p.is_symlink() and (
            (p / MARKER).is_file() or (p / TMP_MARKER).is_file() or not any(p.iterdir())  # empty: killed at birth
        )
        if not ours or pid is None:
            left.append(p)
            continue
        if prefix == old_prefix and not (out.exists() or out.is_symlink()) and (p / MARKER).is_file():
            os.rename(p, out)
            warnings.warn(f"restored {str(out)!r} from {name} (a writer was killed while replacing it)", stacklevel=3)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if left:
        warnings.warn(f"left alone in {str(parent)!r}: {[p.name for p in left]} look like temporary folders of an "
                      "interrupted kcore write but do not carry kcore's marker. Fix: delete them yourself if "
                      "they are not needed.", stacklevel=3)
    return removed


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, kind: str = "run") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out_dir``, on any error it is removed.

    The finished folder carries :data:`MARKER`. See the module's docstring for what may be replaced.

    Raises:
        ValueError: see :func:`check_out_dir` (checked before anything is written).
    """
    if kind not in FOLDER_KINDS:
        raise ValueError(f"kind must be one of {FOLDER_KINDS}; got {kind!r}.")
    out = Path(out_dir)
    clean_stale(out)
    check_out_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    (tmp / TMP_MARKER).write_text("")
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"kcore": kind, "format": 1}))
        (tmp / TMP_MARKER).unlink()
        _pause("written")
        if out.exists() or out.is_symlink():
            check_out_dir(out, overwrite=overwrite)  # re-checked: it may have changed while we worked
            if _exchange(tmp, out):
                # tmp now holds the old folder (with its marker): the path never lacked a whole folder
                _pause("swapped")
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                os.rmdir(old)
                os.rename(out, old)
                _pause("aside")
                os.rename(tmp, out)
                _pause("swapped")
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
