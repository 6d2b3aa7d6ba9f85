"""The dashboard's Studies page opens study folders (tables, figures, provenance) and reports bad ones."""
from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from kcore.experiments._common import write_study
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
