"""What every session starts with: the embedded default (bundled images, two sample models), and a one-time
garbage-collector freeze of the server's import-time objects."""
from __future__ import annotations

import streamlit as st

from dashboard.state._images import DEFAULT_N_IMAGES, ImageChoice, bundled_images, image_size, images, set_images
from dashboard.state._models import DEFAULT_PAIR, load_path, make_slot, sample_models, set_slot, slot

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


def ensure_defaults() -> None:
    """Start every session on the embedded default: the bundled images and the two sample models.

    A failure (e.g. sample models missing from this checkout) is kept for :func:`default_error` and shown on
    the Models page and in the sidebar; the app still opens.
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


def default_error() -> str | None:
    """Why the embedded default could not be loaded, if it could not."""
    return st.session_state.get("kc_default_error")
