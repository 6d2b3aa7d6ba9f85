"""A layer-by-layer sweep: compare two networks at several depths, with one feature extraction per network.

Each network runs once over the images with every chosen layer captured in the same forward pass
(:func:`extract_layers`); every matched pair of layers is then fitted by :func:`kcore.pipeline.compare` on those
features (its ``features`` argument), so a sweep's pair gives exactly what a separate comparison of that pair
gives. :func:`write_sweep` writes one run folder per pair (every dashboard page opens it) with ``sweep.json`` and
``sweep.csv`` beside them; :func:`comparison_rows` turns any comparison into the rows the depth plot
(:mod:`kcore.viz.depth`) draws, so the same plot compares saved runs side by side (:func:`run_differences` says
where their settings differ).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor, nn

from kcore import distributed as kd
from kcore.checkpoints import LoadedModel
from kcore.comparison import Comparison, ModelInfo, PipelineProgress
from kcore.devices import resolve_device
from kcore.feature_cache import image_set_hash
from kcore.feature_set import FeaturePair
from kcore.features import (
    ExtractionCancelled,
    _batches,
    _is_cancelled,
    _MemorySink,
    _store,
    run_capture,
)
from kcore.fit import FitConfig
from kcore.layers import (
    _channels_last,
    _check_hookable,
    _eval_mode,
    _module_dtype,
    _on_device,
    list_layers,
    validate_layer,
)
from kcore.provenance import kcore_command, versions

PairMode = Literal["diagonal", "all"]
PAIR_MODES: dict[str, str] = {
    "diagonal": "the i-th layer of A with the i-th layer of B (the lists must be equally long)",
    "all": "every layer of A with every layer of B",
}
SWEEP_FORMAT = "kcore-sweep/1"
#: the folder of each pair's run folder inside a sweep folder
PAIRS_DIR = "pairs"


# --------------------------------------------------------------------------------------------------
# Which layers
# --------------------------------------------------------------------------------------------------


def network_stages(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224), *,
                   layers: Sequence[Any] | None = None) -> list[str]:
    """The stages of a network, shallow to deep: its top-level blocks whose output is a feature map.

    A stage is a direct child of ``model`` that holds modules of its own (a block, not a single convolution or
    activation) and outputs (N, C, H, W): torchvision's ResNets give ``layer1 … layer4``, the sample
    ``kc_resnet`` ``stem, layer1, layer2, layer3`` and ``kc_tinynet`` ``block1, block2, block3``. A network with
    fewer than two such blocks (e.g. a VGG's single ``features``) gives its top-level layers with a feature map.

    Args:
        model: the network (not TorchScript).
        input_size: ``(C, H, W)`` of one input image (for the dry run of :func:`kcore.layers.list_layers`).
        layers: the model's spatial layers already listed (``list_layers(model, input_size, spatial_only=True)``,
            :class:`~kcore.layers.LayerInfo` or names): then no dry run is needed.

    Returns:
        Module names in the order they run.

    Raises:
        ValueError: as :func:`kcore.layers.list_layers`; or no top-level layer outputs a feature map.
    """
    listed = list_layers(model, input_size, spatial_only=True) if layers is None else layers
    spatial = [getattr(info, "name", info) for info in listed]
    top = [n for n in spatial if "." not in n]
    modules = dict(model.named_modules())
    blocks = [n for n in top if any(True for _ in modules[n].children())]
    found = blocks if len(blocks) >= 2 else top
    if not found:
        raise ValueError(f"{type(model).__name__} has no top-level layer with a feature map (N, C, H, W), so it has "
                         "no stages to sweep. Fix: name the layers (layers_a/layers_b, or --layers-a/--layers-b); "
                         "kcore.features.list_layers(model, spatial_only=True) lists them.")
    return found


def stages_of(m: LoadedModel) -> list[str]:
    """:func:`network_stages` of a loaded checkpoint at its own input size (its preprocessing's, else 224 × 224)."""
    from kcore.preprocessing import preprocessing_of

    h, w = preprocessing_of(m).input_size or (224, 224)
    return network_stages(m.model, (3, int(h), int(w)))


def deepest_matched(layers_a: Sequence[str], layers_b: Sequence[str]) -> tuple[list[str], list[str]]:
    """Two stage lists cut to the same length by dropping the shallowest stages of the longer one.

    The deep ends are matched (the last stage of A with the last of B): e.g. ``kc_tinynet``'s
    ``block1, block2, block3`` against ``kc_resnet``'s ``stem, layer1, layer2, layer3`` gives ``layer1 … layer3``.
    """
    n = min(len(layers_a), len(layers_b))
    return list(layers_a[len(layers_a) - n:]), list(layers_b[len(layers_b) - n:])


def layer_pairs(layers_a: Sequence[str], layers_b: Sequence[str], pairs: PairMode = "diagonal") -> list[tuple[int, int]]:
    """The ``(i, j)`` positions of the pairs a sweep fits: A's ``layers_a[i]`` with B's ``layers_b[j]``.

    Raises:
        ValueError: an unknown ``pairs`` mode, an empty or repeated list, or (diagonal) lists of different lengths.
    """
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {sorted(PAIR_MODES)}; got {pairs!r}. Fix: 'diagonal' pairs the i-th "
                         "layers, 'all' every layer of A with every layer of B.")
    for name, layers in (("layers_a", layers_a), ("layers_b", layers_b)):
        if isinstance(layers, str) or not layers:
            raise ValueError(f"{name} must be a non-empty list of layer names; got {layers!r}. Fix: e.g. "
                             "['layer1', 'layer2'], or None for the network's stages.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"{name} names a layer twice: {list(layers)}. Fix: name each layer once.")
    if pairs == "diagonal":
        if len(layers_a) != len(layers_b):
            raise ValueError(f"pairs='diagonal' pairs the i-th layers, so layers_a and layers_b must be equally long; "
                             f"got {len(layers_a)} ({list(layers_a)}) and {len(layers_b)} ({list(layers_b)}). Fix: "
                             "name as many layers of each, or use pairs='all'.")
        return [(i, i) for i in range(len(layers_a))]
    return [(i, j) for i in range(len(layers_a)) for j in range(len(layers_b))]


# --------------------------------------------------------------------------------------------------
# One extraction per network
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LayerFeatures:
    """Several layers of one network captured in one pass over the images.

    Attributes:
        features: layer name → (N, C, H, W) float32 on the CPU.
        image_ids: one id per image. labels: (N,) int64, or None.
        forward_passes: forward passes the extraction ran (one per batch).
    """

    features: Mapping[str, Tensor]
    image_ids: tuple[str, ...]
    labels: Tensor | None
    forward_passes: int


def extract_layers(model: nn.Module, layers: Sequence[str], images: Any, *, transform: Callable | None = None,
                   batch_size: int = 64, device: str | torch.device | None = "auto", ids: Sequence[str] | None = None,
                   progress: Callable[[int, int | None], None] | None = None, cancel: Any = None) -> LayerFeatures:
    """Run ``model`` once over ``images`` and capture every layer of ``layers`` in the same forward passes.

    Batches, preprocessing, eval mode, channels-last layout on the CPU and the early stop once the deepest
    captured layer has run are those of :func:`kcore.features.extract_features`, so each layer's features equal
    what it extracts for that layer alone.

    Args:
        model: the network (not TorchScript).
        layers: module names with 4-D outputs.
        images: a Dataset of ``(image (3, H, W), label)``, an iterable of batches or a tensor (N, 3, H, W).
        transform: applied to each batch on the device before the model (its preprocessing).
        batch_size: images per forward pass. device: where to run.
        ids: one id per image (default the Dataset's ``ids``). progress: ``(done, total)`` after each batch.
        cancel: a ``threading.Event`` (or a function) checked before each batch.

    Returns:
        A :class:`LayerFeatures`.

    Raises:
        ValueError: an unknown layer or one without a 4-D output, malformed batches or no images.
        ExtractionCancelled: ``cancel`` was set.
    """
    _check_hookable(model)
    layers = list(dict.fromkeys(layers))
    for name in layers:
        validate_layer(model, name)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}. Fix: e.g. batch_size=64.")
    dev = resolve_device(device)
    batches, n_total, given_ids = _batches(images, batch_size, ids)
    sinks: dict[str, _MemorySink] = {}
    labels: list[int] = []
    has_labels, batch_ids, done, passes = True, [], 0, 0
    truncate: bool | None = None  # after one full pass: stop at the deepest captured layer when each ran once
    with _on_device(model, dev), _eval_mode(model), _channels_last(model, dev) as cl:
        for batch in batches:
            if _is_cancelled(cancel):
                raise ExtractionCancelled(f"feature extraction cancelled after {done} images")
            x = batch.x.to(dev).to(_module_dtype(model))
            x = transform(x) if transform else x
            if cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            calls: dict[str, int] | None = {} if truncate is None else None
            outs = run_capture(model, x, layers, require_spatial=True, stop_early=bool(truncate), calls=calls)
            passes += 1
            if calls is not None:
                truncate = all(calls.get(name, 0) == 1 for name in layers)
            for name in layers:
                if outs[name].shape[0] != x.shape[0]:
                    raise ValueError(f"layers must keep the batch dimension: {x.shape[0]} images gave {name!r} "
                                     f"{tuple(outs[name].shape)}.")
                sink = sinks.setdefault(name, _MemorySink(n_total, tuple(outs[name].shape[1:])))
                _store(sink, n_total, done, outs[name], name)
            del outs
            if batch.labels is None:
                has_labels = False
            elif has_labels:
                labels.extend(batch.labels.tolist())
            if batch.ids is not None:
                batch_ids.extend(batch.ids)
            done += int(x.shape[0])
            if progress is not None:
                progress(done, n_total)
    if done == 0:
        raise ValueError("images yielded no images. Fix: check the data set or loader is not empty.")
    if n_total is not None and done != n_total:
        raise ValueError(f"images yielded {done} images but {n_total} were announced (len(dataset)).")
    image_ids = [str(i) for i in given_ids] if given_ids is not None else (batch_ids or [str(i) for i in range(done)])
    if len(image_ids) != done:
        raise ValueError(f"ids has {len(image_ids)} entries but {done} images were read. Fix: give one id per image.")
    label_tensor = torch.tensor(labels, dtype=torch.int64) if has_labels and labels else None
    return LayerFeatures({name: s.finish() for name, s in sinks.items()}, tuple(image_ids), label_tensor, passes)


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SweepPair:
    """One pair of layers of a sweep and its comparison.

    Attributes:
        index: the pair's place in the sweep (0-based). depth_a, depth_b: the layers' places in A's and B's lists.
        layer_a, layer_b: the layers. comparison: what :func:`kcore.pipeline.compare` gives for them.
    """

    index: int
    depth_a: int
    depth_b: int
    layer_a: str
    layer_b: str
    comparison: Comparison

    @property
    def label(self) -> str:
        """``"layer_a ↔ layer_b"``, or one name when both layers are called the same."""
        return self.layer_a if self.layer_a == self.layer_b else f"{self.layer_a} ↔ {self.layer_b}"

    @property
    def folder_name(self) -> str:
        """The name of the pair's run folder inside the sweep folder, e.g. ``"00_layer1__layer1"``."""
        from kcore.export import slug

        return f"{self.index:02d}_{slug(self.layer_a)}__{slug(self.layer_b)}"


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Every pair of a sweep, in order, with the sweep's provenance.

    Attributes:
        a, b: the checkpoints (:class:`~kcore.comparison.ModelInfo`, their ``layer`` the first of their list).
        layers_a, layers_b: the layers swept. pairs: the :class:`SweepPair` results. mode: ``"diagonal"``/``"all"``.
        provenance: checkpoints, images, preset, config, extraction passes, versions, command, time.
    """

    a: ModelInfo
    b: ModelInfo
    layers_a: tuple[str, ...]
    layers_b: tuple[str, ...]
    pairs: tuple[SweepPair, ...]
    mode: str
    provenance: dict = field(default_factory=dict)

    def rows(self) -> list["SweepRow"]:
        """One :class:`SweepRow` per pair and direction, in sweep order (what ``sweep.csv`` holds)."""
        return [row for p in self.pairs for row in comparison_rows(p.comparison, p.label, p.index)]


def sweep(
    a: LoadedModel,
    layers_a: Sequence[str] | None,
    b: LoadedModel,
    layers_b: Sequence[str] | None,
    images: Any,
    config: FitConfig | None = None,
    *,
    pairs: PairMode = "diagonal",
    both_directions: bool = False,
    baselines: bool | Sequence[str] = False,
    preset: str | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 64,
    image_source: str = "",
    paths: tuple[str | None, str | None] = (None, None),
    progress: Callable[[PipelineProgress], None] | None = None,
    on_pair: Callable[[SweepPair], None] | None = None,
    cancel: Any = None,
    ctx: kd.Context | None = None,
    **overrides: Any,
) -> SweepResult:
    """Compare A and B layer by layer: one extraction per network, then one :func:`kcore.pipeline.compare` per pair.

    Args:
        a, b: loaded checkpoints (:func:`kcore.checkpoints.load_model`).
        layers_a, layers_b: the layers to sweep, shallow to deep; ``None``: the network's stages
            (:func:`stages_of`; both ``None`` with diagonal pairs: cut to one length by :func:`deepest_matched`).
        images: a Dataset of ``(image (3, H, W) in [0, 1], label)`` with ``ids`` (as for :func:`compare`).
        config, preset, overrides: the fit recipe of every pair, as for :func:`kcore.pipeline.compare`.
        pairs: ``"diagonal"`` (i-th with i-th) or ``"all"`` (every pair), see :data:`PAIR_MODES`.
        both_directions: also fit B → A for every pair. baselines: the chance baselines of every pair.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``. batch_size: images per extraction batch.
        image_source, paths: for provenance.
        progress: :class:`PipelineProgress` over the whole sweep (extraction, then each pair).
        on_pair: called with each :class:`SweepPair` as soon as it is fitted.
        cancel: a ``threading.Event`` checked between batches and epochs.
        ctx: a torchrun job: the pairs are dealt to the ranks (pair i to rank i mod R, each fitted in one
            process); every rank extracts the features itself and returns the whole result.

    Returns:
        A :class:`SweepResult`; pair i's comparison equals ``compare(a, layer_a_i, b, layer_b_i, images, config,
        ...)`` with the same settings.

    Raises:
        ValueError, TypeError: bad layers or pair mode, and whatever :func:`kcore.pipeline.compare` raises.
    """
    from kcore.pipeline import baseline_kinds, compare, comparison_config
    from kcore.preprocessing import preprocessing_of

    ctx = ctx or kd.Context()
    la = list(stages_of(a) if layers_a is None else layers_a)
    lb = list(stages_of(b) if layers_b is None else layers_b)
    if layers_a is None and layers_b is None and pairs == "diagonal":
        la, lb = deepest_matched(la, lb)
    plan = layer_pairs(la, lb, pairs)
    for name in la:
        validate_layer(a.model, name)
    for name in lb:
        validate_layer(b.model, name)
    cfg, preset_name = comparison_config(config, preset, **overrides)
    baseline_kinds(baselines, kd.Context())  # checked before any work (each pair runs in one process)
    dev = ctx.device if ctx.distributed else resolve_device(device)
    report = progress or (lambda p: None)
    ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
    n = len(ids)
    share = 0.2  # of the progress bar for the extraction
    used_a = [la[i] for i in sorted({i for i, _ in plan})]
    used_b = [lb[j] for j in sorted({j for _, j in plan})]
    preps = (preprocessing_of(a), preprocessing_of(b))

    def on_extract(which: int, done: int, total: int | None) -> None:
        frac = share * (which + done / max(total or n, 1)) / 2
        report(PipelineProgress("extract", frac, f"features of {'AB'[which]}: {done}/{total or n} images"))

    report(PipelineProgress("extract", 0.0, f"extracting {len(used_a)} layer(s) of A and {len(used_b)} of B "
                            f"for {n} images, one pass per network"))
    same = a.model is b.model and preps[0] == preps[1]
    feats_a = extract_layers(a.model, list(dict.fromkeys(used_a + (used_b if same else []))), images,
                             transform=preps[0].transform(), batch_size=batch_size, device=dev, ids=ids,
                             progress=lambda d, t: on_extract(0, d, t), cancel=cancel)
    feats_b = feats_a if same else extract_layers(
        b.model, used_b, images, transform=preps[1].transform(), batch_size=batch_size, device=dev, ids=ids,
        progress=lambda d, t: on_extract(1, d, t), cancel=cancel)
    items = list(enumerate(plan))

    def fit_pair(item: tuple[int, tuple[int, int]]) -> SweepPair:
        k, (i, j) = item
        base = share + (1 - share) * k / len(items)

        def on_fit(p: PipelineProgress) -> None:
            if p.stage != "done":
                report(PipelineProgress(f"pair {k + 1}/{len(items)} {p.stage}", base + (1 - share) / len(items) * p.fraction,
                                        f"{la[i]} ↔ {lb[j]} ({k + 1}/{len(items)}): {p.message}"))

        pair = FeaturePair(feats_a.features[la[i]], feats_b.features[lb[j]], la[i], lb[j], feats_a.image_ids,
                           feats_a.labels)
        comp = compare(a, la[i], b, lb[j], images, cfg, preset=preset_name, device=dev, both_directions=both_directions,
                       batch_size=batch_size, image_source=image_source, progress=on_fit, cancel=cancel, paths=paths,
                       baselines=baselines, features=pair)
        result = SweepPair(k, i, j, la[i], lb[j], comp)
        if on_pair is not None and not ctx.distributed:
            on_pair(result)
        return result

    done = kd.map_over_ranks(fit_pair, items, ctx)
    if on_pair is not None and ctx.distributed:
        for p in done:
            on_pair(p)
    prov = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_a": dataclasses.asdict(ModelInfo.from_loaded(a, la[0], paths[0])),
        "checkpoint_b": dataclasses.asdict(ModelInfo.from_loaded(b, lb[0], paths[1])),
        "layers": {"A": la, "B": lb},
        "pairs": pairs,
        "images": {"n": n, "source": image_source, "ids_sha256": image_set_hash(ids)},
        "preprocessing": {"A": preps[0].as_dict(), "B": preps[1].as_dict()},
        "preset": preset_name,
        "config": dataclasses.asdict(cfg),
        "both_directions": both_directions,
        "extraction": {"forward_passes": {"A": feats_a.forward_passes, "B": 0 if same else feats_b.forward_passes},
                       "batch_size": batch_size},
        "device": str(dev),
        "world_size": ctx.world_size,
        "versions": versions(),
        "command": kcore_command(),  # None when the dashboard or Python made it: then "reproduce" says how
    }
    if done:
        prov["reproduce"] = sweep_reproduction(prov, done[0].comparison)
    report(PipelineProgress("done", 1.0, "done"))
    return SweepResult(ModelInfo.from_loaded(a, la[0], paths[0]), ModelInfo.from_loaded(b, lb[0], paths[1]),
                       tuple(la), tuple(lb), tuple(done), pairs, prov)


def sweep_reproduction(provenance: Mapping[str, Any], first: Comparison, out: str | None = None) -> dict[str, Any]:
    """The ``reproduce`` entry of a sweep's provenance: the ``kcore sweep`` command and the Python snippet
    (:func:`kcore.reproduce.reproduce_sweep`), or ``{"error": ...}`` when the pair's provenance cannot be read.

    Args:
        provenance: the sweep's provenance (layers, pair mode, directions). first: any pair's comparison.
        out: the folder the command writes (default :data:`kcore.reproduce.DEFAULT_OUT`).
    """
    from kcore.reproduce import DEFAULT_OUT, reproduce_sweep

    try:
        return reproduce_sweep(provenance, first.provenance, out=out or DEFAULT_OUT).as_dict()
    except ValueError as exc:  # a foreign pair's provenance: the sweep stays usable without it
        return {"error": str(exc)}


# --------------------------------------------------------------------------------------------------
# Rows: what the table and the depth plot show, from a sweep or from any saved runs
# --------------------------------------------------------------------------------------------------

Interval = tuple[float, float]


@dataclass(frozen=True)
class SweepRow:
    """One direction of one comparison: its instability and additive shares with intervals, and the chance baselines.

    Attributes:
        position: the place on the x axis (a sweep's pair index, or a run's place in a list).
        label: what the x axis says there (layers, or a run's name).
        layer_a, layer_b: the layers compared. direction: ``"A_to_B"`` or ``"B_to_A"``.
        instability: Var(x^Δ)/Var(x*) on the held-out images; ``instability_ci`` its interval (``None``: none).
        share_orders: the additive shares of x⁽⁰⁾ … x⁽ᴷ⁾; ``share_orders_ci`` their intervals.
        share_residual: x^Δ's share; ``share_residual_ci`` its interval.
        baselines: chance baseline kind → ``(instability, interval or None)``.
        verdict: the verdict code against chance (:mod:`kcore.verdict`). preset: the fit preset.
        n_heldout: the held-out images the numbers rest on.
    """

    position: int
    label: str
    layer_a: str
    layer_b: str
    direction: str
    instability: float
    instability_ci: Interval | None
    share_orders: tuple[float, ...]
    share_orders_ci: tuple[Interval | None, ...]
    share_residual: float | None
    share_residual_ci: Interval | None
    baselines: Mapping[str, tuple[float, Interval | None]]
    verdict: str
    preset: str
    n_heldout: int

    def as_dict(self) -> dict[str, Any]:
        """The ``sweep.json`` form (intervals as two-element lists, ``None`` where there is none)."""
        out = dataclasses.asdict(self)
        out["baselines"] = {k: {"instability": v, "ci": None if iv is None else list(iv)}
                            for k, (v, iv) in self.baselines.items()}
        return json.loads(json.dumps(out))  # tuples → lists

    def as_csv_row(self, orders: int, kinds: Sequence[str]) -> dict[str, Any]:
        """One ``sweep.csv`` row: flat columns, empty where a number is missing (``orders``: the K of the table)."""
        row: dict[str, Any] = {"position": self.position, "label": self.label, "layer_a": self.layer_a,
                               "layer_b": self.layer_b, "direction": self.direction, "preset": self.preset,
                               "n_heldout": self.n_heldout}
        row.update(_value_cols("instability", self.instability, self.instability_ci))
        for k in range(orders + 1):
            has = k < len(self.share_orders)
            row.update(_value_cols(f"share_x{k}", self.share_orders[k] if has else None,
                                   self.share_orders_ci[k] if has else None))
        row.update(_value_cols("share_residual", self.share_residual, self.share_residual_ci))
        for kind in kinds:
            v, iv = self.baselines.get(kind, (None, None))
            row.update(_value_cols(f"chance_{kind}", v, iv))
        row["verdict"] = self.verdict
        return row


def _value_cols(name: str, value: float | None, iv: Interval | None) -> dict[str, Any]:
    return {name: "" if value is None else value, f"{name}_lo": "" if iv is None else iv[0],
            f"{name}_hi": "" if iv is None else iv[1]}


def comparison_rows(comparison: Comparison, label: str, position: int = 0) -> list[SweepRow]:
    """The :class:`SweepRow` of every direction of ``comparison``, placed at ``position`` with ``label``.

    Args:
        comparison: from :func:`kcore.pipeline.compare` or :func:`kcore.pipeline.read_run`.
        label: the x axis label (layers for a sweep, a name for a saved run).
        position: the place on the x axis.
    """
    rows = []
    for key, d in comparison.directions.items():
        rep = d.fit.heldout_report
        shares = tuple(rep.share_orders) if rep.share_orders is not None else ()
        refs = {}
        for kind, ref in comparison.baselines.items():
            r = ref.reports.get(key)
            if r is not None:
                refs[kind] = (float(r.instability), _iv(r.interval("instability")))
        rows.append(SweepRow(
            position=position, label=label, layer_a=comparison.a.layer, layer_b=comparison.b.layer, direction=key,
            instability=float(rep.instability), instability_ci=_iv(rep.interval("instability")),
            share_orders=shares, share_orders_ci=tuple(_iv(rep.interval(f"share_x{k}")) for k in range(len(shares))),
            share_residual=None if rep.share_residual is None else float(rep.share_residual),
            share_residual_ci=_iv(rep.interval("share_residual")), baselines=refs,
            verdict=comparison.verdict(key).code, preset=comparison.preset, n_heldout=int(rep.n_images),
        ))
    return rows


def _iv(iv: Any) -> Interval | None:
    return None if iv is None else (float(iv[0]), float(iv[1]))


def rows_table(rows: Sequence[SweepRow]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and flat rows of ``sweep.csv`` for ``rows`` (every order and chance baseline any row has)."""
    orders = max((len(r.share_orders) for r in rows), default=1) - 1
    kinds = sorted({k for r in rows for k in r.baselines})
    flat = [r.as_csv_row(max(orders, 0), kinds) for r in rows]
    columns = list(flat[0]) if flat else []
    return columns, flat


def rows_csv(rows: Sequence[SweepRow], provenance: Mapping[str, Any] | None = None) -> str:
    """``sweep.csv``'s text: ``# key: value`` provenance lines, then the table of :func:`rows_table`.

    ``pandas.read_csv(path, comment="#")`` reads the table back.
    """
    buf = io.StringIO()
    for key, value in (provenance or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        buf.write(f"# {key}: {' '.join(str(text).split())}\n")
    columns, flat = rows_table(rows)
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in flat:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buf.getvalue()


def csv_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The few provenance entries a CSV's header lines carry: time, command, checkpoints, images, preset, versions,
    and the `kcore sweep` command that recomputes the sweep (``reproduce``)."""
    keep = ("created", "command", "checkpoint_a", "checkpoint_b", "images", "preset", "config", "versions")
    reproduce = provenance.get("reproduce")
    out: dict[str, Any] = {}
    for k in keep:
        v = provenance.get(k)
        if isinstance(v, Mapping) and k.startswith("checkpoint"):
            v = {f: v.get(f) for f in ("name", "sha256", "architecture", "path")}
        if v is not None:
            out[k] = v
    if isinstance(reproduce, Mapping) and reproduce.get("cli"):
        out["reproduce"] = reproduce["cli"]
    return out


# --------------------------------------------------------------------------------------------------
# The sweep folder
# --------------------------------------------------------------------------------------------------


def write_sweep(result: SweepResult, out_dir: str | os.PathLike, *, overwrite: bool = False, images: Any = None) -> Path:
    """Write a sweep folder atomically: ``pairs/<NN>_<layer_a>__<layer_b>/`` run folders, ``sweep.json``, ``sweep.csv``.

    Each pair's folder is a run folder (:func:`kcore.run_folder.write_run`), so every page and
    :func:`kcore.read_run` opens it. ``sweep.json`` holds the format, the provenance, the pairs (layers, folder)
    and the rows (:class:`SweepRow`); ``sweep.csv`` the same rows flat with ``#`` provenance lines.

    Args:
        result: from :func:`sweep`. out_dir: the folder to write. overwrite: replace a kcore folder there.
        images: the sweep's image set, to store held-out input images in each run folder (for overlays).

    Returns:
        The folder written.

    Raises:
        ValueError: ``out_dir`` exists (without ``overwrite``) or may not be written (:func:`kcore._io.check_out_dir`).
    """
    from kcore._io import atomic_folder
    from kcore.run_folder import write_run

    with atomic_folder(out_dir, overwrite=overwrite, kind="study") as tmp:
        (tmp / PAIRS_DIR).mkdir()
        for p in result.pairs:
            write_run(p.comparison, tmp / PAIRS_DIR / p.folder_name, images=images)
        doc = sweep_document(result)
        if result.pairs:  # the command writes beside this folder, not over it
            doc["provenance"] = {**doc["provenance"], "reproduce": sweep_reproduction(
                result.provenance, result.pairs[0].comparison, f"{Path(out_dir).name}-reproduced")}
        (tmp / "sweep.json").write_text(json.dumps(doc, indent=1, default=str))
        (tmp / "sweep.csv").write_text(rows_csv(result.rows(), csv_provenance(doc["provenance"])))
    return Path(out_dir)


def sweep_document(result: SweepResult) -> dict[str, Any]:
    """``sweep.json``'s content: format, mode, layers, pairs (with their run folder), rows and provenance."""
    return {
        "format": SWEEP_FORMAT,
        "mode": result.mode,
        "layers": {"A": list(result.layers_a), "B": list(result.layers_b)},
        "pairs": [{"index": p.index, "layer_a": p.layer_a, "layer_b": p.layer_b, "depth_a": p.depth_a,
                   "depth_b": p.depth_b, "label": p.label, "folder": f"{PAIRS_DIR}/{p.folder_name}"}
                  for p in result.pairs],
        "rows": [r.as_dict() for r in result.rows()],
        "provenance": result.provenance,
    }


def rows_from_dicts(items: Sequence[Mapping[str, Any]]) -> list[SweepRow]:
    """The :class:`SweepRow` list of ``sweep.json``'s ``rows`` (:meth:`SweepRow.as_dict` read back).

    Raises:
        ValueError: a row without the fields of a :class:`SweepRow` or with numbers that are not finite.
    """
    out = []
    for i, d in enumerate(items):
        try:
            row = SweepRow(
                position=int(d["position"]), label=str(d["label"]), layer_a=str(d["layer_a"]),
                layer_b=str(d["layer_b"]), direction=str(d["direction"]), instability=float(d["instability"]),
                instability_ci=_iv(d["instability_ci"]), share_orders=tuple(float(v) for v in d["share_orders"]),
                share_orders_ci=tuple(_iv(v) for v in d["share_orders_ci"]),
                share_residual=None if d["share_residual"] is None else float(d["share_residual"]),
                share_residual_ci=_iv(d["share_residual_ci"]),
                baselines={str(k): (float(v["instability"]), _iv(v["ci"])) for k, v in d["baselines"].items()},
                verdict=str(d["verdict"]), preset=str(d["preset"]), n_heldout=int(d["n_heldout"]),
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ValueError(f"sweep.json row {i} is not a sweep row ({type(exc).__name__}: {exc}). Fix: rewrite the "
                             "sweep folder with this version of kcore (kcore sweep).") from None
        if not math.isfinite(row.instability):
            raise ValueError(f"sweep.json row {i}: instability must be a finite number; got {row.instability!r}.")
        out.append(row)
    return out


def read_sweep(folder: str | os.PathLike) -> tuple[list[SweepRow], dict[str, Any]]:
    """The rows and the ``sweep.json`` document of a sweep folder (:func:`write_sweep`).

    The file is read with kcore's size cap and checks of a run folder's JSON (:mod:`kcore._readback`).

    Raises:
        ValueError: no ``sweep.json``, another format, or rows that do not read back.
    """
    from kcore._readback import read_json

    d = Path(folder)
    doc = read_json(d, "sweep.json")
    if not isinstance(doc, dict) or doc.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{d / 'sweep.json'} is not a kcore sweep ({SWEEP_FORMAT}); got format "
                         f"{doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r}. "
                         "Fix: pick a folder written by `kcore sweep`.")
    return rows_from_dicts(doc.get("rows", [])), doc


# --------------------------------------------------------------------------------------------------
# Comparing saved runs
# --------------------------------------------------------------------------------------------------


def run_differences(comparisons: Mapping[str, Comparison]) -> list[str]:
    """Sentences naming the settings in which runs differ that change their numbers: the fit preset and recipe
    (the order split depends on it), each network's preprocessing, and the image set.

    Args:
        comparisons: a run's name → its comparison (e.g. :func:`kcore.pipeline.read_run`).

    Returns:
        One sentence per setting that differs (empty when the runs agree or there is one run).
    """
    if len(comparisons) < 2:
        return []

    def differ(what: Callable[[Comparison], Any]) -> dict[str, str] | None:
        seen = {name: json.dumps(what(c), sort_keys=True, default=str) for name, c in comparisons.items()}
        return seen if len(set(seen.values())) > 1 else None

    out = []
    presets = differ(lambda c: c.preset)
    if presets:
        out.append("the runs were fitted with different presets (" + ", ".join(
            f"{n}: {comparisons[n].preset}" for n in presets) + "): the order split depends on the recipe, so their "
            "shares are not comparable. Fix: refit with one preset.")
    elif differ(lambda c: {k: v for k, v in c.provenance.get("config", {}).items() if k not in ("seed", "budget")}):
        out.append("the runs were fitted with different fit settings (K, λ, epochs or convention). Fix: refit with "
                   "the same settings to compare their shares.")
    for side in ("A", "B"):
        if differ(lambda c, s=side: _prep_key(c.provenance.get("preprocessing", {}).get(s))):
            out.append(f"network {side}'s preprocessing differs between the runs (input size, mean or std): its "
                       "features are not the same. Fix: use the same preprocessing.")
    if differ(lambda c: c.provenance.get("images", {}).get("ids_sha256")):
        out.append("the runs were computed on different image sets. Fix: use the same images to compare them.")
    return out


def _prep_key(prep: Any) -> Any:
    return {k: v for k, v in prep.items() if k != "source"} if isinstance(prep, Mapping) else prep
