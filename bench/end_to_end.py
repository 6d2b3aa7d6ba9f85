"""The embedded default end to end, and the dashboard's redraw after a fit.

End to end is what the dashboard runs when a user presses "Start fit" with everything left at its default:
:func:`kcore.pipeline.compare` on the default pair (``kshapes_tinynet_s0`` → ``kshapes_resnet_s0`` at their
cards' default layers) over the 400 bundled images, one direction (A → B), the ``fast`` preset; then the
held-out decomposition the result pages show. Loading the checkpoints is not counted (the dashboard keeps
them loaded).

Redraw is what the Explorer page does when the image, the channel or the order changes: build the overlay
of the chosen map and the blind-spot overlay from the cached decomposition (:func:`kcore.viz.component_overlay`)
and render both to PNG at the dashboard's 150 dpi. The decomposition itself is computed once per run and
is not part of a redraw.
"""
from __future__ import annotations

import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import DEFAULT_N_IMAGES, load_default_pair, sample_images

DISPLAY_DPI = 150  # dashboard/ui.py's DISPLAY_DPI


def end_to_end(n_images: int = DEFAULT_N_IMAGES, both_directions: bool = False, models_dir: Path | None = None) -> dict[str, Any] | None:
    """Time extract + fit + decompose of the embedded default; None when the sample models are missing."""
    from kcore.pipeline import compare

    loaded = load_default_pair(models_dir)
    if loaded is None:
        return None
    a, la, b, lb = loaded
    images = sample_images(n_images)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_progress(p: Any) -> None:
        stages.setdefault(p.stage, time.perf_counter() - t0)

    comp = compare(a, la, b, lb, images, both_directions=both_directions, device="cpu", progress=on_progress)
    t_fit = time.perf_counter() - t0
    decs = {d: comp.decompose(d) for d in comp.directions}
    total = time.perf_counter() - t0
    first_fit = min((v for k, v in stages.items() if k.startswith("fit")), default=float("nan"))
    return {
        "pair": [a.name, la, b.name, lb],
        "n_images": n_images,
        "directions": list(comp.directions),
        "extract_seconds": first_fit,
        "fit_seconds": t_fit - first_fit,
        "decompose_seconds": total - t_fit,
        "total_seconds": total,
        "epochs": {d: len(r.fit.history) for d, r in comp.directions.items()},
        "heldout_error": {d: r.fit.heldout_error for d, r in comp.directions.items()},
        "instability": {d: r.fit.heldout_report["instability"] for d, r in comp.directions.items()},
        "n_heldout": {d: int(v.target.shape[0]) for d, v in decs.items()},
        "comparison": comp,  # used by the redraw benchmark; dropped before writing JSON
    }


def _png(fig: Any) -> bytes:
    try:
        from kcore.export import figure_bytes

        return figure_bytes(fig, "png", DISPLAY_DPI)
    except ImportError:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DISPLAY_DPI)
        return buf.getvalue()


def _array_overlay_png(dec: Any, order: int, image: int, channel: int, rgb: np.ndarray | None) -> bytes:
    """The same overlay without matplotlib: colour-map lookup, bilinear upsampling, alpha blend, PNG (fast zlib).

    A floor for what a redraw has to cost (no axes, colour bar or title), not what the dashboard draws.
    """
    import torch
    from matplotlib import colormaps
    from PIL import Image

    from kcore.conventions import resample

    m = dec.components[order][image, channel]
    size = (64, 64) if rgb is None else rgb.shape[:2]
    up = resample(m[None, None].float(), size)[0, 0]
    lim = float(up.abs().max()) or 1.0
    lut = (colormaps["RdBu_r"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.float32)
    idx = ((up / lim + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    base = np.full((*size, 3), 255.0, np.float32) if rgb is None else rgb.astype(np.float32).mean(2, keepdims=True)
    out = (0.35 * base + 0.65 * lut[idx]).astype(np.uint8)
    img = Image.fromarray(out).resize((size[1] * 6, size[0] * 6), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=1)
    return buf.getvalue()


def redraw(dec: Any, images: list[np.ndarray] | None = None, changes: int = 12) -> dict[str, Any]:
    """Median time of one Explorer redraw (chosen map + blind-spot map, built and rendered) per kind of change.

    Also reports, for the same redraws, how the time splits into building the figures and encoding the PNGs,
    and the array-only floor (:func:`_array_overlay_png`, both maps).

    Args:
        dec: a :class:`kcore.decompose.Decomposition` (the cached held-out decomposition).
        images: the input images (H, W, 3) uint8 under the overlays (None: maps alone).
        changes: redraws timed per kind of change.
    """
    from kcore import viz

    n, c, k = int(dec.target.shape[0]), int(dec.target.shape[1]), dec.orders
    rng = np.random.default_rng(0)
    state = {"image": 0, "channel": 0, "order": 0}
    split = {"build": [], "png": [], "floor": []}

    def draw() -> None:
        spec = viz.MapSpec("component", (state["order"],))
        img = images[state["image"]] if images is not None else None
        t = time.perf_counter()
        figs = [viz.component_overlay(dec, s, state["image"], state["channel"], img, alpha=0.65)
                for s in (spec, viz.MapSpec("blind_spot"))]
        t1 = time.perf_counter()
        for f in figs:
            _png(f)
        split["build"].append(t1 - t)
        split["png"].append(time.perf_counter() - t1)

    def floor() -> None:
        img = images[state["image"]] if images is not None else None
        t = time.perf_counter()
        for _ in range(2):
            _array_overlay_png(dec, state["order"], state["image"], state["channel"], img)
        split["floor"].append(time.perf_counter() - t)

    draw()  # warm-up: fonts, colour maps
    floor()
    for v in split.values():
        v.clear()
    out: dict[str, Any] = {"n_images": n, "channels": c, "orders": k, "dpi": DISPLAY_DPI}
    for what, size in (("image", n), ("channel", c), ("order", k + 1)):
        times, cpu = [], []
        for _ in range(changes):
            state[what] = int((state[what] + 1 + rng.integers(max(size - 1, 1))) % size)
            t, tc = time.perf_counter(), time.process_time()
            draw()
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - tc)
            floor()
        out[f"{what}_seconds"] = statistics.median(times)
        out[f"{what}_cpu_seconds"] = statistics.median(cpu)
    out["worst_seconds"] = max(out[f"{w}_seconds"] for w in ("image", "channel", "order"))
    out["build_seconds"] = statistics.median(split["build"])
    out["png_seconds"] = statistics.median(split["png"])
    out["array_floor_seconds"] = statistics.median(split["floor"])
    return out


def heldout_images(comp: Any, direction: str = "A_to_B", n: int | None = None) -> list[np.ndarray] | None:
    """The held-out input images of a comparison as uint8 RGB (for overlays), when the image set has them."""
    images = sample_images(max(comp.features.n_images, 1))
    raw = getattr(images, "raw", None)
    pos = comp.heldout_positions[: n or len(comp.heldout_positions)]
    if raw is None:
        return None
    return [np.asarray(raw(p)) for p in pos]
