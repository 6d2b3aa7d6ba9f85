"""Run folders: a :class:`~kcore.comparison.Comparison` written to disk and read back like an upload.

:func:`write_run` writes a complete folder atomically (JSON + safetensors, optionally the held-out input images);
:func:`read_run` and :func:`read_heldout_images` read one back with every file size-capped, every field type-checked
and every array bounded before it is decompressed.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from kcore._io import atomic_folder
from kcore._readback import Maybe
from kcore.baselines import ChanceBaseline
from kcore.comparison import DIRECTIONS, Comparison, DirectionResult, ModelInfo
from kcore.feature_set import FeaturePair
from kcore.fit import FitResult
from kcore.fit import check_report_lengths as fit_check_report
from kcore.metrics import VarianceReport
from kcore.reproduce import reproduce_of
from kcore.verdict import ChanceVerdict

HELDOUT_IMAGES_FILE = "heldout_images.npz"
"""Optional part of a run folder: the held-out input images (uint8 RGB), for overlays without the image set."""
MAX_STORED_IMAGES = 512
"""At most this many held-out input images are stored with a run."""


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
        (tmp / "metrics.json").write_text(metrics_json(comparison))
        cfg = comparison.provenance.get("config", {})
        (tmp / "config.json").write_text(json.dumps({
            "directions": list(comparison.directions), "layer_a": comparison.a.layer, "layer_b": comparison.b.layer,
            "fit": cfg,
        }, indent=1))
        prov = dict(comparison.provenance)
        try:  # the command and Python snippet that recompute this run into a sibling folder
            prov["reproduce"] = reproduce_of(comparison, out=f"{Path(out_dir).name}-reproduced").as_dict()
        except ValueError:  # a provenance with no layers/config (e.g. built by hand): nothing to rebuild from
            pass
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, default=str))
        if images is not None:
            raw = images if isinstance(images, Mapping) else heldout_images(comparison, images)
            _write_heldout_images(tmp, raw)
    return Path(out_dir)


def metrics_json(comparison: Comparison) -> str:
    """The text of a run folder's ``metrics.json`` (:meth:`Comparison.metrics`), as :func:`write_run` and
    :func:`update_run_baselines` write it."""
    return json.dumps(comparison.metrics(), indent=1)


BASELINE_PROVENANCE_KEYS = ("baselines_pending", "baselines_skipped", "baselines_failed")
"""The provenance entries about chance baselines that :func:`update_run_baselines` replaces."""
_SAME_RUN_KEYS = ("created", "checkpoint_a", "checkpoint_b", "layers", "images", "seed", "config")


def update_run_baselines(run_dir: str | os.PathLike, comparison: Comparison) -> Path:
    """Add the chance baselines of ``comparison`` to its run folder, written before them by :func:`write_run`.

    ``metrics.json`` (baselines, verdicts) and ``provenance.json`` (which baselines are pending, skipped or failed;
    every other entry is kept as written) are each replaced in one atomic rename (:func:`kcore._io.write_file_atomic`):
    a reader sees the old file or the new one, never a part. The result equals what :func:`write_run` writes for
    ``comparison`` in one go.

    Args:
        run_dir: the run folder of ``comparison`` before its baselines (:func:`kcore.pipeline.compare_fit`).
        comparison: the comparison with its baselines (:func:`kcore.pipeline.add_baselines`).

    Returns:
        ``run_dir`` as a Path.

    Raises:
        ValueError: ``run_dir`` is not a run folder, or holds another run (its provenance's creation time,
            checkpoints, layers, images, seed or config differ from ``comparison``'s).
    """
    from kcore import _readback as rb
    from kcore._io import write_file_atomic

    d = Path(run_dir)
    missing = [n for n in ("metrics.json", "provenance.json") if not os.path.lexists(d / n)]
    if missing:
        raise ValueError(f"run_dir {str(d)!r} is not a kcore run folder: missing {missing}. Fix: pass the folder "
                         "write_run wrote for this comparison.")
    prov = rb.read_json(d, "provenance.json")
    if not isinstance(prov, dict):
        raise rb.folder_error(d, "provenance.json", f"holds a JSON {type(prov).__name__}; expected an object")
    ours = json.loads(json.dumps(comparison.provenance, default=str))
    differ = [k for k in _SAME_RUN_KEYS if prov.get(k) != ours.get(k)]
    if differ:
        raise ValueError(f"run_dir {str(d)!r} holds another run than comparison: provenance.json differs in "
                         f"{differ}. Fix: pass the folder write_run wrote for this comparison (before its baselines).")
    for key in BASELINE_PROVENANCE_KEYS:
        prov.pop(key, None)
        if key in ours:
            prov[key] = ours[key]
    write_file_atomic(d / "metrics.json", metrics_json(comparison))
    write_file_atomic(d / "provenance.json", json.dumps(prov, indent=1, default=str))
    return d


_STATS = {"mean": float, "sd": float, "min": float, "max": float}
# Named outside the dict[...] below: a linter reads string keys inside a subscript as type names.
_BASELINE = {"kind": str, "description": str | None, "seed": int | None,
             "directions": dict[str, VarianceReport] | None, "extra": dict | None}
_SPREAD = {"seeds": tuple[int, ...], "summary": {
    "instability": _STATS, "share_orders": tuple[_STATS, ...], "share_residual": Maybe(_STATS),
    "var_ratio_orders": tuple[_STATS, ...]}}
# the verdict block is type-checked; read_run recomputes the verdict from the baselines (old folders have none)
_DIRECTION = {"verdict": Maybe(ChanceVerdict)}
RUN_JSON_FIELDS: dict[str, dict[str, Any]] = {
    "provenance.json": {"checkpoint_a": ModelInfo, "checkpoint_b": ModelInfo, "layers": {"A": str, "B": str},
                        "preset": str | None},
    "images.json": {"ids": tuple[str, ...], "labels": tuple[int, ...] | None,
                    "heldout_of_all": tuple[int, ...] | None},
    "metrics.json": {
        "baselines": Maybe(dict[str, _BASELINE]),
        "seed_spread": Maybe(dict[str, _SPREAD]),
        "directions": Maybe(dict[str, _DIRECTION]),
        "verdict": Maybe(ChanceVerdict),
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
