"""Studies: run the paper's studies (Sec. 4) with small defaults, and open their result folders."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from dashboard.jobs import ordinal
from dashboard.state import paths, studies
from kcore.experiments import STUDIES, read_study, zip_study
from kcore.limits import ENV_VARS, limits
from kcore.study_options import study_options


def _changed(study: str, values: dict) -> dict:
    """The values that differ from what the command uses when they are left out (only those become flags)."""
    out = {}
    for opt in study_options(study):
        if opt.name not in values:
            continue
        v = values[opt.name]
        same = values.get(opt.follows) if opt.follows else opt.effective_default
        if v is not None and v != same:
            out[opt.name] = v
    return out


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"

ABOUT = {
    "diagnosis": "Sec. 4.1 / App. B — blind spots (weak → strong) and unreliable features (strong → weak) of a "
    "weak network, with maps and the two accuracy checks.",
    "stability": "Sec. 4.2 / Tables 1–2 — instability of learning over all pairs of a family of networks "
    "(different seeds or disjoint halves of the data), and Var per order.",
    "refinement": "Sec. 4.3 / Table 3 / App. A — B's upper layers fine-tuned on raw x_A, raw x_B and on "
    "x⁽⁰⁾, x⁽⁰⁾+x⁽¹⁾, … with g frozen (the fairness protocol).",
    "compression": "Sec. 4.4 — magnitude pruning at several ratios: Var(x^Δ) of the original reconstructed "
    "from the pruned network against accuracy.",
    "distillation": "Sec. 4.5 — born-again generations: Var(x^Δ) of the newest network against each earlier one.",
    "cross_task": "Sec. 4.6 — networks for a fine and a coarse labelling of the same images, both directions.",
}

st.title("Studies")
st.caption("The paper's studies, run here on the bundled sample models and kshapes images (or on networks the study "
           "trains itself): a run executes `kcore <study>` in the background (it survives clicks elsewhere) and writes "
           "a study folder: CSV tables, PNG/SVG/PDF figures, result.json and provenance.json. Checkpoints and image "
           "folders cannot be chosen on this page; to run a study on your own networks, use a terminal: "
           "`kcore <study> --help` lists the options that take your checkpoints and images (e.g. "
           "`kcore stability --ckpts a.pth b.pth c.pth --data ~/images --out DIR`), and the folder it writes opens "
           "below.")

study = st.selectbox("Study", STUDIES, format_func=lambda s: s.replace("_", "-"), key="kc_st_study",
                     help="Each study's command also runs from a terminal: `kcore <study> --help`.")
st.markdown(ABOUT.get(study, ""))

with st.container(border=True):
    st.markdown("**Run on the bundled sample models and kshapes images**")
    scale = st.radio("Scale", list(studies.SCALES), format_func=studies.SCALES.get, key="kc_st_scale", horizontal=True,
                     help="Quick: fewer images and epochs than the command's defaults (see Options), to see the "
                          "study's shape in minutes. Full: the command's own defaults.")
    quick = studies.QUICK.get(study, {}) if scale == "quick" else {}

    def start_value(opt):
        """The option's starting value: the quick scale's, else the value the command uses when it is left out."""
        if opt.name in quick:
            return quick[opt.name]
        if opt.follows is not None:
            follow = next((o for o in study_options(study) if o.name == opt.follows), None)
            return start_value(follow) if follow is not None else None
        return opt.effective_default

    def field_help(opt) -> str:
        """The option's help, with the default it shows and the server's cap."""
        note = (f" Left out, the command uses the value of {opt.follows}; it starts at {opt.follows}'s starting "
                "value." if opt.follows else
                f" The command's default is {opt.effective_default:g}." if opt.default is None
                and opt.effective_default is not None else "")
        return f"{opt.help}{note} (at most {opt.maximum:{',' if opt.kind == 'int' else 'g'}} here: {opt.env})"

    values: dict = {}
    with st.expander("Options", expanded=False):
        st.caption(f"The numbers and choices of `kcore {study.replace('_', '-')}` (see `--help`); paths, "
                   "checkpoints and the output folder are not set from the browser. Each number stops at this "
                   "server's cap (shown in its help; the operator sets it with the `KCORE_MAX_*` variable named "
                   "there).")
        cols = st.columns(3)
        for i, opt in enumerate(study_options(study)):
            key, col = f"kc_st_opt_{study}_{scale}_{opt.name}", cols[i % 3]
            label = opt.flag.lstrip("-")
            if opt.kind == "switch":
                values[opt.name] = col.checkbox(label, value=bool(start_value(opt)), key=key, help=opt.help or None)
            elif opt.kind == "choice":
                values[opt.name] = col.selectbox(label, opt.choices, key=key, help=opt.help or None,
                                                 index=opt.choices.index(str(opt.default))
                                                 if str(opt.default) in opt.choices else 0)
            elif opt.kind == "int":
                start = start_value(opt)
                values[opt.name] = col.number_input(label, min_value=0, max_value=opt.maximum, step=1, key=key,
                                                    value=min(start, opt.maximum) if isinstance(start, int) else None,
                                                    help=field_help(opt))
            else:
                start = start_value(opt)
                values[opt.name] = col.number_input(label, min_value=0.0, max_value=float(opt.maximum), key=key,
                                                    format="%g", help=field_help(opt),
                                                    value=min(float(start), opt.maximum) if start is not None else None)
    try:
        plan, eta = studies.expected_time(study, values)
    except ValueError as exc:
        st.warning(f"No time estimate: {exc}", icon=":material/warning:")
    else:
        st.markdown(f"**Expected run time at these settings:** about {_duration(eta.seconds)} (between "
                    f"{_duration(eta.low)} and {_duration(eta.high)}).",
                    help="An estimate, not a promise: the study's plan at these settings "
                         f"({plan.describe()}) times this server's measured cost per image-epoch, from "
                         f"{eta.basis}. More images or epochs give a proportionally longer estimate; the server's "
                         "other jobs slow a study down.")
    busy = studies.study_running()
    st.caption(f"The server runs {limits().max_jobs} job(s) (fits and studies) at once for all its users "
               f"({ENV_VARS['max_jobs']}); a study started beyond that waits in line, and is stopped when you "
               "close this tab.")
    if st.button("Run", key="kc_st_run", icon=":material/play_arrow:", type="primary", disabled=busy,
                 help="Disabled while a study of this session waits or runs (cancel it below, or wait)." if busy
                 else None):
        try:
            studies.start_study(study, _changed(study, values))
        except ValueError as exc:
            st.error(str(exc))
            st.stop()
        st.rerun()  # redraw with Run disabled and the job's progress


def job_status(drawn_busy: bool) -> None:
    """This session's study jobs, newest first: status, the log's last lines and Cancel. ``drawn_busy``: whether a
    study ran when the page was drawn; when it has ended since, the whole page is drawn again (the list of finished
    studies and Run change with it, not only this part)."""
    if studies.needs_page_rerun(drawn_busy):
        st.rerun()
    for name, job in reversed(list(studies.study_jobs().items())):
        status, p = job.state, studies.progress(job)
        with st.container(border=True, key=f"kc_st_job_{name}"):
            head = f"**{name}** · `{' '.join(job.args) or 'defaults'}`"
            if status == "queued":
                where = job.position
                st.markdown(f":material/hourglass_empty: {head} · queued: "
                            f"{ordinal(where) + ' in line' if where else 'starting'}; it starts when one of the "
                            "server's jobs ends")
                if st.button("Cancel", key=f"kc_st_cancel_{name}", icon=":material/stop:"):
                    studies.cancel_study(job)
                    st.rerun()
            elif status == "running":
                st.markdown(f":material/hourglass_top: {head} · running")
                steps = f"step {p.steps}" + (f" of about {p.expected}" if p.expected else "")
                eta = (" · no time estimate" if p.eta is None else
                       f" · about {_duration(p.eta)} left (the last run of these settings took "
                       f"{_duration(p.elapsed + p.eta)})" if p.basis == "last_run" else
                       f" · about {_duration(p.eta)} left (estimated from the study's plan: these settings have "
                       "not run here before)")
                text = f"{steps} · {_duration(p.elapsed)} elapsed{eta}"
                if p.fraction is not None:
                    st.progress(p.fraction, text=text)
                else:
                    st.caption(text)
                if st.button("Cancel", key=f"kc_st_cancel_{name}", icon=":material/stop:"):
                    studies.cancel_study(job)
                    st.rerun()
            elif status == "done":
                st.markdown(f":material/check_circle: {head} · finished in {_duration(p.elapsed)} "
                            f"({p.steps} steps); open it below.")
            elif status == "cancelled":
                why = f" ({job.job.error})" if job.job is not None and job.job.error else ""
                st.markdown(f":material/cancel: {head} · cancelled{why} after {_duration(p.elapsed)}; nothing was "
                            "written.")
            elif job.proc is None:  # the process could not be started
                st.markdown(f":material/error: {head} · failed: {job.job.error if job.job else 'not started'}")
            else:
                st.markdown(f":material/error: {head} · failed (exit code {job.exit_code}) after "
                            f"{_duration(p.elapsed)}: the log's last lines say why.")
            if p.last and status != "done":
                st.code("\n".join(job.lines()[-4:]), language=None)


if studies.study_jobs():
    busy_now = studies.study_running()
    st.fragment(job_status, run_every=2.0 if busy_now else None)(busy_now)

st.subheader("Open a study folder")
found = studies.finished_studies()
st.selectbox("Finished studies on this server", [str(p) for p in found], index=None, key="kc_st_found",
             format_func=lambda p: Path(p).name, on_change=studies.open_chosen_study,
             placeholder="none yet" if not found else f"choose one of {len(found)} (newest first)")
path = st.text_input("… or a folder path", key="kc_st_path")
if not path:
    st.stop()
try:
    folder = read_study(paths.allowed_folder(path, "study folder"))
except (ValueError, OSError) as exc:
    st.error(f"Could not open {path!r}: {exc}")
    st.stop()

st.markdown(f"### {folder.study.replace('_', '-')} · `{folder.path.name}`")
prov = folder.provenance
if prov:
    st.caption(" · ".join(f"{k}: {v}" for k, v in prov.items() if isinstance(v, (str, int, float)))[:600])
for name, df in folder.tables.items():
    st.markdown(f"**{name}**")
    st.dataframe(df, key=f"kc_st_tab_{name}", hide_index=True)
for name, png in folder.figures.items():
    try:  # read like an upload: the file must still be a regular file inside the folder
        st.image(folder.read_file(png.name), caption=name)
    except (ValueError, OSError) as exc:
        st.warning(f"Figure {name!r} is not shown: {exc}", icon=":material/warning:")
if folder.skipped:
    left = list(folder.skipped.items())
    st.warning("Left out (never opened, not in the zip): " + "; ".join(f"`{n}`: {why}" for n, why in left[:20])
               + (f"; and {len(left) - 20} more" if len(left) > 20 else "") + ".", icon=":material/warning:")
with st.expander("result.json and provenance.json"):
    st.json(folder.result, expanded=False)
    st.json(prov, expanded=False)
try:
    archive = zip_study(folder)  # the regular files of the folder only, each re-read like an upload
except (ValueError, OSError) as exc:
    st.warning(f"No zip to download: {exc}", icon=":material/warning:")
else:
    st.download_button("Download the folder (zip)", archive, file_name=f"{folder.path.name}.zip",
                       mime="application/zip", key="kc_st_zip", on_click="ignore")
