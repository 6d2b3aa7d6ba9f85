"""The Layer sweep and Compare runs pages keep the user's choices across page changes (AppTest, no sweep run)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def app(tmp_path):
    """The dashboard in an AppTest, with an empty runs folder of its own."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from streamlit.testing.v1 import AppTest

    old = os.environ.get("KCORE_RUNS_DIR")
    os.environ["KCORE_RUNS_DIR"] = str(tmp_path / "runs")
    (tmp_path / "runs").mkdir()
    yield AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    if old is None:
        os.environ.pop("KCORE_RUNS_DIR", None)
    else:
        os.environ["KCORE_RUNS_DIR"] = old


CHOICES = {  # widget kind, key, a value other than its default
    "K": ("number_input", "kc_sweep_K", 1),
    "epochs": ("number_input", "kc_sweep_epochs", 3),
    "seed": ("number_input", "kc_sweep_seed", 7),
    "preset": ("selectbox", "kc_sweep_preset", "authors"),
    "mode": ("radio", "kc_sweep_mode", "all"),
    "both": ("checkbox", "kc_sweep_both", False),
    "baselines": ("checkbox", "kc_sweep_baselines", True),
    "layers A": ("multiselect", "kc_sweep_layers_A", ["block1", "block3"]),
    "layers B": ("multiselect", "kc_sweep_layers_B", ["layer2"]),
}


def _value(at, kind: str, key: str):
    return getattr(at, kind)(key=key).value


def test_the_sweep_settings_survive_leaving_the_page_and_coming_back(app):
    at = app.run()
    at.switch_page("app_pages/sweep.py").run()
    assert not at.exception, [e.value for e in at.exception]
    defaults = {name: _value(at, kind, key) for name, (kind, key, _) in CHOICES.items()}
    assert all(defaults[name] != value for name, (_, _, value) in CHOICES.items()), defaults  # each choice changes it
    for kind, key, value in CHOICES.values():
        getattr(at, kind)(key=key).set_value(value).run()
    assert not at.exception, [e.value for e in at.exception]
    for page in ("app_pages/fit.py", "app_pages/setup.py"):  # away (the widgets are not drawn there) and back
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        at.switch_page("app_pages/sweep.py").run()
        assert not at.exception, [e.value for e in at.exception]
        kept = {name: _value(at, kind, key) for name, (kind, key, _) in CHOICES.items()}
        assert kept == {name: value for name, (_, _, value) in CHOICES.items()}
    # the kept choices are what a start would use: 'all' pairs of 2 × 1 layers
    assert any(c.value.startswith("2 pair(s)") for c in at.caption), [c.value for c in at.caption]


def test_layers_kept_for_another_network_fall_back_to_its_stages(app):
    at = app.run()
    at.switch_page("app_pages/sweep.py").run()
    at.multiselect(key="kc_sweep_layers_A").set_value(["block1", "block3"]).run()
    at.switch_page("app_pages/setup.py").run()
    at.selectbox(key="kc_sample_A").set_value("kshapes_resnet_s1").run()  # A becomes a network without block1..3
    at.switch_page("app_pages/sweep.py").run()
    assert not at.exception, [e.value for e in at.exception]
    picker = at.multiselect(key="kc_sweep_layers_A")
    assert "resnet_s1" in picker.label and picker.value == ["stem", "layer1", "layer2", "layer3"]  # its stages
    at.switch_page("app_pages/setup.py").run()
    at.selectbox(key="kc_sample_A").set_value("kshapes_tinynet_s0").run()
    at.switch_page("app_pages/sweep.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="kc_sweep_layers_A").value == ["block1", "block2", "block3"]


def test_the_runs_picked_on_compare_runs_are_kept(app, tmp_path, random_images):
    from helpers import loaded, tiny_net
    from kcore.pipeline import compare
    from kcore.run_folder import write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    images = random_images()
    for name in ("run_x", "run_y"):
        write_run(compare(a, "2", b, "2", images, orders=1, epochs=1), tmp_path / "runs" / name)
    at = app.run()
    at.switch_page("app_pages/compare_runs.py").run()
    at.multiselect(key="kc_compare_runs").set_value(["run_y", "run_x"]).run()
    assert not at.exception, [e.value for e in at.exception]
    at.switch_page("app_pages/sweep.py").run()
    at.switch_page("app_pages/compare_runs.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.multiselect(key="kc_compare_runs").value == ["run_y", "run_x"]
    assert len(at.get("plotly_chart")) == 1
