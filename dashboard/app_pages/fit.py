"""Fit: settings of g_θ, a background fit with progress and Cancel, and the runs of this session."""
from __future__ import annotations

import streamlit as st

from dashboard import progress, ui
from dashboard.jobs import check_fit_request
from dashboard.state import images, jobs, models, paths, runs
from kcore.baselines import baselines_are_cheap
from kcore.devices import DEVICE_CHOICES
from kcore.fit import PRESETS
from kcore.limits import ENV_VARS, limits

DIRECTION_CHOICES = {"one": "A → B (blind spots of A)", "both": "Both: A → B and B → A (unreliable features of A)"}

st.title("Fit")
st.caption("g_θ learns to reconstruct the target network's feature x* from the source's x with K+1 branches of "
           "increasing non-linearity (Eq. 1–2). The fit runs in the background: you can look at other pages "
           "meanwhile, and cancel it here.")

a, b, imgs = models.slot("A"), models.slot("B"), images.images()
layer_a, layer_b = models.chosen_layer("A"), models.chosen_layer("B")

with st.container(border=True, key="kc_fit_summary"):
    if a is None or b is None or imgs is None:
        st.warning("Choose two networks and the images on **Models & images** first.")
        st.page_link("app_pages/setup.py", label="Models & images", icon=":material/tune:")
        st.stop()
    sa, sb = a.shape_of(layer_a), b.shape_of(layer_b)
    st.markdown(
        f"**A** {a.loaded.name} `{a.loaded.short_hash}` · `{layer_a}` {'×'.join(map(str, sa))}  \n"
        f"**B** {b.loaded.name} `{b.loaded.short_hash}` · `{layer_b}` {'×'.join(map(str, sb))}  \n"
        f"**Images** {imgs.description}"
    )
    if tuple(sa[1:]) != tuple(sb[1:]):
        st.caption("Spatial sizes differ: the source map is resampled bilinearly to the target's H×W.")

st.subheader("Settings")
caps = limits()  # the server's caps (kcore.limits): the widgets stop there, and start_fit checks them again
c1, c2, c3 = st.columns(3)
orders = c1.number_input("K (highest order)", 0, caps.max_orders, min(2, caps.max_orders), key="kc_fit_K",
                         persist_state="session",
                         help="g_θ has K+1 branches: x⁽⁰⁾ is linear (the strictest consistency), x⁽ᵏ⁾ passes k ReLUs.")
lam = c2.number_input("λ (penalty on the gates p⁽ᵏ⁾)", 0.0, float(caps.max_coefficient), 0.1, step=0.05, format="%.3f",
                      key="kc_fit_lam", persist_state="session",
                      help="Eq. 2: pushes consistent knowledge into the lowest order that can represent it. "
                           "The paper uses 0.1.")
epochs = c3.number_input("Epochs (0 = preset schedule)", 0, caps.max_fit_epochs, 0, key="kc_fit_epochs",
                         persist_state="session",
                         help="0 keeps the preset's schedule (fast: at most 40 epochs, at least 800 steps, early "
                              "stopping on a monitor split; authors: 1000 epochs). A number is taken literally. "
                              f"This server allows at most {caps.max_fit_epochs} ({ENV_VARS['max_fit_epochs']}).")
c4, c5, c6 = st.columns(3)
seed = c4.number_input("Seed", 0, caps.max_seed, 0, key="kc_fit_seed", persist_state="session",
                       help="Seeds the held-out split, the initialisation and the batch order.")
device = c5.selectbox("Device", list(DEVICE_CHOICES), key="kc_fit_device", persist_state="session",
                      help="auto = CUDA when present, else the CPU.")
preset = c6.selectbox("Preset", list(PRESETS), key="kc_fit_preset", persist_state="session",
                      help="fast: the paper's conventions with a closed-form start. authors: the authors' recipe "
                           "(1000 epochs; slow on a CPU).")
both = st.radio("Directions", list(DIRECTION_CHOICES), format_func=DIRECTION_CHOICES.get, key="kc_fit_dirs",
                horizontal=True, persist_state="session",
                help="A → B: x^Δ is what B encodes and A cannot reconstruct (blind spots of A). "
                     "B → A: what A encodes and B cannot (unreliable features of A).") == "both"

cheap = baselines_are_cheap(imgs.n, sb)
with_baselines = st.checkbox(
    "Chance baselines (random-init B, shuffled pairs)", value=cheap, key="kc_fit_baselines",
    help="Also fit, with the same recipe and split, B replaced by a randomly initialised network of its architecture "
         "and the image pairing shuffled (instability near 1; clearly above 1 means g over-fits: too few images). The Overview draws them as reference lines. They run "
         "after the fit, whose result is shown as soon as it is done; together about two to three times the fit's "
         "time" + ("; on by default for a fit this small." if cheap else "; off by default here."))

