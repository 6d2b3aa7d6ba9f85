"""The layer sweep: one extraction per network, pairs equal to separate comparisons, the sweep folder, the depth
plot, `kcore sweep`, and the Layer sweep and Compare runs pages."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from helpers import loaded, tiny_net
from kcore.checkpoints import load_model
from kcore.data import sample_images
from kcore.pipeline import compare, read_run, write_run
from kcore.sweep import (
    SweepRow,
    deepest_matched,
    extract_layers,
    layer_pairs,
    network_stages,
    read_sweep,
    run_differences,
    stages_of,
    sweep,
    write_sweep,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
TINY = dict(orders=1, epochs=2)  # seconds per fit, not a converged one
LAYERS = ["layer1", "layer2"]


@pytest.fixture(scope="module")
def resnets():
    return (load_model(SAMPLES / "kshapes_resnet_s0.safetensors"), load_model(SAMPLES / "kshapes_resnet_s1.safetensors"))


@pytest.fixture(scope="module")
def images():
    return sample_images(n=60, preprocess=(64, 64))


@pytest.fixture(scope="module")
def swept(resnets, images, one_thread):
    a, b = resnets
    found = []
    result = sweep(a, LAYERS, b, LAYERS, images, both_directions=True, baselines=["shuffled"], on_pair=found.append,
                   **TINY)
    return result, found


def _numbers(comp):
    out = {}
    for key, d in comp.directions.items():
        rep = d.fit.heldout_report
        out[key] = (rep.instability, *rep.share_orders, rep.share_residual, *rep.var_orders, *rep.interval("instability"))
    for kind, ref in comp.baselines.items():
        for key, rep in ref.reports.items():
            out[f"{kind}/{key}"] = (rep.instability,)
    return out


def test_every_pair_equals_a_separate_comparison_with_the_same_seed(swept, resnets, images):
    result, _ = swept
    a, b = resnets
    assert [(p.layer_a, p.layer_b) for p in result.pairs] == [("layer1", "layer1"), ("layer2", "layer2")]
    for p in result.pairs:
        alone = compare(a, p.layer_a, b, p.layer_b, images, both_directions=True, baselines=["shuffled"], **TINY)
        torch.testing.assert_close(p.comparison.features.x_a, alone.features.x_a, rtol=0, atol=0)
        torch.testing.assert_close(p.comparison.features.x_b, alone.features.x_b, rtol=0, atol=0)
        got, want = _numbers(p.comparison), _numbers(alone)
        assert got.keys() == want.keys() and len(got) == 4  # 2 directions + the shuffled baseline of each
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
        assert p.comparison.heldout_positions == alone.heldout_positions


def test_pairs_are_reported_as_they_finish(swept):
    result, found = swept
    assert [p.index for p in found] == [0, 1]
    assert all(f is p for f, p in zip(found, result.pairs))


def test_the_extraction_runs_once_per_network(resnets, images):
    a, b = resnets
    calls = {"A": 0, "B": 0}
    handles = [m.model.register_forward_pre_hook(lambda *_, w=w: calls.__setitem__(w, calls[w] + 1))
               for m, w in ((a, "A"), (b, "B"))]
    try:
        result = sweep(a, ["stem", *LAYERS], b, ["stem", *LAYERS], images, batch_size=16, **TINY)
    finally:
        for h in handles:
            h.remove()
    batches = -(-len(images) // 16)
    assert calls == {"A": batches, "B": batches}  # three layers each, one pass per batch (not one per pair)
    assert result.provenance["extraction"]["forward_passes"] == {"A": batches, "B": batches}
    assert len(result.pairs) == 3


def test_one_pass_captures_what_single_layer_extraction_gives(resnets, images):
    from kcore.features import extract_features
    from kcore.preprocessing import preprocessing_of

    a, _ = resnets
    t = preprocessing_of(a).transform()
    many = extract_layers(a.model, ["stem", "layer3"], images, transform=t, batch_size=16, device="cpu")
    one = extract_features(a.model, "layer3", a.model, "stem", images, transform_a=t, transform_b=t, batch_size=16,
                           device="cpu")
    torch.testing.assert_close(many.features["layer3"], one.x_a, rtol=0, atol=0)
    torch.testing.assert_close(many.features["stem"], one.x_b, rtol=0, atol=0)
    assert many.image_ids == tuple(images.ids) and many.forward_passes == 4


def test_stages_of_the_sample_and_torchvision_networks(resnets):
    from kcore.architectures import build_model

    assert stages_of(resnets[0]) == ["stem", "layer1", "layer2", "layer3"]
    tiny = load_model(SAMPLES / "kshapes_tinynet_s0.safetensors")
    assert stages_of(tiny) == ["block1", "block2", "block3"]
    assert network_stages(build_model("resnet18", 3), (3, 64, 64)) == ["layer1", "layer2", "layer3", "layer4"]
    assert deepest_matched(stages_of(tiny), stages_of(resnets[0])) == (
        ["block1", "block2", "block3"], ["layer1", "layer2", "layer3"])


def test_layer_pairs_and_their_errors():
    assert layer_pairs(["a", "b"], ["x", "y"], "diagonal") == [(0, 0), (1, 1)]
    assert layer_pairs(["a", "b"], ["x", "y", "z"], "all") == [(i, j) for i in range(2) for j in range(3)]
    with pytest.raises(ValueError, match=r"layers_a and layers_b must be equally long; got 2 .* and 3 .*Fix: .*'all'"):
        layer_pairs(["a", "b"], ["x", "y", "z"], "diagonal")
    with pytest.raises(ValueError, match=r"pairs must be one of \['all', 'diagonal'\]; got 'every'"):
        layer_pairs(["a"], ["x"], "every")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"layers_b names a layer twice"):
        layer_pairs(["a", "b"], ["x", "x"])


def test_an_unknown_layer_is_refused_before_any_work(resnets, images):
    a, b = resnets
    with pytest.raises(ValueError, match=r"layer 'layer9' not found .*did you mean"):
        sweep(a, ["layer1", "layer9"], b, LAYERS, images, **TINY)


def test_the_sweep_folder(tmp_path, swept, images):
    result, _ = swept
    out = write_sweep(result, tmp_path / "sw", images=images)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["format"] == "kcore-sweep/1" and doc["mode"] == "diagonal"
    assert doc["provenance"]["checkpoint_a"]["sha256"] == result.a.sha256
    assert [p["folder"] for p in doc["pairs"]] == ["pairs/00_layer1__layer1", "pairs/01_layer2__layer2"]
    for p, entry in zip(result.pairs, doc["pairs"]):  # each pair is a run folder that re-opens with its numbers
        back = read_run(out / entry["folder"])
        for key, d in p.comparison.directions.items():
            assert back.directions[key].fit.heldout_report.instability == pytest.approx(
                d.fit.heldout_report.instability, rel=1e-9)
    rows, _ = read_sweep(out)
    assert rows == result.rows()
    text = (out / "sweep.csv").read_text()
    assert "# checkpoint_b: " in text and result.b.sha256 in text and "# reproduce: kcore sweep " in text
    table = pd.read_csv(out / "sweep.csv", comment="#")
    assert len(table) == 4 and list(table["direction"]) == ["A_to_B", "B_to_A"] * 2
    for col in ("instability_lo", "instability_hi", "share_x0", "share_x1_hi", "share_residual", "chance_shuffled",
                "chance_shuffled_lo", "verdict"):
        assert col in table.columns
    for (_, csv_row), row in zip(table.iterrows(), result.rows()):
        assert csv_row["instability"] == pytest.approx(row.instability, rel=1e-5)
        assert csv_row["instability_lo"] == pytest.approx(row.instability_ci[0], rel=1e-5)
        assert csv_row["share_x0"] == pytest.approx(row.share_orders[0], rel=1e-5, abs=1e-9)
        assert csv_row["chance_shuffled"] == pytest.approx(row.baselines["shuffled"][0], rel=1e-5)
        assert csv_row["share_x0"] + csv_row["share_x1"] + csv_row["share_residual"] == pytest.approx(1, abs=1e-4)


def _planted_rows() -> list[SweepRow]:
    def row(pos, direction, inst, ref):
        return SweepRow(pos, f"l{pos}", f"l{pos}", f"l{pos}", direction, inst, (inst - 0.05, inst + 0.05),
                        (0.7, -0.2), ((0.6, 0.8), (-0.45, 0.0)), 0.5, (0.4, 0.6),
                        {"random_b": (ref, (ref - 0.1, ref + 0.5))}, "unknown", "fast", 50)

    return [row(0, "A_to_B", 0.2, 2.5), row(0, "B_to_A", 0.3, 1.0), row(1, "A_to_B", 0.4, 0.9),
            row(1, "B_to_A", 0.5, 1.1)]


def test_the_depth_plot_axes_hold_every_interval_and_reference_line():
    from kcore.viz.depth import depth_figure, depth_figure_interactive, depth_series

    rows = _planted_rows()
    series = depth_series(rows)
    chance = [s for s in series if s.kind == "chance:random_b" and s.direction == "A_to_B"][0]
    assert chance.y == (2.5, 0.9) and chance.hi == (3.0, 1.4)  # the planted baseline and its interval
    fig = depth_figure(rows)
    inst, shares = fig.axes[:2]
    assert inst.get_ylim()[0] <= 0 and inst.get_ylim()[1] >= 3.0
    assert shares.get_ylim()[0] <= -0.45 and shares.get_ylim()[1] >= 1.0
    assert [t.get_text() for t in inst.get_xticklabels()] == ["l0", "l1"]
    plotly = depth_figure_interactive(rows)
    lo, hi = plotly.layout.yaxis.range
    assert lo <= 0 and hi >= 3.0
    lo2, hi2 = plotly.layout.yaxis2.range
    assert lo2 <= -0.45 and hi2 >= 1.0
    names = {t.name for t in plotly.data}
    assert {"A → B", "B → A", "A → B chance: random-init B", "B → A x^Δ"} <= names
    fit = next(t for t in plotly.data if t.name == "A → B")
    assert list(fit.error_y.array) == pytest.approx([0.05, 0.05])


def test_run_differences_name_preset_preprocessing_and_images(swept, random_images):
    import dataclasses

    result, _ = swept
    c0, c1 = result.pairs[0].comparison, result.pairs[1].comparison
    assert run_differences({"a": c0, "b": c1}) == []  # one sweep: the same settings
    other = dataclasses.replace(c1, provenance={**c1.provenance, "preset": "authors"})
    text = run_differences({"a": c0, "b": other})
    assert len(text) == 1 and "different presets (a: fast, b: authors)" in text[0] and "Fix:" in text[0]
    prep = {**c1.provenance["preprocessing"], "B": {**c1.provenance["preprocessing"]["B"], "input_size": [32, 32]}}
    other = dataclasses.replace(c1, provenance={**c1.provenance, "preprocessing": prep})
    assert any("network B's preprocessing differs" in t for t in run_differences({"a": c0, "b": other}))


def test_the_benchmark_gets_the_separate_fits_numbers(one_thread):
    from bench.sweep import sweep_benchmark

    r = sweep_benchmark(n_images=20, epochs=1)
    assert r["layers"] == ["stem", "layer1", "layer2", "layer3"] and r["max_abs_diff"] == 0.0
    assert set(r["instability"]) == set(r["layers"]) and r["ratio"] > 0


# ---------------------------------------------------------------------------------------------------- the CLI
def test_cli_end_to_end(tmp_path, capsys, one_thread):
    from kcore.cli import main

    out = tmp_path / "sweep"
    code = main(["sweep", "--a", str(SAMPLES / "kshapes_tinynet_s0.safetensors"), "--b",
                 str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--layers-a", "block1", "block2", "--layers-b",
                 "layer1", "layer2", "--n-images", "60", "--orders", "1", "--epochs", "2", "--both-directions",
                 "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows, doc = read_sweep(out)
    assert [(r.layer_a, r.layer_b, r.direction) for r in rows] == [
        ("block1", "layer1", "A_to_B"), ("block1", "layer1", "B_to_A"), ("block2", "layer2", "A_to_B"),
        ("block2", "layer2", "B_to_A")]
    assert doc["provenance"]["reproduce"]["cli"].startswith("kcore sweep ") and doc["provenance"]["images"]["n"] == 60
    assert "block1 ↔ layer1" in captured.out and f"wrote {out}" in captured.out
    code = main(["sweep", "--a", str(SAMPLES / "kshapes_tinynet_s0.safetensors"), "--b",
                 str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--layers-a", "block1", "--layers-b", "layer1",
                 "layer2", "--n-images", "60", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "layers_a and layers_b must be equally long" in err and "Fix:" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_two_ranks_deal_the_pairs_and_write_what_one_process_writes(tmp_path):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), KCORE_DIST_TIMEOUT="120")
    args = ["-m", "kcore", "sweep", "--a", str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--b",
            str(SAMPLES / "kshapes_resnet_s1.safetensors"), "--layers-a", *LAYERS, "--layers-b", *LAYERS,
            "--n-images", "40", "--orders", "1", "--epochs", "1", "--device", "cpu"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    for cmd, out in (([sys.executable, *args]), "one"), (([*torchrun, *args]), "two"):
        proc = subprocess.run([*cmd, "--out", str(tmp_path / out)], capture_output=True, text=True, timeout=600,
                              env=env, cwd=ROOT)
        assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    (one, d1), (two, d2) = read_sweep(tmp_path / "one"), read_sweep(tmp_path / "two")
    assert (d1["provenance"]["world_size"], d2["provenance"]["world_size"]) == (1, 2)
    assert [(r.label, r.direction) for r in one] == [(r.label, r.direction) for r in two]
    for r1, r2 in zip(one, two):  # each pair ran whole on one rank: the same numbers
        assert r2.instability == pytest.approx(r1.instability, abs=1e-9)
        assert r2.share_orders == pytest.approx(r1.share_orders, abs=1e-9)
    assert sorted(p.name for p in (tmp_path / "two" / "pairs").iterdir()) == ["00_layer1__layer1", "01_layer2__layer2"]


# ---------------------------------------------------------------------------------------------- the dashboard
@pytest.fixture()
def runs_root(tmp_path):
    old = os.environ.get("KCORE_RUNS_DIR")
    os.environ["KCORE_RUNS_DIR"] = str(tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    yield tmp_path / "runs"
    if old is None:
        os.environ.pop("KCORE_RUNS_DIR", None)
    else:
        os.environ["KCORE_RUNS_DIR"] = old


def _app():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)


def test_sweep_page_runs_a_sweep_in_the_background(runs_root):
    from dashboard import state
    from dashboard.state import sweeps

    at = _app().run()
    at.slider(key="kc_img_n").set_value(60).run()
    at.switch_page("app_pages/sweep.py").run()
    assert not at.exception, [e.value for e in at.exception]
    # the default pair (tinynet A, resnet B): the deepest stages matched, three pairs
    assert at.multiselect(key="kc_sweep_layers_A").value == ["block1", "block2", "block3"]
    assert at.multiselect(key="kc_sweep_layers_B").value == ["layer1", "layer2", "layer3"]
    at.multiselect(key="kc_sweep_layers_A").set_value(["block1", "block2"]).run()
    assert any("as many layers of A as of B" in w.value for w in at.warning)  # 2 against 3: refused before a start
    assert at.button(key="kc_sweep_start").disabled
    at.multiselect(key="kc_sweep_layers_B").set_value(["layer1", "layer2"]).run()
    at.number_input(key="kc_sweep_K").set_value(1).run()
    at.number_input(key="kc_sweep_epochs").set_value(2).run()
    at.button(key="kc_sweep_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job_id = at.session_state["kc_sweep_jobs"][-1]
    job = state.registry().wait(job_id, timeout=600)
    assert job is not None and job.state == "done", job and job.error
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Finished" in s.value for s in at.success)
    assert at.session_state["kc_sweep_pairs"][job_id] and len(job.result.result.pairs) == 2
    folder = job.result.folder
    assert folder.parent == runs_root and (folder / "sweep.csv").is_file()
    assert len(at.get("plotly_chart")) == 1 and len(at.dataframe) >= 1
    assert set(sweeps.comparable_runs()) == {folder / "pairs" / p.folder_name for p in job.result.result.pairs}
    at.button(key="kc_sweep_open_0").click().run()  # a pair opens on the result pages
    assert not at.exception, [e.value for e in at.exception]
    assert any(r.comparison is job.result.result.pairs[0].comparison for r in at.session_state["kc_runs"].values())


def test_compare_runs_warns_when_presets_differ(runs_root, random_images):
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    data = random_images()
    write_run(compare(a, "2", b, "2", data, preset="fast", **TINY), runs_root / "run_fast")
    time.sleep(0.05)
    write_run(compare(a, "2", b, "2", data, preset="authors", **TINY), runs_root / "run_authors")
    at = _app().run()
    at.switch_page("app_pages/compare_runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    at.multiselect(key="kc_compare_runs").set_value(["run_fast", "run_authors"]).run()
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any("different presets (run_fast: fast, run_authors: authors)" in w for w in warnings), warnings
    assert len(at.get("plotly_chart")) == 1
    at.multiselect(key="kc_compare_runs").set_value(["run_fast"]).run()
    assert not any("different presets" in w.value for w in at.warning)
