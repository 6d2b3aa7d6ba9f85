"""kcore.safe_files: files below a root are opened without following symlinks, checked after opening, read once."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from kcore import safe_files
from kcore.safe_files import UnsafePathError, open_under, read_nofollow, read_under, regular_files_under, scan_under

pytestmark = pytest.mark.skipif(not safe_files._supported(), reason="needs O_NOFOLLOW and dir_fd (POSIX)")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/{a.bin, sub/b.bin, sub/deeper/c.bin} and an outside/secret.bin beside root."""
    root = tmp_path / "root"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(b"A" * 10)
    (root / "sub" / "b.bin").write_bytes(b"B" * 20)
    (root / "sub" / "deeper" / "c.bin").write_bytes(b"C" * 30)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.bin").write_bytes(b"SECRET-CONTENT")
    return {"root": root, "outside": outside}


def test_reads_regular_files_relative_and_absolute(tree):
    root = tree["root"]
    assert read_under(root, "a.bin", max_bytes=100) == b"A" * 10
    assert read_under(root, "sub/deeper/c.bin", max_bytes=100) == b"C" * 30
    assert read_under(root, root / "sub" / "b.bin", max_bytes=100) == b"B" * 20
    assert read_under(str(root), "./sub/./b.bin", max_bytes=20) == b"B" * 20  # exactly at the cap
    with open_under(root, "sub/b.bin", max_bytes=100) as fh:
        assert fh.read(5) == b"BBBBB"
        fd = fh.fileno()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed on exit


def test_symlink_at_last_component_is_refused(tree):
    root, outside = tree["root"], tree["outside"]
    (root / "link.bin").symlink_to(outside / "secret.bin")
    (root / "inside_link.bin").symlink_to(root / "a.bin")  # even one that stays inside: never followed
    for name in ("link.bin", "inside_link.bin"):
        with pytest.raises(UnsafePathError) as info:
            read_under(root, name, max_bytes=100, what="checkpoint path")
        msg = str(info.value)
        assert "checkpoint path" in msg and name in msg and str(root) in msg and "symlink" in msg and "Fix:" in msg
        assert "SECRET" not in msg


def test_symlink_at_middle_component_is_refused(tree):
    root, outside = tree["root"], tree["outside"]
    (root / "via").symlink_to(outside)
    with pytest.raises(UnsafePathError, match=r"symlink \('via'\)"):
        read_under(root, "via/secret.bin", max_bytes=100)
    with pytest.raises(UnsafePathError, match="is or passes through a symlink"):
        regular_files_under(root, "via", max_files=10)


def test_symlink_swapped_after_the_check_is_refused_by_the_open(tree, monkeypatch):
    """The path passes a resolve-and-check; a component is swapped for a symlink before the open: the open refuses."""
    root, outside = tree["root"], tree["outside"]
    checked = (root / "sub" / "b.bin").resolve()
    assert checked.is_relative_to(root.resolve())  # the check a caller did, and it passed
    # the swap: sub/ becomes a symlink to the outside folder, holding a b.bin of its own
    (outside / "b.bin").write_bytes(b"OUTSIDE")
    os.rename(root / "sub", root / "sub_old")
    (root / "sub").symlink_to(outside)
    assert (root / "sub" / "b.bin").read_bytes() == b"OUTSIDE"  # a plain open would read outside
    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(safe_files.os, "open", spy)
    with pytest.raises(UnsafePathError, match=r"passes through a symlink \('sub'\)"):
        read_under(root, checked, max_bytes=100)
    assert "b.bin" not in opened  # refused at 'sub', before anything inside the outside folder was opened
    # the same for the last component swapped to a symlink
    os.replace(root / "a.bin", root / "a_old.bin")
    (root / "a.bin").symlink_to(outside / "secret.bin")
    with pytest.raises(UnsafePathError, match=r"is or passes through a symlink \('a.bin'\)"):
        read_under(root, root / "a.bin", max_bytes=100)