nested = st.checkbox(
    "Nested fits (order-wise gains)", value=False, key="kc_fit_nested",
    help="Fit g₀ (least squares), then g₁ … g_K, each started from the one before with its new gate at 0, and show "
         "what each order adds to the held-out R² (with 95 % intervals) beside the split of g_K. The gains depend "
         "far less on the recipe than the split does; costs about K times the training steps (linear gates).")
request = jobs.FitRequest(orders=int(orders), lam=float(lam), epochs=int(epochs) or None, seed=int(seed),
                           device=device, preset=preset, both_directions=both, baselines=bool(with_baselines),
                           nested=bool(nested))
try:
    cost, over = check_fit_request(request.as_params(), imgs.n, caps), None
except (ValueError, TypeError) as exc:
    cost, over = None, str(exc)
st.caption(
    (f"This request: {cost:,} image-epochs" if cost is not None else "This request is over the server's budget")
    + f" (at most {caps.max_fit_work:,}, {ENV_VARS['max_fit_work']}). The server runs {caps.max_jobs} job(s) at "
    f"once for all its users ({ENV_VARS['max_jobs']}); more wait in line.")
if over:
    st.warning(over)

running = jobs.job_running()
if st.button("Start fit", key="kc_fit_start", type="primary", disabled=running or over is not None,
             icon=":material/play_arrow:",
             help="Disabled while a fit of this session runs or waits (cancel it below, or wait)." if running
             else "Disabled: the settings above are over this server's budget." if over else None):
    if ui.guarded(lambda: jobs.start_fit(a, layer_a, b, layer_b, imgs, request), "Could not start the fit") is not None:
        st.rerun()  # redraw at once with Start fit disabled while the job waits or runs


def _progress() -> None:
    job = jobs.current_job()
    if job is None:
        return
    if not jobs.is_adopted(job):
        st.rerun()  # a result since the last poll (the fit's own, or the final one): redraw everything with it
    if job.running:
        if job.queued:
            st.info(f"{job.message.capitalize()}: the fit starts when a slot is free · waiting {job.elapsed:.0f} s",
                    icon=":material/hourglass_top:")
        else:
            if job.partial is not None:
                st.success("The fit is done and shown on the result pages; the chance baselines run on and appear "
                           "on the Overview when they finish.", icon=":material/check_circle:")
            progress.draw_progress(job)
        if st.button("Cancel", key="kc_fit_cancel", icon=":material/stop:",
                     help="Stops the chance baselines; the fit stays." if job.partial is not None else None):
            jobs.cancel_job(job)
            if not job.running:  # it was still in the queue: it has ended, redraw with Start fit enabled
                st.rerun()
            st.toast("Cancelling after the current batch…")
        return
    if job.state == "done":
        st.success(f"Finished in {job.elapsed:.0f} s: {job.label}.")
        cols = st.columns(4)
        cols[0].page_link("app_pages/overview.py", label="Overview", icon=":material/bar_chart:")
        cols[1].page_link("app_pages/explorer.py", label="Explorer", icon=":material/image_search:")
        cols[2].page_link("app_pages/filters.py", label="Filters", icon=":material/grid_on:")
        cols[3].page_link("app_pages/figure1.py", label="Figure 1", icon=":material/view_module:")
    elif job.state == "cancelled":
        st.warning("The chance baselines were cancelled; the fit's result is kept (Overview)." if job.partial is not None
                   else "The fit was cancelled. Earlier results are kept.")
    elif job.partial is not None:
        st.error(f"The chance baselines stopped: {job.error}. The fit's result is kept (Overview).")
    else:
        st.error(f"The fit stopped: {job.error}")


st.fragment(_progress, run_every=1.0 if running else None)()

st.divider()
st.subheader("Results of this session")
session_runs = runs.runs()
if session_runs:
    for rid, run in reversed(list(session_runs.items())):
        where = f" · folder `{run.run_dir}`" if run.run_dir else ""
        st.markdown(f"- {run.label} · {run.origin}{where}")
else:
    st.caption("None yet.")

with st.expander("Re-open a run folder", expanded=not session_runs):
    st.caption(f"Every fit is saved as a run folder under `{paths.runs_dir()}` (also `kcore fit --out` folders). "
               "A run folder holds the fitted g_θ and the held-out features, so the maps redraw without the checkpoints.")
    found = runs.run_folders()
    choice = st.selectbox("Found on the server", [str(p) for p in found], index=None, key="kc_open_found",
                          placeholder="choose a run folder" if found else "no run folders yet")
    typed = st.text_input("…or a path", key="kc_open_path", placeholder="/path/to/run")
    if st.button("Open", key="kc_open_go", disabled=not (choice or typed)):
        entry = ui.guarded(lambda: runs.open_run_folder(typed or choice), "Could not open the run folder")
        if entry is not None:
            runs.add_run(entry)
            st.success(f"Opened {entry.label}.")
            st.rerun()

with st.expander("Details", expanded=False):
    c = runs.counters()
    st.caption(f"Fits started in this session: {c['fits_started']} · decompositions computed: {c['decompositions']}. "
               "Changing the image, channel or order on the result pages reuses the fit and its decomposition.")
