"""Export: figures (PNG, SVG, PDF), metrics (CSV, JSON), component arrays (.npz) and provenance, as a folder
on the server and as a zip download."""
from __future__ import annotations

from dataclasses import replace

import streamlit as st

from dashboard import figures, ui
from dashboard.state import paths, views
from kcore import export, viz
from kcore.server_paths import safe_name

st.title("Export")
run = ui.require_run()
ui.provenance_banner(run)
st.caption("Everything is drawn by matplotlib on the server (no browser needed) from the same figures the pages "
           "show. File names are deterministic; every figure has a JSON sidecar with the checkpoints' names and "
           "hashes, layers, K, λ, seed, versions and device, and manifest.json lists each file's SHA-256.")

c = run.comparison
dirs = list(c.directions)
nested_dirs = [d for d in dirs if figures.is_nested(run, d)]  # nested fits: their gains and nested components too
parts = ["overview", "explorer", "filters", "figure1", "arrays"] + (["nested"] if nested_dirs else [])
what = st.multiselect("Include", parts, default=parts, key="kc_exp_what", persist_state="session",
                      format_func={"overview": "Overview figures", "explorer": "Explorer maps",
                                   "filters": "Channel shares", "figure1": "Figure 1 grid",
                                   "arrays": "Component arrays (.npz)",
                                   "nested": "Nested fits: channel gains and nested components"}.get,
                      help="Metrics (CSV, JSON) and provenance are always included" +
                           (" (for a nested run with the per-channel gains and their intervals, gains_<direction>.csv)"
                            if nested_dirs else "") + ". The Explorer and Figure 1 figures use your current choices "
                           "on those pages." + (" Nested fits: the gains per channel and the nested components of the "
                                                "Explorer's image and channel (with component arrays: theirs too)."
                                                if nested_dirs else ""))
c1, c2, c3 = st.columns([1, 1, 2])
formats = c1.pills("Figure formats", list(export.FIGURE_FORMATS), selection_mode="multi",
                   default=list(export.FIGURE_FORMATS), key="kc_exp_formats", persist_state="session")
dpi = c2.number_input("PNG resolution (DPI)", 72, 1200, 300, step=50, key="kc_exp_dpi", persist_state="session")
footer = st.toggle("Provenance footer under each figure", key=views.FOOTER_KEY, persist_state="session",
                   help="A small grey line naming the checkpoints, layers and fit. Off: the figures are clean for a "
                        "paper; the JSON sidecar of every figure and provenance.json always hold the provenance.")
export_name = c3.text_input("Export name", value=run.id, key=f"kc_exp_folder_{run.id}", max_chars=80,
                            help=f"A new folder of this name under {paths.exports_dir()} (letters, digits, '.', '_' "
                                 "and '-' only; other characters become '_'). If the name is taken, the export gets "
                                 "a new folder (name-2, name-3, …): an export never mixes with another.")


