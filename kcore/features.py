"""Feature maps of two networks on the same images: list layers, capture them, extract them.

Listing and checking layers live in :mod:`kcore.layers`, capturing them in :mod:`kcore.capture`; this module
extracts and caches, and offers all three (``from kcore.features import list_layers, capture, extract_features``).

The pipeline's first step (Sec. 3 of the paper fits g_θ on the feature maps x of network A and x* of
network B for the same images). Hooks only ever exist inside a ``with capture(...)`` block and are removed
in ``finally``; captured outputs are cloned, because an in-place ReLU after the hooked layer would
otherwise overwrite them.

TorchScript models cannot be hooked (their forward runs in the TorchScript interpreter, which ignores
Python hooks), so :func:`list_layers`, :func:`capture` and :func:`extract_features` refuse them with a
ValueError that says how to re-save the model. ``torch.export`` archives loaded by
:func:`kcore.checkpoints.load_model` are unflattened and work like ordinary modules.

Extracted features come back as a :class:`kcore.feature_set.FeaturePair`; with ``cache_dir`` they are written
to (and later reopened from) the float16 disk cache of :mod:`kcore.feature_cache`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import torch
from torch import Tensor, nn

from kcore.capture import capture, run_capture
from kcore.devices import resolve_device
from kcore.feature_cache import (
    ArrayWriter,
    CacheKey,
    assemble_entry,
    cache_entry_dir,
    discard_entry,
    finish_entry,
    part_key,
    parts_dir,
    read_entry,
    start_entry,
)
from kcore.feature_set import FeaturePair
from kcore.layers import (  # the layer API, also offered here: kcore.features is the face of all three modules
    LayerInfo,
    _channels_last,
    _check_hookable,
    _eval_mode,
    _module_dtype,
    _on_device,
    list_layers,
    validate_layer,
)

__all__ = [
    "BatchTransform", "Cancel", "ExtractionCancelled", "LayerInfo", "Progress", "capture", "estimate_feature_bytes",
    "extract_features", "format_bytes", "list_layers", "run_capture", "validate_layer",
]

if TYPE_CHECKING:
    from kcore.distributed import Context

class ExtractionCancelled(Exception):
    """Raised by :func:`extract_features` when its ``cancel`` callback asks it to stop."""


class _Settable(Protocol):
    def is_set(self) -> bool: ...


Cancel = Union[Callable[[], bool], _Settable]
"""Either a function returning True to stop, or an object with ``is_set()`` (``threading.Event``)."""

Progress = Callable[[int, Union[int, None]], None]
"""Called after each batch with (images done, total images or None when unknown)."""

BatchTransform = Callable[[Tensor], Tensor]
"""Maps a batch of images (N, C, H, W) on the device to a model's input (e.g. its normalisation)."""


# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


def estimate_feature_bytes(
    n_images: int,
    shape_a: Sequence[int],
    shape_b: Sequence[int],
    dtype_bytes: int = 4,
) -> int:
    """Bytes needed to hold both feature maps of ``n_images`` images.

    Args:
        n_images: number of images N.
        shape_a: (C_a, H_a, W_a) of one image's features from A (e.g. ``LayerInfo.shape``).
        shape_b: (C_b, H_b, W_b) of one image's features from B.
        dtype_bytes: 4 for float32 in memory, 2 for the float16 cache.

    Returns:
        N · (C_a·H_a·W_a + C_b·H_b·W_b) · dtype_bytes.
    """
    if n_images < 0 or dtype_bytes <= 0:
        raise ValueError(f"n_images must be >= 0 and dtype_bytes > 0; got {n_images} and {dtype_bytes}.")
    return int(n_images) * (math.prod(shape_a) + math.prod(shape_b)) * int(dtype_bytes)


