"""The study template (kcore/experiments/_study.py) and the layout of what the studies share."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

import kcore
import kcore.experiments as experiments
from kcore.experiments import STUDIES, read_study
from kcore.experiments._study import StudyRun, StudySettings, study_command
from kcore.pipeline import ModelInfo
from kcore.provenance import source_revision

EXPERIMENTS = Path(experiments.__file__).parent


@dataclasses.dataclass(frozen=True)
class _Result:
    """The smallest study result the template writes: one number, one table, no figure."""

    value: float

    def as_dict(self) -> dict:
        return {"value": self.value}

    def tables(self) -> dict:
        return {"numbers": pd.DataFrame({"value": [self.value]})}

    def figures(self) -> dict:
        return {}


def _parser(compute, report=lambda res: None, device: str = "cpu") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kcore")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("toy")
    p.add_argument("--value", type=float, default=1.5)
    study_command(p, "toy_study", compute, report, device=device)
    return parser


def test_run_study_hands_a_frozen_settings_object_and_leaves_the_options_unchanged(tmp_path, capsys):
    seen = {}

    def compute(args, run, progress):
        seen["run"] = run
        progress("computing")
        return StudyRun(_Result(args.value * 2), {"note": "toy"})

    out = tmp_path / "study"
    args = _parser(compute).parse_args(["toy", "--value", "2.25", "--threads", "1", "--out", str(out)])
    before = dict(vars(args))
    assert args.handler(args) == 0
    assert vars(args) == before  # no job, no device written into the parsed options

    run = seen["run"]
    assert isinstance(run, StudySettings) and run.device == "cpu"
    assert run.job.world_size == 1 and run.job.is_main and not run.job.distributed
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.device = "cuda"  # type: ignore[misc]

    folder = read_study(out)
    assert folder.study == "toy_study" and folder.result["value"] == 4.5
    assert folder.tables["numbers"]["value"].tolist() == [4.5]
    prov = folder.provenance
    assert prov["note"] == "toy" and prov["device"] == "cpu" and prov["threads"] == 1 and prov["world_size"] == 1
    assert prov["command"].startswith("kcore") and prov["versions"]["kcore"] == kcore.__version__
    captured = capsys.readouterr()
    assert "[toy-study" in captured.err and "computing" in captured.err
    assert f"wrote {out}" in captured.out


def test_run_study_refuses_an_existing_out_before_any_work(tmp_path):
    calls = []

    def compute(args, run, progress):
        calls.append(run)
        return StudyRun(_Result(0.0), {})

    out = tmp_path / "taken"
    out.mkdir()
    args = _parser(compute).parse_args(["toy", "--out", str(out)])
    with pytest.raises(ValueError, match="already exists") as err:
        args.handler(args)
    assert "--out" in str(err.value) and str(out) in str(err.value) and "--overwrite" in str(err.value)
    assert calls == []


def test_threads_are_restored_after_a_study(tmp_path):
    n = torch.get_num_threads()
    inside = []

    def compute(args, run, progress):
        inside.append(torch.get_num_threads())
        return StudyRun(_Result(0.0), {})

    target = 1 if n != 1 else 2
    args = _parser(compute).parse_args(["toy", "--threads", str(target), "--out", str(tmp_path / "o")])
    args.handler(args)
    assert inside == [target] and torch.get_num_threads() == n


def _imported_modules(path: Path) -> set[str]:
    """Every module that ``path`` imports (``from kcore.experiments import x`` counts as kcore.experiments.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_no_study_imports_another_study_and_the_shared_modules_import_none():
    studies = {f"kcore.experiments.{s}" for s in STUDIES}
    modules = sorted(EXPERIMENTS.glob("*.py"))
    assert {p.stem for p in modules} >= set(STUDIES)
    for path in modules:
        imported = _imported_modules(path) & studies
        imported.discard(f"kcore.experiments.{path.stem}")
        assert not imported, f"{path.name} imports the study {sorted(imported)}"


def test_study_template_is_a_small_module():
    lines = (EXPERIMENTS / "_study.py").read_text().count("\n")
    assert lines <= 150, f"kcore/experiments/_study.py has {lines} lines; the template should stay within 150"


def test_study_results_name_their_checkpoints_with_model_info(tmp_path):
    """Diagnosis and refinement keep :class:`ModelInfo` (typed), written to JSON as its fields."""
    from kcore.experiments import diagnosis, refinement
    from kcore.experiments._folder import write_study

    hints = {f.name: f.type for f in dataclasses.fields(diagnosis.DiagnosisResult)}
    assert hints["weak"] in ("ModelInfo", ModelInfo) and hints["strong"] in ("ModelInfo", ModelInfo)
    hints = {f.name: f.type for f in dataclasses.fields(refinement.RefinementResult)}
    assert hints["a"] in ("ModelInfo", ModelInfo) and hints["b"] in ("ModelInfo", ModelInfo)
    info = ModelInfo(name="net", sha256="ab" * 32, kind="state_dict", architecture="kc_resnet", num_parameters=7,
                     test_accuracy=0.5, layer="layer2")
    write_study(tmp_path / "s", "toy", {"weak": info}, {}, {}, {"checkpoint_weak": info})
    stored = json.loads((tmp_path / "s" / "provenance.json").read_text())["checkpoint_weak"]
    assert stored == dataclasses.asdict(info)
    assert json.loads((tmp_path / "s" / "result.json").read_text())["weak"] == dataclasses.asdict(info)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_source_revision_is_the_checkout_that_holds_kcore():
    root = Path(kcore.__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("kcore is not inside a git checkout here")
    rev = source_revision()
    assert rev["git_commit"] == head.stdout.strip()
    assert isinstance(rev["kcore_modified"], bool)


def test_study_folders_are_read_from_one_place():
    from kcore.experiments import _folder

    assert _folder.read_study is experiments.read_study and _folder.zip_study is experiments.zip_study


def test_consistency_row_holds_the_fits_held_out_numbers_and_flattens_in_table_order():
    from kcore.experiments._fits import ConsistencyRow, consistency_row

    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 3, 4, 4, generator=g)
    target = x.flip(1) + 0.3 * torch.randn(24, 3, 4, 4, generator=g)  # channels swapped, plus what x cannot give
    res = kcore.fit(x, target, orders=2, lam=0.1, epochs=1, seed=0)
    row = consistency_row(res)
    assert isinstance(row, ConsistencyRow)
    rep = res.heldout_report
    assert row.var_orders == tuple(float(v) for v in rep.var_orders) and len(row.var_orders) == 3
    assert row.var_residual == float(rep.var_residual) and row.instability == float(rep.instability)
    assert row.gates == tuple(float(p) for p in res.gates) and len(row.gates) == 2
    flat = row.as_row()
    assert list(flat) == ["var_x0", "var_x1", "var_x2", "var_residual", "var_target", "instability", "heldout_error",
                          "linear_r2", "cka", "p1", "p2"]
    assert flat["var_x1"] == row.var_orders[1] and flat["p2"] == row.gates[1] and flat["cka"] == row.cka
    assert all(isinstance(v, float) for v in flat.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        row.instability = 0.0  # type: ignore[misc]
