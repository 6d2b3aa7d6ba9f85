"""Checkpoints + images → features → g_θ in one or both directions → a :class:`Comparison`, and run folders.

A → B (x = A's features, x* = B's) finds the **blind spots of A**: what B encodes that A cannot reconstruct.
B → A finds the **unreliable features of A**: what A encodes that B cannot reconstruct (Sec. 4.1, App. B).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from kcore import distributed as kd
from kcore._io import atomic_folder
from kcore._readback import Maybe
from kcore.baselines import BASELINE_KINDS, ChanceBaseline
from kcore.checkpoints import LoadedModel
from kcore.decompose import Decomposition
from kcore.devices import resolve_device
from kcore.feature_cache import CacheKey, cached_arrays, image_content_hash, image_set_hash
from kcore.feature_set import FeaturePair
from kcore.features import extract_features, validate_layer
from kcore.fit import PRESETS, FitConfig, FitResult, fit, make_config
from kcore.fit import check_report_lengths as fit_check_report
from kcore.metrics import VarianceReport
from kcore.preprocessing import Preprocessing, preprocessing_of
from kcore.provenance import versions

DIRECTIONS: dict[str, tuple[str, str, str]] = {
    "A_to_B": ("A", "B", "blind spots of A: what B encodes that A's feature cannot reconstruct"),
    "B_to_A": ("B", "A", "unreliable features of A: what A encodes that B's feature cannot reconstruct"),
}
RUN_FORMAT = "kcore-run/1"
HELDOUT_IMAGES_FILE = "heldout_images.npz"
"""Optional part of a run folder: the held-out input images (uint8 RGB), for overlays without the image set."""
MAX_STORED_IMAGES = 512
"""At most this many held-out input images are stored with a run."""


@dataclass(frozen=True)
class PipelineProgress:
    """What a pipeline progress callback receives."""

    stage: str  # "extract", "fit A_to_B", "fit B_to_A", "done"
    fraction: float  # of the whole run, in [0, 1]
    message: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """Which checkpoint produced a result (shown next to every result and written to provenance)."""

    name: str
    sha256: str
    kind: str
    architecture: str | None
    num_parameters: int
    test_accuracy: float | None
    layer: str
    path: str | None = None

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of the checkpoint's SHA-256."""
        return self.sha256[:12]

    @staticmethod
    def from_loaded(m: LoadedModel, layer: str, path: str | None = None) -> "ModelInfo":
        """The record of model ``m`` compared at ``layer`` (``path``: where it was read from)."""
        card = m.card
        return ModelInfo(
            name=m.name, sha256=m.sha256, kind=m.kind, architecture=card.architecture if card else None,
            num_parameters=m.num_parameters, test_accuracy=card.test_accuracy if card else None, layer=layer,
            path=path,
        )

    def label(self) -> str:
        """One line for people: name, short hash, layer, parameters and accuracy."""
        acc = f", acc {self.test_accuracy:.1%}" if self.test_accuracy is not None else ""
        return f"{self.name} [{self.short_hash}] · {self.layer} · {self.num_parameters:,} params{acc}"


@dataclass(frozen=True)
class DirectionResult:
    """g_θ fitted in one direction: ``source`` features reconstruct ``target`` features."""

    key: str
    source: str
    target: str
    meaning: str
    fit: FitResult


