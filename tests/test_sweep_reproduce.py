"""A sweep folder carries the `kcore sweep` command and the Python snippet that recompute it: run them into a new
folder and get the same numbers (a sweep made by `kcore sweep` and one made by the dashboard's job)."""
from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import pytest

from helpers import copy_sample
from kcore.cli import main
from kcore.reproduce import reproduce_sweep
from kcore.sweep import read_sweep

ROOT = Path(__file__).resolve().parents[1]
WEAK, STRONG = "kshapes_tinynet_s0", "kshapes_resnet_s0"


def _same_rows(got: Path, want: Path) -> None:
    """Both sweep folders hold the same rows: layers, directions and every number (the fit is deterministic on CPU)."""
    (rows_got, _), (rows_want, _) = read_sweep(got), read_sweep(want)
    assert len(rows_want) >= 2
    assert [(r.layer_a, r.layer_b, r.direction) for r in rows_got] == [
        (r.layer_a, r.layer_b, r.direction) for r in rows_want]
    for g, w in zip(rows_got, rows_want):
        pairs = [(g.instability, w.instability), *zip(g.share_orders, w.share_orders),
                 *zip(g.instability_ci or (), w.instability_ci or ())]
        assert all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in pairs), (g, w)
    csv_got = [ln for ln in (got / "sweep.csv").read_text().splitlines() if not ln.startswith("#")]
    csv_want = [ln for ln in (want / "sweep.csv").read_text().splitlines() if not ln.startswith("#")]
    assert csv_got == csv_want


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory, one_thread):
    """A tiny `kcore sweep` of two stages of the samples (both directions, λ and seed not the defaults), from a folder
    with spaces."""
    base = tmp_path_factory.mktemp("sweep_repro")
    models = base / "my models (v1)"
    a, b = copy_sample(WEAK, models), copy_sample(STRONG, models)
    out = base / "sweep one"
    rc = main(["sweep", "--a", str(a), "--b", str(b), "--layers-a", "block1", "block2", "--layers-b", "layer1",
               "layer2", "--n-images", "60", "--orders", "1", "--epochs", "2", "--lambda", "0.2", "--seed", "3",
               "--both-directions", "--out", str(out)])
    assert rc == 0
    return out


def test_the_sweep_command_recomputes_the_same_numbers(cli_sweep, tmp_path, monkeypatch):
    _, doc = read_sweep(cli_sweep)
    how = doc["provenance"]["reproduce"]
    argv = shlex.split(how["cli"])
    assert argv[:2] == ["kcore", "sweep"] and how["exact"] and not how["notes"]
    assert argv[argv.index("--a") + 1].endswith(f"my models (v1)/{WEAK}.safetensors")
    assert argv[argv.index("--layers-a") + 1:argv.index("--layers-a") + 3] == ["block1", "block2"]
    assert argv[argv.index("--layers-b") + 1:argv.index("--layers-b") + 3] == ["layer1", "layer2"]
    for flag, value in (("--lambda", "0.2"), ("--seed", "3"), ("--epochs", "2"), ("--orders", "1"),
                        ("--n-images", "60"), ("--out", "sweep one-reproduced")):
        assert argv[argv.index(flag) + 1] == value, (flag, how["cli"])
    assert "--both-directions" in argv and "--layer-a" not in argv and "--pairs" not in argv
    # the CSV's header lines carry the same command
    assert f"# reproduce: {how['cli']}" in (cli_sweep / "sweep.csv").read_text().splitlines()
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    _same_rows(tmp_path / "sweep one-reproduced", cli_sweep)


def test_the_python_snippet_recomputes_the_same_numbers(cli_sweep, tmp_path, monkeypatch):
    _, doc = read_sweep(cli_sweep)
    snippet = doc["provenance"]["reproduce"]["python"]
    assert "sweep.sweep(a, ['block1', 'block2'], b, ['layer1', 'layer2']" in snippet and "lam=0.2" in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "reproduce_sweep.py", "exec"), {})
    _same_rows(tmp_path / "sweep one-reproduced", cli_sweep)


