"""Read files below a root folder without following symlinks: one open file, checked after it is opened.

A path that is checked first (``Path.resolve()``, ``is_relative_to``) and opened afterwards can be swapped in
between: a component replaced by a symlink leads the open outside the root, and a file replaced between a hash and
a load gives the hash of another file. The functions here close that gap by never following a symlink below the
root:

* the root is opened as a folder (``O_DIRECTORY``; the root itself is trusted, e.g. a ``KCORE_SERVER_ROOTS`` entry,
  so symlinks in *its* path are followed), then each component of the path below it is opened relative to the
  folder before it (``dir_fd``) with ``O_NOFOLLOW``: a symlink anywhere below the root, ``..``, or a path outside
  the root is refused by the open itself, whatever happened to the path since it was checked;
* the last component is opened with ``O_NONBLOCK`` (a FIFO never hangs the reader) and checked with ``os.fstat``
  on the open descriptor: a regular file of at most ``max_bytes`` bytes, else refused (a device such as
  ``/dev/zero`` or a FIFO is never read);
* :func:`read_under` reads the bytes from that same descriptor and stops past ``max_bytes`` (a file growing while
  it is read), so whoever hashes and loads those bytes hashes exactly what it loads.

Hard links are not symlinks: a file hard-linked into a root from outside is read like any other file in it (making
one needs write access to the root, where any file can be planted anyway).

API (used by checkpoints, image folders, and run/study folders):

* :class:`UnsafePathError` (a ``ValueError``, also an ``OSError`` so that code skipping unreadable files skips
  these too): a symlink, ``..``, a path outside the root, a FIFO/device/folder, or a file above the cap;
* :func:`open_under` (context manager → open binary file), :func:`read_under` (→ bytes);
* :func:`regular_files_under` (→ sorted list of regular files of a folder, symlinks never followed or listed) and
  :func:`scan_under`, the same walk that also reports what it left out (symlinks, FIFOs, devices).

A missing file or folder raises ``FileNotFoundError`` (an ``OSError``) with the same kind of message. Messages name
the path and the root, never a file's contents nor another folder's listing. POSIX only (``dir_fd`` and
``O_NOFOLLOW``); elsewhere the functions refuse with a message saying so.
"""
from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import BinaryIO, Literal

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
# Folders on the way are only passed through: O_PATH (Linux) needs the search (x) permission alone, as a path
# lookup does, and an O_PATH descriptor still serves as dir_fd. Elsewhere they are opened for reading.
_WALK_FLAGS = (getattr(os, "O_PATH", 0) | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
               if hasattr(os, "O_PATH") else _DIR_FLAGS)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = (os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))
_READ_CHUNK = 1 << 30  # one os.read asks for at most this much (Linux returns at most ~2 GiB per call)
MAX_DEPTH = 64
"""Deepest folder nesting :func:`scan_under` walks (each level holds one open descriptor while it is walked)."""

EntryKind = Literal["file", "symlink", "other"]
"""What :func:`scan_under` found: a regular ``"file"``, a ``"symlink"`` (never followed), or ``"other"`` (a FIFO,
device or socket)."""


class UnsafePathError(ValueError, OSError):
    """A path below a root cannot be read safely: a symlink, ``..``, outside the root, not a regular file, or too big.

    It is a ``ValueError`` (the caller gave a bad path) and an ``OSError`` (code that skips unreadable files,
    e.g. in an image folder, skips these too).
    """


_SUPPORTED = bool(_NOFOLLOW) and os.open in os.supports_dir_fd and os.scandir in os.supports_fd


def _supported() -> bool:
    """Whether this platform can open files below a folder without following symlinks (``dir_fd``, O_NOFOLLOW)."""
    return _SUPPORTED


def _fix(root: str) -> str:
    return f"Fix: give a path to a regular file inside {root!r} that is not, and does not pass through, a symlink"


