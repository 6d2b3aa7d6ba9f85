"""The benchmark of the dashboard's first result, at smoke size: its timeline is in order and its row is written.

(That the job publishes the fit before a planted slow baseline ends is tested in tests/test_results_early.py.)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported before the first AppTest run, as in test_dashboard)

ROOT = Path(__file__).resolve().parents[1]
needs_samples = pytest.mark.skipif(not (ROOT / "sample_models" / "kshapes_resnet_s0.safetensors").is_file(),
                                   reason="sample models not built")


@needs_samples
@pytest.mark.slow
def test_first_result_smoke_row_and_timeline(tmp_path):
    from bench.__main__ import main

    assert main(["--profile", "smoke", "--only", "first_result", "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())["first_result"]
    assert r["n_images"] == 60 and r["epochs"] == 3 and r["baselines"] == ["random_b", "shuffled"]
    stages = [s["stage"] for s in r["timeline"]]
    assert stages[0] == "extract" and stages[-1] == "done"
    assert stages.index("fit A_to_B") < stages.index("saving") < stages.index("baseline random_b A_to_B")
    # the fit is done, then published (before the baselines end), then shown; at smoke size the baselines may end
    # while the Overview is drawn, so the time shown is not compared with theirs
    assert r["fit_seconds"] <= r["published_seconds"] <= r["shown_seconds"]
    assert r["published_seconds"] < r["baselines_done_seconds"]
    assert r["write_seconds"] == pytest.approx(r["published_seconds"] - r["fit_seconds"])
    assert 0 < r["gtheta_seconds"] < r["fit_seconds"]
    table = (tmp_path / "results.md").read_text()
    assert "| first result in the dashboard | Fit page, kshapes_tinynet_s0" in table and "60 images, 3 epochs, A→B" in table


def test_first_result_refuses_another_models_folder(tmp_path):
    from bench.first_result import first_result

    with pytest.raises(ValueError, match=r"models_dir: the dashboard loads its sample models from .*Fix: leave --models"):
        first_result(60, 1, tmp_path)
