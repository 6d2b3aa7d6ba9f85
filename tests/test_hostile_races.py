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
    opened: list[str] = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_files.os, "open", spy)
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
