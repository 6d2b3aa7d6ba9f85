"""Layer sweep: pick layers of A and B, fit every matched pair in the background, and see the depth plot grow."""
from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard import depth_view, ui
from dashboard.jobs import check_fit_request
from dashboard.state import images, jobs, models, runs, sweeps, views
from kcore.devices import DEVICE_CHOICES
from kcore.features import format_bytes
from kcore.fit import PRESETS
from kcore.limits import ENV_VARS, limits
from kcore.sweep import PAIR_MODES, SweepResult, csv_provenance, deepest_matched, network_stages

st.title("Layer sweep")
st.caption("Compare A and B at several depths: each network runs once over the images with all chosen layers "
           "captured, then g_θ is fitted for every pair of layers exactly as on the Fit page. The plot shows the "
           "instability and the additive order shares against depth, with their 95 % intervals and the chance "
           "baselines.")

a, b, imgs = models.slot("A"), models.slot("B"), images.images()
if a is None or b is None or imgs is None:
    st.warning("Choose two networks and the images on **Models & images** first.")
    st.page_link("app_pages/setup.py", label="Models & images", icon=":material/tune:")
    st.stop()


def _stages(slot) -> list[str]:
    try:
        return network_stages(slot.loaded.model, slot.input_size, layers=slot.layers)
    except ValueError:
        return [slot.default_layer]


stages_a, stages_b = deepest_matched(_stages(a), _stages(b))
for key, names, stages in (("kc_sweep_layers_A", a.layer_names, stages_a),
                           ("kc_sweep_layers_B", b.layer_names, stages_b)):
    held = views.widget_value(key)  # the choice kept from an earlier visit, maybe for another network
    if held is not None and not set(held) <= set(names):
        views.set_widget_value(key, [n for n in held if n in names] or stages)
c1, c2 = st.columns(2)
layers_a = c1.multiselect(f"Layers of A ({a.loaded.name})", a.layer_names, default=stages_a, key="kc_sweep_layers_A",
                          persist_state="session",
                          help="Shallow to deep, in the order chosen. Default: A's stages (its top-level blocks), "
                               "the deepest ones when B has fewer.")
layers_b = c2.multiselect(f"Layers of B ({b.loaded.name})", b.layer_names, default=stages_b, key="kc_sweep_layers_B",
                          persist_state="session",
                          help="Default: B's stages, the deepest ones when A has fewer.")
mode = st.radio("Pairs", list(PAIR_MODES), format_func=lambda m: f"{m}: {PAIR_MODES[m]}", key="kc_sweep_mode",
                horizontal=True, persist_state="session")
n_pairs = len(layers_a) * len(layers_b) if mode == "all" else len(layers_a)

caps = limits()
c3, c4, c5, c6 = st.columns(4)
orders = c3.number_input("K (highest order)", 0, caps.max_orders, min(2, caps.max_orders), key="kc_sweep_K",
                         persist_state="session")
epochs = c4.number_input("Epochs (0 = preset schedule)", 0, caps.max_fit_epochs, 0, key="kc_sweep_epochs",
                         persist_state="session")
preset = c5.selectbox("Preset", list(PRESETS), key="kc_sweep_preset", persist_state="session")
device = c6.selectbox("Device", list(DEVICE_CHOICES), key="kc_sweep_device", persist_state="session")
c7, c8, c9 = st.columns(3)
seed = c7.number_input("Seed", 0, caps.max_seed, 0, key="kc_sweep_seed", persist_state="session")
both = c8.checkbox("Both directions (A → B and B → A)", value=True, key="kc_sweep_both", persist_state="session")
with_baselines = c9.checkbox("Chance baselines", value=False, key="kc_sweep_baselines", persist_state="session",
                             help="Random-init B and shuffled pairs for every pair of layers (about three times "
                                  "the time): the plot draws them as reference series.")
request = jobs.FitRequest(orders=int(orders), epochs=int(epochs) or None, seed=int(seed), device=device,
                          preset=preset, both_directions=both, baselines=bool(with_baselines))
problem = None
if not layers_a or not layers_b:
    problem = "Choose at least one layer of each network."
elif mode == "diagonal" and len(layers_a) != len(layers_b):
    problem = (f"Diagonal pairs need as many layers of A as of B (now {len(layers_a)} and {len(layers_b)}). "
               "Choose as many, or pick 'all'.")
