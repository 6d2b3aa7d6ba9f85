"""Hostile inputs: every payload is built at test time, and each case must end in a clear error (or the right
result) without running code, without touching anything outside the test's temporary roots, within a time bound.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kcore._io import MARKER, atomic_folder, check_out_dir, clean_stale

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ --overwrite
def test_overwrite_refuses_cwd_parents_home_root_and_foreign_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for bad, why in ((".", "current working directory"), ("..", "parent of the current"), ("/", "root"),
                     ("~", "home folder")):
        with pytest.raises(ValueError, match=why) as e:
            check_out_dir(os.path.expanduser(bad), overwrite=True)
        assert "Fix:" in str(e.value)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a kcore run or study folder.*Fix:"):
        with atomic_folder(foreign, overwrite=True) as tmp:
            (tmp / "new").write_text("new")
    assert _snapshot(foreign) == {"a.jpg": b"x"}
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(ValueError, match="symlink"):
        check_out_dir(link, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "link", "photos"]  # no temporary left


def test_overwrite_replaces_a_kcore_folder_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "run"
    with atomic_folder(out) as tmp:
        (tmp / "old").write_text("old")
    assert (out / MARKER).is_file()
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(RuntimeError):  # an error while writing leaves the old folder as it was
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


_WRITER = textwrap.dedent("""
    import sys
    from kcore._io import atomic_folder
    out, tag = sys.argv[1], sys.argv[2]
    with atomic_folder(out, overwrite=True) as tmp:
        for i in range(60):
            (tmp / f"f{i:02d}").write_text(tag * 2000)
""")


def _write(out: Path, tag: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(out), tag], env=_env(**env),
                            stderr=subprocess.PIPE, text=True)


def _whole(out: Path) -> str:
    """The tag of the folder at ``out`` if it is whole (marker + 60 files of one tag); fails otherwise."""
    files = _snapshot(out)
    assert MARKER in files, f"{out} has no marker: {sorted(files)[:5]}"
    body = {k: v for k, v in files.items() if k != MARKER}
    tags = {v.decode()[:1] for v in body.values()}
    assert len(body) == 60 and len(tags) == 1 and all(len(v) == 2000 for v in body.values()), (len(body), tags)
    return tags.pop()


@pytest.mark.parametrize("step,no_exchange", [("written", ""), ("swapped", ""), ("aside", "1"), ("swapped", "1")])
def test_sigkill_during_overwrite_leaves_old_or_new_folder_whole(tmp_path, step, no_exchange):
    out = tmp_path / "run"
    p = _write(out, "o")
    assert p.wait(60) == 0
    assert _whole(out) == "o"
    p = _write(out, "n", KCORE_TEST_IO_PAUSE=step, KCORE_TEST_IO_NO_EXCHANGE=no_exchange)
    t0 = time.monotonic()
    line = p.stderr.readline()
    assert line.startswith(f"kcore-io-pause {step}"), line
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    assert time.monotonic() - t0 < 60
    if not (no_exchange and step == "aside"):
        assert _whole(out) in ("o", "n")  # the path always holds a whole folder
    with pytest.warns(UserWarning, match="restored") if (no_exchange and step == "aside") else _nullcontext():
        clean_stale(out)  # what the next write does first
    expect = "n" if step == "swapped" else "o"
    assert _whole(out) == expect
    assert [q.name for q in tmp_path.iterdir()] == ["run"]  # stale temporaries of the killed writer removed
    p = _write(out, "z")  # and the next write works
    assert p.wait(60) == 0 and _whole(out) == "z"


def test_sigkill_at_random_moments_never_loses_the_folder(tmp_path):
    out = tmp_path / "run"
    assert _write(out, "a").wait(60) == 0
    rng = random.Random(0)
    seen = set()
    for i in range(6):
        p = _write(out, "bc"[i % 2])
        time.sleep(rng.uniform(0.05, 0.6))
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        seen.add(_whole(out))
        clean_stale(out)
        assert [q.name for q in tmp_path.iterdir()] == ["run"]
    assert seen <= {"a", "b", "c"}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_cli_fit_out_dot_overwrite_refused_before_any_work(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "kcore.cli", "fit", "--a", "nonexistent_a.pt", "--b", "nonexistent_b.pt",
                        "--out", ".", "--overwrite"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert "current working directory" in r.stderr and "Fix:" in r.stderr, r.stderr[-2000:]
    assert _snapshot(tmp_path) == {"precious.txt": b"keep me"}
    assert time.monotonic() - t0 < 120
