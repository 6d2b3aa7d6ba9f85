"""Checkpoints + images → features → g_θ in one or both directions → a :class:`~kcore.comparison.Comparison`.

A → B (x = A's features, x* = B's) finds the **blind spots of A**: what B encodes that A cannot reconstruct.
B → A finds the **unreliable features of A**: what A encodes that B cannot reconstruct (Sec. 4.1, App. B).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore.baselines import BASELINE_KINDS
from kcore.checkpoints import LoadedModel
from kcore.comparison import (  # noqa: F401  (re-exported: the result types are part of this module's face)
    DIRECTIONS,
    RUN_FORMAT,
    Comparison,
    DirectionResult,
    ModelInfo,
    PipelineProgress,
)
from kcore.devices import resolve_device
from kcore.feature_cache import CacheKey, cached_arrays, image_content_hash, image_set_hash
from kcore.feature_set import FeaturePair
from kcore.features import extract_features, validate_layer
from kcore.fit import PRESETS, FitConfig, fit, make_config
from kcore.groups import as_groups, groups_provenance
from kcore.preprocessing import Preprocessing, preprocessing_of
from kcore.progress import Eta
from kcore.provenance import kcore_command, versions
from kcore.reproduce import fit_request
from kcore.run_folder import (  # noqa: F401  (re-exported: run folders were written and read from here)
    HELDOUT_IMAGES_FILE,
    HELDOUT_IMAGES_MAX_BYTES,
    MAX_STORED_IMAGES,
    RUN_JSON_FIELDS,
    _write_heldout_images,
    heldout_images,
    read_heldout_images,
    read_run,
    update_run_baselines,
    write_run,
)


def fit_message(direction: str, p: Any, eta: Eta | None = None) -> str:
    """One line about a fit in progress: phase, epoch and step counts, monitor error, and the time left (``eta``,
    measured by :func:`kcore.progress.eta_range`; nothing is said before it is measured)."""
    msg = f"g_θ {direction}: {p.phase} epoch {p.epoch}/{p.epochs}"
    if p.phase == "train":
        if p.steps:
            msg += f" (step {p.step}/{p.steps})"
        if p.monitor_error == p.monitor_error:  # not NaN
            msg += f", monitor error {p.monitor_error:.4f}"
    if eta is not None and p.phase != "done":
        msg += f", ETA {eta.span()}"
    return msg


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


def given_pair(features: FeaturePair, a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str,
               ids: Sequence[str], *, both_directions: bool = False) -> tuple[FeaturePair, tuple[Any, Any]]:
    """Check features extracted elsewhere (:func:`compare`'s ``features``) as :func:`extract_pair` checks its own.

    Returns:
        ``(features, (x_a, x_b))``.

    Raises:
        TypeError: ``features`` is not a :class:`FeaturePair`.
        ValueError: other layers or images than the comparison's, or features that cannot inform each other.
    """
    from kcore._validate import check_informative

    if not isinstance(features, FeaturePair):
        raise TypeError(f"features must be a kcore FeaturePair; got {type(features).__name__}. Fix: pass the "
                        "result of kcore.extract_features (or leave features out to extract here).")
    got = (features.layer_a, features.layer_b, list(features.image_ids))
    if got != (layer_a, layer_b, list(ids)):
        raise ValueError(f"features must be of layers ({layer_a!r}, {layer_b!r}) for the {len(ids)} images given; "
                         f"got layers ({features.layer_a!r}, {features.layer_b!r}) for {features.n_images} images. "
                         "Fix: extract the same layers of the same images, or leave features out.")
    arrays = cached_arrays(features) if features.entry is not None else (features.x_a, features.x_b)
    check_informative(arrays[0], arrays[1], f"A's layer {layer_a!r} ({a.name})", f"B's layer {layer_b!r} ({b.name})")
    if both_directions:
        check_informative(arrays[1], arrays[0], f"B's layer {layer_b!r} ({b.name})", f"A's layer {layer_a!r} ({a.name})")
    return features, arrays


def pipeline_stages(directions: Sequence[str], extra_seeds: Sequence[int] = (),
                    kinds: Sequence[str] = ()) -> tuple[str, ...]:
    """The stages of a comparison in the order they run: what "stage i of n" counts in its progress.

    Args:
        directions: ``"A_to_B"`` and/or ``"B_to_A"``.
        extra_seeds: the seeds refitted after the first (``fit_seeds``).
        kinds: the chance baselines (:data:`~kcore.baselines.BASELINE_KINDS`).

    Returns:
        ``("extract", "fit A_to_B", …, "seed 1 A_to_B", …, "baseline random_b A_to_B", …)``.
    """
    return ("extract", *(f"fit {k}" for k in directions), *(f"seed {s} {k}" for k in directions for s in extra_seeds),
            *(f"baseline {kind} {k}" for kind in kinds for k in directions))


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
    features: FeaturePair | None = None,
    **overrides: Any,
) -> Comparison:
    """Extract both layers' features for ``images``, fit g_θ A → B (and B → A with ``both_directions``), and the
    chance baselines asked for.

    Two steps, each usable on its own: :func:`compare_fit` (the comparison without baselines, complete: write it
    with :func:`write_run` at once), then :func:`add_baselines` (a new comparison with them; add them to the run
    folder with :func:`kcore.run_folder.update_run_baselines`).

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
        progress: gets a :class:`PipelineProgress` per report: the stage (:func:`pipeline_stages`), its own
            fraction, "stage i of n" and the time left as a range. cancel: as in :func:`kcore.fit`.
        paths: the checkpoint paths, if any (for provenance).
        ctx: a torchrun job (:func:`kcore.distributed.init`) to share the work with: each rank extracts its
            shard of the images into ``cache_dir`` (required, a folder every rank sees) and the fits run with
            DistributedDataParallel. Every rank returns the same comparison; only rank 0 should write it.
        baselines: also fit the chance-level references (:mod:`kcore.baselines`): ``True`` for all of
            :data:`~kcore.baselines.BASELINE_KINDS`, or a list of kinds. A ``random_b`` that cannot be built
            (a TorchScript archive) is left out, with the reason in ``provenance["baselines_skipped"]``; a
            baseline that fails (any other error, e.g. a random B that did not change) is left out too, with
            ``"ErrorType: message"`` in ``provenance["baselines_failed"]``: the main fit is never lost to it.
        fit_seeds: with N > 1, also refit every direction with seeds ``seed+1 … seed+N−1`` and keep the spread
            of instability and of the order split (:func:`kcore.baselines.seed_spread`) in ``seed_spread``.
        features: A's ``layer_a`` and B's ``layer_b`` features of ``images``, already extracted (e.g. by
            :func:`kcore.sweep.sweep`, which captures many layers in one pass): then nothing is extracted here.
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
    comp = compare_fit(
        a, layer_a, b, layer_b, images, config, preset=preset, device=device, both_directions=both_directions,
        batch_size=batch_size, cache_dir=cache_dir, image_source=image_source, progress=progress, cancel=cancel,
        paths=paths, ctx=ctx, baselines=baselines, fit_seeds=fit_seeds, features=features, **overrides,
    )
    if comp.provenance.get("baselines_pending"):
        comp = add_baselines(comp, b, images, batch_size=batch_size, progress=progress, cancel=cancel)
    return comp


def compare_fit(
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
    features: FeaturePair | None = None,
    **overrides: Any,
) -> Comparison:
    """The first step of :func:`compare`: extract, fit every direction (and seed); the chance baselines are only
    planned.

    The steps: :func:`comparison_config`, :func:`feature_cache_key` (with ``cache_dir``), :func:`extract_pair`, then
    :func:`kcore.fit` per direction and seed. The result is complete without its baselines (write it with
    :func:`write_run` at once); ``baselines`` are checked here and named in ``provenance["baselines_pending"]``
    (with the extraction's seconds in ``provenance["extract_seconds"]``, which bound the time a random B's takes),
    for :func:`add_baselines`, and counted in the progress's stages.

    Args:
        a, b, layer_a, layer_b, images, config, preset, device, both_directions, batch_size, cache_dir,
        image_source, progress, cancel, paths, ctx, fit_seeds, features, overrides: as in :func:`compare`.
        baselines: the chance baselines to plan (:func:`add_baselines` fits them).

    Returns:
        A :class:`Comparison` without baselines.

    Raises:
        TypeError, ValueError: as :func:`compare`.
    """
    import time

    from kcore.progress import StageClock

    validate_layer(a.model, layer_a)
    validate_layer(b.model, layer_b)
    cfg, preset_name = comparison_config(config, preset, **overrides)
    seed = cfg.seed
    ctx = ctx or kd.Context()
    dev = ctx.device if ctx.distributed else resolve_device(device)
    ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
    n = len(ids)
    groups = as_groups(getattr(images, "groups", None), n, "images.groups")  # no group is split, intervals resample them
    preps = (preprocessing_of(a), preprocessing_of(b))
    transform_desc = preprocessing_desc(preps)
    key = feature_cache_key(a, b, images, ids, transform_desc) if cache_dir else None
    kinds = baseline_kinds(baselines, ctx)
    if isinstance(fit_seeds, bool) or not isinstance(fit_seeds, int) or fit_seeds < 1:
        raise ValueError(f"fit_seeds must be a positive integer (1 = one fit); got {fit_seeds!r}.")
    keys = ["A_to_B", "B_to_A"] if both_directions else ["A_to_B"]
    extra = list(range(seed + 1, seed + fit_seeds))
    clock = StageClock(pipeline_stages(keys, extra, kinds), progress)

    def on_extract(done: int, total: int | None) -> None:
        clock.tell("extract", done / max(total or n, 1), f"features: {done}/{total or n} images")

    t_extract = time.perf_counter()
    if features is not None:
        feats, arrays = given_pair(features, a, layer_a, b, layer_b, ids, both_directions=both_directions)
    else:
        clock.tell("extract", 0.0, f"extracting {layer_a} of A and {layer_b} of B for {n} images")
        feats, arrays = extract_pair(
            a, layer_a, b, layer_b, images, ids=ids, preps=preps, device=dev, batch_size=batch_size,
            cache_dir=cache_dir, cache_key=key, progress=on_extract, cancel=cancel, ctx=ctx,
            both_directions=both_directions,
        )
    extract_seconds = time.perf_counter() - t_extract
    clock.extract_seconds = extract_seconds
    results: dict[str, DirectionResult] = {}
    for dkey in keys:
        src, tgt, meaning = DIRECTIONS[dkey]
        x_src, x_tgt = arrays if dkey == "A_to_B" else arrays[::-1]
        on_fit = clock.fit_progress(f"fit {dkey}", lambda p, eta, dkey=dkey: fit_message(dkey, p, eta))
        res = fit(x_src, x_tgt, config=cfg, device=dev, progress=on_fit, cancel=cancel, ctx=ctx, groups=groups)
        results[dkey] = DirectionResult(dkey, src, tgt, meaning, res)
    spread: dict[str, dict] = {}
    if extra:
        from kcore.baselines import seed_spread

        for dkey in keys:
            x_src, x_tgt = arrays if dkey == "A_to_B" else arrays[::-1]
            reps = [results[dkey].fit.heldout_report]
            for s in extra:
                on_seed = clock.fit_progress(f"seed {s} {dkey}",
                                             lambda p, eta, s=s, dkey=dkey: fit_message(f"{dkey}, seed {s}", p, eta))
                r = fit(x_src, x_tgt, config=dataclasses.replace(cfg, seed=s), device=dev, progress=on_seed,
                        cancel=cancel, ctx=ctx, groups=groups)
                reps.append(r.heldout_report)
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
        "groups": groups_provenance(groups, n, _split_of(results["A_to_B"].fit)),
        "seed": seed,
        "preset": preset_name,
        "config": dataclasses.asdict(cfg),
        "device": str(dev),
        "world_size": ctx.world_size,
        "hosts": kd.hosts(ctx),
        "versions": versions(),
        "command": kcore_command(),
        "request": fit_request(a, b, images, paths=paths, device=dev, both_directions=both_directions, baselines=kinds,
                               fit_seeds=fit_seeds, batch_size=batch_size, cache_dir=cache_dir,
                               world_size=ctx.world_size),
    }
    if kinds:
        prov["baselines_pending"] = kinds
        prov["extract_seconds"] = round(extract_seconds, 3)
    else:
        clock.tell("done", 1.0, "done")
    return Comparison(info_a, info_b, feats, held, results, prov, {}, spread)


