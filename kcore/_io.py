"""Atomic, symlink-safe writes: files and folders are written under a temporary sibling name, then renamed into place.

Files (:func:`write_file_atomic`, :func:`atomic_file`): the temporary file is created inside the destination's own
folder with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (mode 0600) under a name with a random part
(``.NAME.tmp-PID-<16 hex>``), so a symlink planted at any name the writer could use makes that create fail
instead of writing through it; it is written, fsynced, and renamed over NAME relative to the folder's open
descriptor. A destination that is itself a symlink (or a folder, FIFO, device) is refused. A file that is
streamed while another process reads it (a log) is created with :func:`open_new_file` (``O_EXCL|O_NOFOLLOW``).

Folders (:func:`atomic_folder`, :func:`write_new_folder`): written into a fresh private temporary folder
(``mkdtemp``, mode 0700) beside the destination, then renamed into place. :func:`write_new_folder` never replaces
or merges: a name already taken gets a new one (``NAME-2``, ``NAME-3``, ...), and on Linux the rename itself
refuses to land on an existing name (``renameat2(RENAME_NOREPLACE)``).

Safety rules (what ``overwrite=True`` may replace):

* only a folder that carries kcore's marker file (:data:`MARKER`, written into every run and study folder),
  never a plain file, a symlink, ``.``, a parent of the working directory, the home folder or ``/``;
* the new folder is complete before it is swapped in: with Linux's atomic exchange (``renameat2``) the path
  always holds either the whole old or the whole new folder; elsewhere the old folder is renamed aside, the new
  one renamed in, and only then the old one is deleted (a kill in between is repaired on the next write);
* temporary folders left by killed writers (``.NAME.tmp-PID-*``, ``.NAME.old-PID-*``, of any NAME) are removed on
  the next write into the same parent when they carry kcore's marker and their process is gone; those of the
  name being written that lack the marker are named in a warning, and every folder without the marker is left
  alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

T = TypeVar("T")

#: Marker file of a finished kcore run/study folder (JSON: ``{"kcore": KIND, "format": 1}``).
MARKER = ".kcore-folder.json"
#: Marker file of a folder kcore is still writing (its temporary sibling).
TMP_MARKER = ".kcore-tmp"
FOLDER_KINDS = ("run", "study", "export")

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: A temporary (``tmp``) or set-aside (``old``) sibling of the folder NAME, written by process PID.
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")
#: The temporary file of :func:`atomic_file`: ``.NAME.tmp-PID-<16 hex>``.
_FILE_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{16}$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TMP_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_NAME_TRIES = 32
_TMP_NAME_LEN = 200  # the destination's name in its temporary's (255 bytes at most with the suffix)
MAX_UNIQUE = 1000
"""How many names :func:`write_new_folder` tries (``NAME``, ``NAME-2`` ... ``NAME-1000``) before it refuses."""
_libc = None


def _pause(step: str) -> None:
    """Test hook: ``KCORE_TEST_IO_PAUSE=STEP`` stops the writer at STEP (announced on stderr) for a kill test."""
    if os.environ.get("KCORE_TEST_IO_PAUSE") == step:
        print(f"kcore-io-pause {step}", file=sys.stderr, flush=True)
        time.sleep(600)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2(a, b, flags)``: True when done, False where unsupported; other failures raise OSError."""
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
    rc = _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not rename {str(a)!r} to {str(b)!r}: {os.strerror(err)}", str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


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


def _ours(p: Path) -> bool:
    """A real folder kcore made: it carries a marker, or it is empty (its writer was killed at birth)."""
    try:
        return p.is_dir() and not p.is_symlink() and (
            (p / MARKER).is_file() or (p / TMP_MARKER).is_file() or not any(p.iterdir()))
    except OSError:
        return False


def clean_stale(out_dir: str | os.PathLike) -> list[Path]:
    """Repair and remove what killed writers left in the parent of ``out_dir``; return the folders removed.

    Every ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` folder of the parent is looked at, whatever its NAME (a
    killed run leaves its temporary folder behind even when the next write has another name). Only those whose
    process is gone and that kcore made (they carry :data:`MARKER` or :data:`TMP_MARKER`, or are empty) are
    touched: a ``.NAME.old-PID-*`` folder with the marker while NAME is missing is renamed back to NAME (the kill
    came between the two renames of the fallback path); the others are deleted. Anything else is left alone, and
    what looks like a temporary of ``out_dir`` itself is named in a warning.

    Args:
        out_dir: the folder about to be written; its parent is cleaned.

    Returns:
        The folders deleted.
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
        same = name.startswith(tmp_prefix) or name.startswith(old_prefix)
        match = _SIBLING.match(name)
        if same:
            prefix = tmp_prefix if name.startswith(tmp_prefix) else old_prefix
            pid, target = _pid_of(name, prefix), out
        elif match is not None:
            prefix = f".{match['name']}.{match['kind']}-"
            pid, target = int(match["pid"]), parent / match["name"]
        else:
            continue
        if pid is not None and _pid_alive(pid):
            continue  # another writer is at work
        if pid is None or not _ours(p):
            if same:
                left.append(p)
            continue
        if prefix.endswith(".old-") and not (target.exists() or target.is_symlink()) and (p / MARKER).is_file():
            os.rename(p, target)
            warnings.warn(f"restored {str(target)!r} from {name} (a writer was killed while replacing it)",
                          stacklevel=3)
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if left:
        warnings.warn(f"left alone in {str(parent)!r}: {[p.name for p in left]} look like temporary folders of an "
                      "interrupted kcore write but do not carry kcore's marker. Fix: delete them yourself if "
                      "they are not needed.", stacklevel=3)
    return removed


def _check_kind(kind: str) -> None:
    if kind not in FOLDER_KINDS:
        raise ValueError(f"kind must be one of {FOLDER_KINDS}; got {kind!r}.")


def _new_tmp(out: Path) -> Path:
    """A fresh private (0700) temporary folder beside ``out``, carrying :data:`TMP_MARKER`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    (tmp / TMP_MARKER).write_text("")
    return tmp


