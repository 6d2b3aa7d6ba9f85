"""Explorer: one image × channel × order at a time, overlaid on the input image, and the blind-spot map."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, state, ui
from kcore import viz

KINDS = {"order": "x⁽ᵏ⁾", "sum": "sum of orders", "target": "x*", "output": "g(x)", "residual": "x^Δ"}
KIND_HELP = ("x⁽ᵏ⁾: the part of x* reconstructed at order k (0 = linear). Sum: several orders together. "
             "x*: the target feature. g(x) = Σₖ x⁽ᵏ⁾: all that the source reconstructs. "
             "x^Δ = x* − g(x): what it cannot.")

st.title("Explorer")
run = ui.require_run()
direction = ui.direction_picker(run, key="kc_ex_dir")
ui.provenance_banner(run, direction)


@st.fragment
def explorer() -> None:
    view = state.decomposition(run, direction)
    dec = view.dec
    K, C = dec.orders, int(dec.target.shape[1])
    controls, main = st.columns([1, 3.2], gap="medium")
    with controls:
        image = st.selectbox("Image (held out)", list(range(view.n)), format_func=lambda i: view.image_ids[i],
                             key="kc_ex_image", persist_state="session",
                             help=f"The {view.n} held-out images: never used to fit g_θ.")
        if st.session_state.get("kc_ex_channel", 0) >= C:
            st.session_state["kc_ex_channel"] = 0
        channel = st.number_input(f"Channel of x* (0–{C - 1})", 0, C - 1, 0, key="kc_ex_channel",
                                  persist_state="session",
                                  help="Channels are ranked by fuzziness on the Filters page; click one there.")
        kind = st.radio("Map", list(KINDS), format_func=KINDS.get, key="kc_ex_kind", persist_state="session",
                        help=KIND_HELP)
        orders_all = list(range(K + 1))
        if st.session_state.get("kc_ex_order", 0) not in orders_all:
            st.session_state["kc_ex_order"] = 0
        if kind == "order":
            order = st.segmented_control("Order k", orders_all, key="kc_ex_order", default=0, required=True,
                                         persist_state="session")
            spec = viz.MapSpec("component", (int(order),))
        elif kind == "sum":
            chosen = st.pills("Orders to sum", orders_all, selection_mode="multi", key="kc_ex_orders",
                              default=[0, 1] if K >= 1 else [0], persist_state="session")
            chosen = [k for k in (chosen or []) if k in orders_all] or [0]
            spec = viz.MapSpec("component", tuple(chosen))
        else:
            spec = viz.MapSpec(kind)
        scale = st.radio("Colour scale", list(viz.SCALES), key="kc_ex_scale", persist_state="session",
                         format_func=lambda s: {"map": "per map", "image": "per image", "shared": "shared"}[s],
                         help=" · ".join(viz.SCALES.values()))
        alpha = st.slider("Opacity of the map", 0.0, 1.0, 0.65, 0.05, key="kc_ex_alpha", persist_state="session")
        background = st.radio("Under the map", list(viz.BACKGROUNDS), key="kc_ex_bg",
                              format_func=lambda b: {"gray": "grey image", "rgb": "colour image", "none": "nothing"}[b],
                              persist_state="session")
    choice = figures.MapChoice(direction, int(image), int(channel), spec, scale, float(alpha), background)
    state.set_explorer_choice(choice)  # the Export page redraws exactly this
    with main:
        left, right = st.columns(2)
        with left:
            ui.show_interactive(figures.overlay_view(run, choice),
                                caption=f"{spec.label} of channel {channel} on {view.image_ids[image]} "
                                        f"(diverging, centred at 0; scale {scale}). Hover for values; the Export "
                                        "page saves this map as a PNG/SVG/PDF figure.")
        with right:
            ui.show_interactive(figures.blind_spot_view(run, choice),
                                caption="Blind-spot energy: mean over channels of (x^Δ)² (sequential, from 0)")
        rep = run.comparison.directions[direction].fit.heldout_report.per_channel
        units = ("standardised units of x* (paper convention)" if dec.convention == "paper"
                 else "raw units of x* (authors' convention)")
        if rep.share_orders is not None and rep.share_residual is not None:
            shares = " · ".join(f"{viz.order_label(k)} {rep.share_orders[k][channel]:.1%}" for k in range(K + 1))
            shares += f" · x^Δ {rep.share_residual[channel]:.1%} of its Var(x*) (additive shares)"
        else:
            shares = "shares not stored in this run"
        st.caption(f"Channel {channel} on held-out images: {shares}. Maps are in {units} and upsampled bilinearly to the image.")


explorer()