def format_bytes(n_bytes: int | float) -> str:
    """Human-readable size with binary units, e.g. ``1536 -> "1.5 KiB"``."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------


def _is_cancelled(cancel: Cancel | None) -> bool:
    if cancel is None:
        return False
    is_set = getattr(cancel, "is_set", None)
    return bool(is_set() if callable(is_set) else cancel())  # type: ignore[operator]


@dataclass
class _Batch:
    x: Tensor
    labels: Tensor | None
    ids: list[str] | None


def _as_labels(value: object, n: int) -> Tensor | None:
    if value is None:
        return None
    labels = torch.as_tensor(value)
    if labels.shape != (n,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(
            f"images: a batch's labels must be {n} integer class indices (shape ({n},)); got shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}."
        )
    return labels.to(torch.int64)


def _to_batch(item: object) -> _Batch:
    """Normalise one batch: a tensor, or (images, labels) / (images, labels, ids)."""
    if isinstance(item, Tensor):
        x, labels, ids = item, None, None
    elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 3 and isinstance(item[0], Tensor):
        x = item[0]
        labels = item[1] if len(item) > 1 else None
        ids = [str(i) for i in item[2]] if len(item) > 2 else None
    else:
        raise ValueError(
            "images must yield batches shaped as a tensor (N, C, H, W) or a tuple (images, labels[, ids]); got "
            f"a {type(item).__name__}. Fix: pass a torch Dataset of (image (C, H, W), label) or a DataLoader."
        )
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"images: each batch must be a float tensor (N, C, H, W); got shape {tuple(x.shape)} and dtype "
            f"{x.dtype}. Fix: convert images with torchvision.transforms.ToTensor() (and normalise them)."
        )
    return _Batch(x, _as_labels(labels, x.shape[0]), ids)


def _batches(
    images: object, batch_size: int, ids: Sequence[str] | None
) -> tuple[Iterator[_Batch], int | None, Sequence[str] | None]:
    """Turn the accepted kinds of ``images`` into batches; also return N (if known) and the ids (if given)."""
    from torch.utils.data import DataLoader, Dataset

    if ids is None:
        ids = getattr(images, "ids", None) if isinstance(images, Dataset) else None
    if isinstance(images, Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"images given as one tensor must be (N, C, H, W); got shape {tuple(images.shape)}."
            )
        chunks = (images[i : i + batch_size] for i in range(0, images.shape[0], batch_size))
        return (_to_batch(c) for c in chunks), int(images.shape[0]), ids
    if isinstance(images, Dataset):
        n = len(images) if hasattr(images, "__len__") else None  # type: ignore[arg-type]
        loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=0)
        return (_to_batch(b) for b in loader), n, ids
    if isinstance(images, Iterable):
        return (_to_batch(b) for b in images), None, ids
    raise TypeError(
        f"images must be a torch Dataset, an iterable of batches or a tensor (N, C, H, W); got "
        f"{type(images).__name__}."
    )


class _MemorySink:
    """One feature array kept in memory as float32: preallocated when N is known, else a list of batches."""

    def __init__(self, n: int | None, shape: tuple[int, ...]) -> None:
        self.shape = shape
        self.done = 0
        self.parts: list[Tensor] = []
        self.store = torch.empty((n, *shape), dtype=torch.float32) if n is not None else None

    def write(self, feats: Tensor, layer: str) -> None:
        b = feats.shape[0]
        if self.store is not None:
            self.store[self.done : self.done + b] = feats
        else:
            self.parts.append(feats)
        self.done += b

    def finish(self) -> Tensor:
        return self.store if self.store is not None else torch.cat(self.parts)

    def close(self) -> None:
        pass


def _store(sink: _MemorySink | ArrayWriter, n: int | None, done: int, feats: Tensor, layer: str) -> None:
    """Check one batch of features against the first batch's shape and the announced N, then store it."""
    if tuple(feats.shape[1:]) != sink.shape:
        raise ValueError(
            f"layer {layer!r} gave shape {tuple(feats.shape[1:])} for a later batch but {sink.shape} for the "
            "first one. Fix: resize all images to one size."
        )
    if n is not None and done + feats.shape[0] > n:
        raise ValueError(f"images yielded more than the {n} images announced (n_images or len(dataset)).")
    sink.write(feats.detach().to("cpu", torch.float32), layer)


def _sink(folder: Path | None, n: int | None, shape: tuple[int, ...], name: str) -> _MemorySink | ArrayWriter:
    """Where one layer's features go: float32 in memory (no cache) or a float16 array of the cache entry."""
    return _MemorySink(n, shape) if folder is None else ArrayWriter(folder, n, shape, name)


