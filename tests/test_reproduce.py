"""Every run folder carries the `kcore fit` command and the Python snippet that recompute it: run them, get the
same numbers (from the CLI, from Python and from the dashboard), with paths that need quoting."""
from __future__ import annotations

import dataclasses
import json
import math
import shlex
import sys
import time
from pathlib import Path

import pytest

from helpers import copy_sample
from kcore.cli import main
from kcore.reproduce import Reproduction, fit_request, reproduce, reproduce_of

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
WEAK, STRONG = "kshapes_tinynet_s0", "kshapes_resnet_s0"


def _numbers(run_dir: Path) -> dict[str, float]:
    """Every number of metrics.json's directions (flattened), but the fit's wall time."""
    out: dict[str, float] = {}

    def walk(prefix: str, v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if k != "fit_seconds":
                    walk(f"{prefix}.{k}", x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{prefix}[{i}]", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix] = float(v)

    walk("", json.loads((run_dir / "metrics.json").read_text())["directions"])
    return out


def _same_numbers(got: Path, want: Path) -> None:
    a, b = _numbers(got), _numbers(want)
    assert a.keys() == b.keys() and len(a) > 20
    bad = {k: (a[k], b[k]) for k in a if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-7)}
    assert not bad, f"{len(bad)} numbers differ, e.g. {list(bad.items())[:5]}"


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A tiny `kcore fit` of the samples (both directions, non-default λ and seed) from a folder with spaces."""
    base = tmp_path_factory.mktemp("repro")
    models = base / "my models (v1)"
    a, b = copy_sample(WEAK, models), copy_sample(STRONG, models)
    out = base / "run one"
    rc = main(["fit", "--a", str(a), "--b", str(b), "--data", "kshapes", "--n-images", "120", "--epochs", "3",
               "--lambda", "0.2", "--seed", "3", "--both-directions", "--out", str(out)])
    assert rc == 0
    return out


def test_the_run_folder_command_recomputes_the_same_numbers(cli_run, tmp_path, monkeypatch):
    prov = json.loads((cli_run / "provenance.json").read_text())
    cli = prov["reproduce"]["cli"]
    argv = shlex.split(cli)
    assert argv[:2] == ["kcore", "fit"]
    # the settings that change the numbers are all there, and the paths with spaces survive the quoting
    assert str(SAMPLES.name) not in cli and argv[argv.index("--a") + 1].endswith(f"my models (v1)/{WEAK}.safetensors")
    for flag, value in (("--lambda", "0.2"), ("--seed", "3"), ("--epochs", "3"), ("--n-images", "120"),
                        ("--layer-a", "block2"), ("--layer-b", "layer2"), ("--device", "cpu")):
        assert argv[argv.index(flag) + 1] == value, (flag, cli)
    assert "--both-directions" in argv and prov["reproduce"]["exact"] and not prov["reproduce"]["notes"]
    assert argv[argv.index("--out") + 1] == "run one-reproduced"
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    _same_numbers(tmp_path / "run one-reproduced", cli_run)


def test_the_python_snippet_recomputes_the_same_numbers(cli_run, tmp_path, monkeypatch):
    prov = json.loads((cli_run / "provenance.json").read_text())
    snippet = prov["reproduce"]["python"]
    assert "kcore.compare(" in snippet and "both_directions=True" in snippet and "lam=0.2" in snippet
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "reproduce.py", "exec"), {})
    _same_numbers(tmp_path / "run one-reproduced", cli_run)


def test_exports_carry_the_command_in_provenance_and_manifest(cli_run, tmp_path):
    import kcore
    from kcore.export import export_comparison, verify_export

    comp = kcore.read_run(cli_run)
    stored = json.loads((cli_run / "provenance.json").read_text())["reproduce"]
    assert reproduce_of(comp) == Reproduction.from_dict(stored)  # the run folder's own, read back
    res = export_comparison(comp, tmp_path / "export", formats=("png",), dpi=50)
    manifest = json.loads((res.folder / "manifest.json").read_text())
    assert manifest["reproduce"]["cli"] == stored["cli"]
    assert json.loads((res.folder / "provenance.json").read_text())["reproduce"]["python"] == stored["python"]
    verify_export(res.folder)  # the manifest's new field does not disturb the check


# ------------------------------------------------------------------------------- the command, built by hand
@pytest.fixture(scope="module")
def provenance():
    """A compare()-style provenance of the samples on 30 bundled images (nothing fitted)."""
    import kcore
    from kcore.data import sample_images
    from kcore.fit import make_config
    from kcore.preprocessing import preprocessing_of

    a, b = kcore.load_model(SAMPLES / f"{WEAK}.safetensors"), kcore.load_model(SAMPLES / f"{STRONG}.safetensors")
    images = sample_images(30)
    return {
        "layers": {"A": "block2", "B": "layer2"}, "preset": "fast",
        "config": dataclasses.asdict(make_config("fast", orders=1, seed=2)),
        "preprocessing": {"A": preprocessing_of(a).as_dict(), "B": preprocessing_of(b).as_dict()},
        "request": fit_request(a, b, images, paths=(str(SAMPLES / f"{WEAK}.safetensors"),
                                                    str(SAMPLES / f"{STRONG}.safetensors"))),
    }


def test_an_uploaded_checkpoint_is_named_by_its_file_and_hash(provenance):
    prov = json.loads(json.dumps(provenance))
    prov["request"]["A"].update(path=None, name="resnet18 a's.safetensors", card=None, card_arch=None,
                                card_num_classes=None)
    r = reproduce(prov, out="out dir")
    argv = shlex.split(r.cli)
    assert argv[argv.index("--a") + 1] == "./resnet18 a's.safetensors"
    assert argv[argv.index("--arch-a") + 1] == "kc_tinynet"  # no card beside the saved upload: the flags say it
    assert argv[argv.index("--orders") + 1] == "1" and argv[argv.index("--seed") + 1] == "2"
    assert argv[-2:] == ["--out", "out dir"] and "--arch-b" not in argv  # B's card lies beside it
    (note,) = r.notes
    assert "uploaded file" in note and prov["request"]["A"]["sha256"] in note
    assert "kcore.load_model(\"./resnet18 a's.safetensors\", arch='kc_tinynet', num_classes=10)" in r.python


def test_settings_without_a_flag_are_said_and_set_exactly_in_python(provenance):
    prov = json.loads(json.dumps(provenance))
    prov["config"]["lr"] = 0.01  # no `kcore fit` flag sets the learning rate
    prov["preprocessing"]["B"]["input_size"] = [48, 48]
    prov["request"]["baselines"] = ["shuffled"]
    r = reproduce(prov)
    argv = shlex.split(r.cli)
    assert not r.exact and argv[argv.index("--input-size-b") + 1: argv.index("--input-size-b") + 3] == ["48", "48"]
    assert "--baselines" in argv and any("asked only for ['shuffled']" in n for n in r.notes)
    assert any("['lr']" in n and "Python snippet sets them exactly" in n for n in r.notes)
    ns: dict = {}
    config_line = next(ln for ln in r.python.splitlines() if ln.startswith("config = "))
    exec("import dataclasses\nfrom kcore.fit import PRESETS\n" + config_line, ns)
    assert ns["config"].lr == 0.01 and ns["config"].orders == 1 and ns["config"].seed == 2
    assert "preprocessing=Preprocessing(input_size=(48, 48)" in r.python and "baselines=['shuffled']" in r.python


def test_a_fit_setting_with_a_flag_of_its_own_is_passed_by_it(provenance):
    import argparse

    from kcore.cli import build_parser

    fit_parser = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["fit"]
    switches = {a.dest for a in fit_parser._actions if a.nargs == 0 and a.option_strings}
    from kcore.fit import make_config

    prov = json.loads(json.dumps(provenance))
    prov["config"] = dataclasses.asdict(make_config("fast", orders=1, seed=2, epochs=7, lr=0.01))  # lr: no flag
    r = reproduce(prov)
    argv = shlex.split(r.cli)
    assert argv[argv.index("--epochs") + 1] == "7" and any("['lr'" in n for n in r.notes)
    if "nested" in switches:  # a FitConfig switch that `kcore fit` takes under its own name
        prov = json.loads(json.dumps(provenance))
        prov["config"]["nested"] = True
        assert "--nested" in shlex.split(reproduce(prov).cli)


def test_grouped_images_keep_their_groups(provenance):
    prov = json.loads(json.dumps(provenance))
    prov["request"]["images"] = {"kind": "folder", "path": "/data/my photos", "n": 30, "load_size": [64, 64]}
    prov["groups"] = {"source": "folder", "detail": "", "n_images": 30, "n_groups": 6}
    r = reproduce(prov)
    argv = shlex.split(r.cli)
    assert argv[argv.index("--data") + 1] == "/data/my photos" and argv[argv.index("--groups") + 1] == "folder"
    assert r.exact and "images.with_groups(groups.folder_groups(images.ids))" in r.python
    prov["groups"] = {"source": "pattern", "detail": r"^(.*)_crop\d+", "n_images": 30, "n_groups": 6}
    r = reproduce(prov)
    assert "--groups" not in r.cli and not r.exact and any("file-name pattern" in n for n in r.notes)
    assert "groups.pattern_groups('^(.*)_crop\\\\d+', images.ids)" in r.python


def test_an_older_run_without_the_record_gets_a_command_and_says_what_is_guessed(provenance):
    prov = {k: v for k, v in provenance.items() if k != "request"}
    prov.update(checkpoint_a={"path": "/m/a b.safetensors", "name": "a", "kind": "safetensors"},
                checkpoint_b={"path": "/m/b.safetensors", "name": "b", "kind": "safetensors"},
                images={"n": 30, "source": "kshapes test split (bundled)"})
    r = reproduce(prov)
    assert shlex.split(r.cli)[3] == "/m/a b.safetensors" and "--data kshapes --n-images 30" in r.cli
    assert not r.exact and "before kcore recorded" in r.notes[0]


def test_a_provenance_without_config_is_refused_with_a_fix():
    with pytest.raises(ValueError, match=r"provenance must hold 'layers', 'config'.*Fix: pass a run's provenance"):
        reproduce({"layers": {"A": "x", "B": "y"}})
    with pytest.raises(ValueError, match="Fix:"):
        reproduce({"layers": {}, "config": {}, "preset": "fast"})  # no layer names


def test_the_command_is_recorded_only_when_kcore_is_the_program(monkeypatch):
    from kcore.provenance import kcore_command

    monkeypatch.setattr(sys, "argv", ["/venv/bin/kcore", "fit", "--a", "x"])
    assert kcore_command() == "kcore fit --a x"
    monkeypatch.setattr(sys, "argv", ["/srv/app/.venv/bin/streamlit", "run", "dashboard/app.py"])
    assert kcore_command() is None
    monkeypatch.setattr(sys, "argv", [str(ROOT / "kcore" / "__main__.py"), "stability"])
    assert kcore_command() == "kcore stability"


# ---------------------------------------------------------------------------------------------- the dashboard
def test_a_dashboard_run_on_a_server_checkpoint_reproduces_from_its_command(tmp_path, monkeypatch):
    """The Overview shows the command; it names the server file (path with spaces) and recomputes the numbers."""
    from streamlit.testing.v1 import AppTest

    from dashboard import state

    server = tmp_path / "server root"
    b_path = copy_sample(STRONG, server / "the models")
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(server))
    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.segmented_control(key="kc_src_B").set_value("path").run()
    at.text_input(key="kc_path_B").input(str(b_path)).run()
    at.button(key="kc_loadpath_B").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    at.slider(key="kc_img_n").set_value(60).run()
    at.switch_page("app_pages/fit.py").run()
    at.number_input(key="kc_fit_epochs").set_value(2).run()
    at.button(key="kc_fit_start").click().run()
    t0 = time.perf_counter()
    while not at.session_state["kc_runs"]:
        assert time.perf_counter() - t0 < 600, "the dashboard's fit did not finish"
        job = state.registry().get(at.session_state["kc_jobs"][-1])
        assert job is None or job.state not in ("failed", "cancelled"), job.error
        time.sleep(0.5)
        at.run()
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").is_file()]
    prov = json.loads((run_dir / "provenance.json").read_text())
    assert prov["command"] is None  # not the app's path: the dashboard is no kcore command
    argv = shlex.split(prov["reproduce"]["cli"])
    assert argv[argv.index("--b") + 1] == str(b_path.resolve()) and argv[argv.index("--epochs") + 1] == "2"
    at.switch_page("app_pages/overview.py").run()
    assert not at.exception
    assert any(c.value == prov["reproduce"]["cli"] for c in at.code), [c.value for c in at.code]
    monkeypatch.chdir(tmp_path)
    assert main(argv[1:]) == 0
    _same_numbers(tmp_path / f"{run_dir.name}-reproduced", run_dir)
