"""The embedded default end to end, and the dashboard's redraw after a fit.

End to end is what the dashboard runs when a user presses "Start fit" with everything left at its default:
:func:`kcore.pipeline.compare` on the default pair (``kshapes_tinynet_s0`` → ``kshapes_resnet_s0`` at their
cards' default layers) over the 400 bundled images, one direction (A → B), the ``fast`` preset; then the
held-out decomposition the result pages show. Loading the checkpoints is not counted (the dashboard keeps
them loaded).

Redraw is what the Explorer page does when the image, the channel or the order changes, timed through the
dashboard itself (Streamlit's AppTest on the run folder of the end-to-end fit): :func:`dashboard_redraw`.
The Explorer shows its maps as Plotly views drawn by the browser; :func:`figure_split` compares one such
view with the matplotlib figure that Export saves (built and rendered to PNG) and with an axis-free floor.
The decomposition is computed once per run and is not part of a redraw.
"""
from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.data import DEFAULT_N_IMAGES, load_default_pair, sample_images

ROOT = Path(__file__).resolve().parents[1]


def _display() -> tuple[int, int]:
    """The dashboard's display resolution and PNG compression (dashboard/ui.py)."""
    from dashboard.ui import DISPLAY_DPI, DISPLAY_PNG_COMPRESSION

    return DISPLAY_DPI, DISPLAY_PNG_COMPRESSION


def end_to_end(n_images: int = DEFAULT_N_IMAGES, both_directions: bool = False, models_dir: Path | None = None,
               epochs: int | None = None) -> dict[str, Any] | None:
    """Time extract + fit + decompose of the embedded default; None when the sample models are missing.

    ``epochs`` caps the fit (smoke test only; None is the default preset's own stopping).
    """
    from kcore.fit import make_config
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

    comp = compare(a, la, b, lb, images, make_config("fast", epochs=epochs), preset="fast",
                   both_directions=both_directions, device="cpu", progress=on_progress)
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
        "instability": {d: r.fit.heldout_report.instability for d, r in comp.directions.items()},
        "n_heldout": {d: int(v.target.shape[0]) for d, v in decs.items()},
        "comparison": comp,  # used by the redraw benchmark; dropped before writing JSON
    }


def _png(fig: Any) -> bytes:
    from kcore.export import figure_bytes

    dpi, level = _display()
    return figure_bytes(fig, "png", dpi, png_compression=level)


