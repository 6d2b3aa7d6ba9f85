"""The float16 on-disk feature cache: one folder per (checkpoints, images, transform, layers) key.

An entry is a folder ``cache_dir / <cache_digest>`` holding ``x_a.npy`` and ``x_b.npy`` (float16, C order),
``ids.json``, ``labels.npy`` when the images had labels, and ``meta.json``, written last. It is built in a
hidden temporary folder next to it and renamed into place, so a reader sees either a finished entry or none.
Entries are opened memory-mapped (:func:`read_entry`), so reading one costs about one batch of memory.

:func:`kcore.features.extract_features` writes entries through :func:`start_entry`, :class:`ArrayWriter` and
:func:`finish_entry`; :func:`load_cached_features` opens one without running any model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from kcore.feature_set import FeaturePair

CACHE_FORMAT = "kcore-feature-cache/2"  # 2: image sets keyed by content, not by names
"""Value of the ``"format"`` key in a cache entry's ``meta.json``."""

FLOAT16_MAX = 65504.0
"""Largest finite float16 value; cached features must stay below it in magnitude."""


@dataclass(frozen=True)
class CacheKey:
    """What identifies a cache entry besides the two layer names (which :func:`kcore.features.extract_features` adds).

    Attributes:
        checkpoint_a: SHA-256 of network A's checkpoint: ``LoadedModel.sha256``, the hash of the very bytes its
            weights were loaded from (never a second read of the path, which may find a file replaced since).
        checkpoint_b: SHA-256 of network B's checkpoint (``LoadedModel.sha256``).
        image_set: a hash of the images and their order (e.g. :func:`image_set_hash` of their ids
            together with the data set's version).
        transform: a description of the preprocessing (resize, crop, normalisation).
    """

    checkpoint_a: str
    checkpoint_b: str
    image_set: str
    transform: str = ""


def image_set_hash(image_ids: Iterable[str]) -> str:
    """SHA-256 of an ordered list of image ids (for :attr:`CacheKey.image_set`)."""
    digest = hashlib.sha256()
    for image_id in image_ids:
        digest.update(str(image_id).encode("utf-8") + b"\0")
    return digest.hexdigest()


def image_content_hash(images: object, ids: Iterable[str] | None = None) -> str:
    """SHA-256 of what a set of images holds, in order (for :attr:`CacheKey.image_set`).

    An :class:`kcore.data.ImageSet` hashes its ids, the bytes each image was decoded from (read once, from one
    open file: the digest is taken from the same bytes the pixels come from, never from a second read) and its
    decoding (size, mean, std, resize), so replacing a file under the same name gives a new key, even while the
    image set is being read. A tensor is hashed
    by its bytes; any other dataset by the bytes of each item's tensor (one pass over it).
    """
    import torch

    content_hash = getattr(images, "content_hash", None)
    if callable(content_hash):
        return str(content_hash(include_preprocess=True))
    digest = hashlib.sha256(b"kcore-images/1\0")
    for image_id in ids or ():
        digest.update(str(image_id).encode("utf-8") + b"\0")
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu().contiguous()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return digest.hexdigest()
    for i in range(len(images)):  # type: ignore[arg-type]
        item = images[i]  # type: ignore[index]
        x = item[0] if isinstance(item, (tuple, list)) else item
        t = torch.as_tensor(x).detach().cpu().contiguous()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def cache_digest(cache_key: CacheKey | str, layer_a: str, layer_b: str, cache_key_extra: str = "") -> str:
    """The SHA-256 naming a cache entry: of the key's fields, both layer names and ``cache_key_extra``.

    Args:
        cache_key: a :class:`CacheKey`, or a string the caller already made unique for the two models,
            the images and the transform.
        layer_a: layer name in A.
        layer_b: layer name in B.
        cache_key_extra: anything else that changes the features (e.g. an input resolution).
    """
    if isinstance(cache_key, CacheKey):
        key: dict[str, Any] = asdict(cache_key)
    elif isinstance(cache_key, str) and cache_key:
        key = {"key": cache_key}
    else:
        raise ValueError(
            f"cache_key must be a kcore.feature_cache.CacheKey or a non-empty string; got {cache_key!r}. Fix: "
            "CacheKey(checkpoint_a=loaded_a.sha256, checkpoint_b=loaded_b.sha256, image_set=..., transform=...)."
        )
    payload = {"format": CACHE_FORMAT, **key, "layer_a": layer_a, "layer_b": layer_b, "extra": cache_key_extra}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def cache_entry_dir(
    cache_dir: str | os.PathLike[str],
    cache_key: CacheKey | str,
    layer_a: str,
    layer_b: str,
    cache_key_extra: str = "",
) -> Path:
    """The folder of a cache entry: ``cache_dir / <cache_digest>``."""
    return Path(cache_dir) / cache_digest(cache_key, layer_a, layer_b, cache_key_extra)


