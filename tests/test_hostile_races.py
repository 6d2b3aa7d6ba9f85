"""Races against the loaders (issue 23, "read once, from one open file"): a file replaced while it loads, a symlink
swapped in after the path check, a checkpoint replaced with the same mtime. Each payload is built at test time."""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from kcore import safe_files
from kcore.architectures import build_model
from kcore.checkpoints import load_model
from kcore.safe_files import UnsafePathError

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.skipif(not safe_files._supported(), reason="needs O_NOFOLLOW and dir_fd (POSIX)")

ARCH, CLASSES = "kc_tinynet", 3


def _checkpoint_bytes(seed: int) -> bytes:
    """A valid safetensors checkpoint of kc_tinynet with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    model = build_model(ARCH, CLASSES)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def candidates() -> dict[str, tuple[bytes, dict[str, torch.Tensor]]]:
    """Two different valid checkpoints: sha256 → (bytes, the weights a model gets from them)."""
    out = {}
    for seed in (1, 2):
        data = _checkpoint_bytes(seed)
        out[hashlib.sha256(data).hexdigest()] = (data, _weights(load_model(data, arch=ARCH, num_classes=CLASSES).model))
    assert len(out) == 2 and not _same(*(w for _, w in out.values()))
    return out


class _Replacer:
    """A thread that keeps replacing ``target`` (``os.replace`` of a freshly written file) by each payload in turn."""

    def __init__(self, target: Path, payloads: list[bytes]) -> None:
        self.target, self.payloads = target, payloads
        self.stop = threading.Event()
        self.swaps = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        tmp = self.target.with_name(".incoming")
        while not self.stop.is_set():
            tmp.write_bytes(self.payloads[self.swaps % len(self.payloads)])
            os.replace(tmp, self.target)
            self.swaps += 1

    def __enter__(self) -> _Replacer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_checkpoint_replaced_while_it_loads_keeps_hash_and_weights_together(tmp_path, candidates):
    """Every load's sha256 is the hash of the weights that load produced, on every iteration of a racing writer."""
    target = tmp_path / "model.safetensors"
    payloads = [data for data, _ in candidates.values()]
    target.write_bytes(payloads[0])
    seen: dict[str, int] = {}
    with _Replacer(target, payloads) as writer:
        for i in range(40):
            for root in (None, tmp_path):  # a plain path, and a path below a server root
                loaded = load_model(target, arch=ARCH, num_classes=CLASSES, root=root)
                assert loaded.sha256 in candidates, f"load {i}: a hash of neither candidate"
                assert _same(_weights(loaded.model), candidates[loaded.sha256][1]), (
                    f"load {i} (root={root}): sha256 {loaded.short_hash} names other weights than those loaded")
                seen[loaded.sha256] = seen.get(loaded.sha256, 0) + 1
    assert writer.swaps > 0  # the writer did run during the loads


def test_checkpoint_symlink_swapped_after_the_check_is_not_loaded(tmp_path, monkeypatch, candidates):
    """A component of a checked path becomes a symlink to outside the root before the open: the load is refused
    and the outside checkpoint (a valid one, which would load) is not opened."""
    import kcore.server_paths as server_paths

    (inside_bytes, _), (outside_bytes, _) = candidates.values()
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "models").mkdir(parents=True)
    outside.mkdir()
    (root / "models" / "m.safetensors").write_bytes(inside_bytes)
    (outside / "m.safetensors").write_bytes(outside_bytes)
    real_resolve = server_paths.resolve_server_path

    def check_then_swap(*args, **kwargs):
        checked = real_resolve(*args, **kwargs)  # the honest path passes the check ...
        os.rename(root / "models", root / "models_old")  # ... then the folder becomes a symlink out of the root
        (root / "models").symlink_to(outside, target_is_directory=True)
        return checked

    checked = check_then_swap(str(root / "models" / "m.safetensors"), roots=(root.resolve(),))
    opened = _spy_opens(monkeypatch)
    with pytest.raises(UnsafePathError) as info:
        load_model(checked, arch=ARCH, num_classes=CLASSES, root=root.resolve())
    msg = str(info.value)
    assert "symlink" in msg and "'models'" in msg and str(root.resolve()) in msg and "Fix:" in msg
    assert "m.safetensors" not in opened[1:] and not any(str(outside) in p for p in opened)
    # and the last component swapped for a symlink
    os.remove(root / "models")
    os.rename(root / "models_old", root / "models")
    os.remove(root / "models" / "m.safetensors")
    (root / "models" / "m.safetensors").symlink_to(outside / "m.safetensors")
    with pytest.raises(UnsafePathError, match="is or passes through a symlink"):
        load_model(checked, arch=ARCH, num_classes=CLASSES, root=root.resolve())