def _seal(tmp: Path, kind: str) -> None:
    """Mark ``tmp`` finished: kcore's marker in, the temporary marker out."""
    (tmp / MARKER).write_text(json.dumps({"kcore": kind, "format": 1}))
    (tmp / TMP_MARKER).unlink()


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False, kind: str = "run") -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out_dir``, on any error it is removed.

    The finished folder carries :data:`MARKER`. See the module's docstring for what may be replaced.

    Raises:
        ValueError: see :func:`check_out_dir` (checked before anything is written).
    """
    _check_kind(kind)
    out = Path(out_dir)
    clean_stale(out)
    check_out_dir(out, overwrite=overwrite)
    tmp = _new_tmp(out)
    try:
        yield tmp
        _seal(tmp, kind)
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


def _rename_new(tmp: Path, dest: Path) -> bool:
    """Rename the folder ``tmp`` to ``dest`` only if nothing is there; False (nothing renamed) if ``dest`` is taken."""
    if dest.exists() or dest.is_symlink():
        return False
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):  # atomic: never lands on an existing name
            return True
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    # elsewhere: reserve the name with an empty folder (mkdir fails if taken), then rename onto that empty folder
    try:
        os.mkdir(dest, 0o700)
    except FileExistsError:
        return False
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rmdir(dest)
        raise
    return True


def write_new_folder(out_dir: str | os.PathLike, fill: Callable[[Path], T], *, kind: str = "export",
                     max_names: int = MAX_UNIQUE) -> tuple[Path, T]:
    """Write a new folder at ``out_dir``, or at ``out_dir-2``, ``-3``, ... when the name is taken; never replace.

    ``fill(tmp)`` writes the content into a fresh private temporary folder beside ``out_dir``; the finished folder
    gets kcore's marker and is renamed into place in one step, so no reader ever sees it half written, and two
    writers of the same name end as two folders (never one folder mixing both). An error in ``fill`` (or a kill)
    leaves no visible folder: the temporary is removed at once (or by the next write into the parent).

    Args:
        out_dir: the folder wanted.
        fill: writes the content into the folder it is given; its return value is passed back.
        kind: what the folder holds, one of :data:`FOLDER_KINDS` (recorded in the marker).
        max_names: how many names to try before refusing.

    Returns:
        ``(folder, value)``: where the folder landed and what ``fill`` returned.

    Raises:
        ValueError: ``out_dir`` is ``.``, a parent of the working directory, ``~`` or ``/``; or ``kind`` is
            unknown; or all ``max_names`` names are taken.
    """
    _check_kind(kind)
    out = Path(out_dir)
    why = _protected(out)
    if why is not None:
        raise ValueError(f"out_dir {str(out_dir)!r} cannot be written: {why}. Fix: choose a new folder name, "
                         "e.g. exports/my_export.")
    clean_stale(out)
    tmp = _new_tmp(out)
    try:
        value = fill(tmp)
        _seal(tmp, kind)
        _pause("written")
        for i in range(1, max_names + 1):
            dest = out if i == 1 else out.with_name(f"{out.name}-{i}")
            if _rename_new(tmp, dest):
                return dest, value
        raise ValueError(f"out_dir {str(out_dir)!r}: the names {out.name!r} and {out.name}-2 ... {out.name}-{max_names} "
                         "are all taken. Fix: choose another name, or remove old folders.")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ files
def _temp_token() -> str:
    """The random part of a temporary file's name (16 hex digits; a test may replace it to force collisions)."""
    return secrets.token_hex(8)


def _umask() -> int:
    """The process's umask, read without changing it (``os.umask`` sets it process-wide: not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _refuse_unsafe(dir_fd: int, name: str, shown: Path) -> None:
    """Raise ValueError when ``name`` in the folder ``dir_fd`` is a symlink or anything but a regular file."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ValueError(f"path {str(shown)!r} is a symlink; kcore never writes through a symlink (it may lead "
                         "outside the folder). Fix: remove the link, or write to another file name.")
    if not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO, device or socket"
        raise ValueError(f"path {str(shown)!r} is {what}, not a regular file; kcore replaces only regular files. "
                         "Fix: choose another file name.")