def _relative_parts(root: str, path: str | os.PathLike, what: str) -> tuple[str, ...]:
    """The components of ``path`` below ``root`` (absolute paths must start with ``root`` or its real path)."""
    raw = os.fspath(path)
    if isinstance(raw, bytes):
        raw = os.fsdecode(raw)
    if "\x00" in raw:
        raise UnsafePathError(f"{what} {raw!r} contains a NUL character. {_fix(root)}.")
    p = PurePath(raw)
    if ".." in p.parts:
        raise UnsafePathError(f"{what} {raw!r} contains '..', which is never followed below the root {root!r}. "
                              f"{_fix(root)}, without '..'.")
    if not p.is_absolute():
        return tuple(part for part in p.parts if part not in ("", "."))
    for base in dict.fromkeys((os.path.abspath(root), os.path.realpath(root))):
        try:
            rel = p.relative_to(base)
        except ValueError:
            continue
        return tuple(part for part in rel.parts if part not in ("", "."))
    raise UnsafePathError(f"{what} {raw!r} is outside the folder it must be read from ({root!r}). {_fix(root)}.")


def _open_root(root: str, what: str) -> int:
    if not _supported():
        raise UnsafePathError(f"{what}: this platform cannot open files without following symlinks (no O_NOFOLLOW "
                              f"or dir_fd support), so kcore does not read files below {root!r} here. Fix: run kcore "
                              "on Linux or macOS.")
    try:
        return os.open(root, _WALK_FLAGS)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"{what}: the folder {root!r} does not exist. Fix: check the "
                                "folder's path.") from None
    except NotADirectoryError:
        raise UnsafePathError(f"{what}: {root!r} is not a folder. Fix: give the folder the path lies in.") from None


