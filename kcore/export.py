"""Write a comparison's figures, metrics and arrays to files, offline, with deterministic names and provenance.

Figures come from :mod:`kcore.viz` (matplotlib, no browser) and are saved as PNG (chosen DPI), SVG and PDF
with fixed metadata, so the same figure gives the same bytes. Every export folder holds a
``provenance.json`` (checkpoint names and hashes, layers, K, λ, seed, versions, device, and the ``kcore fit``
command and Python snippet that recompute the result) and every figure a ``<stem>.json`` sidecar with that
provenance plus what the figure shows (image, channel, orders, scaling, colour limits). ``manifest.json`` lists every
other file of the folder with its SHA-256 (all but itself and kcore's marker ``.kcore-folder.json``;
:func:`verify_export` checks it), and the same command and snippet under ``reproduce``.

Exports are atomic and private: :func:`export_comparison` writes into a fresh temporary folder that is renamed into
place when complete (:func:`kcore._io.write_new_folder`); a name already taken gets a new folder ``NAME-2``, ... —
never a merge with another export. Every file is written with :func:`kcore._io.write_file_atomic` (no symlink
followed).

Names are deterministic: :func:`figure_stem` builds them from what a figure shows, e.g.
``overlay_A_to_B_img-kshapes-test-00012_ch007_x1_scale-image``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import rc_context
from matplotlib.figure import Figure

from kcore._io import MARKER, TMP_MARKER, atomic_file, write_file_atomic, write_new_folder
from kcore.decompose import Decomposition
from kcore.metrics import VarianceReport
from kcore.provenance import dumps, versions
from kcore.verdict import chance_verdict

FigureFormat = Literal["png", "svg", "pdf"]
FIGURE_FORMATS: dict[str, str] = {
    "png": "raster image at the chosen DPI",
    "svg": "vector graphics with text as real, editable <text> (fonts: the reader's own)",
    "pdf": "vector graphics for LaTeX",
}
"""Valid figure formats."""

MIME: dict[str, str] = {
    "png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf", "csv": "text/csv",
    "json": "application/json", "npz": "application/octet-stream", "zip": "application/zip",
}
DIRECTION_TITLES: dict[str, str] = {"A_to_B": "A → B", "B_to_A": "B → A"}
"""Display names of the directions of :mod:`kcore.pipeline`."""

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# matplotlib's rc_context sets and restores process-wide rcParams: two threads (two dashboard sessions exporting at
# once) interleaving it would render with each other's settings and leave them behind
_RENDER_LOCK = threading.RLock()


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    out = tuple(formats)
    bad = [f for f in out if f not in FIGURE_FORMATS]
    if bad or not out:
        raise ValueError(f"formats must be a non-empty selection of {sorted(FIGURE_FORMATS)}; got {list(out)!r}.")
    return out


def _check_dpi(dpi: int) -> int:
    if isinstance(dpi, bool) or not isinstance(dpi, (int, np.integer)) or not 50 <= int(dpi) <= 1200:
        raise ValueError(f"dpi must be an integer in [50, 1200]; got {dpi!r}. Fix: 300 suits print, 150 the screen.")
    return int(dpi)


def figure_bytes(fig: Figure, fmt: FigureFormat = "png", dpi: int = 300, *, png_compression: int = 6) -> bytes:
    """Render ``fig`` to PNG, SVG or PDF bytes, deterministically (no dates, fixed SVG ids).

    Args:
        fig: a matplotlib figure (e.g. from :mod:`kcore.viz`).
        fmt: ``"png"``, ``"svg"`` or ``"pdf"``.
        dpi: resolution of PNGs (and of raster images embedded in SVG/PDF).
        png_compression: zlib level of PNGs, 0–9 (the same pixels at every level; 1 encodes about 5× faster
            than the default 6 into files about 20 % larger, which is what the dashboard's display uses).

    Returns:
        The file's bytes.
    """
    (fmt,) = _check_formats([fmt])
    dpi = _check_dpi(dpi)
    if isinstance(png_compression, bool) or not isinstance(png_compression, int) or not 0 <= png_compression <= 9:
        raise ValueError(f"png_compression must be an integer zlib level from 0 to 9; got {png_compression!r}. "
                         "Use 1 for speed, 6 (the default) or 9 for smaller files.")
    metadata: dict[str, Any] = {
        "png": {"Software": "kcore (matplotlib)"},
        "svg": {"Date": None, "Creator": "kcore (matplotlib)"},
        "pdf": {"CreationDate": None, "ModDate": None, "Creator": "kcore (matplotlib)", "Producer": "kcore"},
    }[fmt]
    buf = io.BytesIO()
    with _RENDER_LOCK, rc_context({"svg.hashsalt": "kcore", "svg.fonttype": "none", "pdf.fonttype": 42}):
        extra = {"pil_kwargs": {"compress_level": png_compression}} if fmt == "png" else {}
        fig.savefig(buf, format=fmt, dpi=dpi, metadata=metadata, facecolor="white", **extra)
    return buf.getvalue()


def slug(text: object) -> str:
    """A file-name-safe form of ``text``: letters, digits, ``.``, ``_``, ``-`` and ``+`` kept, the rest ``-``."""
    s = re.sub(r"[^A-Za-z0-9._+-]+", "-", str(text)).strip("-.")
    return s or "x"


def figure_stem(
    kind: str,
    direction: str | None = None,
    *,
    image_id: str | None = None,
    channel: int | Sequence[int] | None = None,
    what: str | None = None,
    scale: str | None = None,
) -> str:
    """The deterministic file stem of a figure, from what it shows.

    Example: ``figure_stem("overlay", "A_to_B", image_id="kshapes/test/00012", channel=7, what="x1",
    scale="image")`` → ``"overlay_A_to_B_img-kshapes-test-00012_ch007_x1_scale-image"``.
    """
    parts = [slug(kind)]
    if direction:
        parts.append(slug(direction))
    if image_id is not None:
        parts.append("img-" + slug(image_id))
    if channel is not None:
        chans = [channel] if isinstance(channel, (int, np.integer)) else list(channel)
        parts.append("ch" + "-".join(f"{int(c):03d}" for c in chans))
    if what:
        parts.append(slug(what))
    if scale:
        parts.append("scale-" + slug(scale))
    return "_".join(parts)


def save_figure(
    fig: Figure,
    folder: str | Path,
    stem: str,
    formats: Sequence[FigureFormat] = ("png", "svg", "pdf"),
    dpi: int = 300,
    sidecar: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``fig`` as ``<folder>/<stem>.<fmt>`` for each format, plus ``<stem>.json`` if ``sidecar`` is given.

    Each file is written atomically, never through a symlink (:func:`kcore._io.write_file_atomic`).

    Returns:
        The paths written, in the order of ``formats`` (the sidecar last).

    Raises:
        ValueError: ``stem`` is not file-name safe, or a format is unknown, or a destination is a symlink.
    """
    formats = _check_formats(formats)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if slug(stem) != stem:
        raise ValueError(f"stem {stem!r} is not file-name safe. Fix: build it with figure_stem() or slug().")
    paths = []
    for fmt in formats:
        p = out / f"{stem}.{fmt}"
        paths.append(write_file_atomic(p, figure_bytes(fig, fmt, dpi)))
    if sidecar is not None:
        p = out / f"{stem}.json"
        paths.append(write_file_atomic(p, _dumps({"figure": stem, "formats": list(formats), "dpi": dpi, **sidecar})))
    return paths


# ---------------------------------------------------------------------------------------------- provenance
def _model_dict(info: Any) -> dict[str, Any]:
    keys = ("name", "sha256", "kind", "architecture", "num_parameters", "test_accuracy", "layer", "path")
    return {k: getattr(info, k, None) for k in keys}


def provenance(comparison: Any, direction: str | None = None) -> dict[str, Any]:
    """Which checkpoints, layers and settings produced a result (for sidecars and captions).

    Args:
        comparison: a :class:`kcore.pipeline.Comparison`.
        direction: restrict the fit block to one direction (default: all of them).

    Returns:
        A JSON-ready dict: ``checkpoint_a``/``checkpoint_b`` (name, sha256, kind, architecture, parameters,
        test accuracy, layer), ``layers``, ``directions`` (per direction: K, λ, seed, preset fields, device,
        best epoch, verdict against chance), ``images``, ``versions`` (of this export), ``reproduce`` (the
        ``kcore fit`` command and Python snippet that recompute it, :mod:`kcore.reproduce`) and the run's own
        provenance under ``run``.
    """
    keys = list(comparison.directions) if direction is None else [direction]
    for k in keys:
        if k not in comparison.directions:
            raise ValueError(f"direction must be one of {sorted(comparison.directions)}; got {k!r}.")
    fits = {}
    for k in keys:
        f = comparison.directions[k].fit
        cfg = f.config
        fits[k] = {
            "meaning": comparison.directions[k].meaning, "orders_K": cfg.orders, "lambda": cfg.lam, "seed": cfg.seed,
            # what this fit planned and ran (fits saved before these were recorded: the config's epochs)
            "epochs_max": f.extra.get("epochs_planned", cfg.epochs),
            "epochs_run": f.extra.get("epochs_run", len(f.history)), "best_epoch": f.best_epoch,
            "steps_max": f.extra.get("steps_planned"), "steps_run": f.extra.get("steps_run"),
            "stopped_by": f.extra.get("stopped_by"),
            "convention": cfg.convention, "kernel_size": cfg.kernel_size, "device": f.device,
            "heldout_images": len(f.heldout_indices),
            "verdict": chance_verdict(f.heldout_report, getattr(comparison, "baselines", {}), k).as_dict(),
        }
    run = dict(getattr(comparison, "provenance", {}) or {})
    return {
        "checkpoint_a": _model_dict(comparison.a),
        "checkpoint_b": _model_dict(comparison.b),
        "layers": {"A": comparison.a.layer, "B": comparison.b.layer},
        "directions": fits,
        "images": run.get("images", {}),
        "device": run.get("device"),
        "versions": versions(),
        "reproduce": _reproduce(comparison),
        "run": run,
    }


def _reproduce(comparison: Any) -> dict[str, Any] | None:
    """The command and Python snippet that recompute the comparison (:func:`kcore.reproduce.reproduce_of`), or None
    for a comparison whose provenance has nothing to rebuild them from."""
    from kcore.reproduce import reproduce_of

    try:
        return reproduce_of(comparison).as_dict()
    except ValueError:
        return None


def model_label(info: Any) -> str:
    """``"name [hash12] · layer · 123,456 params, acc 91.2%"`` for a :class:`kcore.pipeline.ModelInfo`."""
    acc = getattr(info, "test_accuracy", None)
    acc_s = f", acc {acc:.1%}" if isinstance(acc, (int, float)) and math.isfinite(acc) else ""
    return f"{info.name} [{info.sha256[:12]}] · {info.layer} · {info.num_parameters:,} params{acc_s}"


def caption(comparison: Any, direction: str | None = None) -> str:
    """One provenance line for a figure: both checkpoints (name, hash, layer) and the fit settings."""
    key = direction or next(iter(comparison.directions))
    cfg = comparison.directions[key].fit.config
    head = f"{DIRECTION_TITLES.get(key, key)} · " if direction else ""
    return (
        f"{head}A: {comparison.a.name} [{comparison.a.sha256[:12]}] {comparison.a.layer} · "
        f"B: {comparison.b.name} [{comparison.b.sha256[:12]}] {comparison.b.layer} · "
        f"K={cfg.orders} λ={cfg.lam:g} seed={cfg.seed} · preset {getattr(comparison, 'preset', 'unknown')} · "
        f"held-out images"
    )


# ------------------------------------------------------------------------------------------------ tables
def metrics_table(comparison: Any) -> pd.DataFrame:
    """One row per direction: Var of each order, of x^Δ and x*, instability, held-out error, baseline, fit.

    Columns: ``direction, source, target, var_x0 … var_xK, var_residual, var_target, instability,
    share_x0 … share_xK, share_residual`` (additive: Cov(·, x*)/Var(x*), summing to 1), ``*_ci_lo``/``*_ci_hi``
    (bootstrap interval of instability and of each share), ``n_heldout``, ``n_groups`` (the held-out groups the
    intervals resampled whole; empty when they resampled single images), ``preset, heldout_error, baseline_linear_r2,
    baseline_linear_error`` (the least-squares map's held-out error, in the units of ``heldout_error``), ``baseline_cka,
    gates, best_epoch, epochs_run, fit_seconds``, ``chance_<kind>_instability`` per chance baseline and the verdict
    against chance (:mod:`kcore.verdict`): ``verdict`` (its code), ``verdict_overfit``, ``verdict_text``.
    A nested fit adds ``gain_x0 … gain_xK`` (its order-wise gains Δₖ, with ``instability`` summing to 1),
    ``gain_xk_ci_lo``/``gain_xk_ci_hi`` (their bootstrap intervals) and ``gain_accepted`` (per stage g₀ … g_K,
    ``1`` when the trained gₖ was kept, ``0`` when the guard kept gₖ₋₁'s function, so that Δₖ = 0).
    """
    rows = []
    for key, d in comparison.directions.items():
        f = d.fit
        rep = f.heldout_report
        row: dict[str, Any] = {"direction": key, "source": d.source, "target": d.target}
        for k, v in enumerate(rep.var_orders):
            row[f"var_x{k}"] = v
        row.update({"var_residual": rep.var_residual, "var_target": rep.var_target, "instability": rep.instability})
        nan = float("nan")
        for k in range(rep.orders + 1):
            row[f"share_x{k}"] = rep.share_orders[k] if rep.has_shares else nan
        row["share_residual"] = rep.share_residual if rep.has_shares else nan
        for name in ["instability"] + [f"share_x{k}" for k in range(rep.orders + 1)] + ["share_residual"]:
            iv = rep.interval(name)
            row[f"{name}_ci_lo"], row[f"{name}_ci_hi"] = iv if iv is not None else (nan, nan)
        row["n_heldout"] = rep.n_heldout
        row["n_groups"] = rep.ci.n_groups if rep.ci is not None and rep.ci.n_groups is not None else nan
        row["preset"] = getattr(comparison, "preset", "unknown")
        for kind, ref in getattr(comparison, "baselines", {}).items():
            r = ref.reports.get(key)
            row[f"chance_{kind}_instability"] = r.instability if r is not None else nan
        v = chance_verdict(rep, getattr(comparison, "baselines", {}), key)
        row.update({"verdict": v.code, "verdict_overfit": v.overfit, "verdict_text": v.text})
        row.update({
            "heldout_error": f.heldout_error, "baseline_linear_r2": f.baseline.linear_r2,
            "baseline_linear_error": f.baseline.linear_error, "baseline_cka": f.baseline.cka,
            "gates": " ".join(f"{g:.4g}" for g in f.gates),
            "best_epoch": f.best_epoch, "epochs_run": len(f.history), "fit_seconds": round(f.seconds, 3),
        })
        if f.nested is not None:  # order-wise gains of nested fits, beside the shares
            gains = f.nested.gains
            for k, g in enumerate(gains.gain_orders):
                iv = gains.interval(k)
                row[f"gain_x{k}"] = g
                row[f"gain_x{k}_ci_lo"], row[f"gain_x{k}_ci_hi"] = iv if iv is not None else (nan, nan)
            row["gain_accepted"] = " ".join("1" if s.accepted else "0" for s in f.nested.stages)
        rows.append(row)
    return pd.DataFrame(rows)


def channel_table(report: VarianceReport) -> pd.DataFrame:
    """Per-filter fuzziness: one row per channel of x*.

    Columns: ``channel``, ``var_target`` (the channel's Var(x*)), ``share_x0 … share_xK`` (additive shares
    Cov(x⁽ᵏ⁾_c, x*_c)/Var(x*_c)), ``share_residual`` (Cov(x^Δ_c, x*_c)/Var(x*_c); with the orders it sums to 1),
    ``dominant_order`` (the order with the largest share), and the paper's ``var_ratio_x0 … var_ratio_xK``
    (Var(x⁽ᵏ⁾_c)/Var(x*_c), not additive) and ``var_ratio_residual`` (Var(x^Δ_c)/Var(x*_c)). Shares are NaN for
    reports written before they existed.
    """
    pc = report.per_channel
    ratios = np.asarray(pc.var_ratio_orders, dtype=np.float64)  # (K+1, C)
    C = ratios.shape[1]
    shares = (np.asarray(pc.share_orders, dtype=np.float64) if pc.share_orders is not None
              else np.full_like(ratios, np.nan))
    df = pd.DataFrame({"channel": np.arange(C), "var_target": np.asarray(pc.var_target, dtype=np.float64)})
    for k in range(shares.shape[0]):
        df[f"share_x{k}"] = shares[k]
    df["share_residual"] = (np.asarray(pc.share_residual, dtype=np.float64) if pc.share_residual is not None
                            else np.full(C, np.nan))
    df["dominant_order"] = (np.nan_to_num(shares, nan=-np.inf)).argmax(0)
    for k in range(ratios.shape[0]):
        df[f"var_ratio_x{k}"] = ratios[k]
    df["var_ratio_residual"] = np.asarray(pc.var_ratio_residual, dtype=np.float64)
    return df


def gain_table(gains: Any) -> pd.DataFrame:
    """Per-channel order-wise gains of a nested fit (:class:`kcore.fit.nested.NestedGains`): one row per channel.

    Columns: ``channel``, ``gain_x0 … gain_xK`` (Δₖ of the channel, each around its own mean), ``instability``
    (Var(x*_c − g_K(x)_c)/Var(x*_c); with the gains it sums to 1), and ``gain_xk_ci_lo``/``gain_xk_ci_hi`` and
    ``instability_ci_lo``/``instability_ci_hi`` (the 95 % bootstrap intervals over the held-out images; NaN when the
    run kept no per-channel intervals).
    """
    from kcore.viz.gains import gain_matrix

    m = gain_matrix(gains)  # (C, K+2)
    C, K = m.shape[0], m.shape[1] - 2
    ci = gains.ci
    cgo = ci.channel_gain_orders if ci is not None else None
    cgi = ci.channel_instability if ci is not None else None
    nan = np.full(C, np.nan)
    df = pd.DataFrame({"channel": np.arange(C)})
    for k in range(K + 1):
        df[f"gain_x{k}"] = m[:, k]
    df["instability"] = m[:, -1]
    for k in range(K + 1):
        iv = np.asarray(cgo[k], dtype=np.float64) if cgo is not None else None
        df[f"gain_x{k}_ci_lo"], df[f"gain_x{k}_ci_hi"] = (iv[:, 0], iv[:, 1]) if iv is not None else (nan, nan)
    iv = np.asarray(cgi, dtype=np.float64) if cgi is not None else None
    df["instability_ci_lo"], df["instability_ci_hi"] = (iv[:, 0], iv[:, 1]) if iv is not None else (nan, nan)
    return df


def nested_figures(
    comparison: Any,
    direction: str,
    *,
    dec: Decomposition | None = None,
    image_ids: Sequence[str] | None = None,
    images: Sequence[int] = (0,),
    channels: Sequence[int] = (0,),
    raw: Sequence[np.ndarray | None] | None = None,
    scale: str = "image",
    cmap: str | None = None,
    footer: bool = False,
) -> list[FigureItem]:
    """The figures of a nested fit in ``direction``, ready for :func:`export_comparison`.

    Two figures: ``channel-gains_<direction>`` (the per-channel gains Δ₀ … Δ_K and x^Δ, :func:`kcore.viz.
    channel_gain_figure`) and ``nested-components_<direction>_…`` (per image and channel: x*, the nested components
    x⁽⁰⁾ₙ … x⁽ᴷ⁾ₙ and x^Δ over the image, :func:`kcore.viz.figure1_grid` of the nested decomposition). Their
    sidecars hold the gains with their intervals (overall, and for the channels drawn).

    Args:
        comparison: a :class:`kcore.pipeline.Comparison` whose ``direction`` is a nested fit.
        direction: the direction.
        dec: its nested decomposition (:func:`kcore.decompose.decompose_comparison` with ``parts="nested"``;
            default: computed for the held-out images). image_ids: ``dec``'s image ids (default: the held-out ones).
        images: images to draw (indices into ``dec``). channels: channels of x* to draw.
        raw: the input images for ``images`` (same order), or None for the maps alone.
        scale: colour scaling of the grid (:data:`kcore.viz.SCALES`). cmap: its diverging colour map.
        footer: a provenance line under each figure.

    Returns:
        Two :class:`FigureItem`.

    Raises:
        ValueError: ``direction`` is not a nested fit of ``comparison``, or ``dec`` is not a nested decomposition.
    """
    from kcore import viz
    from kcore.decompose import decompose_comparison

    if direction not in comparison.directions:
        raise ValueError(f"direction must be one of {sorted(comparison.directions)}; got {direction!r}.")
    fit = comparison.directions[direction].fit
    if fit.nested is None:
        raise ValueError(f"direction {direction!r} is not a nested fit, so it has no gains or nested components. "
                         "Fix: export its figures as usual, or fit with nested=True (kcore fit --nested).")
    if dec is None:
        dec = decompose_comparison(comparison, direction, parts="nested")
        image_ids = comparison.image_ids()
    elif not viz.is_nested(dec):
        raise ValueError("dec must be the nested decomposition (meta kind 'nested'); got the Eq. 3–4 split. Fix: "
                         "pass kcore.decompose.decompose_comparison(comparison, direction, parts='nested').")
    ids = list(image_ids) if image_ids is not None else [f"image {i}" for i in range(dec.target.shape[0])]
    gains = fit.nested.gains
    cap = caption(comparison, direction) if footer else None
    title = f"{DIRECTION_TITLES.get(direction, direction)}: order-wise gains of nested fits per channel"
    chans = [int(c) for c in channels]
    per_channel = {int(c): {"gain_orders": [g[c] for g in gains.channel_gain_orders],
                            "gain_ci": None if gains.ci is None or gains.ci.channel_gain_orders is None
                            else [list(iv[c]) for iv in gains.ci.channel_gain_orders]} for c in chans}
    overall = {"gain_orders": list(gains.gain_orders), "instability": gains.instability,
               "gain_ci": None if gains.ci is None else [list(iv) for iv in gains.ci.gain_orders]}
    kw = {} if cmap is None else {"cmap": cmap}
    grid = viz.figure1_grid(dec, list(images), chans, list(raw) if raw is not None else None, scale=scale,  # type: ignore[arg-type]
                            row_labels=["/".join(str(ids[i]).split("/")[-2:]) for i in images], caption=cap,
                            units="standardised units" if dec.convention == "paper" else "target units", **kw)
    sel = [str(ids[i]) for i in images]
    stem_ids = "+".join(sel) if len(sel) <= 3 else f"{len(sel)}images"
    return [
        FigureItem(figure_stem("channel-gains", direction),
                   viz.channel_gain_figure(gains, title=title, caption=cap),
                   {"shows": "order-wise gains of nested fits per channel (R²(g_k) − R²(g_(k−1)), with x^Δ adding up "
                             "to 1), 95 % bootstrap intervals in gains_<direction>.csv", "direction": direction,
                    "gains": overall}),
        FigureItem(figure_stem("nested-components", direction, image_id=stem_ids, channel=chans, scale=scale),
                   grid,
                   {"shows": "x*, nested components x^(k)_n = g_k(x) − g_(k−1)(x) (sum: g_K(x)) and x^Δ",
                    "direction": direction, "image_ids": sel, "channels": chans, "scale": scale,
                    "gains": overall, "channel_gains": per_channel}),
    ]


# ------------------------------------------------------------------------------------------------ files
def _dumps(obj: Any) -> str:
    return dumps(obj, lenient=True) + "\n"


def write_metrics(comparison: Any, folder: str | Path) -> list[Path]:
    """Write ``metrics.csv`` (:func:`metrics_table`), ``metrics.json`` (the full held-out reports) and
    ``channels_<direction>.csv`` (:func:`channel_table`) into ``folder``, and for a nested fit
    ``gains_<direction>.csv`` (:func:`gain_table`, the per-channel gains with their intervals); returns the paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = [write_file_atomic(out / "metrics.csv", metrics_table(comparison).to_csv(index=False, float_format="%.6g")),
             write_file_atomic(out / "metrics.json", _dumps(comparison.metrics()))]
    for key, d in comparison.directions.items():
        table = channel_table(d.fit.heldout_report).to_csv(index=False, float_format="%.6g")
        paths.append(write_file_atomic(out / f"channels_{slug(key)}.csv", table))
        if d.fit.nested is not None:  # nested fits: the per-channel gains with their intervals
            gains = gain_table(d.fit.nested.gains).to_csv(index=False, float_format="%.6g")
            paths.append(write_file_atomic(out / f"gains_{slug(key)}.csv", gains))
    return paths


def write_components(
    dec: Decomposition,
    folder: str | Path,
    stem: str,
    image_ids: Sequence[str],
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Save the raw arrays of a decomposition as ``<stem>.npz`` (float32, uncompressed).

    Arrays: ``components`` (K+1, N, C, H, W) with ``components[k]`` = x⁽ᵏ⁾ (of a nested decomposition: the
    nested component x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x), said so in ``meta``), ``residual`` x^Δ, ``target`` x*,
    ``output`` g(x) (each (N, C, H, W), the fit's target units), ``image_ids`` (N,) strings, and ``meta``
    (a JSON string: ``meta`` plus the array layout).
    """
    n = int(dec.target.shape[0])
    if len(image_ids) != n:
        raise ValueError(f"image_ids must hold one id per image of the decomposition ({n}); got {len(image_ids)}.")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(stem)}.npz"
    comps = np.stack([c.detach().cpu().float().numpy() for c in dec.components])
    what = ("nested components: components[k] = g_k(x) − g_(k−1)(x) of nested fits (components[0] = g_0(x))"
            if dec.meta.get("kind") == "nested" else "components[k] = x^(k)")
    layout = {"components": f"(K+1, N, C, H, W): {what}", "residual": "(N, C, H, W) x^Δ = x* − g(x)",
              "target": "(N, C, H, W) x*", "output": "(N, C, H, W) g(x) = Σ_k x^(k)", "units": dec.convention}
    with atomic_file(path) as fh:
        np.savez(
            fh, components=comps, residual=dec.residual.detach().cpu().float().numpy(),
            target=dec.target.detach().cpu().float().numpy(), output=comps.sum(0),
            image_ids=np.asarray([str(i) for i in image_ids]),
            meta=np.asarray(dumps({**(meta or {}), "layout": layout}, indent=None, lenient=True)),
        )
    return path


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_comparison` wrote.

    Attributes:
        folder: the export folder.
        files: every file written, relative to ``folder``, sorted.
    """

    folder: Path
    files: tuple[str, ...]

    def zip_bytes(self) -> bytes:
        """All files as one deterministic zip (see :func:`zip_folder`)."""
        return zip_folder(self.folder, self.files)


@dataclass(frozen=True)
class FigureItem:
    """A figure to export with what it shows (written to its sidecar).

    Attributes:
        stem: file stem (:func:`figure_stem`).
        figure: the matplotlib figure.
        meta: what it shows: direction, image id, channel, orders, scaling, colour limits, …
    """

    stem: str
    figure: Figure
    meta: Mapping[str, Any]


def export_comparison(
    comparison: Any,
    folder: str | Path,
    *,
    figures: Sequence[FigureItem] = (),
    arrays: Mapping[str, tuple[Decomposition, Sequence[str]]] | None = None,
    formats: Sequence[FigureFormat] = ("png", "svg", "pdf"),
    dpi: int = 300,
) -> ExportResult:
    """Write figures, metrics, arrays and provenance of ``comparison`` into ``folder``.

    The export is a new folder, written whole into a private temporary folder and renamed into place
    (:func:`kcore._io.write_new_folder`): if ``folder`` is taken, ``<folder>-2``, ``-3``, ... is used instead (the
    result names the folder written); an existing folder is never written into, so two exports of the same name
    never mix. A failure or a kill leaves no visible folder.

    Args:
        comparison: a :class:`kcore.pipeline.Comparison`.
        folder: the folder wanted (its parent is created).
        figures: the figures, each saved in every format with a ``<stem>.json`` sidecar.
        arrays: stem → (decomposition, its image ids), saved by :func:`write_components`.
        formats: figure formats (:data:`FIGURE_FORMATS`).
        dpi: PNG resolution.

    Returns:
        An :class:`ExportResult`; ``manifest.json`` in the folder lists every other file with its SHA-256 (kcore's
        marker aside), exactly what the folder holds (:func:`verify_export`).

    Raises:
        ValueError: bad ``formats``, ``dpi`` or repeated figure stems (checked before anything is written); or
            ``folder`` is ``.``, a parent of the working directory, ``~`` or ``/``.
    """
    formats = _check_formats(formats)
    dpi = _check_dpi(dpi)
    stems = [f.stem for f in figures]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise ValueError(f"figure stems must be unique; repeated: {dupes}. Fix: give each figure its own stem "
                         "(figure_stem() of what it shows).")
    prov = provenance(comparison)

    def fill(out: Path) -> tuple[str, ...]:
        write_file_atomic(out / "provenance.json", _dumps(prov))
        write_metrics(comparison, out)
        for item in figures:
            save_figure(item.figure, out / "figures", item.stem, formats, dpi,
                        sidecar={**dict(item.meta), "provenance": prov})
        for stem, (dec, ids) in (arrays or {}).items():
            write_components(dec, out / "arrays", stem, ids, meta={"provenance": prov})
        # the manifest lists what the folder holds, not what we meant to write
        rel = [r for r in _listing(out) if r not in (TMP_MARKER, MANIFEST)]
        write_file_atomic(out / MANIFEST, _dumps({"files": {r: _sha256(out / r) for r in rel},
                                                  "reproduce": prov["reproduce"]}))
        return tuple(sorted(rel + [MANIFEST]))

    final, files = write_new_folder(folder, fill, kind="export")
    return ExportResult(final, files)


MANIFEST = "manifest.json"
"""The file of an export folder that lists every other file with its SHA-256."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _listing(folder: Path) -> list[str]:
    """Every entry below ``folder`` that is not a folder, as sorted POSIX relative paths (symlinks listed, never
    followed), kcore's marker aside."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        # a symlink to a folder shows up in dirnames: list it as an entry so that it is never silently skipped
        names = filenames + [d for d in dirnames if (base / d).is_symlink()]
        out += [(base / n).relative_to(folder).as_posix() for n in names]
    return sorted(r for r in out if r != MARKER)


def verify_export(folder: str | Path) -> tuple[str, ...]:
    """Check that ``manifest.json`` lists exactly the files of an export folder, with their SHA-256.

    Args:
        folder: an export folder written by :func:`export_comparison`.

    Returns:
        The files listed, sorted (``manifest.json`` itself and kcore's marker not included).

    Raises:
        ValueError: no readable manifest; a file missing, added, not a regular file, or changed.
    """
    root = Path(folder)
    try:
        listed = json.loads((root / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"folder {str(folder)!r} has no readable {MANIFEST} ({exc}). Fix: export again with "
                         "kcore.export.export_comparison.") from exc
    if not isinstance(listed, dict):
        raise ValueError(f"folder {str(folder)!r}: {MANIFEST}'s 'files' must map names to SHA-256 hex digests; got "
                         f"{type(listed).__name__}. Fix: export again.")
    present = set(_listing(root)) - {MANIFEST}
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if extra or missing:
        raise ValueError(f"folder {str(folder)!r} does not hold exactly what {MANIFEST} lists: not listed "
                         f"{extra[:10]}, missing {missing[:10]}. Fix: export again into a new folder.")
    for name in sorted(listed):
        p = root / name
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"folder {str(folder)!r}: {name!r} is not a regular file. Fix: export again.")
        if _sha256(p) != listed[name]:
            raise ValueError(f"folder {str(folder)!r}: {name!r} does not match its SHA-256 in {MANIFEST} (changed "
                             "after the export). Fix: export again.")
    return tuple(sorted(listed))


def zip_folder(folder: str | Path, files: Sequence[str] | None = None) -> bytes:
    """Zip ``files`` (relative paths; default every regular file under ``folder``, kcore's marker aside) with fixed
    dates, sorted: same content, same bytes.

    Raises:
        ValueError: a file named in ``files`` is a symlink (never followed) or not a regular file.
    """
    root = Path(folder)
    names = sorted(files) if files is not None else [r for r in _listing(root) if not (root / r).is_symlink()]
    for name in names:
        p = root / name
        if p.is_symlink() or not p.is_file():
            raise ValueError(f"files: {name!r} in {str(folder)!r} is a symlink or not a regular file; zip_folder "
                             "never follows links. Fix: leave it out of files.")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, (root / name).read_bytes())
    return buf.getvalue()