def extract_features(
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    images: object,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = "auto",
    ids: Sequence[str] | None = None,
    n_images: int | None = None,
    transform_a: BatchTransform | None = None,
    transform_b: BatchTransform | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_key: CacheKey | str | None = None,
    cache_key_extra: str = "",
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    ctx: Context | None = None,
) -> FeaturePair:
    """Run both networks over the same images and gather one layer's feature maps from each.

    Each batch goes once through A and once through B (once in all when ``model_a is model_b``), in eval
    mode, without gradients, on ``device``. Both models are given back on their original device with their
    original training flags, also after an error.

    Args:
        model_a: network A (not TorchScript).
        layer_a: module name in A with a 4-D output (see :func:`list_layers`).
        model_b: network B.
        layer_b: module name in B with a 4-D output.
        images: one of
            - a ``torch.utils.data.Dataset`` whose items are ``(image (C, H, W) float tensor, int label)``
              or just image tensors; batched here in order; its ``ids`` attribute, if any, names the images;
            - an iterable of batches (e.g. a ``DataLoader``), each a float tensor (N, C, H, W) or a tuple
              ``(images (N, C, H, W), labels (N,)[, ids])``;
            - one float tensor (N, C, H, W).
            Images must already be converted to float (and normalised, unless ``transform_a/b`` do it).
        batch_size: images per forward pass (for a Dataset or a tensor; an iterable keeps its batches).
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        ids: one id per image; default the Dataset's ``ids``, the batches' ids, else ``"0"``, ``"1"``, ….
        n_images: the number of images an iterable will yield, so that storage is preallocated.
        transform_a: applied to each batch on the device before model A (e.g. its normalisation).
        transform_b: the same for model B.
        cache_dir: folder of the float16 on-disk cache; None keeps float32 features in memory.
        cache_key: required with ``cache_dir``: a :class:`kcore.feature_cache.CacheKey` (checkpoint hashes,
            image-set hash, transform description) or a string unique to them; the layer names and
            ``cache_key_extra`` are added to it (see :func:`kcore.feature_cache.cache_digest`).
        cache_key_extra: anything else that changes the features.
        progress: called after each batch with (images done, total or None).
        cancel: checked before each batch; ``threading.Event`` or a function returning True to stop.
        ctx: a torchrun job to share the work with (:func:`kcore.distributed.init`); None or a single process:
            this process does it all. With several ranks, ``cache_dir`` must be a folder every rank sees;
            each rank extracts its shard (whole batches, :func:`kcore.distributed.shard`) into its part of
            the entry, rank 0 assembles the entry (the same bytes one process writes) and every rank gets it
            memory-mapped. No rank holds the whole feature set; ``images`` must be a Dataset or a tensor.

    Returns:
        A :class:`FeaturePair`. Without ``cache_dir``: float32 tensors in memory. With ``cache_dir``: float16
        tensors memory-mapped from the cache entry (features are rounded to float16, relative error about
        5e-4), read back from disk both on the first call and on later calls with the same key, which do not
        run the models. Memory then stays at about one batch, however many images there are.

    Raises:
        ValueError: unknown or non-4-D layers, malformed batches, no images, too many images, features beyond
            the float16 range when caching, ``cache_dir`` without ``cache_key``, or an unusable device.
        ExtractionCancelled: ``cancel`` asked to stop; nothing is written to the cache.

    Examples::

        images = kcore.data.sample_images(200)
        pair = kcore.extract_features(a.model, "layer2", b.model, "layer2", images)
        res = kcore.fit(pair.x_a, pair.x_b)
    """
    _check_hookable(model_a, "model_a")
    _check_hookable(model_b, "model_b")
    validate_layer(model_a, layer_a)
    validate_layer(model_b, layer_b)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}. Fix: e.g. batch_size=64.")
    dev = resolve_device(device)
    entry: Path | None = None
    if cache_dir is not None:
        if cache_key is None:
            raise ValueError(
                "cache_dir is given but cache_key is None: the cache needs to know which checkpoints, images and "
                "transform the features come from. Fix: pass cache_key=CacheKey(checkpoint_a=loaded_a.sha256, "
                "checkpoint_b=loaded_b.sha256, image_set=image_set_hash(ids), transform='...'), or cache_dir=None."
            )
        entry = cache_entry_dir(cache_dir, cache_key, layer_a, layer_b, cache_key_extra)
        if (entry / "meta.json").is_file():
            return read_entry(entry)
    if ctx is not None and ctx.distributed:
        if entry is None:
            raise ValueError(
                f"extraction shared by {ctx.world_size} ranks needs cache_dir: each rank writes its part of the float16 "
                "cache there and rank 0 assembles it. Fix: pass cache_dir (--cache-dir) on a folder every rank can see."
            )
        return _extract_sharded(
            entry, ctx, model_a, layer_a, model_b, layer_b, images, ids, batch_size=batch_size, device=dev,
            transform_a=transform_a, transform_b=transform_b, progress=progress, cancel=cancel,
        )
    batches, n_total, given_ids = _batches(images, batch_size, ids)
    if n_images is not None:
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"n_images must be a positive integer or None; got {n_images!r}.")
        if n_total is not None and n_images != n_total:
            raise ValueError(f"n_images={n_images} but images holds {n_total} images. Fix: drop n_images.")
        n_total = n_images
    tmp: Path | None = None
    if entry is not None:
        tmp = start_entry(entry)
    sinks: tuple[_MemorySink | ArrayWriter, _MemorySink | ArrayWriter] | None = None
    try:
        got = _gather(model_a, layer_a, model_b, layer_b, batches, dev, n_total, tmp,
                      transform_a=transform_a, transform_b=transform_b, progress=progress, cancel=cancel)
        sinks, done, labels, has_labels, batch_ids = got.sinks, got.done, got.labels, got.has_labels, got.ids
        if sinks is None or done == 0:
            raise ValueError("images yielded no images. Fix: check the data set or loader is not empty.")
        if n_total is not None and done != n_total:
            raise ValueError(f"images yielded {done} images but {n_total} were announced (n_images or len(dataset)).")
        image_ids = _resolve_ids(given_ids, batch_ids, done)
        label_tensor = torch.tensor(labels, dtype=torch.int64) if has_labels and labels else None
        x_a, x_b = sinks[0].finish(), sinks[1].finish()
        if tmp is None or entry is None:
            return FeaturePair(x_a, x_b, layer_a, layer_b, image_ids, label_tensor)  # type: ignore[arg-type]
        finish_entry(tmp, entry, sinks[0].shape, sinks[1].shape, layer_a, layer_b, image_ids, label_tensor)
        tmp = None
        return read_entry(entry)
    finally:
        if tmp is not None:
            for sink in sinks or ():
                sink.close()
            discard_entry(tmp)


