"""Hostile writes: planted symlinks at every temporary name a writer could use, a destination that is a symlink,
two exports racing to one name, a kill in the middle of an export, and dead writers' temporaries of other names.

Every payload is built at test time; each case checks that nothing outside the destination's folder was written
and that what kcore wrote is whole (issue 23, items 2 and 4, and the temporary-folder leak of item 7).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import plain_net
from kcore import _io, export, viz
from kcore._io import MARKER, TMP_MARKER, atomic_folder, clean_stale, write_file_atomic, write_new_folder
from kcore.cards import ModelCard, card_path_for, read_card, write_card
from kcore.checkpoints import LoadedModel

ROOT = Path(__file__).resolve().parents[1]
CARD = ModelCard(architecture="kc_tinynet", num_classes=3, input_size=(32, 32), mean=(0.5, 0.5, 0.5),
                 std=(0.25, 0.25, 0.25), class_names=("a", "b", "c"), dataset="planted")


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file below ``folder`` (symlinks listed by their target, never read through)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = b"-> " + os.fsencode(os.readlink(p))
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def _wait_for_pause(p: subprocess.Popen, step: str = "written") -> None:
    """Read the writer's stderr until it announces the pause at ``step`` (warnings may come first)."""
    seen = []
    for line in p.stderr:
        if line.startswith(f"kcore-io-pause {step}"):
            return
        seen.append(line)
    raise AssertionError(f"the writer ended (rc {p.wait(30)}) without pausing at {step!r}:\n{''.join(seen)[-3000:]}")


def _dead_pid() -> int:
    """The PID of a process that has just ended (so kcore's writers treat its temporaries as abandoned)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(30)
    return p.pid


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A file outside the folder being written, which no write may change."""
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious, not kcore's")
    return victim


# ------------------------------------------------------------------------------------------------ files
def test_card_follows_no_symlink_planted_at_its_old_temporary_name(tmp_path, outside):
    models = tmp_path / "models"
    models.mkdir()
    target = card_path_for(models / "m.safetensors")
    planted = target.with_name(target.name + ".tmp")  # the fixed name write_card used before
    planted.symlink_to(outside)
    dangling = target.with_name(target.name + ".tmp2")
    dangling.symlink_to(tmp_path / "outside" / "created.txt")
    write_card(CARD, target)
    assert outside.read_text() == "precious, not kcore's"
    assert read_card(target) == CARD
    assert not target.is_symlink() and planted.is_symlink() and os.readlink(planted) == str(outside)
    assert not (tmp_path / "outside" / "created.txt").exists()
    assert sorted(p.name for p in models.iterdir()) == sorted([target.name, planted.name, dangling.name])