@dataclass(frozen=True, eq=False)
class Comparison:
    """Two networks compared at one layer each, in one or both directions.

    Attributes:
        a, b: the checkpoints (:class:`ModelInfo`).
        features: A's and B's features of the images (all images after :func:`compare`; only the
            held-out ones after :func:`read_run`).
        heldout_positions: positions in ``features`` of the held-out images (never used for fitting).
        directions: ``"A_to_B"`` and/or ``"B_to_A"`` → :class:`DirectionResult`.
        provenance: hashes, layers, image set, seed, preset, versions, device.
        baselines: chance-level references (:mod:`kcore.baselines`), kind → :class:`ChanceBaseline`.

    Examples::

        cmp = kcore.read_run("runs/ab")
        for key, d in cmp.directions.items():
            print(key, d.meaning, d.fit.heldout_report.instability)
    """

    a: ModelInfo
    b: ModelInfo
    features: FeaturePair
    heldout_positions: tuple[int, ...]
    directions: dict[str, DirectionResult]
    provenance: dict = field(default_factory=dict)
    baselines: dict[str, ChanceBaseline] = field(default_factory=dict)
    seed_spread: dict[str, dict] = field(default_factory=dict)

    @property
    def preset(self) -> str:
        """The fit preset that produced the numbers (the order split depends on it), or ``"unknown"``."""
        return str(self.provenance.get("preset") or "unknown")

    def pair(self, direction: str, positions: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """(x_src, x_tgt) float32 for ``direction`` at ``positions`` (default: the held-out images)."""
        _check_direction(direction, self.directions)
        pos = torch.as_tensor(list(self.heldout_positions if positions is None else positions), dtype=torch.long)
        xa, xb = self.features.x_a[pos].float(), self.features.x_b[pos].float()
        return (xa, xb) if direction == "A_to_B" else (xb, xa)

    def decompose(self, direction: str, positions: Sequence[int] | None = None) -> Decomposition:
        """The order-wise decomposition of ``direction`` for images at ``positions`` (default: held out)."""
        x_src, x_tgt = self.pair(direction, positions)
        return self.directions[direction].fit.decompose(x_src, x_tgt)

    def image_ids(self, positions: Sequence[int] | None = None) -> list[str]:
        """The ids of the images at ``positions`` (default: the held-out images)."""
        pos = self.heldout_positions if positions is None else positions
        return [self.features.image_ids[i] for i in pos]

    def metrics(self) -> dict:
        """The metrics.json content: per direction the held-out report, error, baseline and gates."""
        out: dict[str, Any] = {"format": RUN_FORMAT, "directions": {}}
        for key, d in self.directions.items():
            block = {
                "meaning": d.meaning,
                "source": d.source,
                "target": d.target,
                **d.fit.heldout_report.as_dict(),
                "heldout_error": d.fit.heldout_error,
                "baseline": d.fit.baseline.as_dict(),
                "gates": list(d.fit.gates),
                "best_epoch": d.fit.best_epoch,
                "fit_seconds": d.fit.seconds,
            }
            out["directions"][key] = block
        if len(self.directions) == 1:  # one direction: its block is also the top level
            (key, block), = out["directions"].items()
            out.update({k: v for k, v in block.items()})
            out["direction"] = key
        out["preset"] = self.preset
        out["baselines"] = {k: b.as_dict() for k, b in self.baselines.items()}
        out["seed_spread"] = self.seed_spread
        return out


def fit_message(direction: str, p: Any) -> str:
    """One line about a fit in progress: phase, epoch and step counts, monitor error, time left."""
    msg = f"g_θ {direction}: {p.phase} epoch {p.epoch}/{p.epochs}"
    if p.phase == "train":
        if p.steps:
            msg += f" (step {p.step}/{p.steps})"
        if p.monitor_error == p.monitor_error:  # not NaN
            msg += f", monitor error {p.monitor_error:.4f}"
        if p.eta == p.eta:
            msg += f", ETA {p.eta:.0f} s" + (" or sooner" if p.eta > 0 else "")
    return msg


def _check_direction(direction: str, available: dict) -> None:
    if direction not in available:
        raise ValueError(f"direction must be one of {sorted(available)}; got {direction!r}.")


def model_transform(card: Any, input_size: tuple[int, int] | None = None) -> Callable[[Tensor], Tensor]:
    """Per-model preprocessing of [0, 1] RGB batches (N, 3, H, W) as a model card states it: resize to the card's
    input size (else ``input_size``), normalise. For a loaded model use ``preprocessing_of(m).transform()``,
    which also knows torchvision's standard transforms and the user's overrides."""
    prep = Preprocessing.from_card(card)
    if prep.input_size is None and input_size is not None:
        prep = prep.with_overrides(input_size=input_size)
    return prep.transform()


def comparison_config(config: FitConfig | None = None, preset: str | None = None,
                      **overrides: Any) -> tuple[FitConfig, str | None]:
    """The :class:`FitConfig` a comparison fits with, and the preset name its provenance records.

    Args:
        config: a full :class:`FitConfig` (e.g. from :func:`kcore.fit.make_config`); then ``overrides`` must be empty.
        preset: the preset name to record (with ``config``) or to start from (without it; default ``"fast"``).
        **overrides: without ``config``: :class:`FitConfig` fields applied to the preset by :func:`make_config`
            (``None`` keeps the preset's value).

    Returns:
        ``(config, preset_name)``; ``preset_name`` is ``None`` for a ``config`` given without a name that equals
        no preset.

    Raises:
        TypeError: ``config`` is not a :class:`FitConfig`, or both ``config`` and ``overrides`` are given.
        ValueError: an unknown preset or fit option (:func:`make_config`).
    """
    if config is None:
        name = "fast" if preset is None else preset
        return make_config(name, **overrides), name
    if not isinstance(config, FitConfig):
        raise TypeError(f"config must be a kcore.FitConfig; got {type(config).__name__}. Fix: build it with "
                        "`from kcore.fit import make_config`; make_config(preset, orders=..., lam=..., epochs=...).")
    if overrides:
        raise TypeError(f"compare() got config and also the fit option(s) {sorted(overrides)}. Fix: put them in "
                        "the config (make_config(preset, ...) or dataclasses.replace(config, ...)), or drop config.")
    if preset is None:
        preset = next((k for k, v in PRESETS.items() if v == config), None)
    elif preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} (the name recorded with config); got {preset!r}.")
    return config, preset


