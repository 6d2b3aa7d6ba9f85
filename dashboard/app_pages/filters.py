"""Filters: per-channel fuzziness (share of variance per order and of x^Δ; for a nested run, switchable with the
order-wise gains of the nested fits); click a channel to see its maps."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, ui
from dashboard.state import views
from kcore import viz

st.title("Filters")
run = ui.require_run()
direction = ui.direction_picker(run, key="kc_fl_dir")
ui.provenance_banner(run, direction)
fit = run.comparison.directions[direction].fit
rep = fit.heldout_report
K = rep.orders
gains = fit.nested.gains if fit.nested is not None else None  # a nested run: its order-wise gains as well
show = "shares"
if gains is not None:
    show = st.radio("Show", ["shares", "gains"], key="kc_fl_show", horizontal=True, persist_state="session",
                    format_func={"shares": "shares: Eq. 3–4 split of g_K",
                                 "gains": "gains Δₖ of the nested fits"}.get,
                    help="This run is a nested fit: each channel's split of g_K into orders, or what each order adds "
                         "to the channel's held-out R² (the gains).")
if show == "gains":
    st.caption("Each channel of x*: the order-wise gains of the nested fits, Δₖ = R²(gₖ) − R²(gₖ₋₁) of that channel "
               "(held-out images; with the x^Δ left by g_K each row adds up to 1). A gain below 0 means gₖ "
               "reconstructs the channel worse than gₖ₋₁. Click a row to open that channel's maps.")
else:
    st.caption(f"Each channel of x*: the additive share of its variance reconstructed at each order, "
               "Cov(x⁽ᵏ⁾, x*)/Var(x*), and the share left in x^Δ (held-out images; each row adds up to 1; preset "
               f"{run.comparison.preset}). Low-order channels are strictly consistent; a large x^Δ share marks a "
               "channel the source cannot explain. Click a row to open that channel's maps.", help=ui.SHARE_HELP)
if gains is not None:  # how the two differ, whichever is shown
    from kcore.fit.nested import GAINS_EXPLAINED

    st.caption(GAINS_EXPLAINED)

c1, c2 = st.columns([2, 1])
what = "gain" if show == "gains" else "share"
sort = c1.radio("Sort by", list(viz.SHARE_SORTS), key="kc_fl_sort", horizontal=True, persist_state="session",
                format_func=lambda s: {"channel": "channel", "residual": f"x^Δ {what}" if what == "share" else "x^Δ",
                                       "order": f"{what} of order k"}[s])
order = int(c2.number_input("Order k (for sorting)", 0, K, 0, key="kc_fl_order", persist_state="session",
                            disabled=sort != "order"))
if show == "gains":
    rows = viz.channel_gain_order(gains, sort, order)
    shown = viz.channel_gain_table(gains, rows, rep.per_channel.var_target)
    has_ci = gains.ci is not None and gains.ci.channel_gain_orders is not None
    level, n_held = (gains.ci.level, gains.ci.n_heldout) if gains.ci is not None else (None, gains.n_images)
    head = ("Gains Δₖ = R²(gₖ) − R²(gₖ₋₁) of each channel (around its own mean) and its x^Δ, in % of the channel's "
            "Var(x*), with one decimal (each row adds up to 100 %)")
else:
    rows = viz.channel_order(rep, sort, order)
    shown = viz.channel_share_table(rep, rows)
    has_ci = rep.ci is not None and rep.ci.channel_share_residual is not None
    level, n_held = (rep.ci.level if rep.ci is not None else None), rep.n_heldout
    head = "Shares in % of the channel's Var(x*)"
dead = int((shown["main order"].isna()).sum())
st.caption(head + (f", ± half the {level:.0%} bootstrap interval over the "
           f"{n_held} held-out images (as on the Overview)" if has_ci else
           " (this run kept no per-channel intervals)") + "." +
           (f" {dead} channel(s) have no variance on the held-out images: their {what}s are undefined "
            f"(\"{viz.NO_VARIANCE}\")." if dead else ""))

# widths in px: up to K = 3 every column fits the main area of a 1024 px window (about 530 px of table)
# (a gain's cell, one decimal with its interval, needs more room than a share's)
share_cols = {name: st.column_config.TextColumn(name, width=88 if show == "gains" else 72)
              for name in shown.columns[1:K + 3]}
share_cols["channel"] = st.column_config.NumberColumn("channel", width=52)
share_cols["Var(x*)"] = st.column_config.NumberColumn("Var(x*)", format="%.3g", width=60)
share_cols["main order"] = st.column_config.NumberColumn("order", width=52, help=f"The order with the largest {what}.")

# the table gets the page's width (every column readable at 1024 px, no sideways scroll inside it); the
# heatmap runs across the page below it
event = st.dataframe(shown, hide_index=True, column_config=share_cols, on_select="rerun", width="stretch",
                     selection_mode="single-row", key="kc_fl_table", height=360)
picked = event.selection.rows if event is not None and hasattr(event, "selection") else []
if picked:
    views.set_widget_value("kc_fl_channel", int(shown.iloc[picked[0]]["channel"]))
C = len(shown)
views.keep_valid("kc_fl_channel", range(C), 0)
pick, _ = st.columns([1, 3])
channel = pick.selectbox("Channel", list(range(C)), key="kc_fl_channel", help="Or click a row of the table.")
if show == "gains":
    ui.show_figure(lambda: figures.gains(run, direction, sort, order, channel),
                   key=f"gn-{run.id}-{direction}-{sort}-{order}-{channel}",
                   caption="Order-wise gain of the nested fits per channel (columns, in the table's order; the first "
                           "64) and order (rows), on the shares' colour scale; a gain below 0 is hatched; the "
                           "selected channel is outlined.")
else:
    ui.show_figure(lambda: figures.shares(run, direction, sort, order, channel),
                   key=f"sh-{run.id}-{direction}-{sort}-{order}-{channel}",
                   caption="Variance share per channel (columns, in the table's order; the first 64) and order (rows); "
                           "the selected channel is outlined.")

st.subheader(f"Channel {channel}: its maps")
view = views.decomposition(run, direction)
default_imgs = list(range(min(3, view.n)))
imgs = st.multiselect("Images", list(range(view.n)), default=default_imgs, format_func=lambda i: view.image_ids[i],
                      key="kc_fl_images", max_selections=6, persist_state="session")
if st.button("Show in Explorer", key="kc_fl_to_explorer", icon=":material/image_search:"):
    views.show_in_explorer(channel, direction)
    if gains is not None:  # the Explorer opens on the components that go with the numbers shown here
        views.set_widget_value("kc_ex_parts", "nested" if show == "gains" else "split")
    st.switch_page("app_pages/explorer.py")
if imgs and show == "gains":  # the maps that go with the gains: the nested components
    ui.show_figure(lambda: figures.grid(run, direction, imgs, [channel], "image", parts="nested"),
                   key=f"flgn-{run.id}-{direction}-{channel}-{imgs}",
                   caption=f"Channel {channel}: input, x*, the nested components x⁽⁰⁾ₙ…x⁽ᴷ⁾ₙ (x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x), "
                           "summing to g_K(x)) and x^Δ (one colour scale per image).")
elif imgs:
    ui.show_figure(lambda: figures.grid(run, direction, imgs, [channel], "image"),
                   key=f"flg-{run.id}-{direction}-{channel}-{imgs}",
                   caption=f"Channel {channel}: input, x*, x⁽⁰⁾…x⁽ᴷ⁾ and x^Δ (one colour scale per image).")
