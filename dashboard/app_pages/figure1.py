"""Figure 1 of the paper as a grid: image, x*, x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ for chosen images and channels."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, ui
from dashboard.state import views
from kcore import export, viz

st.title("Figure 1")
run = ui.require_run()
direction = ui.direction_picker(run, key="kc_f1_dir")
ui.provenance_banner(run, direction)
st.caption("Like the paper's Fig. 1: consistent features disentangled from a filter at each order of fuzziness, "
           "and the inconsistent rest x^Δ. Rows are (image, channel); the colour map is diverging, centred at 0.")

view = views.decomposition(run, direction)
rep = run.comparison.directions[direction].fit.heldout_report.per_channel
C = rep.channels
top = sorted(range(C), key=lambda c: -rep.var_target[c])[:2]  # the most active channels by default

c1, c2 = st.columns(2)
imgs = c1.multiselect("Images", list(range(view.n)), default=list(range(min(2, view.n))), max_selections=8,
                      format_func=lambda i: view.image_ids[i], key="kc_f1_images", persist_state="session")
chans = c2.multiselect("Channels of x*", list(range(C)), default=top, max_selections=8, key="kc_f1_channels",
                       persist_state="session", help="Default: the two channels with the largest Var(x*).")
c3, c4, c5, c6 = st.columns(4)
scale = c3.radio("Colour scale", list(viz.SCALES), index=1, key="kc_f1_scale", persist_state="session",
                 format_func=lambda s: {"map": "per map", "image": "per row", "shared": "shared"}[s],
                 help=" · ".join(viz.SCALES.values()))
alpha = c4.slider("Opacity of the maps", 0.0, 1.0, 0.85, 0.05, key="kc_f1_alpha", persist_state="session")
background = c5.radio("Under the maps", list(viz.BACKGROUNDS), key="kc_f1_bg", persist_state="session",
                      format_func=lambda b: {"gray": "grey image", "rgb": "colour image", "none": "nothing"}[b])
cmap = c6.selectbox("Colour map", list(viz.DIVERGING_CMAPS), format_func=viz.DIVERGING_CMAPS.get, key="kc_f1_cmap",
                    persist_state="session", help="Diverging, white at 0; the default is safe for colour-blind readers.")
footer = c6.toggle("Provenance footer", key=views.FOOTER_KEY, persist_state="session",
                   help="A grey line naming the checkpoints, layers and fit under the figure. The JSON sidecar of an "
                        "export always holds the provenance.")

if not imgs or not chans:
    st.info("Choose at least one image and one channel.")
    st.stop()

views.set_figure1_choice((direction, tuple(imgs), tuple(chans), scale, float(alpha), background, cmap))
build = lambda footer=footer: figures.grid(run, direction, imgs, chans, scale, alpha, background, cmap, footer)  # noqa: E731
# the page shows the provenance footer as text under the grid (the grid's own text stays readable at any width);
# the downloads carry it in the figure
ui.show_figure(lambda: build(False), key=f"f1-{run.id}-{direction}-{imgs}-{chans}-{scale}-{alpha}-{background}-{cmap}",
               caption="Figure 1 grid; every colour bar is in units of x* (exported as PNG, SVG and PDF from the "
                       "same figure).")
if footer:
    st.caption(export.caption(run.comparison, direction))


@st.fragment
def downloads() -> None:
    """One download button per figure format; the grid is drawn when one is clicked."""
    stem = figures.grid_stem(run, direction, imgs, chans, scale)
    cols = st.columns(3)
    for col, fmt in zip(cols, export.FIGURE_FORMATS):
        col.download_button(f"Download {fmt.upper()}", data=lambda fmt=fmt: export.figure_bytes(build(), fmt, 300),
                            file_name=f"{stem}.{fmt}", mime=export.MIME[fmt], key=f"kc_f1_dl_{fmt}",
                            on_click="ignore")


downloads()