def read_entry(entry: Path) -> FeaturePair:
    """Open a finished cache entry with its arrays memory-mapped (copy-on-write, so the file never changes)."""
    try:
        meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        ids = json.loads((entry / "ids.json").read_text(encoding="utf-8"))
        x_a = np.load(entry / "x_a.npy", mmap_mode="c")
        x_b = np.load(entry / "x_b.npy", mmap_mode="c")
        labels = np.load(entry / "labels.npy") if meta["has_labels"] else None
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(
            f"feature cache entry {str(entry)!r} is unreadable ({exc}). Fix: delete that folder; the next "
            "extraction recomputes it."
        ) from exc
    n = meta["n_images"]
    if (
        meta.get("format") != CACHE_FORMAT
        or x_a.shape != (n, *meta["shape_a"])
        or x_b.shape != (n, *meta["shape_b"])
        or len(ids) != n
    ):
        raise ValueError(
            f"feature cache entry {str(entry)!r} does not match its meta.json (arrays {x_a.shape}, {x_b.shape}, "
            f"{len(ids)} ids; meta {meta}). Fix: delete that folder; the next extraction recomputes it."
        )
    return FeaturePair(
        x_a=torch.from_numpy(x_a),
        x_b=torch.from_numpy(x_b),
        layer_a=meta["layer_a"],
        layer_b=meta["layer_b"],
        image_ids=tuple(ids),
        labels=None if labels is None else torch.from_numpy(labels),
        entry=entry,
    )


class CachedArray:
    """One float16 array of a cache entry, read from the file on demand (never memory-mapped).

    ``array[i:j]`` and ``array[index_tensor]`` return float16 tensors of those images, read with ``os.pread``:
    the bytes pass through the kernel's page cache but are not mapped into this process, so its resident
    memory holds only what was asked for, however large the file. :func:`kcore.fit` accepts these arrays
    in place of tensors and streams its batches from them.

    Attributes:
        path: the ``.npy`` file.
        shape: (N, C, H, W).
    """

    dtype = torch.float16

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._offset = _npy_data_offset(f)
            f.seek(0)
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        if fortran or np.dtype(dtype) != np.float16 or len(shape) != 4:
            raise ValueError(
                f"{str(self.path)!r} is not a float16 (N, C, H, W) array in C order (got {dtype}, shape {shape}). "
                "Fix: delete that cache entry; the next extraction recomputes it."
            )
        self.shape = torch.Size(shape)
        self._row = math.prod(shape[1:]) * 2
        self._fd: int | None = None

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)  # type: ignore[arg-type]

    def _read(self, start: int, count: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, count * self._row, self._offset + start * self._row)
        if len(data) != count * self._row:
            raise ValueError(f"{str(self.path)!r} is shorter than its header says. Fix: delete that cache entry.")
        return data

    def __getitem__(self, key: int | slice | Tensor | Sequence[int]) -> Tensor:
        n = len(self)
        if isinstance(key, int):
            if -n <= key < n:
                key %= n  # a negative index counts from the end (as a slice key[-1:0] would not)
                return self[key : key + 1][0]
            return self[torch.tensor([key])][0]  # out of range: the index path raises IndexError
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                count = max(0, stop - start)
                if count == 0:
                    return torch.empty(0, *self.shape[1:], dtype=torch.float16)
                buf = bytearray(self._read(start, count))
                return torch.frombuffer(buf, dtype=torch.float16).reshape(count, *self.shape[1:])
            key = torch.arange(start, stop, step)
        index = torch.as_tensor(key, dtype=torch.long).reshape(-1)
        if len(index) and (int(index.min()) < -n or int(index.max()) >= n):
            raise IndexError(f"index out of range for {n} images")
        out = torch.empty(len(index), *self.shape[1:], dtype=torch.float16)
        flat = out.view(len(index), -1).numpy().view(np.uint8)
        for j, i in enumerate(index.tolist()):
            flat[j] = np.frombuffer(self._read(i % n, 1), dtype=np.uint8)
        return out