def baseline_kinds(baselines: bool | Sequence[str], ctx: kd.Context) -> list[str]:
    """The chance baselines asked for (``True``: all of :data:`~kcore.baselines.BASELINE_KINDS`), checked.

    Raises:
        ValueError: an unknown kind, or baselines under torchrun.
    """
    kinds = list(BASELINE_KINDS) if baselines is True else list(baselines or [])
    bad = [k for k in kinds if k not in BASELINE_KINDS]
    if bad:
        raise ValueError(f"baselines must be True, False or kinds from {sorted(BASELINE_KINDS)}; got {bad}.")
    if kinds and ctx.distributed:
        raise ValueError("chance baselines are not run under torchrun. Fix: run `kcore fit --baselines` in one "
                         "process (on a subset of the images if needed), or drop --baselines.")
    return kinds


def preprocessing_desc(preps: tuple[Preprocessing, Preprocessing]) -> str:
    """A's and B's preprocessing as JSON text (what changes the features; part of the cache key and provenance)."""
    return json.dumps([_prep_desc(preps[0]), _prep_desc(preps[1])], sort_keys=True)


def feature_cache_key(a: LoadedModel, b: LoadedModel, images: Any, ids: Sequence[str], transform_desc: str) -> CacheKey:
    """The feature cache's key for A's and B's features of ``images`` (:mod:`kcore.feature_cache`).

    Keyed by the images' content (not their names), both checkpoints' loaded bytes, both preprocessings
    (``transform_desc``, :func:`preprocessing_desc`), the layers (added by :func:`kcore.features.extract_features`)
    and the cache format.
    """
    return CacheKey(a.sha256, b.sha256, image_content_hash(images, ids), transform_desc)


def extract_pair(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, images: Any, *, ids: Sequence[str],
                 preps: tuple[Preprocessing, Preprocessing], device: torch.device, batch_size: int = 64,
                 cache_dir: str | os.PathLike | None = None, cache_key: CacheKey | None = None,
                 progress: Callable[[int, int | None], None] | None = None, cancel: Any = None,
                 ctx: kd.Context | None = None, both_directions: bool = False) -> tuple[FeaturePair, tuple[Any, Any]]:
    """Extract A's and B's features of ``images`` and check that each can inform the other.

    Returns:
        ``(features, (x_a, x_b))``: the :class:`FeaturePair`, and the arrays the fits read (the float16 cache's
        :class:`~kcore.feature_cache.CachedArray` with ``cache_dir``, else the in-memory tensors).

    Raises:
        ValueError: features that are constant or not finite (:func:`kcore._validate.check_informative`).
    """
    from kcore._validate import check_informative

    feats = extract_features(
        a.model, layer_a, b.model, layer_b, images, batch_size=batch_size, device=device, ids=list(ids),
        transform_a=preps[0].transform(), transform_b=preps[1].transform(), cache_dir=cache_dir,
        cache_key=cache_key, progress=progress, cancel=cancel, ctx=ctx,
    )
    arrays = cached_arrays(feats) if feats.entry is not None else (feats.x_a, feats.x_b)
    check_informative(arrays[0], arrays[1], f"A's layer {layer_a!r} ({a.name})", f"B's layer {layer_b!r} ({b.name})")
    if both_directions:
        check_informative(arrays[1], arrays[0], f"B's layer {layer_b!r} ({b.name})", f"A's layer {layer_a!r} ({a.name})")
    return feats, arrays


