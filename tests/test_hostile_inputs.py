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
    import importlib.util, sys
    # kcore/_io.py alone (without the package's torch import): a writer that starts in milliseconds
    spec = importlib.util.spec_from_file_location("kcore_io", sys.argv[3])
    io_ = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io_)
    atomic_folder = io_.atomic_folder
    out, tag = sys.argv[1], sys.argv[2]
    with atomic_folder(out, overwrite=True) as tmp:
        for i in range(60):
            (tmp / f"f{i:02d}").write_text(tag * 2000)
""")


def _write(out: Path, tag: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(out), tag, str(ROOT / "kcore" / "_io.py")], env=_env(**env),
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
        time.sleep(rng.uniform(0.01, 0.15))
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


# ------------------------------------------------------------------------------------------------ payloads
import io  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import struct  # noqa: E402
import warnings  # noqa: E402
import zipfile  # noqa: E402
from typing import Tuple  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from helpers import open_run_folder  # noqa: E402
from kcore.checkpoints import UnsafeCheckpointError, load_model  # noqa: E402

SAMPLE = ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors"
TIME_BOUND = 60.0  # seconds: every hostile case must end (with an error or the right result) well within this


class _FileWriter(torch.nn.Module):
    """A TorchScript module whose __setstate__ writes 8 bytes to ``path`` with torch.from_file (runs on load)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.buf = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.buf = torch.from_file(self.path, True, 8, dtype=torch.uint8)
        self.buf.fill_(65)


class _Mkdir:
    """A pickle payload: unpickling it creates the folder ``path`` (os.mkdir)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


@pytest.fixture()
def roots(tmp_path):
    """``inside/`` (where the user's files are), ``outside/`` (what a payload aims at: must stay empty)."""
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    yield inside, outside
    assert list(outside.iterdir()) == [], f"a payload wrote outside the roots: {list(outside.iterdir())}"


def _torchscript_writer(folder: Path, target: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(_FileWriter(str(target)))
    path = folder / "model.pt"
    torch.jit.save(scripted, str(path))
    return path


def test_the_torchscript_payload_is_real(tmp_path):
    """Guard for the tests below: torch.jit.load of the payload really writes its marker file."""
    marker = tmp_path / "marker"
    path = _torchscript_writer(tmp_path, marker)
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path))
    assert marker.read_bytes() == b"A" * 8


def test_torchscript_file_writer_is_refused_without_loading_api_and_cli(roots):
    inside, outside = roots
    path = _torchscript_writer(inside, outside / "marker")
    t0 = time.monotonic()
    for source in (path, path.read_bytes()):
        with pytest.raises(UnsafeCheckpointError, match=r"TorchScript.*Fix:.*safetensors") as e:
            load_model(source, name="model.pt")
        assert "trust_pickle" in str(e.value)
    r = subprocess.run([sys.executable, "-m", "kcore.cli", "layers", str(path)], env=_env(), capture_output=True,
                       text=True, timeout=TIME_BOUND)
    assert r.returncode == 2 and "TorchScript" in r.stderr and "Fix:" in r.stderr, r.stderr[-1500:]
    r = subprocess.run([sys.executable, "-m", "kcore.cli", "fit", "--a", str(path), "--b", str(SAMPLE), "--out",
                        str(inside / "run")], env=_env(), capture_output=True, text=True, timeout=TIME_BOUND)
    assert r.returncode == 2 and "TorchScript" in r.stderr, r.stderr[-1500:]
    assert not (inside / "run").exists()
    assert time.monotonic() - t0 < 2 * TIME_BOUND


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_payloads_never_run(roots, protocol):
    inside, outside = roots
    target = str(outside / "made_by_pickle")
    files = {f"plain_p{protocol}.pt": pickle.dumps({"w": _Mkdir(target)}, protocol=protocol)}
    buf = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Mkdir(target)}, buf, pickle_protocol=max(protocol, 2))
    files[f"torch_zip_p{protocol}.pt"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save({"x": _Mkdir(target)}, buf, pickle_protocol=max(protocol, 2), _use_new_zipfile_serialization=False)
    files[f"torch_legacy_p{protocol}.pt"] = buf.getvalue()
    for name, data in files.items():
        (inside / name).write_bytes(data)
        for source in (inside / name, data):
            with pytest.raises(ValueError, match="Fix:"):
                load_model(source, name=name, arch="kc_tinynet", num_classes=10)
    r = subprocess.run([sys.executable, "-m", "kcore.cli", "layers", str(inside / f"torch_zip_p{protocol}.pt")],
                       env=_env(), capture_output=True, text=True, timeout=TIME_BOUND)
    assert r.returncode == 2 and "Fix:" in r.stderr and "trust_pickle" in r.stderr, r.stderr[-1500:]


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_forged_pt2_and_safetensors_headers_are_clear_errors(roots):
    inside, _ = roots
    forged = {
        # torch.export archives with a pickled payload, a compiled library, or garbage where JSON belongs
        "pickled.pt2": _zip({"m/archive_format": b"pt2", "m/version": b"0",
                             "m/models/model.json": b"{}",
                             "m/data/weights/model_weights_config.json":
                                 json.dumps({"config": {"w": {"path_name": "w0", "use_pickle": True}}}).encode(),
                             "m/data/weights/w0": pickle.dumps(_Mkdir("/nonexistent/x"))}),
        "compiled.pt2": _zip({"m/archive_format": b"pt2", "m/data/aotinductor/model/evil.so": b"\x7fELF"}),
        "garbage.pt2": _zip({"m/archive_format": b"pt2", "m/models/model.json": b"not json"}),
    }
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 1 << 42]}}).encode()
    forged["huge_offsets.safetensors"] = struct.pack("<Q", len(header)) + header + b"\0" * 16
    header = json.dumps({"w": {"dtype": "EVIL", "shape": [2], "data_offsets": [0, 8]}}).encode()
    forged["bad_dtype.safetensors"] = struct.pack("<Q", len(header)) + header + b"\0" * 8
    forged["huge_header.safetensors"] = struct.pack("<Q", 1 << 62) + b"{}"
    forged["truncated_header.safetensors"] = struct.pack("<Q", 500) + b'{"w": {"dtype": "F32"'
    t0 = time.monotonic()
    for name, data in forged.items():
        (inside / name).write_bytes(data)
        with pytest.raises(ValueError, match="Fix:") as e:
            load_model(inside / name, arch="kc_tinynet", num_classes=10)
        assert name in str(e.value), (name, str(e.value))
    assert time.monotonic() - t0 < TIME_BOUND