@dataclass
class _Gathered:
    """What :func:`_gather` collected: the two feature sinks, the image count, labels and ids."""

    sinks: tuple[_MemorySink | ArrayWriter, _MemorySink | ArrayWriter] | None
    done: int
    labels: list[int]
    has_labels: bool
    ids: list[str]


def _gather(model_a: nn.Module, layer_a: str, model_b: nn.Module, layer_b: str, batches: Iterable[_Batch],
            dev: torch.device, n_total: int | None, tmp: Path | None, *, transform_a: BatchTransform | None,
            transform_b: BatchTransform | None, progress: Progress | None, cancel: Cancel | None) -> _Gathered:
    """Run both models batch by batch and write each layer's features to a sink (memory, or ``tmp`` on disk).

    The models run on ``dev`` in eval mode (channels-last on the CPU) and are given back as they were. On an
    error the sinks of a disk entry are closed before it is raised (the caller discards ``tmp``).
    """
    same = model_a is model_b and transform_a is transform_b
    sinks: tuple[_MemorySink | ArrayWriter, _MemorySink | ArrayWriter] | None = None
    try:
        with _on_device(model_a, dev), _on_device(model_b, dev), _eval_mode(model_a), _eval_mode(model_b), \
                _channels_last(model_a, dev) as cl_a, _channels_last(model_b, dev) as cl_b:
            layout = {"a": cl_a, "b": cl_b}  # (one model for both: only "a" is used)
            labels: list[int] = []  # plain ints: a small tensor kept per batch pins freed batch buffers in the heap
            has_labels = True
            batch_ids: list[str] = []
            done = 0
            # after a full first forward pass per model, later ones stop once the captured layers have run, when
            # each of them ran exactly once (the layers above them do not change the features)
            truncate: dict[str, bool] = {}

            def features(model: nn.Module, x: Tensor, layers: list[str], key: str) -> dict[str, Tensor]:
                calls: dict[str, int] | None = None if key in truncate else {}
                if layout[key] and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                outs = run_capture(model, x, layers, require_spatial=True, stop_early=truncate.get(key, False),
                                   calls=calls)
                if calls is not None:
                    truncate[key] = all(calls.get(name, 0) == 1 for name in layers)
                return outs

            for batch in batches:
                if _is_cancelled(cancel):
                    raise ExtractionCancelled(f"feature extraction cancelled after {done} images")
                x = batch.x.to(dev)
                xa = x.to(_module_dtype(model_a))
                if same:
                    outs = features(model_a, transform_a(xa) if transform_a else xa, [layer_a, layer_b], "a")
                    feat_a, feat_b = outs[layer_a], outs[layer_b]
                else:
                    feat_a = features(model_a, transform_a(xa) if transform_a else xa, [layer_a], "a")[layer_a]
                    xb = x.to(_module_dtype(model_b))
                    feat_b = features(model_b, transform_b(xb) if transform_b else xb, [layer_b], "b")[layer_b]
                if feat_a.shape[0] != x.shape[0] or feat_b.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"layers must keep the batch dimension: {x.shape[0]} images gave {layer_a!r} "
                        f"{tuple(feat_a.shape)} and {layer_b!r} {tuple(feat_b.shape)}."
                    )
                if sinks is None:
                    sinks = (
                        _sink(tmp, n_total, tuple(feat_a.shape[1:]), "x_a"),
                        _sink(tmp, n_total, tuple(feat_b.shape[1:]), "x_b"),
                    )
                _store(sinks[0], n_total, done, feat_a, layer_a)
                _store(sinks[1], n_total, done, feat_b, layer_b)
                del feat_a, feat_b
                if batch.labels is None:
                    has_labels = False
                elif has_labels:
                    labels.extend(batch.labels.tolist())
                if batch.ids is not None:
                    batch_ids.extend(batch.ids)
                done += x.shape[0]
                if progress is not None:
                    progress(done, n_total)
    except BaseException:
        if tmp is not None:
            for sink in sinks or ():
                sink.close()
        raise
    return _Gathered(sinks, done, labels, has_labels, batch_ids)