def compare(
    a: LoadedModel,
    layer_a: str,
    b: LoadedModel,
    layer_b: str,
    images: Any,
    config: FitConfig | None = None,
    *,
    preset: str | None = None,
    device: str | torch.device | None = "auto",
    both_directions: bool = False,
    batch_size: int = 64,
    cache_dir: str | os.PathLike | None = None,
    image_source: str = "",
    progress: Callable[[PipelineProgress], None] | None = None,
    cancel: Any = None,
    paths: tuple[str | None, str | None] = (None, None),
    ctx: kd.Context | None = None,
    baselines: bool | Sequence[str] = False,
    fit_seeds: int = 1,
    **overrides: Any,
) -> Comparison:
    """Extract both layers' features for ``images`` and fit g_θ A → B (and B → A with ``both_directions``).

    The steps: :func:`comparison_config`, :func:`feature_cache_key` (with ``cache_dir``), :func:`extract_pair`, then
    :func:`kcore.fit` per direction (and per chance baseline and seed).

    Args:
        a, b: loaded checkpoints (:func:`kcore.checkpoints.load_model`).
        layer_a, layer_b: module names with 4-D outputs (:func:`kcore.features.list_layers`).
        images: a ``torch.utils.data.Dataset`` of ``(image (3, H, W) float in [0, 1], label)`` with an
            ``ids`` attribute (see :mod:`kcore.data`); each model's card resizes and normalises it.
        config: the :class:`FitConfig` of every fit (:func:`kcore.fit.make_config`); its ``seed`` seeds the
            split, and ``seed+1 …`` the extra seeds. Default: ``preset`` with ``overrides``.
        preset: the preset's name, recorded in provenance (with ``config``: default the preset it equals, if any);
            without ``config``, the preset to start from (default ``"fast"``).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` for extraction and fitting.
        both_directions: also fit B → A (unreliable features of A).
        batch_size: images per extraction batch (the fit's batch is ``config.batch_size``).
        cache_dir: optional float16 on-disk feature cache.
        image_source: a description of where the images came from (for provenance).
        progress, cancel: as in :func:`kcore.fit`; progress gets :class:`PipelineProgress`.
        paths: the checkpoint paths, if any (for provenance).
        ctx: a torchrun job (:func:`kcore.distributed.init`) to share the work with: each rank extracts its
            shard of the images into ``cache_dir`` (required, a folder every rank sees) and the fits run with
            DistributedDataParallel. Every rank returns the same comparison; only rank 0 should write it.
        baselines: also fit the chance-level references (:mod:`kcore.baselines`): ``True`` for all of
            :data:`~kcore.baselines.BASELINE_KINDS`, or a list of kinds. A ``random_b`` that cannot be built
            (no architecture) is left out, with the reason in ``provenance["baselines_skipped"]``.
        fit_seeds: with N > 1, also refit every direction with seeds ``seed+1 … seed+N−1`` and keep the spread
            of instability and of the order split (:func:`kcore.baselines.seed_spread`) in ``seed_spread``.
        **overrides: without ``config`` only: :class:`FitConfig` fields for :func:`make_config`, e.g.
            ``orders=1, epochs=2, seed=3`` (a shorthand for ``config=make_config(preset, ...)``).

    With ``cache_dir`` the fits read their batches from the float16 cache as they go (memory bounded,
    whatever the number of images); without it the features are held in memory as float32.

    Returns:
        A :class:`Comparison`.

    Raises:
        TypeError: ``config`` not a :class:`FitConfig`, or given together with ``overrides``.
        ValueError: an unknown layer, preset, fit option or baseline kind, ``fit_seeds`` below 1, or features
            that cannot inform each other.

    Examples::

        a = kcore.load_model("sample_models/kshapes_tinynet_s0.safetensors")
        b = kcore.load_model("sample_models/kshapes_resnet_s0.safetensors")
        from kcore.fit import make_config

        cfg = make_config("fast", orders=2)
        cmp = kcore.compare(a, "block2", b, "layer2", kcore.data.sample_images(300), cfg, both_directions=True)
        cmp.directions["A_to_B"].fit.heldout_report.instability
        kcore.write_run(cmp, "runs/tiny_vs_resnet")
    """
    validate_layer(a.model, layer_a)
    validate_layer(b.model, layer_b)
    cfg, preset_name = comparison_config(config, preset, **overrides)
    seed = cfg.seed
    ctx = ctx or kd.Context()
    dev = ctx.device if ctx.distributed else resolve_device(device)
    report = progress or (lambda p: None)
    ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
    n = len(ids)
    preps = (preprocessing_of(a), preprocessing_of(b))
    transform_desc = preprocessing_desc(preps)
    key = feature_cache_key(a, b, images, ids, transform_desc) if cache_dir else None
    kinds = baseline_kinds(baselines, ctx)
    if isinstance(fit_seeds, bool) or not isinstance(fit_seeds, int) or fit_seeds < 1:
        raise ValueError(f"fit_seeds must be a positive integer (1 = one fit); got {fit_seeds!r}.")
    n_fits = (2 if both_directions else 1) * (len(kinds) + fit_seeds)
    share = 0.3  # of the progress bar for extraction

    def on_extract(done: int, total: int | None) -> None:
        report(PipelineProgress("extract", share * done / max(total or n, 1), f"features: {done}/{total or n} images"))

    report(PipelineProgress("extract", 0.0, f"extracting {layer_a} of A and {layer_b} of B for {n} images"))
    feats, arrays = extract_pair(
        a, layer_a, b, layer_b, images, ids=ids, preps=preps, device=dev, batch_size=batch_size,
        cache_dir=cache_dir, cache_key=key, progress=on_extract, cancel=cancel, ctx=ctx,
        both_directions=both_directions,
    )
    results: dict[str, DirectionResult] = {}
    keys = ["A_to_B", "B_to_A"] if both_directions else ["A_to_B"]
    for i, dkey in enumerate(keys):
        src, tgt, meaning = DIRECTIONS[dkey]
        x_src, x_tgt = arrays if dkey == "A_to_B" else arrays[::-1]
        base = share + (1 - share) * i / n_fits

        def on_fit(p, base=base, dkey=dkey):
            report(PipelineProgress(f"fit {dkey}", base + (1 - share) / n_fits * p.fraction, fit_message(dkey, p)))

        res = fit(x_src, x_tgt, config=cfg, device=dev, progress=on_fit, cancel=cancel, ctx=ctx)
        results[dkey] = DirectionResult(dkey, src, tgt, meaning, res)
    refs, skipped = {}, {}
    done = len(keys)
    for kind in kinds:
        def on_base(dkey, p, kind=kind, base=share + (1 - share) * done / n_fits):
            report(PipelineProgress(f"baseline {kind}", base + (1 - share) / n_fits * p.fraction,
                                    f"chance baseline ({kind}) {dkey}: {p.phase} epoch {p.epoch}/{p.epochs}"))

        from kcore import baselines as _bl

        if kind == "shuffled":
            refs[kind] = _bl.shuffled_baseline(feats.x_a, feats.x_b, keys, cfg, seed=seed, device=dev, cancel=cancel,
                                               on_fit=on_base)
        else:
            try:
                report(PipelineProgress(f"baseline {kind}", share + (1 - share) * done / n_fits,
                                        f"features of a randomly initialised B for {n} images"))
                refs[kind] = _bl.random_network_baseline(
                    feats.x_a, b, layer_b, images, keys, cfg, seed=seed, device=dev, batch_size=batch_size, ids=ids,
                    cancel=cancel, on_fit=on_base)
            except ValueError as exc:
                skipped[kind] = str(exc)
        done += len(keys)
    spread: dict[str, dict] = {}
    if fit_seeds > 1:
        from kcore.baselines import seed_spread

        extra = list(range(seed + 1, seed + fit_seeds))
        for dkey in keys:
            x_src, x_tgt = arrays if dkey == "A_to_B" else arrays[::-1]
            reps = [results[dkey].fit.heldout_report]
            for s in extra:
                base = share + (1 - share) * done / n_fits

                def on_seed(p, base=base, s=s, dkey=dkey):
                    report(PipelineProgress(f"seed {s}", base + (1 - share) / n_fits * p.fraction,
                                            f"g_θ {dkey}, seed {s}: {p.phase} epoch {p.epoch}/{p.epochs}"))

                r = fit(x_src, x_tgt, config=dataclasses.replace(cfg, seed=s), device=dev, progress=on_seed,
                        cancel=cancel, ctx=ctx)
                reps.append(r.heldout_report)
                done += 1
            spread[dkey] = seed_spread(reps, [seed] + extra)
    held = tuple(results["A_to_B"].fit.heldout_indices)
    info_a = ModelInfo.from_loaded(a, layer_a, paths[0])
    info_b = ModelInfo.from_loaded(b, layer_b, paths[1])
    prov = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_a": dataclasses.asdict(info_a),
        "checkpoint_b": dataclasses.asdict(info_b),
        "layers": {"A": layer_a, "B": layer_b},
        "feature_shapes": {"A": list(feats.x_a.shape[1:]), "B": list(feats.x_b.shape[1:])},
        "images": {"n": n, "source": image_source, "ids_sha256": image_set_hash(ids), "transform": transform_desc},
        "preprocessing": {"A": preps[0].as_dict(), "B": preps[1].as_dict()},
        "seed": seed,
        "preset": preset_name,
        "config": dataclasses.asdict(cfg),
        "device": str(dev),
        "world_size": ctx.world_size,
        "hosts": kd.hosts(ctx),
        "versions": versions(),
        "command": " ".join(sys.argv) if sys.argv else "",
    }
    if skipped:
        prov["baselines_skipped"] = skipped
    report(PipelineProgress("done", 1.0, "done"))
    return Comparison(info_a, info_b, feats, held, results, prov, refs, spread)