def cached_arrays(features: FeaturePair) -> tuple[CachedArray, CachedArray]:
    """(x_a, x_b) of a feature set read from the cache, as :class:`CachedArray` (for :func:`kcore.fit`).

    Raises:
        ValueError: ``features`` did not come from the cache (it holds in-memory tensors).
    """
    if features.entry is None:
        raise ValueError(
            "these features are in memory, not in the disk cache. Fix: extract them with cache_dir=... "
            "(kcore fit --cache-dir DIR), or pass the tensors themselves to kcore.fit."
        )
    return CachedArray(features.entry / "x_a.npy"), CachedArray(features.entry / "x_b.npy")


def load_cached_features(
    cache_dir: str | os.PathLike[str],
    cache_key: CacheKey | str,
    layer_a: str,
    layer_b: str,
    *,
    cache_key_extra: str = "",
) -> FeaturePair | None:
    """Open cached features without reading them into memory.

    Args:
        cache_dir: the cache folder given to :func:`kcore.features.extract_features`.
        cache_key: the same key given to :func:`kcore.features.extract_features`.
        layer_a: layer name in A.
        layer_b: layer name in B.
        cache_key_extra: the same extra string given to :func:`kcore.features.extract_features`.

    Returns:
        A :class:`FeaturePair` whose ``x_a`` (N, C_a, H_a, W_a) and ``x_b`` (N, C_b, H_b, W_b) are float16
        tensors memory-mapped from the cache files (``torch.from_numpy`` on ``np.load(mmap_mode="c")``),
        or None when there is no finished entry for this key.

    Raises:
        ValueError: the entry exists but is unreadable or inconsistent.
    """
    entry = cache_entry_dir(cache_dir, cache_key, layer_a, layer_b, cache_key_extra)
    if not (entry / "meta.json").is_file():
        return None
    return read_entry(entry)


def start_entry(entry: Path) -> Path:
    """Create the hidden temporary folder an entry is written into (next to ``entry``, same file system)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def discard_entry(tmp: Path) -> None:
    """Remove an unfinished entry's temporary folder (after an error or a cancel)."""
    shutil.rmtree(tmp, ignore_errors=True)


class ArrayWriter:
    """One feature array of an entry, appended batch by batch as float16 to ``folder / <name>.npy``.

    Batches are appended with plain writes, not through a memory map: the written pages then sit in the
    kernel's page cache rather than in this process's resident set, so extraction holds about one batch
    whatever the number of images. With an unknown number of images the data goes to a headerless file first
    and is copied behind the .npy header at the end.
    """

    def __init__(self, folder: Path, n: int | None, shape: tuple[int, ...], name: str) -> None:
        self.folder, self.n, self.shape, self.name = folder, n, shape, name
        self.done = 0
        if n is not None:
            self.file: BinaryIO = open(folder / f"{name}.npy", "wb")
            _write_npy_header(self.file, (n, *shape))
        else:
            self.file = open(folder / f"{name}.raw", "wb")

    def write(self, feats: Tensor, layer: str) -> None:
        """Append a CPU float32 batch (B, *shape); refuse values float16 would turn into inf."""
        peak = float(feats.abs().max()) if feats.numel() else 0.0
        if not peak < FLOAT16_MAX:
            raise ValueError(
                f"layer {layer!r} has values up to {peak:.4g} in magnitude, beyond float16 (max {FLOAT16_MAX}); the "
                "float16 cache would store them as inf. Fix: pass cache_dir=None to keep float32 features in memory."
            )
        self.file.write(memoryview(feats.to(torch.float16).contiguous().numpy()))
        self.done += feats.shape[0]

    def finish(self) -> None:
        """Close the file and, with an unknown N, put the .npy header in front of the data."""
        self.file.close()
        if self.n is None:
            raw = self.folder / f"{self.name}.raw"
            with open(self.folder / f"{self.name}.npy", "wb") as out, open(raw, "rb") as src:
                _write_npy_header(out, (self.done, *self.shape))
                shutil.copyfileobj(src, out, 2**22)
            raw.unlink()

    def close(self) -> None:
        """Close the file (after an error; :meth:`finish` closes it otherwise)."""
        self.file.close()


# --------------------------------------------------------------------------------------------------
# Entries written by several ranks
# --------------------------------------------------------------------------------------------------


def part_key(entry: Path, rank: int, world_size: int) -> str:
    """The cache key of rank ``rank``'s part of ``entry`` when ``world_size`` ranks share its extraction."""
    return f"{entry.name}/part-{rank}-of-{world_size}"


def parts_dir(entry: Path) -> Path:
    """Where the ranks' parts of ``entry`` are written before rank 0 assembles them (next to the entry)."""
    return entry.parent / f".{entry.name}.parts"