def _explain(dir_fd: int, name: str, shown: str, root: str, what: str, exc: OSError, *, want_dir: bool) -> OSError:
    """The error for a component that did not open: lstat (never followed) says why."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, f"{what} {shown!r}: no such {'folder' if want_dir else 'file'} "
                                 f"below {root!r}. Fix: check the path.")
    except OSError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        return UnsafePathError(f"{what} {shown!r} is or passes through a symlink ({name!r}) below {root!r}; "
                               f"symlinks are never followed there. {_fix(root)}.")
    if want_dir and st is not None and not stat.S_ISDIR(st.st_mode):
        return UnsafePathError(f"{what} {shown!r}: {name!r} below {root!r} is not a folder. Fix: check the path.")
    return UnsafePathError(f"{what} {shown!r} below {root!r} cannot be opened ({exc.strerror or exc}). "
                           "Fix: check the path and its permissions.")


def _open_dir_under(root: str, parts: tuple[str, ...], shown: str, what: str) -> int:
    """An fd of the folder ``root/parts...`` (``O_PATH`` where there is one: pass it as ``dir_fd``), reached
    without following a symlink below ``root``."""
    fd = _open_root(root, what)
    try:
        for part in parts:
            try:
                nxt = os.open(part, _WALK_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                raise _explain(fd, part, shown, root, what, exc, want_dir=True) from None
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextmanager
def open_under(root: str | os.PathLike, path: str | os.PathLike, *, max_bytes: int,
               what: str = "file") -> Iterator[BinaryIO]:
    """Open a regular file below ``root`` without following any symlink below ``root``.

    Args:
        root: the folder the file must lie in (trusted: symlinks in the root's own path are followed).
        path: the file, relative to ``root`` or absolute (then it must start with ``root`` or its real path).
        max_bytes: largest accepted size (``fstat`` of the open file).
        what: how messages name the file (e.g. ``"checkpoint path"``).

    Returns:
        A context manager yielding the open binary file (blocking reads), closed on exit.

    Raises:
        UnsafePathError: ``..`` in ``path``, ``path`` outside ``root``, a symlink at any component below ``root``,
            not a regular file (folder, FIFO, device, socket), or more than ``max_bytes`` bytes.
        FileNotFoundError: no such file.
    """
    root_s = os.fspath(root)
    shown = os.fspath(path)
    parts = _relative_parts(root_s, path, what)
    if not parts:
        raise UnsafePathError(f"{what} {shown!r} is the folder {root_s!r} itself, not a file in it. "
                              f"{_fix(root_s)}.")
    dir_fd = _open_dir_under(root_s, parts[:-1], shown, what)
    try:
        try:
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            raise _explain(dir_fd, parts[-1], shown, root_s, what, exc, want_dir=False) from None
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{what} {shown!r} below {root_s!r} is not a regular file (a folder, FIFO, device "
                                  "or socket); kcore reads only regular files. Fix: copy the data into a regular "
                                  "file.")
        if st.st_size > max_bytes:
            raise UnsafePathError(f"{what} {shown!r} has {st.st_size} bytes, more than the limit of {max_bytes}. "
                                  "Fix: use a smaller file.")
        os.set_blocking(fd, True)
        fh = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh  # type: ignore[misc]


def read_fd_capped(fd: int, max_bytes: int, shown: str, what: str) -> bytes:
    """All bytes of the open file ``fd`` from its position, refusing more than ``max_bytes`` (a growing file).

    Raises:
        UnsafePathError: the file holds more than ``max_bytes`` bytes by the time it is read.
    """
    size_hint = max(os.fstat(fd).st_size, 0)
    chunks: list[bytes] = []
    total = 0
    while True:
        # ask for the rest of the file plus one byte: a file read in one call is returned without a copy
        want = min(max(size_hint - total, 0) + 1, max_bytes + 1 - total, _READ_CHUNK)
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise UnsafePathError(f"{what} {shown!r} grew past the limit of {max_bytes} bytes while it was read. "
                                  "Fix: wait until the file is written completely, or use a smaller file.")
    return b"".join(chunks)


def read_under(root: str | os.PathLike, path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file below ``root``, read from one open file (see :func:`open_under`).

    Args:
        root: the folder the file must lie in.
        path: the file, relative to ``root`` or absolute under it.
        max_bytes: largest accepted size, checked before reading and again while reading.
        what: how messages name the file.

    Returns:
        The file's bytes, exactly those read from the one descriptor (hash these and load these).

    Raises:
        UnsafePathError: as :func:`open_under`, or the file grew past ``max_bytes`` while read.
        FileNotFoundError: no such file.
    """
    with open_under(root, path, max_bytes=max_bytes, what=what) as fh:
        return read_fd_capped(fh.fileno(), max_bytes, os.fspath(path), what)


def read_nofollow(path: str | os.PathLike, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of a regular file read from one open file, reached from ``/`` without following a symlink.

    For paths a local user gives (the CLI, the API), where there is no root to stay under: symlinks in ``path`` are
    resolved first, as the user asked for them; the resolved path is then opened component by component from the
    file-system root with ``O_NOFOLLOW`` (see :func:`read_under`), so a symlink swapped in after the resolve is
    refused. Where the platform cannot do that (no ``dir_fd``), the resolved file is opened once and checked with
    ``fstat``, without the symlink guarantee.

    Args:
        path: the file.
        max_bytes: largest accepted size.
        what: how messages name the file.

    Returns:
        The bytes of one open file.

    Raises:
        UnsafePathError: a symlink swapped in after the resolve, not a regular file, or more than ``max_bytes``.
        FileNotFoundError: no such file.
    """
    real = os.path.realpath(os.fspath(path))
    if _SUPPORTED:
        anchor = os.path.splitdrive(real)[0] + os.sep
        return read_under(anchor, real, max_bytes=max_bytes, what=what)
    fd = os.open(real, _FILE_FLAGS | getattr(os, "O_BINARY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
            raise UnsafePathError(f"{what} {os.fspath(path)!r} is not a regular file of at most {max_bytes} bytes. "
                                  "Fix: give a regular file below the limit.")
        return read_fd_capped(fd, max_bytes, os.fspath(path), what)
    finally:
        os.close(fd)


def scan_under(root: str | os.PathLike, folder: str | os.PathLike = ".", *, max_files: int,
               recursive: bool = True, skip_hidden: bool = False) -> list[tuple[Path, EntryKind]]:
    """Every non-folder entry of a folder below ``root``, walked without following symlinks.

    Each folder is opened relative to its parent with ``O_NOFOLLOW`` and listed from its descriptor
    (``os.scandir(fd)``, ``follow_symlinks=False``), so a folder swapped for a symlink is neither listed nor entered.
    Symlinked folders are reported as ``"symlink"`` and not entered.

    Args:
        root: the folder everything must lie in.
        folder: the folder to list, relative to ``root`` or absolute under it (default: ``root`` itself).
        max_files: most entries (files, symlinks, others) accepted before the walk is refused.
        recursive: also walk subfolders.
        skip_hidden: leave out names starting with ``"."`` (files and folders).

    Returns:
        ``(path, kind)`` pairs: ``path`` is ``Path(folder) / relative path`` (``root / folder / ...`` when
        ``folder`` is relative); per folder, its entries sorted by name, each subfolder walked after the entries
        of its parent (the order of ``os.walk`` with sorted names).

    Raises:
        UnsafePathError: ``folder`` is or passes through a symlink, is outside ``root``, is not a folder, holds
            more than ``max_files`` entries, or nests folders deeper than :data:`MAX_DEPTH`.
        FileNotFoundError: no such folder.
    """
    root_s = os.fspath(root)
    shown = os.fspath(folder)
    parts = _relative_parts(root_s, folder, "folder")
    base = Path(folder) if Path(folder).is_absolute() else Path(root_s, *parts)
    out: list[tuple[Path, EntryKind]] = []
    walked = _open_dir_under(root_s, parts, shown, "folder")
    try:
        top = os.open(".", _DIR_FLAGS, dir_fd=walked)  # a descriptor that can be listed
    except OSError as exc:
        raise UnsafePathError(f"folder {shown!r} below {root_s!r} cannot be listed ({exc.strerror or exc}). "
                              "Fix: check the folder's permissions.") from None
    finally:
        os.close(walked)

    def walk(fd: int, rel: tuple[str, ...]) -> None:
        if len(rel) > MAX_DEPTH:
            raise UnsafePathError(f"folder {shown!r} below {root_s!r} nests folders more than {MAX_DEPTH} deep "
                                  f"({'/'.join(rel[:3])}/...). Fix: use a flatter folder.")
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                subdirs.append(entry.name)
                continue
            kind: EntryKind = ("symlink" if entry.is_symlink()
                               else "file" if entry.is_file(follow_symlinks=False) else "other")
            out.append((base.joinpath(*rel, entry.name), kind))
            if len(out) > max_files:
                raise UnsafePathError(f"folder {shown!r} below {root_s!r} holds more than {max_files} files. "
                                      "Fix: use a folder with fewer files, or a subset of it.")
        if not recursive:
            return
        for name in subdirs:
            try:
                sub = os.open(name, _DIR_FLAGS | _NOFOLLOW, dir_fd=fd)
            except OSError:  # replaced by a symlink (or removed, or unreadable) since it was listed
                try:
                    swapped = stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
                except OSError:
                    continue
                out.append((base.joinpath(*rel, name), "symlink" if swapped else "other"))
                continue
            try:
                walk(sub, (*rel, name))
            finally:
                os.close(sub)

    try:
        walk(top, ())
    finally:
        os.close(top)
    return out


def regular_files_under(root: str | os.PathLike, folder: str | os.PathLike = ".", *, max_files: int,
                        recursive: bool = True, skip_hidden: bool = False) -> list[Path]:
    """The regular files of a folder below ``root``, sorted; symlinks, FIFOs and devices are left out.

    Args:
        root: the folder everything must lie in.
        folder: the folder to list, relative to ``root`` or absolute under it (default: ``root`` itself).
        max_files: most entries accepted before the walk is refused (see :func:`scan_under`).
        recursive: also list subfolders (never through a symlink).
        skip_hidden: leave out names starting with ``"."``.

    Returns:
        Sorted paths, each to be read with :func:`read_under` (which refuses it if it was swapped since).

    Raises:
        UnsafePathError: as :func:`scan_under`.
        FileNotFoundError: no such folder.
    """
    found = scan_under(root, folder, max_files=max_files, recursive=recursive, skip_hidden=skip_hidden)
    return sorted(p for p, kind in found if kind == "file")
