"""Overview: Var per order, instability, held-out error, the loss curve and the 0-order baseline, per direction."""
from __future__ import annotations

import streamlit as st

from dashboard import figures, progress, ui
from dashboard.state import runs
from kcore import export, viz
from kcore.baselines import BASELINE_LABELS
from kcore.metrics import plus_minus

st.title("Overview")
run = ui.require_run()
ui.provenance_banner(run)
progress.baselines_state(run)  # the chance baselines still running after the fit, if they are
c = run.comparison

st.caption("All numbers are measured on held-out images that were never used to fit g_θ. Var follows the "
           "paper's Sec. 4.2; instability = Var(x^Δ)/Var(x*): the share of the target feature that the source "
           "cannot reconstruct at any order up to K.")


def _by_group(rep) -> str:
    """', resampled by group (G groups)' when the report's intervals resampled whole groups, else ''."""
    n_groups = rep.ci.n_groups if rep.ci is not None else None
    return f", resampled by group ({n_groups} groups)" if n_groups else ""


cols = st.columns(len(c.directions), gap="large")
for col, (key, d) in zip(cols, c.directions.items()):
    f = d.fit
    rep = f.heldout_report
    with col:
        st.subheader(runs.DIRECTION_TITLES[key])
        st.caption(runs.DIRECTION_HELP[key])
        m1, m2 = st.columns(2)
        iv = rep.interval("instability")
        m1.metric("Instability Var(x^Δ)/Var(x*)", plus_minus(rep.instability, iv),
                  help="0 = the target feature is fully reconstructed; 1 = nothing is. ± is half the width of the "
                       + (f"{rep.ci.level:.0%} bootstrap interval [{iv[0]:.3f}, {iv[1]:.3f}] over the "
                          f"{rep.n_heldout} held-out images{_by_group(rep)} (no refit)." if iv
                          else "interval (none computed)."))
        m2.metric("Held-out error 1 − R²", f"{f.heldout_error:.3f}",
                  help="Σ(x* − g(x))² / Σ(x* − channel mean)² on held-out images.")
        m3, m4 = st.columns(2)
        m3.metric("Least-squares error 1 − R²", f"{f.baseline.linear_error:.3f}",
                  help=f"The 0-order baseline: a closed-form least-squares {f.baseline.linear_kernel}×"
                       f"{f.baseline.linear_kernel} convolution, held out: what a purely linear map reconstructs, in the "
                       f"units of g_θ's held-out error beside it (R² {f.baseline.linear_r2:.3f}).")
        m4.metric("Linear CKA (x, x*)", f"{f.baseline.cka:.3f}", help="Linear CKA between the two feature maps.")
        for w in rep.warnings():
            st.warning(w[0].upper() + w[1:], icon=":material/warning:")
        for ref in c.baselines.values():
            r = ref.reports.get(key)
            if r is not None:
                st.caption(f"Chance baseline, {ref.label}: instability {plus_minus(r.instability, r.interval('instability'))}"
                           f" ({ref.description}).")
        v = c.verdict(key)
        show = {"beyond_chance": st.success, "unknown": st.info}.get(v.code, st.warning)
        show(f"**Verdict against chance:** {v.text}" + (f" {v.fix}" if v.fix else ""),
             icon=":material/check_circle:" if v.beyond_chance else None)
        for w in v.warnings:
            st.warning(w, icon=":material/warning:")
        if rep.has_shares:
            shares = " · ".join(f"{viz.order_label(k)} {plus_minus(s, rep.interval(f'share_x{k}'), '.1f', True)}"
                                for k, s in enumerate(rep.share_orders))
            shares += f" · x^Δ {plus_minus(rep.share_residual, rep.interval('share_residual'), '.1f', True)}"
        else:
            shares = "— (re-open the run to compute them)"
        sp = c.seed_spread.get(key)
        if sp:
            sm = sp["summary"]
            split = " · ".join(f"{viz.order_label(k)} sd {s['sd']:.1%}" for k, s in enumerate(sm["share_orders"]))
            st.caption(f"Spread from fitting over seeds {sp['seeds']}: instability {sm['instability']['mean']:.3f} "
                       f"(sd {sm['instability']['sd']:.3f}); shares {split}.")
        ratios = " · ".join(f"{viz.order_label(k)} {s:.3f}" for k, s in enumerate(rep.var_ratio_orders))
        st.caption(f"Share of Var(x*) per order (preset {c.preset}; Cov(x⁽ᵏ⁾, x*)/Var(x*), adds up to 100 %): "
                   f"{shares}", help=ui.SHARE_HELP + " " + ui.PRESET_HELP)
        if f.nested is not None:  # nested fits: what each order adds, beside the split of g_K
            from kcore.fit.nested import GAINS_EXPLAINED, GUARD_EXPLAINED, guard_rows

            g = f.nested.gains
            gains = " · ".join(f"Δ{k} {plus_minus(v, g.interval(k), '.1f', True)}" for k, v in enumerate(g.gain_orders))
            st.caption(f"Order-wise gains of nested fits (R²(gₖ) − R²(gₖ₋₁), add up to 100 % with x^Δ): {gains} · "
                       f"x^Δ {plus_minus(g.instability, g.ci.instability if g.ci else None, '.1f', True)}")
            for w in g.fragile:
                st.warning(w, icon=":material/warning:")
            st.caption(GAINS_EXPLAINED)
            st.dataframe(guard_rows(f.nested.stages), hide_index=True, key=f"kc_ov_guard_{key}")
            st.caption(GUARD_EXPLAINED)
        st.caption(f"Paper's Var(x⁽ᵏ⁾)/Var(x*): {ratios}", help=ui.VAR_RATIO_HELP)
        st.caption(f"gates p = {', '.join(f'{g:.3g}' for g in f.gates) or '—'} · kept epoch {f.best_epoch} "
                     f"of {len(f.history)} · {f.seconds:.0f} s")