# ------------------------------------------------------------------------------------------------ image folders
def _png_bytes(seed: int, size: int = 16) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _unit(size: int = 16):
    from kcore.data import Preprocess

    return Preprocess((size, size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_image_replaced_while_the_folder_loads_is_hashed_from_the_bytes_decoded(tmp_path):
    """The feature cache's image key (content_hash) names the pixels decoded, on every load under a racing writer."""
    from kcore.data import ImageSet
    from kcore.feature_cache import image_content_hash

    folder = tmp_path / "images"
    folder.mkdir()
    payloads = [_png_bytes(1), _png_bytes(2)]
    (folder / "a.png").write_bytes(payloads[0])
    (folder / "b.png").write_bytes(_png_bytes(3))
    # what each candidate must give: its pixels and the key of an image set built from exactly its bytes
    expect = []
    for data in payloads:
        ref = ImageSet.from_uploads([("a.png", data), ("b.png", (folder / "b.png").read_bytes())], _unit())
        expect.append((ref.raw(0).copy(), image_content_hash(ref)))
    assert expect[0][1] != expect[1][1]
    with _Replacer(folder / "a.png", payloads) as writer:
        for i in range(40):
            got = ImageSet.from_folder(folder, _unit(), root=tmp_path)
            assert got.ids == ("a.png", "b.png")
            match = [k for k, (pixels, _) in enumerate(expect) if (got.raw(0) == pixels).all()]
            assert len(match) == 1, f"load {i}: pixels of neither candidate"
            assert image_content_hash(got) == expect[match[0]][1], f"load {i}: the key names other bytes"
    assert writer.swaps > 0


def test_folder_listing_follows_no_symlinked_folder_and_keeps_inside_file_links(tmp_path):
    """from_folder lists without following symlinks: a symlinked class folder (in or out) is skipped with a reason,
    never entered; a file symlink that stays inside the folder is still read (from the file it names)."""
    from kcore.data import ImageSet

    folder, outside = tmp_path / "data", tmp_path / "outside"
    (folder / "cat").mkdir(parents=True)
    outside.mkdir()
    (folder / "cat" / "1.png").write_bytes(_png_bytes(1))
    (outside / "2.png").write_bytes(_png_bytes(2))
    (folder / "dog").symlink_to(outside, target_is_directory=True)
    (folder / "cat2").symlink_to(folder / "cat", target_is_directory=True)
    (folder / "cat" / "again.png").symlink_to(folder / "cat" / "1.png")
    with pytest.warns(UserWarning) as caught:
        got = ImageSet.from_folder(folder, _unit())
    assert got.ids == ("cat/1.png", "cat/again.png") and (got.raw(0) == got.raw(1)).all()
    text = " ".join(str(w.message) for w in caught)
    assert "cat2 (cannot read:" in text and "not a regular file" in text
    assert "dog (cannot read: a symlink that leads out of the folder" in text and "2.png" not in text


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """A server root ``root/`` (KCORE_SERVER_ROOTS) and an ``outside/`` folder beside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(root))
    return root.resolve(), outside.resolve()


def _spy_opens(monkeypatch) -> list[str]:
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_files.os, "open", spy)
    return opened


def test_image_folder_swapped_for_a_symlink_after_the_check_is_refused(server, monkeypatch):
    """Through the dashboard: the folder passes the path check, then becomes a symlink to an outside folder of
    images: nothing in the outside folder is listed or read."""
    import kcore.server_paths as server_paths
    from dashboard.state import _images

    root, outside = server
    (root / "imgs").mkdir()
    (root / "imgs" / "in.png").write_bytes(_png_bytes(1))
    (outside / "secret.png").write_bytes(_png_bytes(2))
    real_resolve = server_paths.resolve_server_path

    def check_then_swap(*args, **kwargs):
        checked = real_resolve(*args, **kwargs)
        os.rename(root / "imgs", root / "imgs_old")
        (root / "imgs").symlink_to(outside, target_is_directory=True)
        return checked

    monkeypatch.setattr(server_paths, "resolve_server_path", check_then_swap)
    opened = _spy_opens(monkeypatch)
    with pytest.raises(UnsafePathError) as info:
        _images.folder_images(str(root / "imgs"), (16, 16))
    msg = str(info.value)
    assert "symlink" in msg and "'imgs'" in msg and str(root) in msg and "secret" not in msg
    assert not any("secret" in p for p in opened)


def test_image_swapped_for_a_symlink_between_check_and_open_is_skipped(server, monkeypatch):
    """An image inside the folder passes the reader's containment check, then becomes a symlink to an outside
    image before the open: it is skipped (the open refuses), the outside image is not read."""
    import kcore.data as kdata
    from dashboard.state import _images

    root, outside = server
    folder = root / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png_bytes(1))
    (folder / "b.png").write_bytes(_png_bytes(2))
    (outside / "secret.png").write_bytes(_png_bytes(3))
    real_read_under = kdata.read_under

    def swap_then_read(base, path, **kwargs):
        if Path(path).name == "b.png":  # after _folder_reader's check, before the open
            os.replace(folder / "b.png", root / "b_old.png")
            (folder / "b.png").symlink_to(outside / "secret.png")
        return real_read_under(base, path, **kwargs)

    monkeypatch.setattr(kdata, "read_under", swap_then_read)
    with pytest.warns(UserWarning, match=r"b\.png \(cannot read: .*is or passes through a symlink"):
        got = _images.folder_images(str(folder), (16, 16))
    assert got.ids == ("a.png",)
    secret = kdata.ImageSet.from_uploads([("a.png", (outside / "secret.png").read_bytes())], _unit())
    assert not (got.raw(0) == secret.raw(0)).all()


def test_dashboard_checkpoint_swapped_after_the_check_is_refused(server, monkeypatch, candidates):
    """Through the dashboard's server-path load: the checkpoint passes the check, then becomes a symlink to a valid
    outside checkpoint: the load is refused, the outside file is not opened."""
    import kcore.server_paths as server_paths
    from dashboard.state import _models

    (inside_bytes, _), (outside_bytes, _) = candidates.values()
    root, outside = server
    (root / "m.safetensors").write_bytes(inside_bytes)
    (outside / "evil.safetensors").write_bytes(outside_bytes)
    real_resolve = server_paths.resolve_server_path

    def check_then_swap(*args, **kwargs):
        checked = real_resolve(*args, **kwargs)
        os.replace(root / "m.safetensors", root / "m_old.safetensors")
        (root / "m.safetensors").symlink_to(outside / "evil.safetensors")
        return checked

    monkeypatch.setattr(server_paths, "resolve_server_path", check_then_swap)
    opened = _spy_opens(monkeypatch)
    with pytest.raises(UnsafePathError, match=r"checkpoint path .*is or passes through a symlink \('m.safetensors'\)"):
        _models.load_server_path(str(root / "m.safetensors"), ARCH, CLASSES)
    assert not any("evil" in p for p in opened)


# ------------------------------------------------------------------------------------------------ model cache
def _new_ctime(path: Path, old_ns: int, mtime_ns: int) -> None:
    """Set ``path``'s mtime back to ``mtime_ns``; repeat until the kernel's ctime moved past ``old_ns`` (the
    ctime clock is coarse: two changes within one tick share it)."""
    for _ in range(10_000):
        os.utime(path, ns=(mtime_ns, mtime_ns))
        if os.stat(path).st_ctime_ns != old_ns:
            return
        threading.Event().wait(0.001)
    pytest.fail("the ctime never changed")


def test_checkpoint_replaced_with_the_same_mtime_is_not_served_from_the_model_cache(server, candidates):
    """The dashboard's model cache: a checkpoint replaced (os.replace) or rewritten in place, with its mtime set
    back to the old one, is loaded again: the new hash, the new weights."""
    from dashboard.state import _models

    (hash_1, (bytes_1, weights_1)), (hash_2, (bytes_2, weights_2)) = candidates.items()
    assert len(bytes_1) == len(bytes_2)  # same size too: only the content differs
    root, _ = server
    path = root / "m.safetensors"
    path.write_bytes(bytes_1)
    first = os.stat(path)
    a = _models.load_server_path(str(path), ARCH, CLASSES)
    assert a.sha256 == hash_1 and _same(_weights(a.model), weights_1)
    assert _models.load_server_path(str(path), ARCH, CLASSES) is a  # unchanged: served from the cache

    tmp = root / ".new"
    tmp.write_bytes(bytes_2)
    os.replace(tmp, path)  # replaced: a new file under the old name ...
    _new_ctime(path, first.st_ctime_ns, first.st_mtime_ns)  # ... with the old mtime
    assert os.stat(path).st_mtime_ns == first.st_mtime_ns and os.stat(path).st_size == first.st_size
    b = _models.load_server_path(str(path), ARCH, CLASSES)
    assert b.sha256 == hash_2 and _same(_weights(b.model), weights_2)

    second = os.stat(path)
    with open(path, "r+b") as fh:  # rewritten in place: same inode, same size ...
        fh.write(bytes_1)
    _new_ctime(path, second.st_ctime_ns, second.st_mtime_ns)  # ... and the same mtime again
    assert os.stat(path).st_ino == second.st_ino and os.stat(path).st_mtime_ns == second.st_mtime_ns
    c = _models.load_server_path(str(path), ARCH, CLASSES)
    assert c.sha256 == hash_1 and _same(_weights(c.model), weights_1)


# ------------------------------------------------------------------------------------------------ feature cache key
def test_feature_cache_key_is_the_hash_of_the_loaded_bytes(tmp_path, monkeypatch, candidates):
    """compare() keys the feature cache by each LoadedModel.sha256 (the bytes loaded) and the images' content, not
    by a re-hash of the path: a file replaced after loading does not change the key, a different load does."""
    import kcore.pipeline as pipeline
    from kcore.data import ImageSet
    from kcore.feature_cache import image_content_hash

    (hash_1, (bytes_1, _)), (hash_2, (bytes_2, _)) = candidates.items()
    path = tmp_path / "m.safetensors"
    path.write_bytes(bytes_1)
    a = load_model(path, arch=ARCH, num_classes=CLASSES)
    path.write_bytes(bytes_2)  # replaced after loading: the key must still name the weights in `a`
    b = load_model(path, arch=ARCH, num_classes=CLASSES)
    images = ImageSet.from_uploads([("x.png", _png_bytes(5, 32)), ("y.png", _png_bytes(6, 32))], _unit(32))
    keys = []

    class _Captured(Exception):
        pass

    def capture(*args, cache_key=None, **kwargs):
        keys.append(cache_key)
        raise _Captured

    monkeypatch.setattr(pipeline, "extract_features", capture)
    layer = "features.0" if "features.0" in dict(a.model.named_modules()) else next(
        n for n, m in a.model.named_modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(_Captured):
        pipeline.compare(a, layer, b, layer, images, cache_dir=tmp_path / "cache", device="cpu")
    (key,) = keys
    assert (key.checkpoint_a, key.checkpoint_b) == (hash_1, hash_2)
    assert key.image_set == image_content_hash(images)
