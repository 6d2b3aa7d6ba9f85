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