else:
    try:
        cost = check_fit_request(request.as_params(), imgs.n * n_pairs, caps)
        held = sum(imgs.n * 4 * math.prod(slot.shape_of(name) or ()) for slot, chosen in ((a, layers_a), (b, layers_b))
                   for name in chosen)
        st.caption(f"{n_pairs} pair(s) · {cost:,} image-epochs (at most {caps.max_fit_work:,}, "
                   f"{ENV_VARS['max_fit_work']}) · features held in memory: about {format_bytes(held)} (float32).")
    except (ValueError, TypeError) as exc:
        problem = str(exc)
if problem:
    st.warning(problem)

job = sweeps.current_sweep()
running = job is not None and job.running
if st.button("Start sweep", key="kc_sweep_start", type="primary", disabled=running or problem is not None,
             icon=":material/play_arrow:"):
    if ui.guarded(lambda: sweeps.start_sweep(a, layers_a, b, layers_b, imgs, request, mode),
                  "Could not start the sweep") is not None:
        st.rerun()


def _result_view(result: SweepResult) -> None:
    """The finished sweep: the plot, the table and the exports."""
    depth_view.draw(result.rows(), key="kc_sweep", x_title="layer pair, shallow → deep",
                    caption=export_caption(result), provenance=csv_provenance(result.provenance), stem="sweep_depth")
    how = result.provenance.get("reproduce") or {}
    if how.get("cli"):
        with st.expander("Reproduce this sweep", icon=":material/terminal:"):
            st.caption("The command and the Python snippet that recompute this sweep from the same files.")
            st.code(how["cli"], language="bash", wrap_lines=True)
            for note in how.get("notes") or ():
                st.caption(f"Note: {note}")
            st.code(how["python"], language="python")


def export_caption(result: SweepResult) -> str:
    """The provenance line under an exported figure."""
    p = result.provenance
    line = (f"A {result.a.name} [{result.a.short_hash}] · B {result.b.name} [{result.b.short_hash}] · "
            f"{p.get('images', {}).get('n')} images · preset {p.get('preset')} · {p.get('created')}")
    cli = (p.get("reproduce") or {}).get("cli")
    return f"{line}\nreproduce: {cli}" if cli else line


def _progress() -> None:
    job = sweeps.current_sweep()
    if job is None:
        return
    if job.running:
        if job.queued:
            st.info(f"{job.message.capitalize()}: the sweep starts when a slot is free.", icon=":material/hourglass_top:")
        else:
            st.progress(job.fraction, text=f"{job.message} · {job.elapsed:.0f} s")
        if st.button("Cancel", key="kc_sweep_cancel", icon=":material/stop:"):
            sweeps.cancel_sweep(job)
            st.toast("Cancelling after the current batch…")
        found = sweeps.pairs_so_far(job)
        if found:
            st.markdown("**Pairs fitted so far**")
            lines = []
            for p in found:
                for key, d in p.comparison.directions.items():
                    rep = d.fit.heldout_report
                    iv = rep.interval("instability")
                    lines.append({"pair": p.label, "direction": runs.DIRECTION_TITLES.get(key, key),
                                  "instability": rep.instability, "95% CI": f"[{iv[0]:.3f}, {iv[1]:.3f}]" if iv else ""})
            st.dataframe(pd.DataFrame(lines), hide_index=True)
        return
    if sweeps.first_sight(job):  # just finished: redraw the whole page, with the result below
        st.rerun()
    if job.state == "done":
        st.success(f"Finished in {job.elapsed:.0f} s: {job.label}."
                   + (f" Saved in `{job.result.folder}`." if job.result.folder else ""))
    elif job.state == "cancelled":
        st.warning("The sweep was cancelled.")
    else:
        st.error(f"The sweep stopped: {job.error}")


st.fragment(_progress, run_every=1.0 if running else None)()

job = sweeps.current_sweep()
if job is not None and job.state == "done" and job.result is not None:
    st.divider()
    st.subheader("Result")
    _result_view(job.result.result)
    st.markdown("**Open a pair on the result pages** (Overview, Explorer, Filters, Figure 1, Export)")
    pair_cols = st.columns(min(4, len(job.result.result.pairs)) or 1)
    for i, p in enumerate(job.result.result.pairs):
        if pair_cols[i % len(pair_cols)].button(p.label, key=f"kc_sweep_open_{i}"):
            runs.add_run(sweeps.pair_entry(job.result, p))
            st.switch_page("app_pages/overview.py")
