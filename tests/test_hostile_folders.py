"""Study and run folders are read like uploads: every payload is built at test time.

A study folder with symlinks out, a ``/dev/zero`` "csv" and a FIFO; a run folder's ``heldout_images.npz`` that
would inflate past its cap; run folders with edited types or NaN features; a fit kernel larger than the map.
Each case ends in a clear error (or the file left out with a note), nothing outside the folder is read, memory
stays bounded (measured) and nothing hangs.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import kcore

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fit kernel
@pytest.mark.parametrize(("size", "kernel", "largest"), [((1, 1), 5, 3), ((2, 5), 7, 5), ((3, 3), 9, 7)])
def test_a_kernel_larger_than_the_map_is_a_clear_error_before_training(size, kernel, largest, one_thread):
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(12, 4, *size, generator=g), torch.randn(12, 3, *size, generator=g)
    calls = []
    with pytest.raises(ValueError) as e:
        kcore.fit(xs, xt, kernel_size=kernel, epochs=1, device="cpu", progress=calls.append)
    msg = str(e.value)
    assert f"kernel_size={kernel}" in msg and f"H×W = {size[0]}×{size[1]}" in msg
    assert f"at most 2·min(H, W)+1 = {largest}" in msg and f"Fix: pass kernel_size={largest} or smaller" in msg
    assert calls == []  # refused before the fit reported its first phase
    # the largest kernel the message allows does fit
    res = kcore.fit(xs, xt, kernel_size=largest, epochs=1, device="cpu")
    assert res.model.spec.kernel_size == largest and math.isfinite(res.heldout_error)


# ------------------------------------------------------------------------------------------------ run folders
class _Images(torch.utils.data.Dataset):
    """12 random 8×8 images with their uint8 originals (``raw``), so the run stores heldout_images.npz."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), i % 2

    def raw(self, i):
        return (self[i][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A run folder written by write_run (both directions, K = 1, held-out images stored)."""
    from kcore.checkpoints import LoadedModel
    from kcore.pipeline import compare, write_run

    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        nets = [torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.ReLU()).eval() for c in (4, 5)]
        a = LoadedModel(nets[0], "a.pt", "a" * 64, "state_dict", None, 1)
        b = LoadedModel(nets[1], "b.pt", "b" * 64, "state_dict", None, 1)
        comp = compare(a, "1", b, "1", _Images(), orders=1, epochs=1, both_directions=True)
    finally:
        torch.set_num_threads(n)
    return write_run(comp, tmp_path_factory.mktemp("runs") / "run", images=_Images())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _nan_features(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "features_heldout.safetensors"))
    t["x_b"][0, 1, 2, 3] = float("nan")
    save_file(t, str(d / "features_heldout.safetensors"))


def _nan_weight(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "g_B_to_A" / "g.safetensors"))
    key = next(k for k in t if k.startswith("g.convs"))
    t[key].view(-1)[0] = float("inf")
    save_file(t, str(d / "g_B_to_A" / "g.safetensors"))


def _set(*path_and_value):
    *keys, value = path_and_value

    def edit(data):
        for k in keys[:-1]:
            data = data[k]
        data[keys[-1]] = value(data[keys[-1]]) if callable(value) else value
    return edit


def _zero_std(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "g_A_to_B" / "g.safetensors"))
    t["norm.tgt_std"][1] = 0.0
    save_file(t, str(d / "g_A_to_B" / "g.safetensors"))


# case → (edit of a copy, file named, field named, words of the expectation)
EDITS = {
    "string_parameter_count": (lambda d: _edit_json(d / "provenance.json", _set("checkpoint_a", "num_parameters", "1,234")),
                               "provenance.json", "checkpoint_a.num_parameters", "expected an integer; got '1,234' (str)"),
    "string_instability": (lambda d: _edit_json(d / "g_A_to_B" / "fit.json", _set("heldout_report", "instability", "0.4")),
                           "g_A_to_B/fit.json", "heldout_report.instability", "expected a number; got '0.4' (str)"),
    "nan_instability": (lambda d: _edit_json(d / "g_A_to_B" / "fit.json", _set("heldout_report", "instability", float("nan"))),
                        "g_A_to_B/fit.json", "heldout_report.instability", "expected a finite number"),
    "number_as_id": (lambda d: _edit_json(d / "images.json", _set("ids", lambda ids: [7] + ids[1:])),
                     "images.json", "ids[0]", "expected a string; got 7 (int)"),
    "labels_too_short": (lambda d: _edit_json(d / "images.json", _set("labels", lambda v: v[:-1])),
                         "images.json", "labels", "expected 2"),
    "short_channel_list": (lambda d: _edit_json(d / "g_B_to_A" / "fit.json",
                                                _set("heldout_report", "per_channel", "var_target", lambda v: v[:-1])),
                           "g_B_to_A/fit.json", "heldout_report.per_channel.var_target", "expected 4"),
    "gates_of_another_k": (lambda d: _edit_json(d / "g_A_to_B" / "fit.json",
                                                lambda m: m["history"][0].update(gates=[0.1, 0.2, 0.3])),
                           "g_A_to_B/fit.json", "history[0].gates", "expected 1"),
    "baselines_as_text": (lambda d: _edit_json(d / "metrics.json", _set("baselines", "none")),
                          "metrics.json", "baselines", "expected an object"),
    "nan_features": (_nan_features, "features_heldout.safetensors", "'x_b'", "1 NaN/Inf value(s)"),
    "inf_weight": (_nan_weight, "g_B_to_A/g.safetensors", "g.convs", "NaN/Inf"),
    "zero_std": (_zero_std, "g_A_to_B/g.safetensors", "'norm.tgt_std'", "not > 0"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_an_edited_run_folder_is_a_clear_error_naming_the_file_and_the_field(run_folder, tmp_path, case):
    from kcore.pipeline import read_run

    edit, name, field, words = EDITS[case]
    read_run(run_folder)  # the folder as written reads back
    d = tmp_path / case
    shutil.copytree(run_folder, d)
    edit(d)
    before = _snapshot(d)
    with pytest.raises(ValueError) as e:
        read_run(d)
    msg = str(e.value)
    assert name in msg and field in msg and words in msg, msg
    assert str(d) in msg and "Fix:" in msg and "Traceback" not in msg
    assert _snapshot(d) == before  # nothing changed


def test_a_run_folder_truncated_after_it_was_opened_does_not_crash_the_reader(run_folder, tmp_path):
    """Memory-mapped tensors would die of SIGBUS here; read_run's tensors are its own."""
    import subprocess

    d = tmp_path / "run"
    shutil.copytree(run_folder, d)
    script = (
        "import os, pathlib, sys, kcore\n"
        "c = kcore.read_run(sys.argv[1])\n"
        "for p in pathlib.Path(sys.argv[1]).rglob('*.safetensors'):\n"
        "    os.truncate(p, 0)\n"
        "d = c.decompose('A_to_B')\n"
        "print(float(c.features.x_a.sum()) == float(c.features.x_a.sum()), float(d.residual.abs().sum()) >= 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(d)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])
    assert out.stdout.split() == ["True", "True"]
    assert (d / "features_heldout.safetensors").stat().st_size == 0  # the files really were truncated


def test_run_folder_files_are_read_only_as_regular_files_inside_it(run_folder, tmp_path):
    from kcore.pipeline import read_heldout_images, read_run

    outside = tmp_path / "outside"
    shutil.copytree(run_folder, outside)
    cases = {
        "metrics.json": lambda d: (d / "metrics.json").symlink_to(outside / "metrics.json"),
        "g_A_to_B": lambda d: (d / "g_A_to_B").symlink_to(outside / "g_A_to_B", target_is_directory=True),
        "provenance.json": lambda d: (d / "provenance.json").symlink_to("/dev/zero"),
        "images.json": lambda d: os.mkfifo(d / "images.json"),
    }
    for name, plant in cases.items():
        d = tmp_path / f"planted_{name}"
        shutil.copytree(run_folder, d)
        target = d / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        plant(d)
        with pytest.raises(ValueError, match=re.escape(name)) as e:
            _finishes(lambda: read_run(d))
        assert "symlink" in str(e.value) or "not a regular file" in str(e.value), str(e.value)
    # the held-out images too: a FIFO is refused without waiting for a writer
    d = tmp_path / "fifo_images"
    shutil.copytree(run_folder, d)
    (d / "heldout_images.npz").unlink()
    os.mkfifo(d / "heldout_images.npz")
    with pytest.raises(ValueError, match="heldout_images.npz.*not a regular file"):
        _finishes(lambda: read_heldout_images(d))


def _finishes(fn, timeout: float = 60.0):
    """Run ``fn`` in a thread and return (or raise) what it did; fail if it hangs (a guard, not the assertion)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"the call was still running after {timeout} s (it hangs)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# ------------------------------------------------------------------------------------------------ npz bombs
def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """A .npy version 1.0 header declaring ``shape`` and ``dtype`` (whatever data follows)."""
    from numpy.lib import format as npy

    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()  # (the magic string included)


def _bomb(path: Path, n_ids: int, images_shape: tuple[int, ...], data_bytes: int) -> None:
    """An npz whose ``images.npy`` header declares ``images_shape`` uint8, followed by ``data_bytes`` zeros
    (deflated: a few KB on disk)."""
    import zipfile

    ids = np.asarray([f"img{i}" for i in range(n_ids)])
    ids_npy = io.BytesIO()
    np.save(ids_npy, ids)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ids.npy", ids_npy.getvalue())
        with zf.open("images.npy", "w", force_zip64=True) as fh:
            fh.write(_npy_header(images_shape, "|u1"))
            zero = bytes(1 << 20)
            for _ in range(data_bytes >> 20):
                fh.write(zero)


def _peak_bytes(fn) -> tuple[int, object]:
    """Peak traced allocation (Python and numpy) while ``fn`` runs, and what it raised (or returned)."""
    import tracemalloc

    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        try:
            out = fn()
        except ValueError as exc:
            out = exc
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


def test_an_npz_bomb_is_refused_from_its_headers_before_anything_is_inflated(run_folder, tmp_path):
    from kcore.pipeline import HELDOUT_IMAGES_MAX_BYTES, read_heldout_images

    d = tmp_path / "bomb"
    shutil.copytree(run_folder, d)
    shape = (600_000, 64, 64, 3)  # 7.4 GB declared, 8 MiB of zeros behind it (a few KB on disk)
    _bomb(d / "heldout_images.npz", 3, shape, 8 << 20)
    assert (d / "heldout_images.npz").stat().st_size < 1 << 20
    peak, err = _peak_bytes(lambda: read_heldout_images(d))
    assert isinstance(err, ValueError), err
    msg = str(err)
    assert "heldout_images.npz" in msg and f"would inflate to {math.prod(shape) // 1000}" in msg  # + the ids
    assert f"limit of {HELDOUT_IMAGES_MAX_BYTES} bytes" in msg
    assert "nothing was decompressed" in msg and "Fix:" in msg
    assert peak < 32 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse it"


def test_an_honest_npz_above_the_cap_is_refused_and_the_writer_stays_below_it(run_folder, tmp_path, monkeypatch):
    import kcore.run_folder as pipeline  # the run-folder half of kcore.pipeline

    d = tmp_path / "big"
    shutil.copytree(run_folder, d)
    (d / "heldout_images.npz").unlink()
    ids = [f"img{i}" for i in range(4)]
    np.savez_compressed(d / "heldout_images.npz", ids=np.asarray(ids), images=np.zeros((4, 512, 512, 3), np.uint8))
    assert len(pipeline.read_heldout_images(d)) == 4  # 3 MiB: under the default cap
    with pytest.raises(ValueError, match=r"would inflate to 314\d{4} bytes.*limit of 1048576 bytes"):
        pipeline.read_heldout_images(d, max_bytes=1 << 20)
    # a pickled member is never loaded, and a member that is not an image array is named
    np.savez(d / "heldout_images.npz", ids=np.asarray(ids), images=np.asarray([{"x": 1}] * 4, dtype=object))
    with pytest.raises(ValueError, match=r"holds 'images' of dtype object.*expected uint8 RGB"):
        pipeline.read_heldout_images(d)
    # write_run stores only as many held-out images as the reader accepts
    monkeypatch.setattr(pipeline, "HELDOUT_IMAGES_MAX_BYTES", 1024 + 300)  # room for one 8×8 image and its id
    (d / "heldout_images.npz").unlink()
    raw = {f"img{i}": np.full((8, 8, 3), i, np.uint8) for i in range(5)}
    pipeline._write_heldout_images(d, raw)
    back = pipeline.read_heldout_images(d)
    assert list(back) == ["img0"] and (back["img0"] == 0).all()


# ------------------------------------------------------------------------------------------------ study folders
SECRET = "SECRET-d41d8cd9"


@pytest.fixture
def planted_study(tmp_path):
    """A real study folder beside an outside folder with secrets; inside it, symlinks out, /dev/zero and a FIFO."""
    import pandas as pd
    from matplotlib.figure import Figure

    from kcore.experiments._folder import write_study

    inside, outside = tmp_path / "inside", tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text(f"key,value\n{SECRET},1\n")
    (outside / "secret.json").write_text(json.dumps({"token": SECRET}))
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out = write_study(inside / "st", "stability", {"instability_mean": 0.25},
                      {"pairs": pd.DataFrame({"pair": ["0-1"], "instability": [0.25]})}, {"curve": fig}, {"seed": 0},
                      formats=("png",))
    (out / "leak.csv").symlink_to(outside / "secret.csv")
    (out / "leak.json").symlink_to(outside / "secret.json")
    (out / "x.csv").symlink_to("/dev/zero")
    os.mkfifo(out / "table.csv")
    return out, outside


def test_a_study_folder_is_read_without_symlinks_devices_or_fifos(planted_study):
    import resource
    import tracemalloc
    import zipfile

    from kcore.experiments._folder import read_study, zip_study

    out, _ = planted_study
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    try:
        folder = _finishes(lambda: read_study(out))  # the FIFO must not hang it (the guard fails the test if so)
        archive = _finishes(lambda: zip_study(folder))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    assert peak < 200 << 20 and grew < 200 << 20, (peak, grew)  # /dev/zero was never read
    assert set(folder.tables) == {"pairs"} and set(folder.figures) == {"curve"}
    assert set(folder.skipped) == {"leak.csv", "leak.json", "x.csv", "table.csv"}
    assert "symlink" in folder.skipped["leak.csv"] and "symlink" in folder.skipped["x.csv"]
    assert "not a regular file" in folder.skipped["table.csv"]
    assert folder.read_file("curve.png").startswith(b"\x89PNG")
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        names = set(zf.namelist())
        assert names == {p.name for p in out.iterdir() if p.is_file() and not p.is_symlink()}
        assert "pairs.csv" in names and not names & set(folder.skipped)
        assert not any(SECRET.encode() in zf.read(n) for n in names)
    with pytest.raises(ValueError, match="leak.csv.*symlink"):
        folder.read_file("leak.csv")


def test_a_study_folder_whose_own_files_lead_out_is_refused_by_name(planted_study, tmp_path):
    from kcore.experiments._folder import read_study, zip_study

    out, outside = planted_study
    (out / "provenance.json").unlink()
    (out / "provenance.json").symlink_to(outside / "secret.json")
    with pytest.raises(ValueError, match=r"provenance.json.*symlink") as e:
        read_study(out)
    assert SECRET not in str(e.value) and "Fix:" in str(e.value)
    (out / "provenance.json").unlink()
    os.mkfifo(out / "provenance.json")
    with pytest.raises(ValueError, match=r"provenance.json.*not a regular file"):
        _finishes(lambda: read_study(out))
    (out / "provenance.json").unlink()
    (out / "result.json").write_text(json.dumps({"study": 7}))
    with pytest.raises(ValueError, match=r"result.json.*field 'study'.*expected a string or null; got 7 \(int\)"):
        read_study(out)
    (out / "result.json").write_text(json.dumps({"study": "stability"}))
    folder = read_study(out)
    with pytest.raises(ValueError, match=r"add up to \d+ bytes, more than the limit of 100 bytes"):
        zip_study(folder, max_bytes=100)


def test_the_studies_page_shows_only_the_folders_own_files(planted_study, monkeypatch):
    from streamlit.testing.v1 import AppTest

    out, _ = planted_study
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(out.parent))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/studies.py").run()
    at.text_input(key="kc_st_path").set_value(str(out)).run()  # returns: the FIFO did not hang the page
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    shown = " ".join(df.value.to_string() for df in at.dataframe) + " ".join(str(j.proto) for j in at.json)
    assert "0-1" in shown and SECRET not in shown
    (warning,) = [w.value for w in at.warning if "Left out" in w.value]
    assert all(name in warning for name in ("leak.csv", "leak.json", "x.csv", "table.csv")), warning
    assert len(at.get("download_button")) == 1 and len(at.image) == 1


def test_the_dashboard_shows_edited_run_folders_as_messages_and_a_sound_one_on_every_page(run_folder, tmp_path,
                                                                                         monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    folders = {}
    for case in ("string_instability", "nan_features"):
        folders[case] = tmp_path / case
        shutil.copytree(run_folder, folders[case])
        EDITS[case][0](folders[case])
    folders["npz_bomb"] = tmp_path / "npz_bomb"
    shutil.copytree(run_folder, folders["npz_bomb"])
    _bomb(folders["npz_bomb"] / "heldout_images.npz", 2, (600_000, 64, 64, 3), 1 << 20)
    expect = {"string_instability": ("g_A_to_B/fit.json", "heldout_report.instability"),
              "nan_features": ("features_heldout.safetensors", "NaN/Inf"),
              "npz_bomb": ("heldout_images.npz", "would inflate to")}
    good = tmp_path / "good"
    shutil.copytree(run_folder, good)

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/fit.py").run()
    for case, d in folders.items():
        at.text_input(key="kc_open_path").input(str(d)).run()
        at.button(key="kc_open_go").click().run()
        assert not at.exception, (case, [e.value for e in at.exception])
        errors = [e.value for e in at.error]
        assert any(all(w in e for w in expect[case]) and "Fix:" in e for e in errors), (case, errors)
    assert not at.session_state["kc_runs"]  # none of them was adopted
    at.text_input(key="kc_open_path").input(str(good)).run()
    at.button(key="kc_open_go").click().run()
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (entry,) = at.session_state["kc_runs"].values()
    assert entry.origin == "folder" and len(entry.raw_images) == len(entry.comparison.heldout_positions)
    for page in ("overview", "explorer", "filters", "figure1"):
        at.switch_page(f"app_pages/{page}.py").run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