def _prep_desc(prep: Preprocessing) -> dict:
    """What changes the features (the cache key); the source is words only."""
    return {k: v for k, v in prep.as_dict().items() if k != "source"}


# ------------------------------------------------------------------------------------------------ run folders
def heldout_images(comparison: Comparison, images: Any, limit: int = MAX_STORED_IMAGES) -> dict[str, np.ndarray]:
    """The first ``limit`` held-out input images of ``comparison`` as uint8 ``(H, W, 3)`` RGB, id → image.

    ``images`` is the image set the comparison was made on; without a ``raw(i)`` method (e.g. a plain
    dataset of tensors) there is nothing to store and the result is empty.
    """
    raw = getattr(images, "raw", None)
    if raw is None:
        return {}
    ids = comparison.features.image_ids
    return {ids[p]: np.asarray(raw(p)) for p in comparison.heldout_positions[:limit]}


HELDOUT_IMAGES_MAX_BYTES = 512 * 2**20
"""Largest ``heldout_images.npz`` once decompressed (its ids and images together; the file itself is capped at the
same size): :data:`MAX_STORED_IMAGES` images of up to about 580 × 580 RGB. :func:`write_run` stores only as many
held-out images as fit, and :func:`read_heldout_images` refuses a larger file from the headers, before
decompressing anything."""


