"""Project hygiene: the README's commands, CI, and a core that imports without the dashboard."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set up\n.*?```bash\n(.*?)```", text, re.S)
    assert block, "README.md needs a '## Set up' section with a bash block"
    return [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "streamlit run dashboard/app.py" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_the_readme_test_command_verbatim():
    test_cmd = _readme_commands()[1]
    assert test_cmd in (ROOT / ".ci" / "run").read_text()


def test_kcore_imports_without_streamlit():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'streamlit' or name.startswith('streamlit.'):\n"
        "            raise ImportError('streamlit blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import kcore, kcore.fit, kcore.decompose, kcore.metrics\n"
        "import pkgutil, importlib\n"
        "for m in pkgutil.walk_packages(kcore.__path__, 'kcore.'):\n"
        "    importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_public_api_is_the_workflow_with_examples():
    import kcore

    assert {"load_model", "list_layers", "extract_features", "fit", "compare", "read_run", "load_result",
            "FitResult", "Decomposition", "VarianceReport", "Comparison"} <= set(kcore.__all__)
    assert len(kcore.__all__) <= 20
    for name in kcore.__all__:
        obj = getattr(kcore, name)
        if name != "PRESETS":  # a dict: documented in kcore.fit
            assert "Examples::" in (obj.__doc__ or ""), name
    assert kcore.load_result == kcore.FitResult.load and kcore.compare.__module__ == "kcore.pipeline"
    with pytest.raises(AttributeError, match="import it from its module"):
        kcore.gtheta_loss  # noqa: B018  (internals live in their modules)
    from kcore.decompose import components  # noqa: F401
    from kcore.fit import FitProgress, make_config  # noqa: F401
    from kcore.gtheta import gtheta_loss  # noqa: F401
    from kcore.metrics import linear_cka, variance_report  # noqa: F401
