"""The fit package: what a fit records as typed fields, old run folders read back, its public helpers, CPU detection."""
from __future__ import annotations

import ast
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kcore
import kcore.devices
from kcore.fit import (
    BF16_MIN_STEP_FLOPS,
    FIT_EXTRA_FIELDS,
    fit,
    make_config,
    prepare_data,
    relative_error,
    training_dtype,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _pair(n: int = 48, c: int = 4, h: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g)
    w = torch.randn(c, c, 3, 3, generator=g) / (c * 9) ** 0.5
    y = F.conv2d(x, w, padding=1)
    return x, y + 0.3 * torch.tanh(y) ** 2 + 0.1 * torch.randn(y.shape, generator=g)


@pytest.fixture(scope="module")
def scheduled(one_thread):
    """A fit that runs its whole schedule: 12 steps, measured every 4, never stopped early."""
    x, y = _pair()
    return fit(x, y, orders=1, max_steps=12, eval_every=4, batch_size=8, patience=None, device="cpu"), (x, y)


# ------------------------------------------------------------------------------------------------ typed facts
def test_a_fit_records_what_ran_as_typed_fields(scheduled):
    res, _ = scheduled
    assert (res.steps_planned, res.steps_run, res.stopped_by) == (12, 12, "schedule")
    assert res.steps_run == res.history[-1].step  # the steps the history saw
    steps_per_epoch = math.ceil(len(res.train_indices) / 8)  # batches of 8
    assert res.epochs_run == res.epochs_planned == math.ceil(12 / steps_per_epoch) >= 2
    assert res.train_precision == "float32"  # tiny steps never run in bfloat16
    assert isinstance(res.start_monitor_error, float) and res.start_monitor_error == res.start_monitor_error
    assert len(res.monitor_indices) > 0
    assert not set(res.monitor_indices) & set(res.train_indices + res.heldout_indices)


def test_patience_that_runs_out_is_recorded_as_the_reason_to_stop(one_thread):
    # x* = x: the least-squares start is exact, so no step improves on it and patience (8 steps) runs out
    x, _ = _pair()
    res = fit(x, x.clone(), orders=1, max_steps=200, eval_every=4, batch_size=8, patience_steps=8, device="cpu")
    assert res.stopped_by == "patience" and res.steps_planned == 200
    first_past_patience = min(r.step for r in res.history if r.step >= 8)
    assert res.steps_run == first_past_patience < 200
    assert res.best_epoch == 0 and res.start_monitor_error < min(r.monitor_error for r in res.history)


def test_fit_json_keeps_the_facts_under_extra_as_before(scheduled, tmp_path):
    res, _ = scheduled
    res.save(tmp_path / "g")
    extra = json.loads((tmp_path / "g" / "fit.json").read_text())["extra"]
    # the keys and order kcore has always written: older readers (and kcore.export) look them up by these names
    assert list(extra) == ["monitor_indices", "steps_planned", "epochs_planned", "train_precision",
                           "start_monitor_error", "steps_run", "stopped_by", "epochs_run"] == list(FIT_EXTRA_FIELDS)
    assert extra == res.extra and extra["steps_run"] == res.steps_run and extra["stopped_by"] == res.stopped_by
    back = kcore.load_result(tmp_path / "g")
    for key in FIT_EXTRA_FIELDS:
        assert getattr(back, key) == getattr(res, key), key


@pytest.mark.parametrize("old_extra", [None, {}, "missing", "indices only"])
def test_a_run_folder_written_before_the_facts_were_recorded_still_loads(scheduled, tmp_path, old_extra):
    res, (x, y) = scheduled
    folder = res.save(tmp_path / "g")
    meta = json.loads((folder / "fit.json").read_text())
    if old_extra == "missing":
        del meta["extra"]
    elif old_extra == "indices only":  # what kcore wrote before it counted steps
        meta["extra"] = {"monitor_indices": list(res.monitor_indices)}
    else:
        meta["extra"] = old_extra
    (folder / "fit.json").write_text(json.dumps(meta))
    back = kcore.load_result(folder)
    assert (back.steps_run, back.steps_planned, back.epochs_run, back.stopped_by) == (None, None, None, None)
    assert back.start_monitor_error is None and back.train_precision == "float32"  # all ran in float32 then
    assert back.monitor_indices == (res.monitor_indices if old_extra == "indices only" else ())
    assert "steps_run" not in back.extra  # readers of the dict see no invented numbers
    torch.testing.assert_close(back.predict(x[:3]), res.predict(x[:3]))


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("steps_run", "12", "field 'extra.steps_run' of the wrong type: expected an integer; got '12' (str)"),
    ("stopped_by", "bored", "field 'extra.stopped_by' of the wrong type: expected one of 'schedule', 'patience', "
                            "'budget'; got 'bored' (str)"),
    ("train_precision", 16, "field 'extra.train_precision' of the wrong type"),
    ("monitor_indices", [1, "2"], "field 'extra.monitor_indices[1]' of the wrong type: expected an integer"),
    ("monitor_indices", [3, -1], "negative value in field 'extra.monitor_indices'"),
    ("epochs_run", -2, "negative value in field 'extra.epochs_run'"),
])
def test_edited_facts_in_fit_json_are_named_errors(scheduled, tmp_path, key, value, expected):
    res, _ = scheduled
    folder = res.save(tmp_path / "g")
    meta = json.loads((folder / "fit.json").read_text())
    meta["extra"][key] = value
    (folder / "fit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="fit.json") as e:
        kcore.load_result(folder)
    assert expected in str(e.value)


# ------------------------------------------------------------------------------------------------ public helpers
def test_relative_error_is_the_held_out_error_computed_another_way(scheduled):
    res, (x, y) = scheduled
    data = prepare_data(x, y, res.config, CPU)  # the same seeded split and normalisation as the fit's
    held = data.heldout_idx
    assert tuple(int(i) for i in held) == res.heldout_indices
    by_batches = [relative_error(res.model, data.xs[held], data.xt[held], b, CPU) for b in (1, 3, 64)]
    assert by_batches == pytest.approx([res.heldout_error] * 3, rel=1e-5)
    assert 0 < res.heldout_error < 1


def test_every_name_imported_from_kcore_fit_exists():
    package = sys.modules["kcore.fit"]  # (kcore.fit, the attribute, is the function fit)
    wanted: dict[str, str] = {}
    for folder in ("kcore", "bench", "dashboard", "tests", "tools"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == "kcore.fit":
                    wanted.update({a.name: str(path.relative_to(ROOT)) for a in node.names})
    assert {"fit", "FitResult", "make_config", "relative_error"} <= set(wanted)  # the scan found the callers
    missing = {name: where for name, where in wanted.items() if not hasattr(package, name)}
    assert missing == {}


# ------------------------------------------------------------------------------------------------ CPU capability
@pytest.mark.parametrize(("cpuinfo", "native"), [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 amx_tile amx_bf16\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni\n", False),
    ("processor\t: 0\n", False),
    (None, False),  # no /proc/cpuinfo (not Linux)
])
def test_native_bfloat16_is_read_from_the_cpu_flags_and_decides_the_training_precision(monkeypatch, cpuinfo, native):
    def fake_open(path, *args, **kwargs):
        assert path == "/proc/cpuinfo"
        if cpuinfo is None:
            raise FileNotFoundError(path)
        return io.StringIO(cpuinfo)

    monkeypatch.setattr(kcore.devices, "open", fake_open, raising=False)  # found before the builtin
    assert kcore.devices.cpu_has_native_bf16() is native
    big_step = training_dtype(make_config("fast"), CPU, BF16_MIN_STEP_FLOPS)
    assert big_step == (torch.bfloat16 if native else torch.float32)
