"""Paths typed into a hosted app: allowed only under the server's roots, resolved before they are checked.

A browser user must not read, list or write the server's files at will. Paths typed into the dashboard
therefore go through :func:`resolve_server_path`:

* server-side path fields are off unless the server was started with ``KCORE_SERVER_ROOTS`` (folders
  separated by ``:``, e.g. ``KCORE_SERVER_ROOTS=/data:/models``);
* a path is resolved first (``~`` is not expanded, symlinks are followed, ``..`` removed) and must then lie
  inside one of the roots; relative paths are taken from the first root;
* a file must be a regular file (not a FIFO or a device) below a size cap; a folder must be a folder;
* messages name the path and the roots, never a file's contents or the names inside a folder.

The check alone cannot stop a path swapped after it (a component replaced by a symlink between the check and the
open). Whoever reads the file or lists the folder therefore does it below the root that holds it
(:func:`server_root_of`) with :mod:`kcore.safe_files`, which opens every component without following a symlink:
``read_under(server_root_of(real), real, ...)``. The dashboard's checkpoint and image-folder loads do.

Names that become files or folders (exports, runs) go through :func:`safe_name`, and :func:`child_path` keeps
them inside their own parent folder.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Literal

ROOTS_ENV = "KCORE_SERVER_ROOTS"
"""Environment variable with the allowed roots (``os.pathsep``-separated)."""

MAX_CHECKPOINT_BYTES = 8 * 2**30
"""Largest checkpoint file opened from a server path."""


class ServerPathError(ValueError):
    """A path typed into the app is not allowed (server paths off, outside the roots, wrong kind, too big)."""


def server_roots(env: str | None = None) -> tuple[Path, ...]:
    """The allowed roots, resolved; empty when server paths are off.

    Args:
        env: the variable's value (default: read ``KCORE_SERVER_ROOTS`` from the environment).
    """
    value = os.environ.get(ROOTS_ENV, "") if env is None else env
    roots = []
    for part in value.split(os.pathsep):
        part = part.strip()
        if not part:
            continue
        p = Path(part)
        if not p.is_absolute():
            continue  # a relative root would depend on where the server was started: ignored
        roots.append(p.resolve())
    return tuple(dict.fromkeys(roots))


def server_paths_enabled() -> bool:
    """Whether the server accepts typed paths at all (``KCORE_SERVER_ROOTS`` is set)."""
    return bool(server_roots())


def _roots_text(roots: tuple[Path, ...]) -> str:
    return ", ".join(str(r) for r in roots)


def resolve_server_path(
    text: str | os.PathLike,
    *,
    kind: Literal["file", "folder"] = "file",
    what: str = "path",
    max_bytes: int = MAX_CHECKPOINT_BYTES,
    roots: tuple[Path, ...] | None = None,
) -> Path:
    """Resolve a path typed into the app and check it is allowed.

    Args:
        text: the path as typed.
        kind: ``"file"`` (a regular file of at most ``max_bytes``) or ``"folder"``.
        what: how messages name the field (e.g. ``"checkpoint path"``).
        roots: allowed roots (default: :func:`server_roots`).

    Returns:
        The resolved path (symlinks followed), inside a root.

    Raises:
        ServerPathError: server paths are off, the path leaves the roots, does not exist, or is of the wrong
            kind or size.
    """
    roots = server_roots() if roots is None else roots
    if not roots:
        raise ServerPathError(
            f"{what}: paths on the server are turned off on this server. Fix: upload the file instead, or "
            f"ask whoever runs the server to start it with {ROOTS_ENV}=/folder1:/folder2 (the folders users "
            "may read).")
    raw = os.fspath(text).strip()
    if not raw or "\x00" in raw:
        raise ServerPathError(f"{what} is empty or not a valid path. Fix: type a path under {_roots_text(roots)}.")
    p = Path(raw)
    if not p.is_absolute():
        p = roots[0] / p
    try:
        real = p.resolve()
    except (OSError, RuntimeError) as exc:
        raise ServerPathError(f"{what} {raw!r} cannot be resolved ({type(exc).__name__}). "
                              f"Fix: type a path under {_roots_text(roots)}.") from None
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise ServerPathError(
            f"{what} {raw!r} is outside the folders this server allows ({_roots_text(roots)}); symlinks are "
            f"resolved before this check. Fix: use a path under {_roots_text(roots)}.")
    try:
        st = real.stat()
    except OSError:
        raise ServerPathError(f"{what} {raw!r}: no such {kind} on the server. Fix: check the path.") from None
    if kind == "folder":
        if not stat.S_ISDIR(st.st_mode):
            raise ServerPathError(f"{what} {raw!r} is not a folder. Fix: give the folder's path.")
        return real
    if not stat.S_ISREG(st.st_mode):
        raise ServerPathError(f"{what} {raw!r} is not a regular file (a folder, FIFO or device). "
                              "Fix: give the path of a regular file.")
    if st.st_size > max_bytes:
        raise ServerPathError(f"{what} {raw!r} has {st.st_size} bytes, more than this server's limit of "
                              f"{max_bytes}. Fix: use a smaller file.")
    return real


def server_root_of(path: str | os.PathLike, roots: tuple[Path, ...] | None = None) -> Path:
    """The allowed root that holds ``path`` (a path returned by :func:`resolve_server_path`): the deepest one.

    Args:
        path: a resolved path under one of the roots.
        roots: allowed roots (default: :func:`server_roots`).

    Returns:
        The root to read ``path`` below with :func:`kcore.safe_files.read_under` / ``open_under`` / ``scan_under``.

    Raises:
        ServerPathError: ``path`` lies under none of the roots (or server paths are off).
    """
    roots = server_roots() if roots is None else roots
    p = Path(path)
    holding = [r for r in roots if p == r or p.is_relative_to(r)]
    if not holding:
        raise ServerPathError(f"{str(p)!r} is outside the folders this server allows "
                              f"({_roots_text(roots) or 'none: server paths are off'}). "
                              "Fix: pass a path returned by resolve_server_path.")
    return max(holding, key=lambda r: len(r.parts))


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, *, fallback: str = "item", max_len: int = 80) -> str:
    """A file or folder name made of ``[A-Za-z0-9._-]`` only, not hidden, not ``.``/``..``, at most ``max_len``.

    >>> safe_name("../../etc/passwd")
    'etc_passwd'
    >>> safe_name("my run (2)")
    'my_run_2'
    """
    s = _UNSAFE.sub("_", str(name)).strip("._-")
    s = re.sub(r"_+", "_", s)[:max_len].strip("._-")
    return s or fallback


def child_path(parent: str | os.PathLike, name: str) -> Path:
    """``parent / safe_name(name)``, checked (after resolving) to lie directly inside ``parent``.

    Raises:
        ServerPathError: the result would leave ``parent`` (e.g. through a symlink already there).
    """
    base = Path(parent).resolve()
    child = base / safe_name(name)
    if child.is_symlink() or child.resolve().parent != base:
        raise ServerPathError(f"{str(child)!r} would leave {str(base)!r}. Fix: choose another name.")
    return child