def _write_heldout_images(folder: Path, raw: Mapping[str, np.ndarray]) -> None:
    """Store the held-out input images (one size only) as ``heldout_images.npz``, as many as fit the read cap."""
    arrays = list(raw.values())
    if not arrays or len({a.shape for a in arrays}) != 1:  # only images of one size are stored
        return
    ids = list(raw)
    per_image = arrays[0].nbytes + 4 * max(len(i) for i in ids)
    keep = min(len(arrays), (HELDOUT_IMAGES_MAX_BYTES - 1024) // max(per_image, 1))
    if keep < 1:
        return
    np.savez_compressed(folder / HELDOUT_IMAGES_FILE, ids=np.asarray(ids[:keep]), images=np.stack(arrays[:keep]))


def _npy_header(zf: Any, info: Any, folder: Path) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of one ``.npy`` member of an npz, from its header alone (nothing else is inflated)."""
    from numpy.lib import format as npy

    from kcore import _readback as rb

    with zf.open(info) as fh:
        try:
            version = npy.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = npy.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = npy.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise rb.folder_error(folder, HELDOUT_IMAGES_FILE, f"has a member {info.filename!r} that is not a "
                                                               f".npy array ({str(exc)[:120]})") from None
    return tuple(int(v) for v in shape), dtype


def read_heldout_images(run_dir: str | os.PathLike, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The held-out input images stored in a run folder (id → uint8 RGB), or ``{}`` if it has none.

    The file is read like an upload: a regular file inside the folder (no symlink, FIFO or device), at most
    ``max_bytes`` on disk, and its members' sizes are read from the zip and ``.npy`` headers first: a file that
    would inflate past ``max_bytes`` is refused before anything is decompressed. Pickled arrays are never loaded.

    Args:
        run_dir: the run folder.
        max_bytes: the cap on the file and on its decompressed arrays (default :data:`HELDOUT_IMAGES_MAX_BYTES`).

    Returns:
        Held-out image id → ``(H, W, 3)`` uint8 RGB image, in the stored order.

    Raises:
        ValueError: the file is unsafe, larger than the cap (on disk or decompressed), or not the ids and images
            :func:`write_run` stores; the message names the file, the sizes and the fix.
    """
    import io
    import math
    import zipfile

    from kcore import _readback as rb

    d, cap = Path(run_dir), HELDOUT_IMAGES_MAX_BYTES if max_bytes is None else int(max_bytes)
    if not os.path.lexists(d / HELDOUT_IMAGES_FILE):
        return {}
    data = rb.read_bytes(d, HELDOUT_IMAGES_FILE, cap)
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"is not an npz archive ({str(exc)[:120]})") from None
    with zf:
        infos = {i.filename: i for i in zf.infolist()}
        if sorted(infos) != ["ids.npy", "images.npy"]:
            raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"holds {sorted(infos)[:6]}; expected exactly the "
                                                          "arrays 'ids' and 'images'")
        heads = {name[:-4]: _npy_header(zf, info, d) for name, info in infos.items()}
        declared = sum(max(math.prod(shape) * dt.itemsize, infos[f"{k}.npy"].file_size)
                       for k, (shape, dt) in heads.items())
        if declared > cap:
            raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"would inflate to {declared} bytes ("
                                  f"{declared / 2**20:.0f} MiB), more than the limit of {cap} bytes "
                                  f"({cap / 2**20:.0f} MiB); nothing was decompressed")
        (ids_shape, ids_dt), (img_shape, img_dt) = heads["ids"], heads["images"]
        if ids_dt.kind != "U" or len(ids_shape) != 1:
            raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"holds 'ids' of dtype {ids_dt} and shape {ids_shape}; "
                                                          "expected a 1-D array of strings")
        if img_dt != np.uint8 or len(img_shape) != 4 or img_shape[3] != 3 or img_shape[0] != ids_shape[0]:
            raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"holds 'images' of dtype {img_dt} and shape {img_shape}; "
                                  f"expected uint8 RGB images of shape ({ids_shape[0]}, H, W, 3), one per id")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            ids, images = z["ids"], z["images"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise rb.folder_error(d, HELDOUT_IMAGES_FILE, f"is truncated or corrupt ({str(exc)[:160]})") from None
    return {str(i): a for i, a in zip(ids, images)}


def write_run(comparison: Comparison, out_dir: str | os.PathLike, *, overwrite: bool = False,
              images: Any = None) -> Path:
    """Write a run folder atomically (a temporary sibling, then one rename).

    Contents: ``metrics.json``, ``config.json``, ``provenance.json``, ``images.json`` (held-out ids and
    labels), ``features_heldout.safetensors`` (A's and B's held-out features, so the maps can be redrawn
    without the checkpoints), one ``g_<direction>/`` folder per direction (:meth:`FitResult.save`) and, when
    ``images`` (the image set of :func:`compare`, or a ready id → image mapping) is given,
    ``heldout_images.npz`` with up to :data:`MAX_STORED_IMAGES` held-out input images for the overlays.

    Raises:
        ValueError: ``out_dir`` exists and ``overwrite`` is False.

    Examples::

        kcore.write_run(kcore.compare(a, "block2", b, "layer2", images), "runs/ab")
    """
    from safetensors.torch import save_file

    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        pos = torch.as_tensor(comparison.heldout_positions, dtype=torch.long)
        save_file(
            {"x_a": comparison.features.x_a[pos].float().contiguous(), "x_b": comparison.features.x_b[pos].float().contiguous()},
            str(tmp / "features_heldout.safetensors"),
        )
        labels = comparison.features.labels
        listing = {
            "ids": comparison.image_ids(),
            "labels": labels[pos].tolist() if labels is not None else None,
            "heldout_of_all": list(comparison.heldout_positions),
        }
        (tmp / "images.json").write_text(json.dumps(listing, indent=1))
        for key, d in comparison.directions.items():
            d.fit.save(tmp / f"g_{key}")
        (tmp / "metrics.json").write_text(json.dumps(comparison.metrics(), indent=1))
        cfg = comparison.provenance.get("config", {})
        (tmp / "config.json").write_text(json.dumps({
            "directions": list(comparison.directions), "layer_a": comparison.a.layer, "layer_b": comparison.b.layer,
            "fit": cfg,
        }, indent=1))
        (tmp / "provenance.json").write_text(json.dumps(comparison.provenance, indent=1, default=str))
        if images is not None:
            raw = images if isinstance(images, Mapping) else heldout_images(comparison, images)
            _write_heldout_images(tmp, raw)
    return Path(out_dir)


_STATS = {"mean": float, "sd": float, "min": float, "max": float}
# Named outside the dict[...] below: a linter reads string keys inside a subscript as type names.
_BASELINE = {"kind": str, "description": str | None, "seed": int | None,
             "directions": dict[str, VarianceReport] | None, "extra": dict | None}
_SPREAD = {"seeds": tuple[int, ...], "summary": {
    "instability": _STATS, "share_orders": tuple[_STATS, ...], "share_residual": Maybe(_STATS),
    "var_ratio_orders": tuple[_STATS, ...]}}
RUN_JSON_FIELDS: dict[str, dict[str, Any]] = {
    "provenance.json": {"checkpoint_a": ModelInfo, "checkpoint_b": ModelInfo, "layers": {"A": str, "B": str},
                        "preset": str | None},
    "images.json": {"ids": tuple[str, ...], "labels": tuple[int, ...] | None,
                    "heldout_of_all": tuple[int, ...] | None},
    "metrics.json": {
        "baselines": Maybe(dict[str, _BASELINE]),
        "seed_spread": Maybe(dict[str, _SPREAD]),
    },
}
"""The fields of a run folder's JSON files that :func:`read_run` uses, with the types :func:`write_run` writes."""


def read_run(run_dir: str | os.PathLike) -> Comparison:
    """Re-open a run folder written by :func:`write_run` (weights-only: JSON and safetensors), checked field by field.

    Every file is read like an upload (:mod:`kcore._readback`): a regular file inside the folder (no symlink, FIFO
    or device), under a size cap; every JSON field has the type it was written with; the held-out features and
    g_θ's weights are finite and agree in channels, map size and number of images.

    Args:
        run_dir: the run folder (``kcore fit --out``).

    Returns:
        The :class:`Comparison`, with the held-out images' features only.

    Raises:
        ValueError: not a run folder, or a file unsafe, too large, truncated, edited or inconsistent; the message
            names the file and the field, and the fix.

    Examples::

        cmp = kcore.read_run("runs/tiny_vs_resnet")     # a folder written by `kcore fit` or write_run
        dec = cmp.decompose("A_to_B")                    # held-out images: x^(0) … x^(K), x^Δ, x*
    """
    from kcore import _readback as rb

    d = Path(run_dir)
    needed = ["metrics.json", "provenance.json", "images.json", "features_heldout.safetensors"]
    missing = [n for n in needed if not os.path.lexists(d / n)]
    if missing:
        raise ValueError(f"{str(d)!r} is not a kcore run folder: missing {missing}. Fix: pick a folder written by `kcore fit --out`.")
    js = {}
    for name, fields in RUN_JSON_FIELDS.items():
        js[name] = rb.read_json(d, name)
        rb.check_fields(js[name], fields, d, name)
    prov, imgs, metrics = js["provenance.json"], js["images.json"], js["metrics.json"]
    for key in ("checkpoint_a", "checkpoint_b"):
        rb.check_finite({f"{key}.test_accuracy": prov[key].get("test_accuracy")}, d, "provenance.json")
    n = len(imgs["ids"])
    if n == 0:
        raise rb.folder_error(d, "images.json", "has field 'ids' empty; expected the held-out images' ids")
    rb.check_length(imgs.get("labels"), n, d, "images.json", "labels", f"one per id, {n} ids")
    if any(not -2**63 <= v < 2**63 for v in imgs.get("labels") or ()):
        raise rb.folder_error(d, "images.json", "has field 'labels' with a value outside the 64-bit integers")
    t = rb.read_safetensors(d, "features_heldout.safetensors")
    feats_name = "features_heldout.safetensors"
    for key in ("x_a", "x_b"):
        x = t.get(key)
        if x is None or x.dim() != 4 or not x.is_floating_point() or x.shape[0] != n or min(x.shape) == 0:
            got = "nothing" if x is None else f"{x.dtype} of shape {tuple(x.shape)}"
            raise rb.folder_error(d, feats_name, f"holds {got} as {key!r}; expected a floating-point (N, C, H, W) "
                                                 f"tensor with N = {n} (the ids of images.json)")
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise rb.folder_error(d, feats_name, f"holds {bad} NaN/Inf value(s) of {x.numel()} in {key!r}; "
                                                 "expected finite features")
    labels = torch.tensor(imgs["labels"]) if imgs.get("labels") is not None else None
    feats = FeaturePair(t["x_a"], t["x_b"], prov["layers"]["A"], prov["layers"]["B"], tuple(imgs["ids"]), labels)
    results = {}
    for key, (src, tgt, meaning) in DIRECTIONS.items():
        if not os.path.lexists(d / f"g_{key}"):
            continue
        res = FitResult.load(f"g_{key}", root=d)
        x_src, x_tgt = (feats.x_a, feats.x_b) if key == "A_to_B" else (feats.x_b, feats.x_a)
        spec, size = res.model.spec, tuple(res.norm.target_size)
        if (spec.in_channels, spec.out_channels, size) != (x_src.shape[1], x_tgt.shape[1], tuple(x_tgt.shape[2:])):
            raise rb.folder_error(d, f"g_{key}/fit.json", f"has spec in_channels={spec.in_channels}, out_channels="
                                  f"{spec.out_channels}, target_size={list(size)}, but {feats_name} holds "
                                  f"{src}'s {x_src.shape[1]} and {tgt}'s {x_tgt.shape[1]} channels of "
                                  f"{tuple(x_tgt.shape[2:])} maps; the two files come from different runs")
        if not res.heldout_report.has_shares:  # a run written before the additive shares: recompute them
            res = dataclasses.replace(res, heldout_report=res.report(x_src.float(), x_tgt.float()))
        results[key] = DirectionResult(key, src, tgt, meaning, res)
    if not results:
        raise rb.folder_error(d, "g_A_to_B/", "is missing, and so is g_B_to_A/: the folder holds no fitted g_θ")
    ks = {k: r.fit.model.spec for k, r in results.items()}
    for kind, block in (metrics.get("baselines") or {}).items():
        for key, rep in (block.get("directions") or {}).items():
            if key in ks:
                fit_check_report(rep, ks[key].orders, ks[key].out_channels, d, "metrics.json",
                                 f"baselines.{kind}.directions.{key}")
    try:
        a, b = ModelInfo(**prov["checkpoint_a"]), ModelInfo(**prov["checkpoint_b"])
    except TypeError as exc:
        raise rb.folder_error(d, "provenance.json", f"has an invalid checkpoint entry ({str(exc)[:200]})") from None
    try:
        refs = {k: ChanceBaseline.from_dict(v) for k, v in (metrics.get("baselines") or {}).items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise rb.folder_error(d, "metrics.json", f"has an invalid field 'baselines' ({type(exc).__name__}: "
                                                 f"{str(exc)[:200]})") from None
    return Comparison(a, b, feats, tuple(range(n)), results, prov, refs, dict(metrics.get("seed_spread") or {}))
