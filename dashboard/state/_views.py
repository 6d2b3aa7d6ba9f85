"""A run's held-out decomposition as the result pages use it (computed once per run and direction), and the
choices one page hands to another (Explorer and Figure 1 → Export, Filters → Explorer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import streamlit as st

from dashboard.state._runs import RunEntry, counters
from kcore.decompose import Decomposition

MAX_DECOMPOSE_BYTES = 256 * 1024**2
"""Held-out images decomposed for the views at most take this much memory (the rest are not shown)."""


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
    positions: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.image_ids)


def decomposition(run: RunEntry, direction: str, parts: str = "split") -> DecompositionView:
    """The held-out decomposition of ``run`` in ``direction``: computed once per session, then reused.

    ``parts``: ``"split"`` (Eq. 3–4) or, for a nested fit, ``"nested"`` (:func:`kcore.decompose.decompose_comparison`).
    """
    from kcore.decompose import decompose_comparison

    cache = st.session_state.setdefault("kc_decomp", {})
    key = (run.id, direction) if parts == "split" else (run.id, direction, parts)
    if key not in cache:
        pos = working_positions(run.comparison, direction)
        dec = decompose_comparison(run.comparison, direction, pos, parts)
        ids = tuple(run.comparison.image_ids(pos))
        cache[key] = DecompositionView(dec, ids, tuple(run.raw_images.get(i) for i in ids), tuple(pos))
        counters()["decompositions"] += 1
    return cache[key]


def feature_maps(run: RunEntry, direction: str, index: int) -> tuple[Any, Any]:
    """(x, x*) of image ``index`` of the run's decomposition view: the source's and the target's raw feature
    maps (C, h, w) as extracted (before any resampling or standardisation)."""
    from kcore.pipeline import DIRECTIONS

    pos = decomposition(run, direction).positions[index]
    feats = run.comparison.features
    src = DIRECTIONS[direction][0]
    x_a, x_b = feats.x_a[pos].float(), feats.x_b[pos].float()
    return (x_a, x_b) if src == "A" else (x_b, x_a)


FOOTER_KEY = "kc_fig_footer"
"""The widget key of the 'provenance footer' switch (Figure 1 and Export pages share it)."""


def footer() -> bool:
    """Whether exported figures carry the provenance footer (their JSON sidecars always hold it)."""
    return bool(st.session_state.get(FOOTER_KEY, False))


def explorer_choice() -> Any:
    """What the Explorer shows now (a :class:`dashboard.figures.MapChoice`), or None before it was opened."""
    return st.session_state.get("kc_ex_choice")


def set_explorer_choice(choice: Any) -> None:
    st.session_state["kc_ex_choice"] = choice


def figure1_choice() -> tuple | None:
    """What Figure 1 shows now: (direction, images, channels, scale, alpha, background), or None."""
    return st.session_state.get("kc_f1_choice")


def set_figure1_choice(choice: tuple) -> None:
    st.session_state["kc_f1_choice"] = choice


def show_in_explorer(channel: int, direction: str) -> None:
    """Make the Explorer open on ``channel`` in ``direction`` (the Filters page's hand-off)."""
    st.session_state["kc_ex_channel"] = int(channel)
    st.session_state["kc_ex_dir"] = direction


def export_result(run_id: str) -> Any:
    """The last export written for run ``run_id`` in this session (a :class:`kcore.export.ExportResult`), or None."""
    rid, result = st.session_state.get("kc_exp_result", (None, None))
    return result if rid == run_id else None


def set_export_result(run_id: str, result: Any) -> None:
    """Remember the export just written for run ``run_id`` (the Export page shows it and its download)."""
    st.session_state["kc_exp_result"] = (run_id, result)


def widget_value(key: str, default: Any = None) -> Any:
    """What the page widget ``key`` holds in this session (``default`` before it was first drawn)."""
    return st.session_state.get(key, default)


def set_widget_value(key: str, value: Any) -> None:
    """Make widget ``key`` show ``value`` on its next draw (a pick elsewhere on the page, e.g. a table row)."""
    st.session_state[key] = value


def keep_valid(key: str, valid: Any, fallback: Any, *, when_missing: bool = False) -> None:
    """Before widget ``key`` is drawn: reset it to ``fallback`` when what it holds is not in ``valid``.

    Args:
        key: the widget's key.
        valid: the values it may hold now (e.g. ``range(C)`` for a channel of the run shown).
        fallback: the value it gets otherwise.
        when_missing: also set it when it holds nothing yet (else the widget's own default applies).
    """
    if key not in st.session_state:
        if when_missing:
            st.session_state[key] = fallback
    elif st.session_state[key] not in valid:
        st.session_state[key] = fallback