def test_guessing_the_temporary_name_is_useless(tmp_path, outside, monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    target = folder / "m.card.json"
    guess = "0" * 16
    planted = folder / f".{target.name}.tmp-{os.getpid()}-{guess}"
    planted.symlink_to(outside)  # the attacker guessed the PID and the random part right
    dangling = folder / f".{target.name}.tmp-{os.getpid()}-{'1' * 16}"
    dangling.symlink_to(tmp_path / "outside" / "new.txt")  # O_CREAT alone would create this outside file
    tokens = iter([guess, "1" * 16, "2" * 16])
    monkeypatch.setattr(_io, "_temp_token", lambda: next(tokens))
    write_card(CARD, target)  # both guessed names are refused by O_EXCL|O_NOFOLLOW; the third is free
    assert outside.read_text() == "precious, not kcore's"
    assert not (tmp_path / "outside" / "new.txt").exists()
    assert read_card(target) == CARD
    assert planted.is_symlink() and dangling.is_symlink()
    assert sorted(p.name for p in folder.iterdir()) == sorted([target.name, planted.name, dangling.name])

    # every name the writer draws is planted: it gives up with a clear error, having written nothing anywhere
    monkeypatch.setattr(_io, "_temp_token", lambda: guess)
    before = target.read_bytes()
    with pytest.raises(FileExistsError, match=r"no free temporary name for .*m\.card\.json.* after 32 tries.*Fix:"):
        write_file_atomic(target, b"{}")
    assert target.read_bytes() == before and outside.read_text() == "precious, not kcore's"


def test_destination_that_is_a_symlink_or_special_file_is_refused(tmp_path, outside):
    folder = tmp_path / "models"
    folder.mkdir()
    link = folder / "m.card.json"
    link.symlink_to(outside)
    with pytest.raises(ValueError, match=r"path '.*m\.card\.json' is a symlink; kcore never writes through a "
                                         r"symlink.*Fix: remove the link"):
        write_card(CARD, link)
    assert outside.read_text() == "precious, not kcore's" and link.is_symlink()
    (folder / "sub").mkdir()
    with pytest.raises(ValueError, match=r"'.*sub' is a folder, not a regular file.*Fix:"):
        write_file_atomic(folder / "sub", "x")
    os.mkfifo(folder / "fifo")
    with pytest.raises(ValueError, match=r"'.*fifo' is a FIFO, device or socket.*Fix:"):
        write_file_atomic(folder / "fifo", "x")  # refused before any open: no hang
    with pytest.raises(TypeError, match=r"data must be bytes or str; got int\. Fix:"):
        write_file_atomic(folder / "n.json", 12)
    # nothing was left behind by the refusals
    assert sorted(p.name for p in folder.iterdir()) == ["fifo", "m.card.json", "sub"]


def test_file_write_is_atomic_private_while_written_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "data.bin"
    target.write_bytes(b"old")
    seen = {}
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_file(target) as fh:
            fh.write(b"half")
            tmp = [p for p in tmp_path.iterdir() if p.name != "data.bin"]
            seen["mode"] = tmp[0].stat().st_mode & 0o777
            raise RuntimeError("boom")
    assert seen["mode"] == 0o600  # private while it is written
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["data.bin"]
    old_umask = os.umask(0o027)
    try:
        write_file_atomic(target, "new ✓", mode=0o666)
    finally:
        os.umask(old_umask)
    assert target.read_text(encoding="utf-8") == "new ✓" and target.stat().st_mode & 0o777 == 0o640  # umask applied
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def test_dead_writers_temporary_files_of_the_same_name_are_removed(tmp_path, outside):
    dead = _dead_pid()
    stale = tmp_path / f".card.json.tmp-{dead}-{'a' * 16}"
    stale.write_bytes(b"half a card")
    other = tmp_path / f".other.json.tmp-{dead}-{'b' * 16}"
    other.write_bytes(b"not this write's")
    link = tmp_path / f".card.json.tmp-{dead}-{'c' * 16}"
    link.symlink_to(outside)  # a planted link of the pattern: not a file kcore wrote, left alone
    write_file_atomic(tmp_path / "card.json", "{}")
    assert not stale.exists() and other.exists() and link.is_symlink()
    assert outside.read_text() == "precious, not kcore's"


# ------------------------------------------------------------------------------------------------ dashboard
def test_dashboard_never_writes_beside_a_server_checkpoint(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    assert not hasattr(state, "save_card_beside")
    models = tmp_path / "models"
    models.mkdir()
    ckpt = models / "net.safetensors"
    save_file(load_file(ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"), str(ckpt))  # without its card
    before = _snapshot(models)
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    for name, sub in (("KCORE_RUNS_DIR", "runs"), ("KCORE_EXPORTS_DIR", "exports"), ("KCORE_STUDIES_DIR", "studies")):
        monkeypatch.setenv(name, str(tmp_path / sub))

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    at.segmented_control(key="kc_src_A").set_value("path").run()
    at.text_input(key="kc_path_A").set_value(str(ckpt))
    at.selectbox(key="kc_arch_A").set_value("kc_tinynet").run()
    at.button(key="kc_loadpath_A").click().run()
    assert not at.exception and not [e.value for e in at.error], [e.value for e in at.error]
    slot = at.session_state["kc_slot_A"]
    assert slot.source == "path"
    key = f"kc_prep_A_{slot.loaded.short_hash}"
    at.number_input(key=f"{key}_h").set_value(48)
    at.button(key=f"{key}_apply").click().run()
    assert not at.exception, [e.value for e in at.exception]
    labels = [b.proto.label for b in at.get("download_button")]
    assert "Download the model card" in labels  # the card is offered as a download ...
    assert not [b for b in at.button if "card" in (b.label or "").lower() or (b.key or "").endswith("_save")]
    assert _snapshot(models) == before  # ... and nothing was written beside the checkpoint
    card = json.loads(state.card_text(at.session_state["kc_slot_A"]))
    assert card["architecture"] == "kc_tinynet" and card["input_size"][0] == 48


# ------------------------------------------------------------------------------------------------ exports


@pytest.fixture(scope="module")
def comparisons(random_images):
    """Two comparisons of the same tiny pair with different fits (their metrics differ)."""
    from kcore.pipeline import compare

    a = LoadedModel(plain_net(0, 5), "a.safetensors", "a" * 64, "safetensors", None, 10)
    b = LoadedModel(plain_net(1, 4), "b.safetensors", "b" * 64, "safetensors", None, 10)
    images = random_images(24, 12, "img{:03d}")
    return tuple(compare(a, "2", b, "2", images, orders=1, epochs=e, seed=s, device="cpu")
                 for e, s in ((1, 0), (2, 1)))


def _figure(tag: str) -> export.FigureItem:
    fig = viz.overlay_figure(None, np.outer(np.arange(4.0), np.ones(4)), title=tag)
    return export.FigureItem(export.figure_stem("plot", what=tag), fig, {"shows": tag})


def _check_manifest_exact(folder: Path) -> dict[str, str]:
    """The manifest of ``folder``, checked by hand: it lists every file but itself and the marker, hashes match."""
    import hashlib

    listed = json.loads((folder / "manifest.json").read_text())["files"]
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json", MARKER}
    assert set(listed) == present
    for name, digest in listed.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert export.verify_export(folder) == tuple(sorted(present))
    return listed


def test_two_exports_racing_to_one_name_end_as_two_consistent_folders(tmp_path, comparisons, monkeypatch):
    exports = tmp_path / "exports"
    both_filled = threading.Barrier(2, timeout=120)
    seal = _io._seal

    def seal_together(tmp: Path, kind: str) -> None:
        seal(tmp, kind)
        both_filled.wait()  # both exports are complete before either is renamed: they race for the name

    monkeypatch.setattr(_io, "_seal", seal_together)
    results: dict[int, export.ExportResult] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = export.export_comparison(comparisons[i], exports / "same", figures=[_figure(f"t{i}")],
                                                  formats=("svg",), dpi=100)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    folders = {results[0].folder, results[1].folder}
    assert folders == {exports / "same", exports / "same-2"}
    assert sorted(p.name for p in exports.iterdir()) == ["same", "same-2"]  # no temporary left, no third folder
    for i, res in results.items():
        listed = _check_manifest_exact(res.folder)
        assert set(res.files) == set(listed) | {"manifest.json"}
        assert {p.name for p in (res.folder / "figures").iterdir()} == {f"plot_t{i}.svg", f"plot_t{i}.json"}
        own = export._dumps(comparisons[i].metrics())
        assert (res.folder / "metrics.json").read_text() == own  # this run's metrics, not the other's
    assert (results[0].folder / "metrics.json").read_bytes() != (results[1].folder / "metrics.json").read_bytes()

    # an export never writes into an existing folder, even one the user made
    monkeypatch.setattr(_io, "_seal", seal)
    (exports / "mine").mkdir()
    (exports / "mine" / "notes.txt").write_text("keep")
    res = export.export_comparison(comparisons[0], exports / "mine", formats=("svg",), dpi=100)
    assert res.folder == exports / "mine-2" and _snapshot(exports / "mine") == {"notes.txt": b"keep"}
    _check_manifest_exact(res.folder)


def test_a_failing_export_leaves_no_folder_and_a_tampered_one_fails_verification(tmp_path, comparisons):
    exports = tmp_path / "exports"
    dec = comparisons[0].decompose("A_to_B")
    with pytest.raises(ValueError, match="image_ids must hold one id per image"):
        export.export_comparison(comparisons[0], exports / "bad", arrays={"c": (dec, ["only-one"])},
                                 formats=("svg",), dpi=100)
    assert list(exports.iterdir()) == []  # neither a half folder nor a temporary
    res = export.export_comparison(comparisons[0], exports / "ok", formats=("svg",), dpi=100)
    (res.folder / "extra.csv").write_text("mixed in")
    with pytest.raises(ValueError, match=r"does not hold exactly what manifest\.json lists: not listed "
                                         r"\['extra\.csv'\].*Fix: export again"):
        export.verify_export(res.folder)
    (res.folder / "extra.csv").unlink()
    (res.folder / "metrics.csv").write_text("edited")
    with pytest.raises(ValueError, match=r"'metrics\.csv' does not match its SHA-256"):
        export.verify_export(res.folder)


_EXPORTER = textwrap.dedent("""
    import sys
    from kcore import export
    from kcore.pipeline import read_run
    export.export_comparison(read_run(sys.argv[1]), sys.argv[2], formats=("svg",), dpi=100)
""")


def test_a_kill_in_the_middle_of_an_export_leaves_no_visible_half_folder(tmp_path, comparisons):
    from kcore.pipeline import write_run

    run = write_run(comparisons[0], tmp_path / "runs" / "r")
    exports = tmp_path / "exports"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KCORE_TEST_IO_PAUSE="written")
    p = subprocess.Popen([sys.executable, "-c", _EXPORTER, str(run), str(exports / "same")], env=env,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_pause(p)
        # everything is written, only the rename is missing: nothing visible yet, one hidden temporary
        hidden = [q for q in exports.iterdir()]
        assert len(hidden) == 1 and hidden[0].name.startswith(f".same.tmp-{p.pid}-"), hidden
        assert (hidden[0] / "manifest.json").is_file()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(60)
    res = export.export_comparison(comparisons[0], exports / "other", formats=("svg",), dpi=100)
    assert sorted(q.name for q in exports.iterdir()) == ["other"]  # the killed writer's temporary is gone
    _check_manifest_exact(res.folder)


# ------------------------------------------------------------------------------------------------ clean_stale
_WRITER = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("kcore_io", sys.argv[2])
    io_ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io_)
    with io_.atomic_folder(sys.argv[1]) as tmp:
        for i in range(20):
            (tmp / f"f{i:02d}").write_text("x" * 1000)
""")


def test_dead_writers_temporary_folder_of_another_name_is_cleaned_by_the_next_write(tmp_path, outside):
    parent = tmp_path / "runs"
    env = dict(os.environ, KCORE_TEST_IO_PAUSE="written")
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(parent / "killed"), str(ROOT / "kcore" / "_io.py")],
                         env=env, stderr=subprocess.PIPE, text=True)
    _wait_for_pause(p)
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    left = [q.name for q in parent.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".killed.tmp-{p.pid}-"), left

    dead = _dead_pid()
    foreign = parent / f".photos.tmp-{dead}-abcd"  # the pattern, but not kcore's: no marker
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"jpg")
    alive = parent / f".busy.tmp-{os.getpid()}-abcd"  # a live writer's temporary
    alive.mkdir()
    (alive / TMP_MARKER).write_text("")
    marked_outside = tmp_path / "elsewhere"
    marked_outside.mkdir()
    (marked_outside / MARKER).write_text("{}")
    (parent / f".linked.tmp-{dead}-abcd").symlink_to(marked_outside)  # a link to a marked folder: never followed
    aside = parent / f".gone.old-{dead}-abcd"  # killed between the fallback's two renames, "gone" missing
    aside.mkdir()
    (aside / MARKER).write_text(json.dumps({"kcore": "run", "format": 1}))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_folder(parent / "next") as tmp:
            (tmp / "f").write_text("new")
    assert [str(w.message) for w in caught if "left alone" in str(w.message)] == []  # other names: silent
    assert any("restored" in str(w.message) and "gone" in str(w.message) for w in caught)
    assert sorted(q.name for q in parent.iterdir()) == sorted(
        [".busy.tmp-" + alive.name.split(".busy.tmp-")[1], foreign.name, f".linked.tmp-{dead}-abcd", "gone", "next"])
    assert _snapshot(foreign) == {"a.jpg": b"jpg"} and (marked_outside / MARKER).is_file()
    assert outside.read_text() == "precious, not kcore's"

    # a foreign folder of the name being written is named in a warning, still left alone
    same = parent / f".next2.tmp-{dead}-abcd"
    same.mkdir()
    (same / "keep").write_text("k")
    with pytest.warns(UserWarning, match=r"left alone in .*\.next2\.tmp-.*do not carry kcore's marker.*Fix:"):
        assert clean_stale(parent / "next2") == []
    assert (same / "keep").read_text() == "k"


def test_write_new_folder_refuses_protected_names_and_unknown_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"out_dir '\.' cannot be written: it is the current working directory.*Fix:"):
        write_new_folder(".", lambda t: None)
    with pytest.raises(ValueError, match=r"kind must be one of \('run', 'study', 'export'\); got 'x'"):
        write_new_folder(tmp_path / "e", lambda t: None, kind="x")
    for i, name in enumerate(("e", "e-2")):
        folder, value = write_new_folder(tmp_path / "e", lambda t: (t / "n").write_text(str(i)), max_names=2)
        assert folder.name == name and value == 1 and (folder / "n").read_text() == str(i)
    with pytest.raises(ValueError, match=r"the names 'e' and e-2 \.\.\. e-2 are all taken\. Fix: choose another"):
        write_new_folder(tmp_path / "e", lambda t: (t / "n").write_text("3"), max_names=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "e-2"]  # the refused write left nothing


def test_no_replace_rename_fallback_without_renameat2(tmp_path, monkeypatch):
    monkeypatch.setenv("KCORE_TEST_IO_NO_EXCHANGE", "1")  # the path taken where renameat2 is missing
    a, _ = write_new_folder(tmp_path / "x", lambda t: (t / "f").write_text("1"))
    b, _ = write_new_folder(tmp_path / "x", lambda t: (t / "f").write_text("2"))
    assert (a.name, b.name) == ("x", "x-2") and (a / "f").read_text() == "1" and (b / "f").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x", "x-2"]


def test_open_new_file_never_follows_or_reuses_what_is_there(tmp_path, outside):
    link = tmp_path / ".study.log"
    link.symlink_to(outside)
    with pytest.raises(FileExistsError, match=r"'.*\.study\.log' already exists \(a file or a symlink\).*Fix:"):
        _io.open_new_file(link)
    dangling = tmp_path / ".other.log"
    dangling.symlink_to(tmp_path / "outside" / "made.txt")
    with pytest.raises(FileExistsError, match="already exists"):
        _io.open_new_file(dangling)
    assert outside.read_text() == "precious, not kcore's" and not (tmp_path / "outside" / "made.txt").exists()
    with _io.open_new_file(tmp_path / "new.log", mode=0o600) as fh:
        fh.write(b"line\n")
    assert (tmp_path / "new.log").read_bytes() == b"line\n" and (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600
