"""The least-squares map's held-out error beside g_θ's: on the Overview and in exports, read from the run folder.

The run is a real small fit whose least-squares R² is then planted (0.3829, so its error is 0.6171: a value no
fit of these tiny nets gives by chance) and written as a run folder; what is shown must come from that folder.
"""
from __future__ import annotations

import dataclasses as dc
import json
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch  # noqa: F401  (imported before the first AppTest run, as in test_dashboard)

from helpers import loaded, open_run_folder, tiny_net

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PLANTED_R2 = 0.3829
PLANTED_ERROR = 1.0 - PLANTED_R2


@pytest.fixture(scope="module")
def run_folder(random_images, tmp_path_factory):
    """(runs folder, the run folder) of a fit with the planted least-squares R²."""
    from kcore.pipeline import compare, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2)
    d = comp.directions["A_to_B"]
    fit = dc.replace(d.fit, baseline=dc.replace(d.fit.baseline, linear_r2=PLANTED_R2))
    comp = dc.replace(comp, directions={"A_to_B": dc.replace(d, fit=fit)})
    runs = tmp_path_factory.mktemp("runs")
    return runs, write_run(comp, runs / "planted")


def test_the_run_folder_and_the_export_carry_the_least_squares_error(run_folder, tmp_path):
    from kcore import export
    from kcore.pipeline import read_run

    _, folder = run_folder
    on_disk = json.loads((folder / "metrics.json").read_text())["directions"]["A_to_B"]["baseline"]
    assert on_disk["linear_error"] == pytest.approx(PLANTED_ERROR, abs=1e-12)
    back = read_run(folder)
    f = back.directions["A_to_B"].fit
    row = export.metrics_table(back).iloc[0]
    assert row["baseline_linear_error"] == pytest.approx(PLANTED_ERROR, abs=1e-12)
    assert row["baseline_linear_error"] == pytest.approx(1.0 - row["baseline_linear_r2"], abs=1e-12)
    assert row["heldout_error"] == f.heldout_error  # g_θ's error in the same table, in the same units

    res = export.export_comparison(back, tmp_path / "export", formats=("png",))
    assert "metrics.csv" in res.files and "metrics.csv" in export.verify_export(res.folder)
    manifest = json.loads((res.folder / export.MANIFEST).read_text())
    assert "metrics.csv" in manifest["files"]
    csv = pd.read_csv(res.folder / "metrics.csv")
    assert csv.loc[0, "baseline_linear_error"] == pytest.approx(PLANTED_ERROR, rel=1e-5)  # written with 6 digits
    exported = json.loads((res.folder / "metrics.json").read_text())["directions"]["A_to_B"]["baseline"]
    assert exported["linear_error"] == pytest.approx(PLANTED_ERROR, abs=1e-12)


@pytest.mark.slow
def test_the_overview_shows_the_least_squares_error_beside_gs(run_folder, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from kcore.pipeline import read_run

    runs, folder = run_folder
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    open_run_folder(at, folder, "overview")
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m for m in at.metric}
    ls = metrics["Least-squares error 1 − R²"]
    assert ls.value == f"{PLANTED_ERROR:.3f}" == "0.617"
    assert f"R² {PLANTED_R2:.3f}" in ls.proto.help and "units of g_θ's held-out error" in ls.proto.help
    g_error = read_run(folder).directions["A_to_B"].fit.heldout_error
    assert metrics["Held-out error 1 − R²"].value == f"{g_error:.3f}"
    labels = [m.label for m in at.metric]  # the two errors side by side, g's first
    assert labels.index("Least-squares error 1 − R²") == labels.index("Held-out error 1 − R²") + 1