def _remove_dead_temps(dir_fd: int, name: str) -> None:
    """Unlink temporary files of ``name`` (``.NAME.tmp-PID-<hex>``) whose writer is gone (regular files we own)."""
    try:
        entries = os.listdir(dir_fd)
    except OSError:
        return
    for entry in entries:
        m = _FILE_TMP.match(entry)
        if m is None or m["name"] != name[:_TMP_NAME_LEN] or _pid_alive(int(m["pid"])):
            continue
        try:
            st = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
                os.unlink(entry, dir_fd=dir_fd)
        except OSError:
            pass


@contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Yield a binary file to write; on success it replaces ``path`` in one rename, on any error it is removed.

    The temporary file is created in ``path``'s own folder with ``O_CREAT|O_EXCL|O_NOFOLLOW`` (mode 0600) under a
    name with 16 random hex digits: a symlink planted at any name it could use makes the create fail (another
    name is tried), never write through. It is fsynced, given ``mode``, and renamed over ``path`` relative to the
    folder's open descriptor (the folder cannot be swapped in between).

    Args:
        path: the file to write; its folder must exist.
        mode: permission bits of the finished file, less the umask (as ``open`` would give).

    Raises:
        ValueError: ``path`` is a symlink, a folder or a special file, or has no file name.
        FileNotFoundError: ``path``'s folder does not exist.
        FileExistsError: no free temporary name after 32 random tries (something plants names in the folder).
    """
    dest = Path(path)
    name = dest.name
    if name in ("", ".", ".."):
        raise ValueError(f"path {str(path)!r} does not name a file. Fix: give a file path, e.g. out/card.json.")
    if not _NOFOLLOW or os.open not in os.supports_dir_fd:  # pragma: no cover - POSIX has both
        raise ValueError("symlink-safe writes need O_NOFOLLOW and dir_fd (POSIX); this platform has neither.")
    dir_fd = os.open(dest.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
    try:
        _refuse_unsafe(dir_fd, name, dest)
        _remove_dead_temps(dir_fd, name)
        head = f".{name[:_TMP_NAME_LEN]}.tmp-{os.getpid()}-"
        for _ in range(_NAME_TRIES):
            tmp = head + _temp_token()
            try:
                fd = os.open(tmp, _TMP_FILE_FLAGS, 0o600, dir_fd=dir_fd)
                break
            except FileExistsError:
                continue  # taken (maybe a planted symlink): O_EXCL refused it; draw another name
        else:
            raise FileExistsError(errno.EEXIST, f"no free temporary name for {str(dest)!r} after {_NAME_TRIES} "
                                  "tries; something keeps creating names in that folder. Fix: check the folder.",
                                  str(dest))
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
                os.fchmod(fh.fileno(), mode & ~_umask())
            _refuse_unsafe(dir_fd, name, dest)  # re-checked: a symlink planted meanwhile is refused, not replaced
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except OSError:
                pass
            raise
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
    finally:
        os.close(dir_fd)


def write_file_atomic(path: str | os.PathLike, data: bytes | str, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically and symlink-safely (see :func:`atomic_file`); str is written as UTF-8.

    Args:
        path: the file to write (replaced if it is a regular file); its folder must exist.
        data: the content.
        mode: permission bits of the finished file, less the umask.

    Returns:
        ``path`` as a Path.

    Raises:
        TypeError: ``data`` is neither bytes nor str.
        ValueError: ``path`` is a symlink, a folder or a special file.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes or str; got {type(data).__name__}. Fix: encode it first, e.g. "
                        "json.dumps(obj).")
    with atomic_file(path, mode=mode) as fh:
        fh.write(data)
    return Path(path)


def open_new_file(path: str | os.PathLike, *, mode: int = 0o644) -> BinaryIO:
    """Open a new file for writing (e.g. a log another process streams into); never through a symlink.

    Created with ``O_CREAT|O_EXCL|O_NOFOLLOW``: whatever is already at ``path`` (a file, a symlink, even a dangling
    one) makes it fail, so a link planted there is never followed. Use :func:`write_file_atomic` for a file written
    in one go.

    Args:
        path: the file to create; its folder must exist.
        mode: permission bits of the new file.

    Returns:
        The file, open for binary writing (close it, e.g. with ``with``).

    Raises:
        FileExistsError: something is already at ``path`` (the message names it and the fix).
    """
    try:
        fd = os.open(path, _TMP_FILE_FLAGS, mode)
    except FileExistsError as exc:
        raise FileExistsError(errno.EEXIST, f"{str(path)!r} already exists (a file or a symlink); kcore creates it "
                              "only where nothing is. Fix: choose a new name, or remove what is there.",
                              str(path)) from exc
    return os.fdopen(fd, "wb")
