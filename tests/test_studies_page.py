"""The dashboard's Studies page opens study folders (tables, figures, provenance) and reports bad ones."""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from kcore.experiments._folder import write_study
from studies_page import open_in_dashboard


def test_a_study_folder_shows_its_tables_and_figures(tmp_path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out = write_study(tmp_path / "st", "stability", {"instability_mean": 0.25},
                      {"pairs": pd.DataFrame({"pair": ["0-1"], "instability": [0.25]})}, {"curve": fig},
                      {"seed": 0})
    at = open_in_dashboard(out)
    assert any("0-1" in df.value.to_string() for df in at.dataframe)
    assert len(at.image) >= 1  # the figure, from the folder's PNG


def test_a_folder_that_is_no_study_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from studies_page import ROOT

    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))

    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/studies.py").run()
    at.text_input(key="kc_st_path").set_value(str(tmp_path)).run()
    assert not at.exception
    assert any("not a kcore study folder" in e.value for e in at.error)


def test_a_cancelled_study_reads_cancelled_and_run_waits_for_it(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard import state
    from studies_page import ROOT

    monkeypatch.setenv("KCORE_STUDIES_DIR", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/studies.py").run()
    assert at.radio(key="kc_st_scale").value == "quick"  # the page starts on the quick settings
    at.button(key="kc_st_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (job,) = at.session_state["kc_study_jobs"].values()
    assert "--n-train 600" in " ".join(job.args) and "--repeats 1" in " ".join(job.args)  # diagnosis, quick
    assert at.button(key="kc_st_run").disabled  # one study at a time
    assert any("running" in m.value for m in at.markdown)
    at.button(key=f"kc_st_cancel_{job.name}").click().run()
    job.proc.wait(30)
    at.run()
    text = " ".join(m.value for m in at.markdown)
    assert "cancelled" in text and "failed" not in text and "exit" not in text
    assert job.state == "cancelled" and not at.button(key="kc_st_run").disabled
    assert not job.out.exists()  # a cancelled study leaves no half-written folder
    # a study that ends with an error is still reported as failed, with its exit code
    bad = state.StudyJob("diagnosis", tmp_path / "x", __import__("subprocess").Popen(["false"]), tmp_path / "none.log", ())
    bad.proc.wait(10)
    assert bad.state == "failed" and bad.exit_code == 1


def test_study_progress_counts_steps_against_the_last_run_of_the_same_settings(tmp_path, monkeypatch):
    import json
    import subprocess

    from dashboard.state import _studies

    monkeypatch.setenv("KCORE_STUDIES_DIR", str(tmp_path))
    log = tmp_path / "run.log"
    log.write_text("[diagnosis 1.0s] features\n\n[diagnosis 2.0s] fitting\n[diagnosis 3.0s] arms\n")
    job = _studies.StudyJob("diagnosis", tmp_path / "out", subprocess.Popen(["sleep", "30"]), log, ("--repeats", "1"))
    try:
        first = _studies.progress(job)
        assert (first.steps, first.expected, first.eta, first.fraction) == (3, None, None, None)  # no history yet
        (tmp_path / _studies.TIMINGS_FILE).write_text(json.dumps({"diagnosis --repeats 1": {"lines": 6, "seconds": 100.0}}))
        p = _studies.progress(job)
        assert (p.steps, p.expected, p.fraction) == (3, 6, 0.5) and p.last.endswith("arms")
        assert 100.0 - p.elapsed - 1.0 <= p.eta <= 100.0
        other = _studies.StudyJob("diagnosis", tmp_path / "o", job.proc, log, ("--repeats", "2"))
        assert _studies.progress(other).expected is None  # other settings: no estimate borrowed
    finally:
        job.proc.kill()
        job.proc.wait()
    # a finished run records its steps and time for the next one
    done = _studies.StudyJob("diagnosis", tmp_path / "d", subprocess.Popen(["true"]), log, ("--seed", "3"))
    done.proc.wait()
    assert done.state == "done"
    assert json.loads((tmp_path / _studies.TIMINGS_FILE).read_text())["diagnosis --seed 3"]["lines"] == 3


# ------------------------------------------------------------------ choosing, refreshing, the time estimate
def _app(monkeypatch, studies_dir):
    from streamlit.testing.v1 import AppTest

    from studies_page import ROOT

    monkeypatch.setenv("KCORE_STUDIES_DIR", str(studies_dir))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.switch_page("app_pages/studies.py").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _small_study(path):
    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    return write_study(path, "stability", {"instability_mean": 0.25},
                       {"pairs": pd.DataFrame({"pair": ["0-1"], "instability": [0.25]})}, {"curve": fig}, {"seed": 0})


def test_choosing_a_finished_study_opens_it(tmp_path, monkeypatch):
    older = _small_study(tmp_path / "stability-20260101-000000-aaaaaa")
    newer = _small_study(tmp_path / "stability-20260102-000000-bbbbbb")
    import os

    os.utime(older / "result.json", (1, 1))  # the list is newest first, by when each study was written
    at = _app(monkeypatch, tmp_path)
    box = at.selectbox(key="kc_st_found")
    assert box.options == [newer.name, older.name] and not at.dataframe  # nothing open before a choice
    box.set_value(str(older)).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.text_input(key="kc_st_path").value == str(older)
    assert any("0-1" in df.value.to_string() for df in at.dataframe) and len(at.image) >= 1
    assert any(older.name in m.value for m in at.markdown)


def test_a_study_that_finishes_refreshes_the_list_and_enables_run(tmp_path, monkeypatch):
    import sys
    import time

    import kcore.study_options as so

    code = ("import sys, pandas as pd; from kcore.experiments._folder import write_study; "
            "print('[fake 0.1s] writing', flush=True); "
            "write_study(sys.argv[1], 'diagnosis', {'x': 1}, {'t': pd.DataFrame({'a': [1]})}, {}, {})")
    monkeypatch.setattr(so, "study_command", lambda study, values, out, caps=None: [sys.executable, "-c", code,
                                                                                    str(out)])
    at = _app(monkeypatch, tmp_path)
    assert at.selectbox(key="kc_st_found").options == []
    at.button(key="kc_st_run").click().run()
    (job,) = at.session_state["kc_study_jobs"].values()
    assert at.button(key="kc_st_run").disabled
    t0 = time.perf_counter()
    while job.proc is None or job.proc.poll() is None:
        assert time.perf_counter() - t0 < 120, "the fake study did not end"
        time.sleep(0.2)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.button(key="kc_st_run").disabled
    assert at.selectbox(key="kc_st_found").options == [job.out.name]
    assert any("finished" in m.value for m in at.markdown)


def test_the_running_page_redraws_itself_when_its_study_ends(tmp_path, monkeypatch):
    """The part of the page that polls a running study asks for a whole-page redraw once the study has ended."""
    import subprocess

    import streamlit as st

    from dashboard.state import _studies

    monkeypatch.setenv("KCORE_STUDIES_DIR", str(tmp_path))
    proc = subprocess.Popen(["sleep", "30"])
    job = _studies.StudyJob("diagnosis", tmp_path / "out", proc, tmp_path / "log", ())
    st.session_state["kc_study_jobs"] = {job.name: job}
    try:
        assert not _studies.needs_page_rerun(True)  # still running: only the status part polls
        proc.terminate()
        proc.wait()
        assert _studies.needs_page_rerun(True)  # ended since the page was drawn: redraw all of it
        assert not _studies.needs_page_rerun(False)  # nothing ran when drawn: nothing to refresh
    finally:
        st.session_state.pop("kc_study_jobs", None)
        proc.kill()


def _seconds(text: str) -> float:
    import re

    m = re.search(r"about (?:(\d+) h )?(?:(\d+) min )?(?:(\d+) s)?", text)
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    return 3600 * h + 60 * mi + s


def test_the_expected_run_time_is_shown_and_grows_with_images_and_epochs(tmp_path, monkeypatch):
    at = _app(monkeypatch, tmp_path)

    def shown() -> float:
        (line,) = [m.value for m in at.markdown if "Expected run time" in m.value]
        return _seconds(line)

    first = shown()
    assert first > 0
    at.number_input(key="kc_st_opt_diagnosis_quick_n_train").set_value(1800).run()
    more_images = shown()
    at.number_input(key="kc_st_opt_diagnosis_quick_epochs").set_value(36).run()
    more_epochs = shown()
    assert first < more_images < more_epochs
    assert any("estimate" in (m.help or "") and "image-epoch" in (m.help or "") for m in at.markdown
               if "Expected run time" in m.value)


def test_the_plan_counts_work_and_the_estimate_follows_it_and_past_runs():
    from kcore.experiments import STUDIES
    from kcore.study_options import UnitCosts, estimate_time, study_options, study_plan

    costs = UnitCosts(train=1e-3, fit=2e-3)
    for study in STUDIES:
        base = study_plan(study)
        for name in ("n_train", "n_images", "epochs", "fit_epochs", "repeats", "generations"):
            opt = next((o for o in study_options(study) if o.name == name), None)
            if opt is None:
                continue
            bigger = study_plan(study, {name: 2 * opt.default + 1})
            assert estimate_time(bigger, costs).seconds > estimate_time(base, costs).seconds, (study, name)
    plan = study_plan("cross_task")  # 2 networks, 2 fits: 2·5·2000 and 2·10·300 image-epochs
    assert (plan.trainings, plan.train_units, plan.fits, plan.fit_units) == (2, 20000, 2, 6000)
    alone = estimate_time(plan, costs)
    assert alone.seconds == 20000e-3 + 6000 * 2e-3 and alone.low < alone.seconds < alone.high
    # finished runs that took 2× and 4× their probe estimate scale this one (their median, the range between them)
    past = [(study_plan("cross_task", {"epochs": 1}), 2 * costs.seconds(study_plan("cross_task", {"epochs": 1}))),
            (study_plan("cross_task", {"epochs": 3}), 4 * costs.seconds(study_plan("cross_task", {"epochs": 3}))),
            (study_plan("stability"), 100.0)]  # another study: not used
    est = estimate_time(plan, costs, past)
    assert est.seconds == 4 * alone.seconds and est.low < 2 * alone.seconds and est.high > 4 * alone.seconds
    assert "2 finished run(s)" in est.basis


def test_every_number_field_shows_a_value(tmp_path, monkeypatch):
    from kcore.experiments import STUDIES

    at = _app(monkeypatch, tmp_path)
    for study in STUDIES:
        at.selectbox(key="kc_st_study").set_value(study).run()
        for scale in ("quick", "full"):
            at.radio(key="kc_st_scale").set_value(scale).run()
            fields = [n for n in at.number_input if n.key.startswith(f"kc_st_opt_{study}_{scale}_")]
            assert fields and all(n.value is not None for n in fields), \
                (study, scale, [n.key for n in fields if n.value is None])
    at.selectbox(key="kc_st_study").set_value("diagnosis").run()
    at.radio(key="kc_st_scale").set_value("full").run()
    assert at.number_input(key="kc_st_opt_diagnosis_full_lam").value == 0.1  # λ: the fit's default, not blank


def test_a_field_left_at_its_shown_default_adds_no_flag(tmp_path, monkeypatch):
    """Showing λ's default (and the teacher's epochs) changes no command: only a changed value becomes a flag."""
    at = _app(monkeypatch, tmp_path)
    at.selectbox(key="kc_st_study").set_value("distillation").run()
    at.radio(key="kc_st_scale").set_value("full").run()
    teacher = at.number_input(key="kc_st_opt_distillation_full_teacher_epochs")
    assert teacher.value == at.number_input(key="kc_st_opt_distillation_full_epochs").value
    import kcore.study_options as so

    seen = {}

    def command(study, values, out, caps=None):
        seen["v"] = dict(values)
        return ["true", "-m", "kcore.cli", study, "--out", str(out)]

    monkeypatch.setattr(so, "study_command", command)
    at.button(key="kc_st_run").click().run()
    assert seen["v"] == {}  # every field at the value the command uses anyway