def add_baselines(comparison: Comparison, b: LoadedModel | None, images: Any, kinds: bool | Sequence[str] | None = None,
                  *, device: str | torch.device | None = None, batch_size: int = 64,
                  progress: Callable[[PipelineProgress], None] | None = None, cancel: Any = None) -> Comparison:
    """The second step of :func:`compare`: fit the chance baselines of ``comparison`` and return a new comparison
    with them (``comparison`` itself is not changed).

    Each baseline is its own stage (:func:`pipeline_stages`) with its own progress and time left. A ``random_b``
    that cannot be built is left out with the reason in ``provenance["baselines_skipped"]``; a baseline that fails
    is left out with ``"ErrorType: message"`` in ``provenance["baselines_failed"]``; ``baselines_pending`` is
    removed.

    Args:
        comparison: the result of :func:`compare_fit` (all images' features; a run folder holds only the held-out
            ones and cannot take baselines).
        b: network B as loaded for the comparison (its random re-initialisation is ``random_b``); may be None
            without ``random_b``.
        images: the images of the comparison (``random_b`` extracts a random B's features of them).
        kinds: the baselines to fit (``True``: all; default: those :func:`compare_fit` planned).
        device: where to fit (default: the comparison's device).
        batch_size: images per extraction batch.
        progress, cancel: as in :func:`compare`.

    Returns:
        A new :class:`Comparison` with ``baselines`` filled (``dataclasses.replace``).

    Raises:
        ValueError: an unknown kind; a comparison without all images' features (read from a run folder); a ``b``
            other than the comparison's B (by hash), or none for ``random_b``.
        kcore.fit.FitCancelled, kcore.features.ExtractionCancelled: ``cancel`` asked to stop.
    """
    from kcore import baselines as _bl
    from kcore.features import ExtractionCancelled
    from kcore.fit import FitCancelled
    from kcore.progress import StageClock

    prov = dict(comparison.provenance)
    asked = prov.get("baselines_pending", []) if kinds is None else kinds
    kinds = baseline_kinds(asked, kd.Context())
    n = int((prov.get("images") or {}).get("n", -1))
    if comparison.features.n_images != n:
        raise ValueError(f"comparison must hold all {n} images' features (the result of compare_fit) to fit chance "
                         f"baselines on the same split; got {comparison.features.n_images} images' features (a run "
                         "folder keeps only the held-out ones). Fix: run compare(..., baselines=True) on the images.")
    if "random_b" in kinds:
        if b is None or getattr(b, "sha256", None) != comparison.b.sha256:
            got = "None" if b is None else f"{getattr(b, 'name', '?')} [{str(getattr(b, 'sha256', ''))[:12]}]"
            raise ValueError(f"b must be the comparison's network B ({comparison.b.name} "
                             f"[{comparison.b.short_hash}]) for the random_b baseline; got {got}. Fix: pass the "
                             "LoadedModel compare_fit was given as b.")
    cfg = FitConfig(**prov["config"])
    seed = cfg.seed
    dev = resolve_device(device if device is not None else prov.get("device", "auto"))
    keys = list(comparison.directions)
    ids = list(comparison.features.image_ids)
    seeds = sorted({s for sp in comparison.seed_spread.values() for s in sp.get("seeds", ())} - {seed})
    clock = StageClock(pipeline_stages(keys, seeds, kinds), progress, extract_seconds=prov.get("extract_seconds"))
    for d in comparison.directions.values():
        f = d.fit
        clock.add_fit(f.seconds, f.seconds - sum(r.seconds for r in f.history), f.steps_run, f.steps_planned,
                      tail_exact=False)  # set-up and evaluation together: an upper bound of the evaluation
    feats = comparison.features
    groups = as_groups(getattr(images, "groups", None), n, "images.groups")  # split and intervals as the main fit's
    refs, skipped, failed = dict(comparison.baselines), {}, {}
    stage_fits: dict[str, Callable[[Any], None]] = {}  # one progress callback per (kind, direction) stage
    for kind in kinds:
        def on_base(dkey, p, kind=kind):
            stage = f"baseline {kind} {dkey}"
            if stage not in stage_fits:
                label = f"{dkey}, chance baseline {_bl.BASELINE_LABELS.get(kind, kind)}"
                stage_fits[stage] = clock.fit_progress(stage, lambda q, eta, label=label: fit_message(label, q, eta))
            stage_fits[stage](p)

        try:  # a failing baseline never loses the finished fit: its error is recorded, the others still run
            if kind == "shuffled":
                refs[kind] = _bl.shuffled_baseline(feats.x_a, feats.x_b, keys, cfg, seed=seed, device=dev,
                                                   cancel=cancel, on_fit=on_base, groups=groups)
            else:
                clock.tell(f"baseline {kind} {keys[0]}", 0.0, f"features of a randomly initialised B for {n} images")
                refs[kind] = _bl.random_network_baseline(
                    feats.x_a, b, comparison.b.layer, images, keys, cfg, seed=seed, device=dev, batch_size=batch_size,
                    ids=ids, cancel=cancel, on_fit=on_base, groups=groups)
        except (ExtractionCancelled, FitCancelled):
            raise
        except _bl.BaselineUnavailable as exc:
            skipped[kind] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of a baseline is reported, never fatal to the fit
            failed[kind] = f"{type(exc).__name__}: {exc}"
    prov.pop("baselines_pending", None)
    if skipped:
        prov["baselines_skipped"] = {**prov.get("baselines_skipped", {}), **skipped}
    if failed:
        prov["baselines_failed"] = {**prov.get("baselines_failed", {}), **failed}
    clock.tell("done", 1.0, "done")
    return dataclasses.replace(comparison, provenance=prov, baselines=refs)


def _split_of(res: Any) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A fit's (train, monitor, held-out) image indices."""
    return res.train_indices, res.monitor_indices, res.heldout_indices


def _prep_desc(prep: Preprocessing) -> dict:
    """What changes the features (the cache key); the source is words only."""
    return {k: v for k, v in prep.as_dict().items() if k != "source"}

