"""The dashboard's state by concern: small faces, pages that never touch session keys, widget values kept valid."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboard"
CONCERNS = ("images", "jobs", "models", "paths", "runs", "startup", "studies", "views")
UI_FILES = sorted(DASHBOARD.glob("app_pages/*.py")) + [DASHBOARD / n for n in ("app.py", "sidebar.py", "ui.py")]


def _session_state_uses(path: Path) -> list[int]:
    """Lines of ``path`` that name ``session_state`` in code (strings and comments aside)."""
    tree = ast.parse(path.read_text())
    return sorted({n.lineno for n in ast.walk(tree)
                   if (isinstance(n, ast.Attribute) and n.attr == "session_state")
                   or (isinstance(n, ast.Name) and n.id == "session_state")})


def test_pages_never_touch_session_keys():
    found = {p.relative_to(DASHBOARD).as_posix(): lines for p in UI_FILES if (lines := _session_state_uses(p))}
    assert not found, f"session_state used outside dashboard/state/ at {found}; move it behind a state function"
    # the check itself finds a use
    assert _session_state_uses(DASHBOARD / "state" / "_views.py")


def test_pages_import_the_concerns_not_the_whole_state():
    for p in UI_FILES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dashboard":
                assert "state" not in [a.name for a in node.names], f"{p.name} imports dashboard.state as a whole"


@pytest.mark.parametrize("name", CONCERNS)
def test_each_concern_is_a_small_face(name):
    mod = importlib.import_module(f"dashboard.state.{name}")
    assert 1 <= len(mod.__all__) <= 20, (name, len(mod.__all__))
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, (name, missing)
    assert mod.__doc__ and mod.__doc__.strip()


def test_the_package_face_is_small_and_the_concerns_do_not_overlap():
    import dashboard.state as state

    assert len([n for n in state.__all__ if n not in CONCERNS]) <= 20
    seen: dict[str, str] = {}
    for name in CONCERNS:
        for n in importlib.import_module(f"dashboard.state.{name}").__all__:
            assert n not in seen, f"{n} is exported by both {seen.get(n)} and {name}"
            seen[n] = name


def _widgets_app():
    import streamlit as st

    from dashboard.state import views

    for key, value in (st.session_state.get("seed_values") or {}).items():
        views.set_widget_value(key, value)
    views.keep_valid("channel", range(4), 0)
    views.keep_valid("layer", ["conv1", "conv2"], "conv2", when_missing=True)
    views.keep_valid("order", [0, 1, 2], 0)
    st.session_state["seen"] = {k: views.widget_value(k, "none") for k in ("channel", "layer", "order")}


def test_keep_valid_resets_only_what_the_current_run_cannot_show():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_widgets_app)
    at.run()
    # nothing set yet: a missing channel or order is left to the widget's default; a missing layer gets its fallback
    assert at.session_state["seen"] == {"channel": "none", "layer": "conv2", "order": "none"}
    at.session_state["seed_values"] = {"channel": 7, "layer": "conv1", "order": 2}
    at.run()
    assert at.session_state["seen"] == {"channel": 0, "layer": "conv1", "order": 2}  # channel 7 of 4: reset
    at.session_state["seed_values"] = {"channel": 3, "layer": "fc", "order": 5}
    at.run()
    assert at.session_state["seen"] == {"channel": 3, "layer": "conv2", "order": 0}


def _export_app():
    import streamlit as st

    from dashboard.state import views

    if st.session_state.get("write"):
        views.set_export_result("run-1", "result of run-1")
    st.session_state["seen"] = (views.export_result("run-1"), views.export_result("run-2"))


def test_an_export_is_shown_only_for_the_run_it_was_written_for():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_function(_export_app)
    at.run()
    assert at.session_state["seen"] == (None, None)
    at.session_state["write"] = True
    at.run()
    assert at.session_state["seen"] == ("result of run-1", None)
