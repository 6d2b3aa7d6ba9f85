"""Compare runs: pick saved run folders and see their instability and order shares side by side, with intervals."""
from __future__ import annotations

import streamlit as st

from dashboard import depth_view, ui
from dashboard.state import paths, sweeps
from kcore.sweep import comparison_rows, csv_provenance, run_differences

st.title("Compare runs")
st.caption("Saved runs side by side: the instability and the additive order shares of each, both directions, with "
           "their 95 % intervals and the chance baselines. Runs are compared as they were fitted: a warning says "
           "where their preset, preprocessing or images differ.")

found = sweeps.comparable_runs()
if not found:
    st.info(f"No run folders under `{paths.runs_dir()}` yet. Fit on the **Fit** page or run a **Layer sweep** first.")
    st.stop()
names = {sweeps.run_name(p): p for p in found}
chosen = st.multiselect("Runs (in the order they appear on the x axis)", list(names), key="kc_compare_runs",
                        persist_state="session",
                        help="Run folders under the runs folder, also each pair of a layer sweep.")
if not chosen:
    st.caption("Choose two or more runs.")
    st.stop()
opened = ui.guarded(lambda: sweeps.opened_runs([names[n] for n in chosen]), "Could not open a run folder")
if opened is None:
    st.stop()
for text in run_differences(opened):
    st.warning(text[0].upper() + text[1:], icon=":material/warning:")
rows = [row for i, (name, comp) in enumerate(opened.items()) for row in comparison_rows(comp, name, i)]
first = next(iter(opened.values()))
prov = csv_provenance(first.provenance) | {"runs": list(opened)}
depth_view.draw(rows, key="kc_compare", x_title="run", caption=" · ".join(opened), provenance=prov, stem="runs_compared")
