"""Verdicts against chance: planted intervals with known answers, metrics.json, old run folders, CLI, Overview."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import loaded, open_run_folder, tiny_net
from kcore.verdict import ChanceVerdict, chance_verdict, verdict_from_intervals

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
STRONG = SAMPLES / "kshapes_resnet_s0.safetensors"
WEAK = SAMPLES / "kshapes_tinynet_s0.safetensors"
needs_samples = pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")


# ------------------------------------------------------------------------------------------------ planted cases
@pytest.mark.parametrize("inst, random_b, shuffled, code", [
    ((0.20, 0.25), (0.40, 0.50), (0.90, 0.98), "beyond_chance"),
    ((0.27, 0.29), (0.24, 0.28), (0.90, 0.98), "like_random_b"),       # the early block: overlap
    ((0.40, 0.60), (0.10, 0.20), (0.55, 0.95), "like_shuffled"),
    ((0.30, 0.60), (0.45, 0.55), (0.50, 0.99), "like_random_b"),       # both overlap: random B is named first
    ((0.60, 0.70), (0.30, 0.40), (0.90, 0.98), "worse_than_chance"),
    ((0.20, 0.25), (0.25, 0.30), (0.90, 0.98), "like_random_b"),       # touching ends count as overlap
])
def test_each_verdict_from_planted_intervals(inst, random_b, shuffled, code):
    v = verdict_from_intervals(inst, {"random_b": random_b, "shuffled": shuffled})
    assert v.code == code, v
    assert v.beyond_chance == (code == "beyond_chance")
    assert not v.overfit and v.warnings == ()
    assert f"[{inst[0]:.4f}, {inst[1]:.4f}]" in v.text  # the sentence shows the interval it rests on


def test_overfit_is_flagged_with_its_fix_beside_the_main_verdict():
    # the late block: shuffled 1.23–1.27 excludes 1, the instability is below both baselines
    v = verdict_from_intervals((0.32, 0.35), {"random_b": (0.50, 0.60), "shuffled": (1.23, 1.27)})
    assert v.code == "beyond_chance" and v.overfit
    (w,) = v.warnings
    assert "g over-fits (shuffled pairing > 1)" in w and "[1.2300, 1.2700]" in w
    assert "more images" in w and "fewer orders" in w and "smaller kernel" in w
    # an interval that reaches down to 1 is not over-fitting; nor is one straddling it
    for sh in ((1.0, 1.1), (0.97, 1.03)):
        assert not verdict_from_intervals((0.3, 0.35), {"random_b": (0.5, 0.6), "shuffled": sh}).overfit
    # over-fit and indistinguishable from the shuffled pairing: the fix comes with the verdict
    v = verdict_from_intervals((1.1, 1.3), {"random_b": (0.2, 0.3), "shuffled": (1.2, 1.25)})
    assert v.code == "like_shuffled" and v.overfit and "fewer orders" in (v.fix or "")


def test_unknown_verdicts_say_how_to_get_one():
    v = verdict_from_intervals((0.2, 0.3), {})
    assert v.code == "unknown" and "--baselines" in (v.fix or "")
    v = verdict_from_intervals((0.2, 0.3), {"random_b": (0.5, 0.6)})  # below, but shuffled not run
    assert v.code == "unknown" and "shuffled" in v.text and "--baselines" in (v.fix or "")
    v = verdict_from_intervals(None, {"random_b": (0.5, 0.6), "shuffled": (0.9, 1.0)})
    assert v.code == "unknown" and "bootstrap" in v.text
    v = verdict_from_intervals((0.2, 0.3), {"random_b": None, "shuffled": (0.9, 1.0)})
    assert v.code == "unknown" and "random_b" in v.text
    # a single baseline that overlaps is still a verdict
    assert verdict_from_intervals((0.2, 0.3), {"random_b": (0.25, 0.6)}).code == "like_random_b"


def test_bad_intervals_are_refused_with_a_message_that_names_them():
    with pytest.raises(TypeError, match=r"instability must be a \(low, high\) pair.*got 'abc'.*Fix"):
        verdict_from_intervals("abc", {"random_b": (0.1, 0.2)})
    with pytest.raises(ValueError, match=r"baselines\['shuffled'\] must have low <= high.*got \(0.9, 0.8\)"):
        verdict_from_intervals((0.1, 0.2), {"shuffled": (0.9, 0.8)})
    with pytest.raises(ValueError, match="low <= high"):
        verdict_from_intervals((float("nan"), 0.2), {"shuffled": (0.8, 0.9)})


def test_verdict_round_trips_and_refuses_an_unknown_code():
    v = verdict_from_intervals((0.32, 0.35), {"random_b": (0.50, 0.60), "shuffled": (1.23, 1.27)})
    assert ChanceVerdict.from_dict(json.loads(json.dumps(v.as_dict()))) == v
    with pytest.raises(ValueError, match="verdict code must be one of .*got 'great'"):
        ChanceVerdict.from_dict({**v.as_dict(), "code": "great"})


# ------------------------------------------------------------------------------------------------ run folders
@pytest.fixture(scope="module")
def run_with_baselines(tmp_path_factory, random_images):
    from kcore.pipeline import compare, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, baselines=True, both_directions=True)
    return comp, write_run(comp, tmp_path_factory.mktemp("verdicts") / "run")


def _intervals(metrics: dict, key: str) -> tuple:
    inst = metrics["directions"][key]["ci"]["instability"]
    refs = {k: b["directions"][key]["ci"]["instability"] for k, b in metrics["baselines"].items()}
    return inst, refs


def test_metrics_json_holds_a_verdict_consistent_with_its_own_intervals(run_with_baselines):
    from kcore.export import metrics_table, provenance

    comp, run = run_with_baselines
    m = json.loads((run / "metrics.json").read_text())
    for key in ("A_to_B", "B_to_A"):
        block = m["directions"][key]["verdict"]
        inst, refs = _intervals(m, key)
        assert block == verdict_from_intervals(inst, refs).as_dict()
        assert block == chance_verdict(comp.directions[key].fit.heldout_report, comp.baselines, key).as_dict()
    table = metrics_table(comp).set_index("direction")
    prov = provenance(comp)
    for key in ("A_to_B", "B_to_A"):
        assert table.loc[key, "verdict"] == m["directions"][key]["verdict"]["code"]
        assert table.loc[key, "verdict_text"] == m["directions"][key]["verdict"]["text"]
        assert prov["directions"][key]["verdict"] == m["directions"][key]["verdict"]


def test_an_old_run_folder_without_verdicts_opens_and_gets_one(run_with_baselines, tmp_path):
    import shutil

    from kcore.pipeline import read_run

    comp, run = run_with_baselines
    old = Path(shutil.copytree(run, tmp_path / "old"))
    m = json.loads((old / "metrics.json").read_text())
    for block in m["directions"].values():
        del block["verdict"]
    (old / "metrics.json").write_text(json.dumps(m))
    back = read_run(old)
    for key in ("A_to_B", "B_to_A"):
        assert back.verdict(key) == comp.verdict(key)
    # without baselines the verdict is "unknown" and says how to get one
    m["baselines"] = {}
    (old / "metrics.json").write_text(json.dumps(m))
    v = read_run(old).verdict("A_to_B")
    assert v.code == "unknown" and "--baselines" in (v.fix or "")


def test_an_edited_verdict_block_is_refused_naming_the_field(run_with_baselines, tmp_path):
    import shutil

    from kcore.pipeline import read_run

    _, run = run_with_baselines
    bad = Path(shutil.copytree(run, tmp_path / "bad"))
    m = json.loads((bad / "metrics.json").read_text())
    m["directions"]["A_to_B"]["verdict"]["code"] = "great"
    (bad / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"metrics\.json.*directions\.A_to_B\.verdict\.code"):
        read_run(bad)


# ------------------------------------------------------------------------------------------------ CLI, dashboard
@needs_samples
@pytest.mark.slow
def test_cli_fit_with_baselines_writes_and_prints_the_verdict(tmp_path, capsys):
    from kcore.cli import main

    out = tmp_path / "run"
    rc = main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", "kshapes", "--n-images", "60",
               "--epochs", "2", "--baselines", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    block = m["directions"]["A_to_B"]["verdict"]
    inst, refs = _intervals(m, "A_to_B")
    assert set(refs) == {"random_b", "shuffled"}
    assert block == verdict_from_intervals(inst, refs).as_dict()
    assert m["verdict"] == block  # one direction: also at the top level
    assert f"verdict against chance: {block['text']}" in printed


@pytest.mark.slow
def test_overview_shows_the_verdict(run_with_baselines, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from kcore.pipeline import write_run

    comp, _ = run_with_baselines
    runs, exports = tmp_path / "runs", tmp_path / "exports"
    runs.mkdir()
    exports.mkdir()
    monkeypatch.setenv("KCORE_RUNS_DIR", str(runs))
    monkeypatch.setenv("KCORE_EXPORTS_DIR", str(exports))
    folder = write_run(comp, runs / "verdict_run")
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=90)
    at.run()
    open_run_folder(at, folder)
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("app_pages/overview.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = [e.value for e in (*at.success, *at.warning, *at.info)]
    for key in ("A_to_B", "B_to_A"):
        v = comp.verdict(key)
        assert any(f"Verdict against chance:** {v.text}" in s for s in shown), (v.text, shown)