def test_zip_with_parent_and_absolute_entries_writes_nothing(roots, monkeypatch):
    inside, outside = roots
    monkeypatch.chdir(inside)
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(png, "PNG")
    evil = {"../outside/escaped.png": png.getvalue(), str(outside / "absolute.png"): png.getvalue(),
            "ok/good.png": png.getvalue()}
    data = _zip(evil)
    from kcore.data import ImageSet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = ImageSet.from_uploads([("photos.zip", data)])
    assert any(i.endswith("ok/good.png") for i in images.ids)  # read in memory, nothing extracted anywhere
    assert not any(".." in i.split("/") for i in images.ids)
    with pytest.raises(ValueError, match="Fix:"):
        load_model(data, name="model.pt")  # a zip that PyTorch did not write
    assert sorted(p.name for p in inside.iterdir()) == []


def _png(path: Path, value: int = 120, size: int = 16, seed: int | None = None) -> None:
    rng = np.random.default_rng(seed if seed is not None else value)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


_FOLDER_READER = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    from kcore.data import ImageSet
    s = ImageSet.from_folder(sys.argv[1])
    print(len(s), sorted(n for n, _ in s.skipped))
""")


def test_fifo_and_dev_zero_in_an_image_folder_do_not_hang(roots):
    inside, outside = roots
    folder = inside / "images"
    folder.mkdir()
    for i in range(3):
        _png(folder / f"img{i}.png", seed=i)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    (outside / "secret.png").write_bytes(b"x")
    (folder / "escape.png").symlink_to(outside / "secret.png")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", _FOLDER_READER, str(folder)], env=_env(), capture_output=True,
                       text=True, timeout=TIME_BOUND)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split("\n")[0] == "3 ['escape.png', 'fifo.png', 'zero.png']"
    assert time.monotonic() - t0 < TIME_BOUND
    (outside / "secret.png").unlink()


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    from kcore.data import ImageSet, decode_image

    ramp = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    img = decode_image((tmp_path / "deep.png").read_bytes())
    expect = np.round(ramp / 257.0).astype(np.uint8)
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert np.abs(img[..., 0].astype(int) - expect).max() <= 1 and (img[..., 0] == img[..., 2]).all()
    assert img.min() == 0 and img.max() >= 250 and 100 < img.mean() < 155  # a ramp, not a white image
    s = ImageSet.from_folder(tmp_path)
    assert len(s) == 1 and not s.skipped


def test_card_input_size_is_capped(tmp_path):
    from kcore.cards import ModelCard

    with pytest.raises(ValueError, match=r"input_size.*at most.*Fix:"):
        ModelCard.from_dict({"arch": "kc_tinynet", "num_classes": 10, "input_size": [30000, 30000]}, source="card")


def test_cache_is_not_reused_after_the_images_change(tmp_path):
    """Same file names, new pixels: the cache must give the new features (it returned the old ones)."""
    from kcore.checkpoints import LoadedModel
    from kcore.data import ImageSet, Preprocess
    from kcore.pipeline import compare

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                   torch.nn.ReLU()).eval()

    a = LoadedModel(net(0), "a.pt", "a" * 64, "state_dict", None, 1)
    b = LoadedModel(net(1), "b.pt", "b" * 64, "state_dict", None, 1)
    folder, cache = tmp_path / "images", tmp_path / "cache"
    folder.mkdir()
    pre = Preprocess((16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def run(seed_offset, cache_dir):
        for i in range(24):
            _png(folder / f"img{i:02d}.png", seed=i + seed_offset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return compare(a, "0", b, "0", ImageSet.from_folder(folder, pre), orders=0, epochs=1, cache_dir=cache_dir)

    first = run(0, cache)
    second = run(1000, cache)  # the same names, other images
    fresh = run(1000, None)
    assert not torch.equal(first.features.x_b, fresh.features.x_b)
    torch.testing.assert_close(second.features.x_b.float(), fresh.features.x_b.float(), atol=2e-3, rtol=2e-3)


def test_constant_target_and_zero_source_are_clear_errors():
    from kcore.fit import fit

    x, y = torch.randn(30, 3, 5, 5), torch.randn(30, 2, 5, 5)
    with pytest.raises(ValueError, match=r"x_tgt is constant.*channels \[0, 1\].*NaN.*Fix:"):
        fit(x, torch.full((30, 2, 5, 5), 3.0), orders=1, epochs=1)
    with pytest.raises(ValueError, match=r"x_src is constant.*value 0.*Fix:"):
        fit(torch.zeros(30, 3, 5, 5), y, orders=1, epochs=1)


# ------------------------------------------------------------------------------------------------ run folders
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from kcore.checkpoints import LoadedModel
    from kcore.pipeline import compare, write_run

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()).eval() for _ in range(2)]
    a = LoadedModel(nets[0], "a.pt", "a" * 64, "state_dict", None, 1)
    b = LoadedModel(nets[1], "b.pt", "b" * 64, "state_dict", None, 1)

    class Images(torch.utils.data.Dataset):
        ids = [f"i{k}" for k in range(30)]

        def __len__(self):
            return 30

        def __getitem__(self, i):
            return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), 0

    comp = compare(a, "1", b, "1", Images(), orders=1, epochs=1)
    return write_run(comp, tmp_path_factory.mktemp("runs") / "run")


def _corrupt_copies(run: Path, dest: Path) -> dict[str, Path]:
    import shutil

    out = {}
    for case in ("truncated_g", "edited_spec", "edited_json_type", "truncated_features"):
        d = dest / case
        shutil.copytree(run, d)
        g = d / "g_A_to_B"
        if case == "truncated_g":
            data = (g / "g.safetensors").read_bytes()
            (g / "g.safetensors").write_bytes(data[: len(data) // 2])
        elif case == "edited_spec":
            meta = json.loads((g / "fit.json").read_text())
            for key in meta["spec"]:
                if isinstance(meta["spec"][key], int) and not isinstance(meta["spec"][key], bool):
                    meta["spec"][key] = 3_000_000  # a 36 TB model if it were built
            (g / "fit.json").write_text(json.dumps(meta))
        elif case == "edited_json_type":
            meta = json.loads((g / "fit.json").read_text())
            meta["history"] = 5
            (g / "fit.json").write_text(json.dumps(meta))
        else:
            data = (d / "features_heldout.safetensors").read_bytes()
            (d / "features_heldout.safetensors").write_bytes(data[:100])
        out[case] = d
    return out


def test_corrupt_run_folders_are_clear_errors_naming_the_file(run_folder, tmp_path):
    from kcore.pipeline import read_run

    expect = {"truncated_g": "g.safetensors", "edited_spec": "fit.json", "edited_json_type": "fit.json",
              "truncated_features": "features_heldout.safetensors"}
    for case, d in _corrupt_copies(run_folder, tmp_path).items():
        before = _snapshot(d)
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"Fix:") as e:
            read_run(d)
        assert expect[case] in str(e.value), (case, str(e.value))
        assert time.monotonic() - t0 < TIME_BOUND
        assert _snapshot(d) == before  # nothing disturbed


# ------------------------------------------------------------------------------------------------ server paths
def test_server_paths_are_off_without_roots_and_stay_inside_them(roots, monkeypatch):
    from kcore.server_paths import ServerPathError, child_path, resolve_server_path, safe_name

    inside, outside = roots
    monkeypatch.delenv("KCORE_SERVER_ROOTS", raising=False)
    with pytest.raises(ServerPathError, match="turned off.*KCORE_SERVER_ROOTS"):
        resolve_server_path(str(SAMPLE))
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(inside))
    (outside / "secret.txt").write_text("root:*:secret")
    (inside / "link.txt").symlink_to(outside / "secret.txt")
    for typed in (str(outside / "secret.txt"), "../outside/secret.txt", "link.txt", str(inside / "link.txt"), "/etc/passwd"):
        with pytest.raises(ServerPathError, match="outside the folders") as e:
            resolve_server_path(typed)
        assert "secret" not in str(e.value).replace("secret.txt", "")  # never the file's contents
    os.mkfifo(inside / "fifo")
    t0 = time.monotonic()
    with pytest.raises(ServerPathError, match="not a regular file"):
        resolve_server_path("fifo")
    assert time.monotonic() - t0 < 5
    (inside / "model.pt").write_bytes(b"x" * 10)
    assert resolve_server_path("model.pt") == (inside / "model.pt").resolve()
    with pytest.raises(ServerPathError, match="limit"):
        resolve_server_path("model.pt", max_bytes=5)
    assert safe_name("../../elsewhere") == "elsewhere" and safe_name("..") == "item"
    assert child_path(inside, "../../elsewhere").parent == inside.resolve()
    (outside / "secret.txt").unlink()
    (inside / "link.txt").unlink()


def test_study_request_carrying_out_or_paths_is_refused(tmp_path):
    from kcore.study_options import new_study_folder, study_arguments, study_command, study_options

    names = {o.name for o in study_options("diagnosis")}
    assert "repeats" in names and not names & {"out", "overwrite", "weak", "strong", "data", "layer_weak"}
    for bad in ({"out": str(tmp_path)}, {"--out": str(tmp_path)}, {"overwrite": True}, {"weak": "/etc/passwd"},
                {"repeats": "2 --out /tmp/x"}, {"convention": "paper --overwrite"}, {"lr": float("inf")}):
        with pytest.raises(ValueError, match="study option"):
            study_arguments("diagnosis", bad)
    out = new_study_folder(tmp_path, "diagnosis")
    cmd = study_command("diagnosis", {"repeats": 2, "convention": "paper"}, out)
    assert cmd[-2:] == ["--out", str(out)] and cmd.count("--out") == 1 and out.parent == tmp_path.resolve()
    assert cmd[4:8] == ["--repeats", "2", "--convention", "paper"]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------ dashboard
def _app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)


def test_dashboard_refuses_torchscript_by_upload_and_by_server_path(roots, monkeypatch):
    inside, outside = roots
    path = _torchscript_writer(inside, outside / "marker")
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(inside))
    at = _app().run()
    at.segmented_control(key="kc_src_B").set_value("upload").run()
    at.file_uploader(key="kc_upload_B").upload("model.pt", path.read_bytes()).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("TorchScript" in e.value for e in at.error), [e.value for e in at.error]
    at.segmented_control(key="kc_src_B").set_value("path").run()
    for typed, expect in ((str(path), "TorchScript"), ("/etc/passwd", "outside the folders")):
        at.text_input(key="kc_path_B").input(typed).run()
        at.button(key="kc_loadpath_B").click().run()
        assert not at.exception, [e.value for e in at.exception]
        assert any(expect in e.value for e in at.error), [e.value for e in at.error]
    assert not any("root:" in e.value for e in at.error)


def test_dashboard_without_roots_offers_no_server_path_and_opens_no_folder_outside(run_folder, tmp_path, monkeypatch):
    import shutil

    monkeypatch.delenv("KCORE_SERVER_ROOTS", raising=False)
    at = _app().run()
    at.segmented_control(key="kc_src_A").set_value("path").run()
    assert not [t for t in at.text_input if t.key == "kc_path_A"]
    assert any("turned off" in i.value for i in at.info)
    at = _app().run()  # (the empty slot A would keep the Fit page from drawing)
    open_run_folder(at, run_folder)
    assert not at.exception and any("turned off" in e.value for e in at.error), [e.value for e in at.error]
    # a corrupt run folder under the allowed roots: a message naming the file, not a traceback
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    bad = _corrupt_copies(run_folder, tmp_path)["truncated_g"]
    at.text_input(key="kc_open_path").input(str(bad)).run()
    at.button(key="kc_open_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("g.safetensors" in e.value and "Fix:" in e.value for e in at.error), [e.value for e in at.error]
    shutil.rmtree(bad)


def test_dashboard_image_folder_with_fifo_and_dev_zero(roots, monkeypatch):
    inside, _ = roots
    folder = inside / "images"
    folder.mkdir()
    for i in range(4):
        _png(folder / f"img{i}.png", seed=i)
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(inside))
    at = _app().run()
    at.segmented_control(key="kc_img_src").set_value("folder").run()
    t0 = time.monotonic()
    at.text_input(key="kc_img_folder").input(str(folder)).run()
    at.button(key="kc_img_use_folder").click().run()
    assert time.monotonic() - t0 < TIME_BOUND
    assert not at.exception, [e.value for e in at.exception]
    assert any("4 images" in c.value for c in at.caption), [c.value for c in at.caption]


def test_studies_page_has_no_raw_flag_field():
    at = _app().run()
    at.switch_page("app_pages/studies.py").run()
    assert not at.exception
    assert [t.key for t in at.text_input] == ["kc_st_path"]  # the only text field opens a finished study
    assert len(at.number_input) >= 5


def _forged_png(width: int, height: int) -> bytes:
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_and_zip_bombs_stay_bounded(tmp_path, monkeypatch):
    import kcore.data as kdata

    good = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(good, "PNG")
    # a PNG that claims 100000 × 100000 pixels (30 GB decoded) in a few bytes
    bomb_png = _forged_png(100_000, 100_000)
    # a zip member that inflates to 8 MiB of zeros from a few KiB, with the cap lowered to 1 MiB
    monkeypatch.setattr(kdata, "MAX_FILE_BYTES", 1 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", b"\0" * (8 << 20))
        zf.writestr("bomb.png", bomb_png)
        zf.writestr("good.png", good.getvalue())
    assert len(buf.getvalue()) < 100_000
    t0 = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = kdata.ImageSet.from_uploads([("photos.zip", buf.getvalue()), ("direct_bomb.png", bomb_png)])
    reasons = dict(s.skipped)
    assert [i.split("/")[-1] for i in s.ids] == ["good.png"]
    assert "MAX_FILE_BYTES" in reasons["photos.zip/zeros.png"]
    assert "DecompressionBomb" in reasons["photos.zip/bomb.png"] and "DecompressionBomb" in reasons["direct_bomb.png"]
    assert time.monotonic() - t0 < 10


def test_cli_fit_on_a_hostile_folder_and_a_reused_cache(roots):
    """Through the CLI: a FIFO and a /dev/zero symlink in the image folder are skipped (no hang), and a cache
    folder reused after the images changed under the same names gives the new features, not the old ones."""
    inside, _ = roots
    folder, cache = inside / "images", inside / "cache"
    folder.mkdir()
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")

    def fit(seed: int, out: str) -> dict:
        for i in range(30):
            _png(folder / f"img{i:02d}.png", size=32, seed=seed + i)
        r = subprocess.run([sys.executable, "-m", "kcore.cli", "fit", "--a", str(SAMPLE), "--b", str(SAMPLE),
                            "--data", str(folder), "--epochs", "1", "--orders", "0", "--cache-dir", str(cache),
                            "--out", str(inside / out)], env=_env(), capture_output=True, text=True,
                           timeout=3 * TIME_BOUND)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "skipped 2" in r.stderr
        return json.loads((inside / out / "metrics.json").read_text())

    t0 = time.monotonic()
    first, second = fit(0, "run1"), fit(500, "run2")
    assert time.monotonic() - t0 < 6 * TIME_BOUND

    def var_target(m: dict) -> float:
        d = m["directions"]["A_to_B"] if "directions" in m else m["A_to_B"]
        report = d.get("heldout_report", d)
        return float(report["var_target"])

    assert var_target(first) != pytest.approx(var_target(second), rel=1e-6)
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2  # a second entry, not a reuse


def test_export_names_stay_inside_the_exports_folder(tmp_path, monkeypatch):
    from dashboard import state

    monkeypatch.setenv("KCORE_EXPORTS_DIR", str(tmp_path / "exports"))
    for name in ("../../elsewhere", "/etc", "..", "a/b/../../c", "run 1 (copy)"):
        folder = state.export_folder(name)
        assert folder.parent == (tmp_path / "exports").resolve() and folder.name not in ("", ".", "..")
    assert state.export_folder("run 1 (copy)").name == "run_1_copy"