def test_every_pair_mode_is_said_and_a_bad_provenance_is_refused(cli_sweep):
    _, doc = read_sweep(cli_sweep)
    pair_prov = json.loads((cli_sweep / "pairs" / "00_block1__layer1" / "provenance.json").read_text())
    every = reproduce_sweep({**doc["provenance"], "pairs": "all"}, pair_prov, out="x")
    argv = shlex.split(every.cli)
    assert argv[argv.index("--pairs") + 1] == "all" and "pairs='all'" in every.python
    with pytest.raises(ValueError, match=r"sweep_provenance must hold 'layers'.*Fix: "):
        reproduce_sweep({"layers": {"A": "block1"}}, pair_prov)


def test_a_dashboard_sweep_on_server_checkpoints_reproduces_from_its_command(tmp_path, monkeypatch):
    """The Layer sweep page's job (server-folder checkpoints, path with spaces): the page shows the command, the
    folder records it, and running it gives the same numbers."""
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    server = tmp_path / "server root"
    a_path, b_path = copy_sample(WEAK, server / "the models"), copy_sample(STRONG, server / "the models")
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(server))
    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path / "runs"))
    (tmp_path / "runs").mkdir()
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    for which, path in (("A", a_path), ("B", b_path)):
        at.segmented_control(key=f"kc_src_{which}").set_value("path").run()
        at.text_input(key=f"kc_path_{which}").input(str(path)).run()
        at.button(key=f"kc_loadpath_{which}").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
    at.slider(key="kc_img_n").set_value(60).run()
    at.switch_page("app_pages/sweep.py").run()
    at.multiselect(key="kc_sweep_layers_A").set_value(["block1", "block2"]).run()
    at.multiselect(key="kc_sweep_layers_B").set_value(["layer1", "layer2"]).run()
    at.number_input(key="kc_sweep_K").set_value(1).run()
    at.number_input(key="kc_sweep_epochs").set_value(2).run()
    at.button(key="kc_sweep_start").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = state.registry().wait(at.session_state["kc_sweep_jobs"][-1], timeout=600)
    assert job is not None and job.state == "done", job and job.error
    t0 = time.perf_counter()
    at.run()
    while not any(c.value.startswith("kcore sweep ") for c in at.code):
        assert time.perf_counter() - t0 < 120, [c.value for c in at.code]
        time.sleep(0.5)
        at.run()
    folder = job.result.folder
    _, doc = read_sweep(folder)
    prov = doc["provenance"]
    assert prov["command"] is None  # the dashboard is no kcore command: not the app's path
    how = prov["reproduce"]
    argv = shlex.split(how["cli"])
    assert argv[argv.index("--a") + 1] == str(a_path.resolve()) and argv[argv.index("--b") + 1] == str(b_path.resolve())
    assert argv[argv.index("--epochs") + 1] == "2" and argv[argv.index("--out") + 1] == f"{folder.name}-reproduced"
    shown = next(c.value for c in at.code if c.value.startswith("kcore sweep "))
    assert shlex.split(shown)[:-1] == argv[:-1]  # the page's command, naming its default output folder
    assert any("sweep.sweep(" in c.value for c in at.code)
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    _same_rows(tmp_path / f"{folder.name}-reproduced", folder)


def test_a_grouped_sweep_keeps_its_groups_in_every_pair_and_in_its_command(tmp_path, monkeypatch):
    """`kcore sweep --groups folder`: every pair's split and intervals use the groups (provenance says so), and the
    reproduce command carries --groups (it used to be dropped with a note)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "photos"
    for g in range(8):
        (data / f"photo{g}").mkdir(parents=True)
        for i in range(4):
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(data / f"photo{g}" / f"crop{i}.png")
    models = tmp_path / "models"
    a, b = copy_sample(WEAK, models), copy_sample(STRONG, models)
    out = tmp_path / "grouped"
    assert main(["sweep", "--a", str(a), "--b", str(b), "--layers-a", "block1", "block2", "--layers-b", "layer1",
                 "layer2", "--data", str(data), "--groups", "folder", "--orders", "1", "--epochs", "2",
                 "--out", str(out)]) == 0
    pairs = sorted((out / "pairs").iterdir())
    assert len(pairs) == 2
    for pair in pairs:
        groups = json.loads((pair / "provenance.json").read_text())["groups"]
        assert (groups["source"], groups["n_groups"], groups["n_images"]) == ("folder", 8, 32)
    _, doc = read_sweep(out)
    argv = shlex.split(doc["provenance"]["reproduce"]["cli"])
    assert argv[argv.index("--groups") + 1] == "folder" and doc["provenance"]["reproduce"]["exact"]