def _extract_sharded(
    entry: Path,
    ctx: Context,
    model_a: nn.Module,
    layer_a: str,
    model_b: nn.Module,
    layer_b: str,
    images: object,
    ids: Sequence[str] | None,
    **options: Any,
) -> FeaturePair:
    """This rank's shard of the images into its part of ``entry``; rank 0 assembles; all open the entry."""
    from torch.utils.data import Dataset, Subset

    from kcore import distributed as kd

    if kd.broadcast_object((entry / "meta.json").is_file(), 0, ctx):  # rank 0's view decides for everyone
        return read_entry(entry)
    if isinstance(images, Tensor):
        n = int(images.shape[0])
    elif isinstance(images, Dataset) and hasattr(images, "__len__"):
        n = len(images)  # type: ignore[arg-type]
    else:
        raise ValueError(
            f"images must be a torch Dataset with a length or a tensor when {ctx.world_size} ranks share the "
            f"extraction (each rank takes its own images by index); got {type(images).__name__}. Fix: pass the "
            "Dataset rather than a DataLoader."
        )
    all_ids = [str(i) for i in (ids if ids is not None else getattr(images, "ids", None) or range(n))]
    if len(all_ids) != n:
        raise ValueError(f"ids has {len(all_ids)} entries but images holds {n}. Fix: give one id per image.")
    block = int(options["batch_size"])
    mine = kd.shard(n, block, ctx)
    n_parts = min(ctx.world_size, math.ceil(n / block))
    part_dirs = [
        cache_entry_dir(parts_dir(entry), part_key(entry, r, ctx.world_size), layer_a, layer_b) for r in range(n_parts)
    ]
    error: BaseException | None = None
    if mine:
        index = torch.as_tensor(mine, dtype=torch.long)
        subset = images[index] if isinstance(images, Tensor) else Subset(images, mine)  # type: ignore[arg-type]
        try:
            extract_features(
                model_a, layer_a, model_b, layer_b, subset, ids=[all_ids[i] for i in mine],
                cache_dir=parts_dir(entry), cache_key=part_key(entry, ctx.rank, ctx.world_size), **options,
            )
        except Exception as exc:  # noqa: BLE001 - raised below on this rank, after telling the others
            error = exc
    try:
        kd.agree(error is None, f"{type(error).__name__}: {error}", ctx)
    except kd.RankFailure:
        if error is not None:
            raise error from None
        raise
    kd.main_first(lambda: assemble_entry(entry, part_dirs, block), ctx)
    return read_entry(entry)


def _resolve_ids(given: Sequence[str] | None, from_batches: list[str], n: int) -> tuple[str, ...]:
    ids = [str(i) for i in given] if given is not None else (from_batches or [str(i) for i in range(n)])
    if len(ids) != n:
        raise ValueError(f"ids has {len(ids)} entries but {n} images were read. Fix: give one id per image.")
    return tuple(ids)