def _array_overlay_png(dec: Any, order: int, image: int, channel: int, rgb: np.ndarray | None) -> bytes:
    """The same overlay without matplotlib's axes: colour-map lookup, bilinear upsampling, blend, PNG.

    A floor for what a redraw has to cost (no axes, colour bar or title), not what the dashboard draws.
    """
    from matplotlib import colors as mcolors
    from PIL import Image

    from kcore import viz

    m = dec.components[order][image, channel]
    lim = float(m.abs().max()) or 1.0
    out = viz.blend_overlay(rgb, m, mcolors.Normalize(-lim, lim), viz.DIVERGING_CMAP, 0.65)
    img = Image.fromarray((out * 255).astype(np.uint8))
    img = img.resize((img.width * 6, img.height * 6), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png", compress_level=_display()[1])
    return buf.getvalue()


def figure_split(dec: Any, images: list[np.ndarray] | None = None, repeats: int = 12) -> dict[str, Any]:
    """Median cost of one overlay in kcore: the matplotlib figure (build, render to PNG), the Plotly view the
    Explorer shows (build and serialise to JSON), and the floor (:func:`_array_overlay_png`: the same pixels
    without axes, colour bar or text).
    """
    from kcore import viz

    n, c = int(dec.target.shape[0]), int(dec.target.shape[1])
    build, png, floor, interactive = [], [], [], []
    for r in range(repeats + 1):
        i, ch, k = r % n, (3 * r) % c, r % (dec.orders + 1)
        img = images[i] if images is not None else None
        t = time.perf_counter()
        fig = viz.component_overlay(dec, viz.MapSpec("component", (k,)), i, ch, img, alpha=0.65)
        t1 = time.perf_counter()
        _png(fig)
        t2 = time.perf_counter()
        _array_overlay_png(dec, k, i, ch, img)
        t3 = time.perf_counter()
        viz.component_overlay_interactive(dec, viz.MapSpec("component", (k,)), i, ch, img, alpha=0.65).to_json()
        t4 = time.perf_counter()
        if r:  # the first is a warm-up (fonts, colour maps)
            build.append(t1 - t)
            png.append(t2 - t1)
            floor.append(t3 - t2)
            interactive.append(t4 - t3)
    return {"build_seconds": statistics.median(build), "png_seconds": statistics.median(png),
            "array_floor_seconds": statistics.median(floor), "interactive_seconds": statistics.median(interactive),
            "dpi": _display()[0]}


def dashboard_redraw(run_dir: Path, changes: int = 12) -> dict[str, Any]:
    """Time the Explorer page's rerun when the image, the channel or the order changes (Streamlit AppTest).

    Opens the run folder in the dashboard (Fit page → Open), goes to the Explorer and changes one choice at a
    time, timing ``AppTest.run()``: the whole page script (provenance, controls, both figures, captions) as the
    server runs it, plus AppTest's own overhead, without the browser's paint. Every timed change shows
    something not shown before (a fresh image; a fresh channel; for orders, a fresh image is opened untimed
    first), so the figure cache never answers for the change being timed; what a real rerun may keep (the
    blind-spot map when only the channel or order changes) it keeps.
    """
    from streamlit.testing.v1 import AppTest

    from kcore.server_paths import ROOTS_ENV

    # the run folder is opened as a path on the server: the dashboard reads typed paths only under its roots
    old_roots = os.environ.get(ROOTS_ENV)
    os.environ[ROOTS_ENV] = str(Path(run_dir).resolve().parent)
    try:
        return _timed_redraws(AppTest, run_dir, changes)
    finally:
        if old_roots is None:
            os.environ.pop(ROOTS_ENV, None)
        else:
            os.environ[ROOTS_ENV] = old_roots


def _timed_redraws(AppTest: Any, run_dir: Path, changes: int) -> dict[str, Any]:
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=120)
    at.run()
    if at.exception:
        raise RuntimeError(f"the dashboard failed to start: {[e.value for e in at.exception]}")
    at.switch_page("app_pages/fit.py").run()
    at.text_input(key="kc_open_path").input(str(run_dir)).run()
    at.button(key="kc_open_go").click().run()
    at.switch_page("app_pages/explorer.py").run()
    if at.exception or len(at.get("plotly_chart")) != 2:
        raise RuntimeError(f"the Explorer did not draw the run: {[e.value for e in at.exception]}")
    choice = at.session_state["kc_ex_choice"]
    run = at.session_state["kc_runs"][at.session_state["kc_active_run"]]
    orders = next(iter(run.comparison.directions.values())).fit.config.orders
    n_images = len(at.selectbox(key="kc_ex_image").options)
    n_channels = int(at.number_input(key="kc_ex_channel").max) + 1
    fresh_images = iter([i for i in range(n_images) if i != choice.image])

    def timed(change) -> float:
        change()
        t = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t
        if at.exception:
            raise RuntimeError(f"the Explorer failed: {[e.value for e in at.exception]}")
        return dt

    out: dict[str, Any] = {"images": n_images, "channels": n_channels, "orders": orders}
    img_t = [timed(lambda i=next(fresh_images): at.selectbox(key="kc_ex_image").set_value(i)) for _ in range(changes)]
    ch_t = [timed(lambda c=c: at.number_input(key="kc_ex_channel").set_value(c))
            for c in range(1, min(changes, n_channels - 1) + 1)]
    ord_t = []
    for r in range(changes):
        at.selectbox(key="kc_ex_image").set_value(next(fresh_images)).run()
        ord_t.append(timed(lambda k=(r % orders) + 1: at.segmented_control(key="kc_ex_order").set_value(k)))
        at.segmented_control(key="kc_ex_order").set_value(0).run()
    for what, ts in (("image", img_t), ("channel", ch_t), ("order", ord_t)):
        out[f"{what}_seconds"] = statistics.median(ts)
        out[f"{what}_max_seconds"] = max(ts)
        out[f"{what}_changes"] = len(ts)
    out["worst_seconds"] = max(out[f"{w}_seconds"] for w in ("image", "channel", "order"))
    return out


def heldout_images(comp: Any, direction: str = "A_to_B", n: int | None = None) -> list[np.ndarray] | None:
    """The held-out input images of a comparison as uint8 RGB (for overlays), when the image set has them."""
    images = sample_images(max(comp.features.n_images, 1))
    raw = getattr(images, "raw", None)
    pos = comp.heldout_positions[: n or len(comp.heldout_positions)]
    if raw is None:
        return None
    return [np.asarray(raw(p)) for p in pos]
