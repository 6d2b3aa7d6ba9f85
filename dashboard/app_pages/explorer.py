"""Explorer: one image × channel × order at a time, overlaid on the input image, with the blind-spot map or
with the two networks' features x and x* side by side. For a nested run the orders' maps are either the Eq. 3–4
split of g_K or the nested components gₖ(x) − gₖ₋₁(x)."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, ui
from dashboard.state import views
from kcore import export, viz

KINDS = {"order": "$x^{(k)}$", "sum": "sum of orders", "target": "$x^*$", "output": "$g(x)$", "residual": r"$x^\Delta$"}
KIND_HELP = (r"$x^{(k)}$: the part of $x^*$ reconstructed at order k (0 = linear). Sum: several orders together. "
             r"$x^*$: the target feature. $g(x) = \sum_k x^{(k)}$: all that the source reconstructs. "
             r"$x^\Delta = x^* - g(x)$: what it cannot.")
SCALE_NAMES = {"map": "per map", "image": "per image", "shared": "shared"}
BACKGROUND_NAMES = {"gray": "grey image", "rgb": "colour image", "none": "nothing"}
NESTED_KINDS = {**KINDS, "order": "$x^{(k)}_n$"}
NESTED_EXPLAINED = ("Nested components: x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x), what the nested fit gₖ adds to gₖ₋₁ (x⁽⁰⁾ₙ = g₀(x), the "
                    "least-squares map); x⁽⁰⁾ₙ + … + x⁽ᵏ⁾ₙ = gₖ(x), and all of them sum to g_K(x). The Eq. 3–4 split "
                    "divides the same g_K(x) along its branches instead, as one optimiser path left them.")

st.title("Explorer")
run = ui.require_run()
direction = ui.direction_picker(run, key="kc_ex_dir")
ui.provenance_banner(run, direction)


def _controls(view: views.DecompositionView) -> figures.MapChoice:
    """The choices, in two rows above the maps (so the maps get the page's width, also at 1024 px)."""
    dec = view.dec
    K, C = dec.orders, int(dec.target.shape[1])
    c1, c2, c3 = st.columns([2.2, 1.3, 2.2])
    image = c1.selectbox("Image (held out)", list(range(view.n)), format_func=lambda i: view.image_ids[i],
                         key="kc_ex_image", persist_state="session",
                         help=f"The {view.n} held-out images: never used to fit g_θ.")
    views.keep_valid("kc_ex_channel", range(C), 0)  # a channel of an earlier, wider run
    channel = c2.number_input(f"Channel of x* (0–{C - 1})", 0, C - 1, 0, key="kc_ex_channel", persist_state="session",
                              help="Channels are ranked by fuzziness on the Filters page; click one there.")
    mode = c3.radio("View", list(figures.VIEWS), format_func=figures.VIEWS.get, key="kc_ex_view", horizontal=True,
                    persist_state="session",
                    help="Map and blind spots: one part of the decomposition and where the source fails. "
                         "x and x* side by side: the source network's feature and the target's, same image.")
    parts = "split"
    if mode == "map" and figures.is_nested(run, direction):  # a nested run: which components the orders show
        from kcore.fit.nested import GAINS_EXPLAINED

        parts = st.radio("Orders' maps", list(figures.PARTS), format_func=figures.PARTS.get, key="kc_ex_parts",
                         horizontal=True, persist_state="session",
                         help=NESTED_EXPLAINED + " " + GAINS_EXPLAINED)
    nested = parts == "nested"
    d1, d2, d3, d4 = st.columns([1.6, 1.6, 1.4, 1.6])
    spec, source_channel = viz.MapSpec("component", (0,)), None
    if mode == "map":
        kinds = NESTED_KINDS if nested else KINDS
        kind = d1.radio("Map", list(kinds), format_func=kinds.get, key="kc_ex_kind", persist_state="session",
                        help=KIND_HELP, horizontal=True)
        orders_all = list(range(K + 1))
        views.keep_valid("kc_ex_order", orders_all, 0)
        if kind == "order":
            order = d2.segmented_control("Order k", orders_all, key="kc_ex_order", default=0, required=True,
                                         persist_state="session")
            spec = viz.MapSpec("component", (int(order),), nested=nested)
        elif kind == "sum":
            chosen = d2.pills("Orders to sum", orders_all, selection_mode="multi", key="kc_ex_orders",
                              default=[0, 1] if K >= 1 else [0], persist_state="session")
            chosen = [k for k in (chosen or []) if k in orders_all] or [0]
            spec = viz.MapSpec("component", tuple(chosen), nested=nested)
        else:
            spec = viz.MapSpec(kind)
        d2.radio("Colour scale", list(viz.SCALES), key="kc_ex_scale", persist_state="session",
                 format_func=SCALE_NAMES.get, help=" · ".join(viz.SCALES.values()), horizontal=True)
    else:
        c_src = int(views.feature_maps(run, direction, int(image))[0].shape[0])
        views.keep_valid("kc_ex_src_channel", range(c_src), min(int(channel), c_src - 1))
        source_channel = int(d1.number_input(f"Channel of x (0–{c_src - 1})", 0, c_src - 1, min(int(channel), c_src - 1),
                                             key="kc_ex_src_channel", persist_state="session",
                                             help="The source network's channel shown beside x*'s channel "
                                                  "(the two networks' channels need not correspond)."))
        d2.caption("Each map on its own colour scale (±max), in the raw activations of its network's layer.")
    scale = views.widget_value("kc_ex_scale", "map")
    alpha = d3.slider("Opacity", 0.0, 1.0, 0.65, 0.05, key="kc_ex_alpha", persist_state="session",
                      help="Opacity of the map over the image.")
    background = d3.selectbox("Under the map", list(viz.BACKGROUNDS), key="kc_ex_bg", format_func=BACKGROUND_NAMES.get,
                              persist_state="session")
    cmap = d4.selectbox("Colour map", list(viz.DIVERGING_CMAPS), format_func=viz.DIVERGING_CMAPS.get, key="kc_ex_cmap",
                        persist_state="session", help="Diverging, white at 0. The default is safe for colour-blind "
                                                      "readers.")
    return figures.MapChoice(direction, int(image), int(channel), spec, scale, float(alpha), background, cmap, mode,
                             source_channel, parts)


@st.fragment
def explorer() -> None:
    """The Explorer's controls and its two maps (a fragment: a change redraws only these)."""
    view = views.decomposition(run, direction)
    choice = _controls(view)
    views.set_explorer_choice(choice)  # the Export page redraws exactly this
    left, right = st.columns(2)
    image_id = view.image_ids[choice.image]
    if choice.view == "a_vs_b":
        fx, fxs = figures.pair_views(run, choice)
        with left:
            ui.show_interactive(fx, caption="x: the source network's feature (what g_θ reads).")
        with right:
            ui.show_interactive(fxs, caption="x*: the target network's feature (what g_θ reconstructs).")
    else:
        with left:
            ui.show_interactive(figures.overlay_view(run, choice),
                                caption=f"{choice.spec.label} of channel {choice.channel} on {image_id} (diverging, "
                                        f"centred at 0; scale {SCALE_NAMES[choice.scale]}). Hover for values.")
        with right:
            ui.show_interactive(figures.blind_spot_view(run, choice),
                                caption=r"Blind-spot energy: mean over channels of $(x^\Delta)^2$ (sequential, from 0).")
        fit = run.comparison.directions[direction].fit
        rep = fit.heldout_report.per_channel
        K, c = view.dec.orders, choice.channel
        if choice.parts == "nested":  # the channel's gains, the numbers that go with the nested components
            g = fit.nested.gains
            civ = g.ci.channel_gain_orders if g.ci is not None else None
            civ_d = g.ci.channel_instability if g.ci is not None else None
            cells = [f"{viz.gain_label(k)} {viz.gains.percent_1(g.channel_gain_orders[k][c], civ[k][c] if civ else None)}"
                     for k in range(K + 1)]
            cells.append(r"$x^\Delta$" + f" {viz.gains.percent_1(g.channel_instability[c], civ_d[c] if civ_d else None)}")
            shares = " · ".join(cells) + " of its Var(x*) (gains of the nested fits" + (
                f", ± half the {g.ci.level:.0%} bootstrap interval)" if g.ci is not None else ")")
            st.caption(NESTED_EXPLAINED)
        elif rep.share_orders is not None and rep.share_residual is not None:
            shares = " · ".join(f"{viz.order_label(k)} {rep.share_orders[k][c]:.1%}" for k in range(K + 1))
            shares += " · " + r"$x^\Delta$" + f" {rep.share_residual[c]:.1%} of its Var(x*) (additive shares)"
        else:
            shares = "shares not stored in this run"
        st.caption(f"Channel {c} on held-out images: {shares}. Maps are in {figures.units(view)} of x* "
                   f"({'paper' if view.dec.convention == 'paper' else 'authors’'} convention), upsampled bilinearly "
                   "to the image.")
    downloads(choice)


def downloads(choice: figures.MapChoice) -> None:
    """Download buttons for the figure shown (drawn by matplotlib on the server only when clicked)."""
    stem = figures.explorer_stem(run, choice)
    cols = st.columns([1, 1, 1, 3])
    for col, fmt in zip(cols, export.FIGURE_FORMATS):
        col.download_button(
            f"{fmt.upper()}", data=lambda fmt=fmt: export.figure_bytes(figures.explorer_figure(run, choice)[1], fmt, 300),
            file_name=f"{stem}.{fmt}", mime=export.MIME[fmt], key=f"kc_ex_dl_{fmt}", on_click="ignore",
            icon=":material/download:", help=f"This view as a {fmt.upper()} figure ({export.FIGURE_FORMATS[fmt]}).")
    cols[3].caption("Download what is shown (300 dpi PNG, SVG with editable text, PDF); the Export page saves it with "
                    "everything else and a provenance sidecar.")


explorer()
