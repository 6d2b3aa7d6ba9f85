"""What the dashboard remembers: loaded models, the image set, finished runs (per browser session), caches.

Process-wide (``st.cache_resource``): loaded checkpoints keyed by their SHA-256 (or path and mtime), layer
listings, the bundled image set, and the :class:`~dashboard.jobs.JobRegistry`.
Per session (``st.session_state``): the chosen models and images, this session's jobs, its finished
runs (:class:`RunEntry`) and their decompositions, computed once per run and direction, so that changing
the image, channel or order never refits or re-extracts.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import streamlit as st

from dashboard.jobs import Job, JobRegistry
from kcore.cards import ModelCard
from kcore.checkpoints import LoadedModel, file_sha256, load_model
from kcore.decompose import Decomposition
from kcore.features import LayerInfo, list_layers

ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = Path(os.environ.get("KCORE_RUNS_DIR", ROOT / "runs" / "dashboard"))
"""Where finished fits are written as run folders (re-openable from the Fit page)."""
EXPORTS_DIR = Path(os.environ.get("KCORE_EXPORTS_DIR", ROOT / "runs" / "exports"))
"""Default folder for exports on the server."""
MAX_DECOMPOSE_BYTES = 256 * 1024**2
"""Held-out images decomposed for the views at most take this much memory (the rest are not shown)."""
MAX_STORED_IMAGES = 512
"""At most this many held-out input images are kept with a run for the overlays."""
HELDOUT_IMAGES_FILE = "heldout_images.npz"
"""The dashboard's addition to a run folder: the held-out input images (uint8 RGB) for overlays."""

DIRECTION_TITLES = {"A_to_B": "A → B", "B_to_A": "B → A"}
DIRECTION_HELP = {
    "A_to_B": "A's feature x reconstructs B's x*: x^Δ = blind spots of A (what B encodes and A misses)",
    "B_to_A": "B's feature x reconstructs A's x*: x^Δ = unreliable features of A (what only A encodes)",
}


# --------------------------------------------------------------------------------------------- registry
_STARTUP_FROZEN = False


def freeze_startup_objects() -> None:
    """Exempt what the imports created from garbage collection, once per server process.

    With torch, matplotlib and streamlit loaded the interpreter tracks ~500k objects, and a full collection,
    which Python starts on its own now and then, walks all of them: ~300 ms, landing in the middle of a
    redraw. These objects live as long as the process, so ``gc.freeze()`` (after one collection) moves them
    out of the collector's way; everything created later is collected as usual.
    """
    global _STARTUP_FROZEN
    if not _STARTUP_FROZEN:
        import gc

        import kcore.viz  # noqa: F401  (what the result pages import, frozen with the rest)

        gc.collect()
        gc.freeze()
        _STARTUP_FROZEN = True


@st.cache_resource(show_spinner=False)
def registry() -> JobRegistry:
    """The process-wide job registry (one per server)."""
    return JobRegistry()


def counters() -> dict[str, int]:
    """Per-session counts of expensive calls (shown in the Fit page's details; read by tests)."""
    return st.session_state.setdefault("kc_counters", {"fits_started": 0, "decompositions": 0})


