"""Pieces every page uses: the provenance banner, figure display, the 'no result yet' notice, errors."""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import streamlit as st
from matplotlib.figure import Figure

from dashboard.state import runs
from kcore import export

DISPLAY_DPI = 150
LAYOUT_PX = 1000
"""About the width of the main area on a large screen: fixed figure widths are shares of it."""
SHARE_HELP = ("Additive share s⁽ᵏ⁾ = Cov(x⁽ᵏ⁾, x*)/Var(x*) (one global mean, as the paper's Var). Because "
              "x⁽⁰⁾ + … + x⁽ᴷ⁾ + x^Δ = x*, the shares of the orders and of x^Δ add up to exactly 100 %.")
PRESET_HELP = ("The split into orders is not unique: the training recipe decides it (docs/conventions.md, 'How "
               "much the order split depends on the recipe', measures it), so a share is named with the preset that "
               "made it.")
VAR_RATIO_HELP = ("The paper's metric Var(x⁽ᵏ⁾)/Var(x*) (Sec. 4.2). It is not a share: the components are "
                  "correlated, so these ratios need not add up to 1 and one of them can exceed 1.")


def model_line(info: Any, role: str) -> str:
    """``**A** name `hash12` · layer `layer2` · 1,234 params · acc 91.2 %`` (markdown)."""
    acc = getattr(info, "test_accuracy", None)
    acc_s = f" · test acc {acc:.1%}" if isinstance(acc, (int, float)) else ""
    arch = f" ({info.architecture})" if getattr(info, "architecture", None) else ""
    return (f"**{role}** {info.name}{arch} `{info.sha256[:12]}` · layer `{info.layer}` · "
            f"{info.num_parameters:,} params{acc_s}")


def provenance_banner(run: runs.RunEntry, direction: str | None = None) -> None:
    """Which checkpoints (name, hash prefix, parameters, accuracy) and settings produced what is shown."""
    c = run.comparison
    fit = c.directions[direction or next(iter(c.directions))].fit
    cfg = fit.config
    with st.container(border=True, key=f"kc_prov_{run.id}_{direction}"):
        left, right = st.columns([3, 2])
        left.markdown(model_line(c.a, "A") + "  \n" + model_line(c.b, "B"))
        held = len(c.heldout_positions)
        right.markdown(
            f"K = {cfg.orders} · λ = {cfg.lam:g} · seed {cfg.seed} · {fit.device}  \n"
            f"{held} held-out images · run `{run.id}`"
        )


def require_run() -> runs.RunEntry:
    """The active run, or a notice with a link to the Fit page (and the page stops)."""
    run = runs.active_run()
    if run is None:
        st.info("No result yet. Run a fit on the **Fit** page (it shows its progress and the time left), "
                "or re-open a run folder there.")
        st.page_link("app_pages/fit.py", label="Go to Fit", icon=":material/play_arrow:")
        st.stop()
    return run


def direction_picker(run: runs.RunEntry, key: str) -> str:
    """A radio over the run's directions (A → B, B → A), with their meaning."""
    dirs = list(run.comparison.directions)
    if len(dirs) == 1:
        st.caption(f"Direction **{runs.DIRECTION_TITLES[dirs[0]]}**: {runs.DIRECTION_HELP[dirs[0]]}")
        return dirs[0]
    choice = st.radio("Direction", dirs, format_func=lambda d: runs.DIRECTION_TITLES.get(d, d), key=key,
                      horizontal=True, help=" · ".join(f"{runs.DIRECTION_TITLES[d]}: {runs.DIRECTION_HELP[d]}" for d in dirs),
                      persist_state="session")
    return choice


DISPLAY_PNG_COMPRESSION = 1  # zlib level of displayed PNGs: far faster to encode than the default 6, same pixels


@st.cache_data(max_entries=256, show_spinner=False)
def _png(key: str, dpi: int, _build: Callable[[], Figure]) -> bytes:
    return export.figure_bytes(_build(), "png", dpi, png_compression=DISPLAY_PNG_COMPRESSION)


def show_figure(build: Callable[[], Figure], *, key: str, caption: str | None = None, width: int | str = "stretch",
                dpi: int = DISPLAY_DPI) -> bytes | None:
    """Display the kcore.viz figure ``build()`` returns, as a PNG (Export saves the same figure).

    ``key`` must name everything the figure shows (run id, direction, image, channel, options): the PNG is
    cached under it, so reruns with the same choices neither rebuild nor re-render the figure.
    """
    try:
        png = _png(key, dpi, build)
    except ValueError as exc:
        st.error(f"Could not draw this figure: {exc}")
        return None
    if isinstance(width, int) and width < LAYOUT_PX:
        # a fixed width as a share of a wide page: the figure shrinks with a narrow window instead of overflowing
        col, _ = st.columns([width, LAYOUT_PX - width])
        col.image(png, caption=caption, width="stretch")
    else:
        st.image(png, caption=caption, width="stretch" if isinstance(width, int) else width)
    return png


PLOTLY_CONFIG = {
    "displaylogo": False,
    # zoom, pan and reset stay; the page's own download buttons save the figure (with units and editable text)
    "modeBarButtonsToRemove": ["select2d", "lasso2d", "autoScale2d", "toImage"],
}


def show_interactive(fig: Any, *, caption: str | None = None) -> None:
    """Display a Plotly figure from :mod:`kcore.viz` with its own colours (not Streamlit's theme)."""
    st.plotly_chart(fig, theme=None, config=PLOTLY_CONFIG)
    if caption:
        st.caption(caption)


def figure_key(*parts: Any) -> str:
    """A stable short key for widgets/caches from what a figure shows."""
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:12]


def guarded(fn: Callable[[], Any], what: str) -> Any:
    """Run ``fn``; show a core ValueError as a readable message instead of a traceback (returns None)."""
    try:
        return fn()
    except (ValueError, FileNotFoundError) as exc:
        st.error(f"{what}: {exc}")
        return None