def assemble_entry(entry: Path, parts: Sequence[Path], block: int) -> FeaturePair:
    """Build ``entry`` from the ranks' finished part entries, then remove the parts.

    Part r holds blocks r, r + R, r + 2R, … of ``block`` consecutive images (R = ``len(parts)``, see
    :func:`kcore.distributed.shard`). The arrays are copied block by block from file to file, so memory stays
    at one block whatever the number of images, and the entry is byte for byte the one a single process
    writes for the same images and batches.

    Raises:
        ValueError: a part is unreadable or does not fit the others (layers, shapes, number of images).
    """
    opened = [read_entry(p) for p in parts]
    first = opened[0]
    n = sum(p.n_images for p in opened)
    world = len(parts)
    for r, p in enumerate(opened):
        expected = sum(min(block, n - s) for s in range(r * block, n, world * block))
        same = (p.layer_a, p.layer_b, p.x_a.shape[1:], p.x_b.shape[1:], p.labels is None) == (
            first.layer_a, first.layer_b, first.x_a.shape[1:], first.x_b.shape[1:], first.labels is None
        )
        if not same or p.n_images != expected:
            raise ValueError(
                f"part {r} of {str(entry)!r} ({p.n_images} images, layers {p.layer_a!r}/{p.layer_b!r}) does not fit "
                f"part 0 or the {expected} images expected. Fix: delete {str(parts_dir(entry))!r} and rerun the job."
            )
    order = [(i % world, (i // world) * block) for i in range(math.ceil(n / block))]
    ids: list[str] = []
    labels: list[Tensor] = []
    for r, first_row in order:
        ids.extend(opened[r].image_ids[first_row : first_row + block])
        part_labels = opened[r].labels
        if part_labels is not None:
            labels.append(part_labels[first_row : first_row + block])
    shapes = {"x_a": tuple(first.x_a.shape[1:]), "x_b": tuple(first.x_b.shape[1:])}
    sizes = [p.n_images for p in opened]
    layer_a, layer_b = first.layer_a, first.layer_b
    del opened, first  # close the memory maps before copying
    tmp = start_entry(entry)
    try:
        for name, shape in shapes.items():
            row = math.prod(shape) * 2  # bytes of one image's float16 features
            with open(tmp / f"{name}.npy", "wb") as out:
                _write_npy_header(out, (n, *shape))
                handles = [open(p / f"{name}.npy", "rb") for p in parts]
                try:
                    starts = [_npy_data_offset(h) for h in handles]
                    for r, first_row in order:
                        handles[r].seek(starts[r] + first_row * row)
                        out.write(handles[r].read(min(block, sizes[r] - first_row) * row))
                finally:
                    for h in handles:
                        h.close()
        label_tensor = torch.cat(labels) if labels else None
        finish_entry(tmp, entry, shapes["x_a"], shapes["x_b"], layer_a, layer_b, tuple(ids), label_tensor)
    except BaseException:
        discard_entry(tmp)
        raise
    shutil.rmtree(parts_dir(entry), ignore_errors=True)
    return read_entry(entry)


def _npy_data_offset(file: BinaryIO) -> int:
    """Offset of the data behind a .npy header (``file`` at 0 on entry, at the data on return)."""
    version = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    read(file)
    return file.tell()


def _write_npy_header(file: BinaryIO, shape: tuple[int, ...]) -> None:
    """The .npy header of a C-ordered float16 array of ``shape``; the data follows it in the file."""
    np.lib.format.write_array_header_1_0(
        file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": shape}
    )


def finish_entry(
    tmp: Path,
    entry: Path,
    shape_a: tuple[int, ...],
    shape_b: tuple[int, ...],
    layer_a: str,
    layer_b: str,
    image_ids: tuple[str, ...],
    labels: Tensor | None,
) -> None:
    """Finish a cache entry in its temporary folder, then rename it into place (atomic on one file system)."""
    (tmp / "ids.json").write_text(json.dumps(list(image_ids)), encoding="utf-8")
    if labels is not None:
        np.save(tmp / "labels.npy", labels.numpy())
    meta = {
        "format": CACHE_FORMAT,
        "n_images": len(image_ids),
        "shape_a": list(shape_a),
        "shape_b": list(shape_b),
        "dtype": "float16",
        "layer_a": layer_a,
        "layer_b": layer_b,
        "has_labels": labels is not None,
    }
    # meta.json last: an entry counts as finished only once it is there.
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    try:
        os.rename(tmp, entry)
    except OSError:
        if not (entry / "meta.json").is_file():  # not a concurrent writer that finished first
            raise
        shutil.rmtree(tmp, ignore_errors=True)