# ----------------------------------------------------------------------------------------------- models
@dataclass(frozen=True, eq=False)
class ModelSlot:
    """Network A or B as chosen on the Models page.

    Attributes:
        loaded: the checkpoint (model, name, hash, card).
        source: how it was chosen: ``"sample"``, ``"upload"`` or ``"path"``.
        path: its file on the server (None for uploads).
        layers: the spatial layers with output shapes, for the picker.
        input_size: (C, H, W) the layers were listed at.
    """

    loaded: LoadedModel
    source: str
    path: str | None
    layers: tuple[LayerInfo, ...]
    input_size: tuple[int, int, int]

    @property
    def default_layer(self) -> str:
        names = [layer.name for layer in self.layers]
        card = self.loaded.card
        if card is not None and card.default_layer in names:
            return card.default_layer
        return names[len(names) // 2] if names else ""

    def shape_of(self, layer: str) -> tuple[int, ...] | None:
        return next((layer_.shape for layer_ in self.layers if layer_.name == layer), None)


def sample_models() -> dict[str, Path]:
    """The bundled sample checkpoints, name → path."""
    try:
        from kcore.pipeline import sample_model_paths

        paths = sample_model_paths()
        items = paths.items() if isinstance(paths, Mapping) else ((Path(p).stem, p) for p in paths)
        return {str(k): Path(v) for k, v in items}
    except ImportError:
        return {p.stem: p for p in sorted((ROOT / "sample_models").glob("*.safetensors"))}


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_path(path: str, mtime: float, arch: str | None, num_classes: int | None) -> LoadedModel:
    return load_model(path, arch=arch, num_classes=num_classes)


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_bytes(sha256: str, name: str, arch: str | None, num_classes: int | None, card_json: str | None,
                _data: bytes) -> LoadedModel:
    card = ModelCard.from_dict(json.loads(card_json), source="uploaded model card") if card_json else None
    # a full pickle is never accepted from the browser: trust_pickle stays False
    return load_model(_data, name=name, arch=arch, num_classes=num_classes, card=card, trust_pickle=False)


def load_path(path: str, arch: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a checkpoint from the server's disk (cached by path and modification time)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(p)!r} on the server. Fix: give the full path of an existing file.")
    return _load_path(str(p.resolve()), p.stat().st_mtime, arch, num_classes)


def load_bytes(data: bytes, name: str, arch: str | None = None, num_classes: int | None = None,
               card_json: str | None = None) -> LoadedModel:
    """Load uploaded checkpoint bytes (cached by their SHA-256)."""
    return _load_bytes(file_sha256(data), name, arch, num_classes, card_json, data)


@st.cache_resource(max_entries=16, show_spinner=False)
def _layers(sha256: str, key: str, input_size: tuple[int, int, int], _model: Any) -> tuple[LayerInfo, ...]:
    return tuple(list_layers(_model, input_size, spatial_only=True))


def make_slot(loaded: LoadedModel, source: str, path: str | None, image_size: tuple[int, int]) -> ModelSlot:
    """List the model's spatial layers at its card's input size (else the images' size)."""
    card = loaded.card
    hw = tuple(card.input_size) if card is not None and card.input_size else tuple(image_size)
    size = (3, int(hw[0]), int(hw[1]))
    key = f"{loaded.kind}:{card.architecture if card else ''}:{loaded.num_parameters}"
    return ModelSlot(loaded, source, path, _layers(loaded.sha256, key, size, loaded.model), size)


def slot(role: str) -> ModelSlot | None:
    """The chosen model ``"A"`` or ``"B"``."""
    return st.session_state.get(f"kc_slot_{role}")


def set_slot(role: str, value: ModelSlot) -> None:
    st.session_state[f"kc_slot_{role}"] = value


# ----------------------------------------------------------------------------------------------- images
@dataclass(frozen=True, eq=False)
class ImageChoice:
    """The images to compare on.

    Attributes:
        images: a dataset of ``(image (3, H, W) in [0, 1], label)`` with ``ids`` and ``raw(i)``.
        description: where they came from (for provenance).
        kind: ``"bundled"``, ``"upload"`` or ``"folder"``.
    """

    images: Any
    description: str
    kind: str

    @property
    def n(self) -> int:
        return len(self.images)


def _unit_preprocess(size: tuple[int, int]) -> Any:
    """Images as floats in [0, 1] at ``size``: each model's card resizes and normalises them in the pipeline."""
    from kcore.data import Preprocess

    return Preprocess((int(size[0]), int(size[1])), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


@st.cache_resource(max_entries=4, show_spinner=False)
def bundled_images(n: int, size: int = 64) -> Any:
    """The bundled kshapes test images (rendered from code, nothing downloaded)."""
    from kcore import data as kdata

    return kdata.sample_images(n, preprocess=_unit_preprocess((size, size)))


def uploaded_images(files: Sequence[tuple[str, bytes]], size: tuple[int, int]) -> Any:
    """Uploaded image files and/or zips of images as one image set (at ``size``, for the overlays)."""
    from kcore import data as kdata

    return kdata.ImageSet.from_uploads(files, _unit_preprocess(size))


def folder_images(folder: str, size: tuple[int, int]) -> Any:
    """The images in a folder on the server (flat, or one subfolder per class), at ``size``."""
    from kcore import data as kdata

    return kdata.ImageSet.from_folder(Path(folder).expanduser(), _unit_preprocess(size))


def working_image_size() -> tuple[int, int]:
    """Size to decode uploaded / folder images at: the larger input size of the two models' cards
    (each model resizes to its own), else 224 × 224."""
    sizes = [tuple(s.loaded.card.input_size) for s in (slot("A"), slot("B"))
             if s is not None and s.loaded.card is not None and s.loaded.card.input_size]
    return max(sizes, key=lambda hw: hw[0] * hw[1]) if sizes else (224, 224)


def images() -> ImageChoice | None:
    return st.session_state.get("kc_images")


def set_images(choice: ImageChoice) -> None:
    st.session_state["kc_images"] = choice


# ------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True, eq=False)
class RunEntry:
    """A finished comparison kept for this browser session.

    Attributes:
        id: run id (the folder name under :data:`RUNS_DIR` for fits made here).
        comparison: the :class:`kcore.pipeline.Comparison`.
        run_dir: its run folder, if written.
        raw_images: held-out image id → input image (H, W, 3) uint8 RGB, for overlays (may be empty).
        origin: ``"fit"`` (made in this session) or ``"folder"`` (re-opened).
        created: UNIX time.
    """

    id: str
    comparison: Any
    run_dir: Path | None
    raw_images: Mapping[str, np.ndarray] = field(default_factory=dict)
    origin: str = "fit"
    created: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        c = self.comparison
        k = next(iter(c.directions.values())).fit.config.orders
        dirs = " + ".join(DIRECTION_TITLES.get(d, d) for d in c.directions)
        when = time.strftime("%H:%M", time.localtime(self.created))
        return f"{when} · {Path(c.a.name).stem}:{c.a.layer} vs {Path(c.b.name).stem}:{c.b.layer} · K={k} · {dirs}"


def runs() -> dict[str, RunEntry]:
    """This session's finished runs, by id (oldest first)."""
    return st.session_state.setdefault("kc_runs", {})


def add_run(entry: RunEntry, activate: bool = True) -> None:
    runs()[entry.id] = entry
    if activate:  # the sidebar's picker (key kc_active_run) takes it over on its next draw
        st.session_state["kc_active_request"] = entry.id


def apply_active_request() -> None:
    """Before the sidebar's picker is drawn: show the run that :func:`add_run` asked for."""
    rid = st.session_state.pop("kc_active_request", None)
    if rid in runs():
        st.session_state["kc_active_run"] = rid


def active_run() -> RunEntry | None:
    """The run the result pages show (the sidebar picks it)."""
    rid = st.session_state.get("kc_active_request") or st.session_state.get("kc_active_run")
    table = runs()
    if rid in table:
        return table[rid]
    return next(reversed(table.values()), None) if table else None


def save_heldout_images(run_dir: Path, raw: Mapping[str, np.ndarray]) -> None:
    """Store the held-out input images beside the run (only if they share one size)."""
    if not raw:
        return
    arrays = list(raw.values())
    if len({a.shape for a in arrays}) != 1:
        return
    np.savez_compressed(run_dir / HELDOUT_IMAGES_FILE, ids=np.asarray(list(raw)), images=np.stack(arrays))


def load_heldout_images(run_dir: Path) -> dict[str, np.ndarray]:
    f = Path(run_dir) / HELDOUT_IMAGES_FILE
    if not f.is_file():
        return {}
    with np.load(f) as z:
        return {str(i): a for i, a in zip(z["ids"], z["images"])}


def open_run_folder(path: str | Path) -> RunEntry:
    """Re-open a run folder written by the dashboard or ``kcore fit --out`` (no checkpoints needed)."""
    from kcore.pipeline import read_run

    d = Path(path).expanduser()
    if not d.is_dir():
        raise ValueError(f"{str(d)!r} is not a folder on the server. Fix: give the path of a run folder.")
    comparison = read_run(d)
    created = (d / "provenance.json").stat().st_mtime
    return RunEntry(f"{d.name}-opened", comparison, d, load_heldout_images(d), "folder", created)


def run_folders() -> list[Path]:
    """Run folders found under :data:`RUNS_DIR`, newest first."""
    if not RUNS_DIR.is_dir():
        return []
    found = [p for p in RUNS_DIR.iterdir() if (p / "provenance.json").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


# ------------------------------------------------------------------------------------------------- jobs
def session_jobs() -> list[str]:
    return st.session_state.setdefault("kc_jobs", [])


def current_job() -> Job | None:
    """This session's latest job, if any."""
    ids = session_jobs()
    return registry().get(ids[-1]) if ids else None


def adopt_finished_jobs() -> list[RunEntry]:
    """Move the results of this session's finished jobs into its runs (once each)."""
    adopted = st.session_state.setdefault("kc_adopted", set())
    new = []
    for jid in session_jobs():
        job = registry().get(jid)
        if job is None or jid in adopted or job.running:
            continue
        adopted.add(jid)
        if job.state == "done" and job.result is not None:
            add_run(job.result)
            new.append(job.result)
    return new


# ------------------------------------------------------------------------------------------ decomposition
def working_positions(comparison: Any, direction: str) -> list[int]:
    """Held-out positions decomposed for the views: all of them, or as many as fit in
    :data:`MAX_DECOMPOSE_BYTES`."""
    fit = comparison.directions[direction].fit
    c = fit.model.spec.out_channels
    h, w = fit.norm.target_size
    per_image = c * h * w * (fit.model.orders + 3) * 4
    cap = max(1, MAX_DECOMPOSE_BYTES // max(per_image, 1))
    return list(comparison.heldout_positions[:cap])


@dataclass(frozen=True, eq=False)
class DecompositionView:
    """A run's decomposition of its held-out images in one direction, as the views use it.

    Attributes:
        dec: the :class:`Decomposition` (N images, index ``i`` = ``image_ids[i]``).
        image_ids: the images' ids.
        raw: input image per index (or None when the run does not have it).
    """

    dec: Decomposition
    image_ids: tuple[str, ...]
    raw: tuple[np.ndarray | None, ...]

    @property
    def n(self) -> int:
        return len(self.image_ids)


def decomposition(run: RunEntry, direction: str) -> DecompositionView:
    """The held-out decomposition of ``run`` in ``direction``: computed once per session, then reused."""
    cache = st.session_state.setdefault("kc_decomp", {})
    key = (run.id, direction)
    if key not in cache:
        pos = working_positions(run.comparison, direction)
        dec = run.comparison.decompose(direction, pos)
        ids = tuple(run.comparison.image_ids(pos))
        cache[key] = DecompositionView(dec, ids, tuple(run.raw_images.get(i) for i in ids))
        counters()["decompositions"] += 1
    return cache[key]


def ensure_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def subset_view(view: DecompositionView, indices: Sequence[int]) -> DecompositionView:
    """A view on some of the images (no recomputation)."""
    idx = list(indices)
    d = view.dec
    sub = Decomposition([c[idx] for c in d.components], d.residual[idx], d.target[idx], d.convention)
    return DecompositionView(sub, tuple(view.image_ids[i] for i in idx), tuple(view.raw[i] for i in idx))


# --------------------------------------------------------------------------------------------- defaults
DEFAULT_PAIR = ("kshapes_tinynet_s0", "kshapes_resnet_s0")
"""The embedded default: a weak network (A) against a strong one (B), the paper's diagnosis setting."""
DEFAULT_N_IMAGES = 400
"""Bundled images used by default (a first fit of both directions stays under a minute on 2 CPU cores)."""


def image_size(choice: ImageChoice | None) -> tuple[int, int]:
    """(H, W) of the chosen images (64 × 64 for the bundled ones)."""
    if choice is None or choice.n == 0:
        return (64, 64)
    x = choice.images[0]
    x = x[0] if isinstance(x, (tuple, list)) else x
    return (int(x.shape[-2]), int(x.shape[-1]))


def ensure_defaults() -> None:
    """Start every session on the embedded default: the bundled images and the two sample models.

    A failure (e.g. sample models missing from this checkout) is kept in ``kc_default_error`` and shown on
    the Models page; the app still opens.
    """
    if st.session_state.get("kc_defaults_done"):
        return
    st.session_state["kc_defaults_done"] = True
    try:
        if images() is None:
            set_images(ImageChoice(bundled_images(DEFAULT_N_IMAGES), f"bundled kshapes test images ({DEFAULT_N_IMAGES})",
                                   "bundled"))
        samples = sample_models()
        for role, name in zip("AB", DEFAULT_PAIR):
            if slot(role) is None:
                if name not in samples:
                    raise ValueError(f"sample model {name!r} not found (have {sorted(samples)}); "
                                     "Fix: run `kcore train-samples --out sample_models`.")
                path = samples[name]
                set_slot(role, make_slot(load_path(str(path)), "sample", str(path), image_size(images())))
    except (ValueError, FileNotFoundError, ImportError) as exc:
        st.session_state["kc_default_error"] = str(exc)


# ------------------------------------------------------------------------------------------------ fitting
def start_fit(a: ModelSlot, layer_a: str, b: ModelSlot, layer_b: str, choice: ImageChoice, params: dict) -> Job:
    """Start :func:`kcore.pipeline.compare` in the background; the result becomes a :class:`RunEntry`.

    The worker only touches the job (progress, cancel, result), never ``st.*``. The finished comparison is
    written as a run folder under :data:`RUNS_DIR` (with the held-out input images, for overlays); if that
    fails the result is still kept for the session.
    """
    import logging
    import uuid

    from kcore.pipeline import compare, write_run

    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    label = f"{a.loaded.name}:{layer_a} vs {b.loaded.name}:{layer_b}"
    images_ = choice.images

    def task(job: Job) -> RunEntry:
        comp = compare(
            a.loaded, layer_a, b.loaded, layer_b, images_, image_source=choice.description, paths=(a.path, b.path),
            progress=lambda p: job.report(p.stage, p.fraction, p.message), cancel=job.cancel, **params,
        )
        job.report("saving", 1.0, "saving the run folder")
        ids = comp.features.image_ids
        raw = {ids[p]: np.asarray(images_.raw(p)) for p in comp.heldout_positions[:MAX_STORED_IMAGES]}
        run_dir = None
        try:
            run_dir = write_run(comp, RUNS_DIR / run_id)
            save_heldout_images(run_dir, raw)
        except OSError as exc:
            logging.getLogger("kcore.dashboard").warning("could not write the run folder: %s", exc)
        return RunEntry(run_id, comp, run_dir, raw, "fit")

    job = registry().start(label, task, job_id=run_id)
    session_jobs().append(job.id)
    counters()["fits_started"] += 1
    return job