def test_fifo_is_refused_without_hanging(tree):
    root = tree["root"]
    os.mkfifo(root / "pipe.png")
    result: list[BaseException | bytes] = []

    def go() -> None:
        try:
            result.append(read_under(root, "pipe.png", max_bytes=100, what="image file"))
        except BaseException as exc:  # noqa: BLE001  (handed to the main thread)
            result.append(exc)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    if t.is_alive():  # unblock the reader so the test process can end, then fail
        fd = os.open(root / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("reading a FIFO blocked")
    assert isinstance(result[0], UnsafePathError)
    assert "not a regular file" in str(result[0]) and "pipe.png" in str(result[0])


def test_char_device_through_symlink_and_directly_is_refused(tree, tmp_path):
    root = tree["root"]
    (root / "zero.csv").symlink_to("/dev/zero")
    with pytest.raises(UnsafePathError, match="is or passes through a symlink"):
        read_under(root, "zero.csv", max_bytes=100)
    # a device reached without a symlink (the root is /dev) is refused by fstat, never read
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_under("/dev", "zero", max_bytes=100)


def test_size_cap_before_and_while_reading(tree, monkeypatch):
    root = tree["root"]
    with pytest.raises(UnsafePathError) as info:
        read_under(root, "sub/deeper/c.bin", max_bytes=29)
    assert "30 bytes" in str(info.value) and "limit of 29" in str(info.value)
    # a file that grows between the fstat check and the read: fstat reports the old size, the read sees more
    path = root / "grow.bin"
    path.write_bytes(b"x" * 10)
    real_fstat = os.fstat

    def fstat_then_grow(fd):
        st = real_fstat(fd)
        with open(path, "ab") as fh:
            fh.write(b"y" * 50)
        return st

    monkeypatch.setattr(safe_files.os, "fstat", fstat_then_grow)
    with pytest.raises(UnsafePathError, match="grew past the limit of 20"):
        read_under(root, "grow.bin", max_bytes=20)


def test_dotdot_and_outside_paths_are_refused(tree):
    root, outside = tree["root"], tree["outside"]
    with pytest.raises(UnsafePathError, match=r"contains '\.\.'"):
        read_under(root, "../outside/secret.bin", max_bytes=100)
    with pytest.raises(UnsafePathError, match=r"contains '\.\.'"):
        read_under(root, root / "sub" / ".." / "a.bin", max_bytes=100)
    with pytest.raises(UnsafePathError) as info:
        read_under(root, outside / "secret.bin", max_bytes=100)
    assert "outside the folder" in str(info.value) and str(root) in str(info.value)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_under(root, "sub", max_bytes=100)
    with pytest.raises(UnsafePathError, match="itself, not a file"):
        read_under(root, root, max_bytes=100)


def test_missing_file_is_file_not_found(tree):
    with pytest.raises(FileNotFoundError, match="no such file below"):
        read_under(tree["root"], "nope.bin", max_bytes=100)
    with pytest.raises(FileNotFoundError, match="no such folder below"):
        read_under(tree["root"], "nowhere/x.bin", max_bytes=100)


def test_unsafe_path_error_is_value_and_os_error():
    assert issubclass(UnsafePathError, ValueError) and issubclass(UnsafePathError, OSError)


def test_root_given_through_a_symlink_is_trusted(tree, tmp_path):
    """The root itself may be a symlink (an operator's /data -> /mnt/data); only what is below it is checked."""
    alias = tmp_path / "alias"
    alias.symlink_to(tree["root"])
    assert read_under(alias, alias / "a.bin", max_bytes=100) == b"A" * 10
    assert read_under(alias, tree["root"] / "a.bin", max_bytes=100) == b"A" * 10  # the real path is accepted too


def test_read_nofollow_resolves_first_then_refuses_a_late_swap(tree, monkeypatch):
    root, outside = tree["root"], tree["outside"]
    (root / "link.bin").symlink_to(root / "sub" / "b.bin")
    assert read_nofollow(root / "link.bin", max_bytes=100) == b"B" * 20  # a user's own symlink is resolved
    real_realpath = os.path.realpath

    def realpath_then_swap(p):
        out = real_realpath(p)
        os.replace(root / "sub" / "b.bin", root / "sub" / "b_old.bin")
        (root / "sub" / "b.bin").symlink_to(outside / "secret.bin")
        return out

    monkeypatch.setattr(safe_files.os.path, "realpath", realpath_then_swap)
    with pytest.raises(UnsafePathError, match=r"symlink \('b.bin'\)"):
        read_nofollow(root / "link.bin", max_bytes=100)


def test_listing_never_follows_symlinks(tree):
    root, outside = tree["root"], tree["outside"]
    (root / "sub" / "out.bin").symlink_to(outside / "secret.bin")
    (root / "outdir").symlink_to(outside)
    os.mkfifo(root / "sub" / "pipe")
    (root / ".hidden").write_bytes(b"h")
    files = regular_files_under(root, ".", max_files=100)
    assert files == sorted(files)
    assert [p.relative_to(root).as_posix() for p in files] == [
        ".hidden", "a.bin", "sub/b.bin", "sub/deeper/c.bin"]
    assert [p.name for p in regular_files_under(root, "sub", max_files=100, recursive=False)] == ["b.bin"]
    assert ".hidden" not in [p.name for p in regular_files_under(root, max_files=100, skip_hidden=True)]
    kinds = {p.relative_to(root).as_posix(): k for p, k in scan_under(root, root, max_files=100)}
    assert kinds["outdir"] == "symlink" and kinds["sub/out.bin"] == "symlink" and kinds["sub/pipe"] == "other"
    assert not any("secret" in name for name in kinds)  # the symlinked folder was not entered


def test_listing_cap(tree):
    with pytest.raises(UnsafePathError) as info:
        regular_files_under(tree["root"], ".", max_files=2)
    assert "more than 2 files" in str(info.value) and "Fix:" in str(info.value)


def test_listing_depth_cap(tmp_path):
    deep = tmp_path.joinpath(*["d"] * (safe_files.MAX_DEPTH + 1))
    deep.mkdir(parents=True)
    (deep / "x.bin").write_bytes(b"x")
    with pytest.raises(UnsafePathError, match=f"more than {safe_files.MAX_DEPTH} deep.*Fix:"):
        regular_files_under(tmp_path, ".", max_files=100)
    assert regular_files_under(tmp_path, ".", max_files=100, recursive=False) == []  # one level is fine
    ok = tmp_path / "ok"
    ok.joinpath(*["d"] * safe_files.MAX_DEPTH).mkdir(parents=True)
    (ok.joinpath(*["d"] * safe_files.MAX_DEPTH) / "y.bin").write_bytes(b"y")
    assert [p.name for p in regular_files_under(tmp_path, "ok", max_files=100)] == ["y.bin"]