width = 420 * len(c.directions) + 60
st.subheader("Instability and shares, with their uncertainty")
if not c.baselines and not progress.baselines_running(run):
    st.caption("No chance baselines in this run (tick *Chance baselines* on the Fit page, or `kcore fit --baselines`).")
for kind, why in c.provenance.get("baselines_failed", {}).items():  # the fit above stands; the reference does not
    st.warning(f"Chance baseline {BASELINE_LABELS.get(kind, kind)} failed: {why}. The fit's numbers above are "
               "complete; without this reference the verdict against chance is partial.", icon=":material/warning:")
for kind, why in c.provenance.get("baselines_skipped", {}).items():
    st.caption(f"Chance baseline {BASELINE_LABELS.get(kind, kind)} was not run: {why}")
ui.show_figure(lambda: figures.instability(run), key=f"inst-{run.id}-{len(c.baselines)}", width=width + 200,
               caption="Left: instability with its bootstrap interval over held-out images"
                       f"{_by_group(next(iter(c.directions.values())).fit.heldout_report)}; lines in shaded bands "
                       "(their intervals): the same fit against a randomly initialised B and against shuffled image "
                       f"pairs (chance level). Right: additive shares (preset {c.preset}) with the interval of each "
                       "share; an open triangle marks an interval clipped at the axis. "
                       + " · ".join(f"{runs.DIRECTION_TITLES[k]}: {c.verdict(k).headline}" for k in c.directions))
others = [r for rid, r in runs.runs().items() if rid != run.id]
if others:
    with st.expander(f"Compare with the other {len(others)} result(s) of this session"):
        rows = []
        for r in [run] + others:
            for key, d in r.comparison.directions.items():
                rep = d.fit.heldout_report
                iv = rep.interval("instability")
                rows.append({"result": r.label, "direction": key, "preset": r.comparison.preset,
                             "instability": rep.instability, "ci_lo": iv[0] if iv else None,
                             "ci_hi": iv[1] if iv else None, "held-out images": rep.n_heldout})
        presets = sorted({row["preset"] for row in rows})
        if len(presets) > 1:
            st.warning(f"These results used different fit presets ({', '.join(presets)}). The split into orders "
                       "depends strongly on the recipe; compare shares only between runs of one preset.",
                       icon=":material/warning:")
        st.dataframe(rows, hide_index=True, key="kc_ov_compare")
        st.caption("Two instabilities differ beyond the noise only when their intervals do not overlap.")
st.subheader("Variance per order")
ui.show_figure(lambda: figures.variance(run), key=f"var-{run.id}", width=width,
               caption="Var of x⁽⁰⁾…x⁽ᴷ⁾, x^Δ and x* on held-out images (bar labels are the values).")
st.subheader("Training")
ui.show_figure(lambda: figures.loss(run), key=f"loss-{run.id}", width=width,
               caption="Loss of Eq. 2 on the training split and reconstruction error on the monitor split; "
                       "the dashed line marks the epoch whose weights were kept.")
with st.expander("All metrics as a table"):
    st.dataframe(export.metrics_table(c), hide_index=True, key="kc_ov_table")
with st.expander("Reproduce this result", icon=":material/terminal:"):
    try:
        from kcore.reproduce import reproduce_of

        again = reproduce_of(c, out=f"{run.run_dir.name}-reproduced" if run.run_dir else None)
    except ValueError as exc:
        st.caption(f"No command for this result: {exc}")
    else:
        st.caption("The command and the Python code that recompute this result from the same files (the copy "
                   "button is at the top right of each box)." + ("" if again.exact else " Read the notes first."))
        for note in again.notes:
            st.caption(f"Note: {note}")
        st.code(again.cli, language="bash", wrap_lines=True)
        st.code(again.python, language="python")