def figure_items() -> list[export.FigureItem]:
    """The figures the ticked pages show, each with its file stem and sidecar facts."""
    items = []
    what_ = set(what or [])
    if "overview" in what_:
        items.append(export.FigureItem(export.figure_stem("variance"), figures.variance(run, footer),
                                       {"shows": "Var per order"}))
        items.append(export.FigureItem(export.figure_stem("loss"), figures.loss(run, footer), {"shows": "training curves"}))
        items.append(export.FigureItem(export.figure_stem("instability"), figures.instability(run, footer),
                                       {"shows": "instability and additive shares with 95 % bootstrap intervals, "
                                                 "chance baselines", "preset": c.preset}))
    if "explorer" in what_:
        m = views.explorer_choice()
        if m is None or m.direction not in c.directions:
            m = figures.MapChoice(dirs[0], 0, 0, viz.MapSpec("component", (0,)))
        if m.parts == "nested" and not figures.is_nested(run, m.direction):  # a choice made on another run
            m = replace(m, parts="split", spec=replace(m.spec, nested=False))
        view = figures.view_of(run, m)  # the split, or the nested components the Explorer shows
        if m.view == "a_vs_b":  # what the Explorer shows: x and x* side by side
            meta = {"shows": "x and x* side by side (raw activations)", "direction": m.direction,
                    "image_id": view.image_ids[m.image], "channel_x": m.source_channel, "channel_x_star": m.channel,
                    "alpha": m.alpha, "cmap": m.cmap}
            items.append(export.FigureItem(figures.pair_stem(run, m), figures.pair(run, m, footer), meta))
        else:
            for spec in (m.spec, viz.MapSpec("blind_spot")):
                mm = replace(m, spec=spec)
                meta = {"shows": spec.label, "direction": m.direction, "image_id": view.image_ids[m.image],
                        "channel": None if spec.kind == "blind_spot" else m.channel, "scale": m.scale,
                        "alpha": m.alpha, "cmap": m.cmap,
                        "limits": viz.map_limits(view.dec, spec, m.image, m.channel, m.scale)}
                items.append(export.FigureItem(figures.overlay_stem(run, mm), figures.overlay(run, mm, footer), meta))
    if "filters" in what_:
        for d in dirs:
            items.append(export.FigureItem(export.figure_stem("channel-shares", d), figures.shares(run, d, footer=footer),
                                           {"shows": "variance share per channel", "direction": d}))
    if "nested" in what_:
        m = views.explorer_choice()
        for d in nested_dirs:
            items += figures.nested_items(run, d, m, footer)
    if "figure1" in what_:
        f1 = views.figure1_choice()
        if f1 is None or f1[0] not in c.directions:
            view = views.decomposition(run, dirs[0])
            f1 = (dirs[0], tuple(range(min(2, view.n))), (0,), "image", 0.85, "gray", viz.DIVERGING_CMAP)
        d, imgs, chans, scale, alpha, bg, cmap = f1
        view = views.decomposition(run, d)
        items.append(export.FigureItem(
            figures.grid_stem(run, d, imgs, chans, scale),
            figures.grid(run, d, imgs, chans, scale, alpha, bg, cmap, footer),
            {"shows": "Figure 1 grid", "direction": d, "image_ids": [view.image_ids[i] for i in imgs],
             "channels": list(chans), "scale": scale, "cmap": cmap}))
    return items


if st.button("Write export", key="kc_exp_go", type="primary", icon=":material/save:", disabled=not formats):
    def go() -> export.ExportResult:
        """Write the export folder: the figures, metrics and, if ticked, the component arrays."""
        arrays = {}
        if "arrays" in set(what or []):
            for d in dirs:
                view = views.decomposition(run, d)
                arrays[f"components_{d}"] = (view.dec, view.image_ids)
            if "nested" in set(what or []):
                for d in nested_dirs:
                    view = views.decomposition(run, d, "nested")
                    arrays[f"nested_components_{d}"] = (view.dec, view.image_ids)
        return export.export_comparison(c, paths.export_folder(export_name), figures=figure_items(), arrays=arrays, formats=formats, dpi=int(dpi))

    with st.spinner("Drawing and writing…"):
        try:
            result = go()
        except (ValueError, OSError) as exc:
            st.error(f"Export failed: {exc}")
            result = None
    if result is not None:
        views.set_export_result(run.id, result)

result = views.export_result(run.id)
if result is not None:
    asked = safe_name(export_name)
    taken = (f" (a folder named `{asked}` already exists, so this export got its own folder; exports never mix)"
             if result.folder.name != asked else "")
    st.success(f"Wrote {len(result.files)} files to `{result.folder}`{taken}.")

    @st.fragment
    def download() -> None:
        """The zip download of the written export (a fragment: the click reruns nothing)."""
        st.download_button("Download all as zip", data=result.zip_bytes, file_name=f"kcore_export_{run.id}.zip",
                           mime="application/zip", key="kc_exp_zip", type="primary", icon=":material/download:", on_click="ignore")

    download()
    with st.expander("Files"):
        st.code("\n".join(result.files), language=None)
