"""Filters: per-channel fuzziness (share of variance per order and of x^Δ); click a channel to see its maps."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, ui
from dashboard.state import views
from kcore import viz

st.title("Filters")
run = ui.require_run()
direction = ui.direction_picker(run, key="kc_fl_dir")
ui.provenance_banner(run, direction)
st.caption(f"Each channel of x*: the additive share of its variance reconstructed at each order, Cov(x⁽ᵏ⁾, x*)/Var(x*), "
           "and the share left in x^Δ (held-out images; each row adds up to 1; preset "
           f"{run.comparison.preset}). Low-order channels are strictly consistent; a large x^Δ share marks a channel "
           "the source cannot explain. Click a row to open that channel's maps.", help=ui.SHARE_HELP)

rep = run.comparison.directions[direction].fit.heldout_report
K = rep.orders

c1, c2 = st.columns([2, 1])
sort = c1.radio("Sort by", list(viz.SHARE_SORTS), key="kc_fl_sort", horizontal=True, persist_state="session",
                format_func=lambda s: {"channel": "channel", "residual": "x^Δ share", "order": "share of order k"}[s])
order = int(c2.number_input("Order k (for sorting)", 0, K, 0, key="kc_fl_order", persist_state="session",
                            disabled=sort != "order"))
rows = viz.channel_order(rep, sort, order)
shown = viz.channel_share_table(rep, rows)
has_ci = rep.ci is not None and rep.ci.channel_share_residual is not None
dead = int((shown["main order"].isna()).sum())
st.caption("Shares in % of the channel's Var(x*)" + (f", ± half the {rep.ci.level:.0%} bootstrap interval over the "
           f"{rep.n_heldout} held-out images (as on the Overview)" if has_ci else
           " (this run kept no per-channel intervals)") + "." +
           (f" {dead} channel(s) have no variance on the held-out images: their shares are undefined "
            f"(\"{viz.NO_VARIANCE}\")." if dead else ""))

# widths in px: up to K = 3 every column fits the main area of a 1024 px window (about 530 px of table)
share_cols = {name: st.column_config.TextColumn(name, width=72) for name in shown.columns[1:K + 3]}
share_cols["channel"] = st.column_config.NumberColumn("channel", width=52)
share_cols["Var(x*)"] = st.column_config.NumberColumn("Var(x*)", format="%.3g", width=60)
share_cols["main order"] = st.column_config.NumberColumn("order", width=52, help="The order with the largest share.")

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
    st.switch_page("app_pages/explorer.py")
if imgs:
    ui.show_figure(lambda: figures.grid(run, direction, imgs, [channel], "image"),
                   key=f"flg-{run.id}-{direction}-{channel}-{imgs}",
                   caption=f"Channel {channel}: input, x*, x⁽⁰⁾…x⁽ᴷ⁾ and x^Δ (one colour scale per image).")
