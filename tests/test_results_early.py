"""Results the moment they exist: the fit is complete, written and shown before its chance baselines, which run as
stages of their own; the run folder takes them atomically; progress and time left are measured, never claimed."""
from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported before the first AppTest run, as in test_dashboard)

from helpers import loaded, tiny_net
from kcore.progress import Eta, StageClock, eta_range, format_span

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLES = ROOT / "sample_models"
STRONG = SAMPLES / "kshapes_resnet_s0.safetensors"
WEAK = SAMPLES / "kshapes_tinynet_s0.safetensors"
needs_samples = pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")


def _nets():
    return loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")


# ----------------------------------------------------------------------------------------- the pipeline in two steps
@pytest.fixture(scope="module")
def two_steps():
    """One comparison made in two steps (compare_fit, then add_baselines), and in one (compare)."""
    from conftest import RandomImages
    from kcore.pipeline import add_baselines, compare, compare_fit

    a, b = _nets()
    images = RandomImages()
    fit_only = compare_fit(a, "2", b, "2", images, orders=1, epochs=2, baselines=True, both_directions=True)
    full = add_baselines(fit_only, b, images)
    once = compare(a, "2", b, "2", images, orders=1, epochs=2, baselines=True, both_directions=True)
    return fit_only, full, once, images, b


def test_the_fit_is_complete_without_its_baselines_and_they_are_added_as_a_new_comparison(two_steps):
    fit_only, full, once, _, _ = two_steps
    assert fit_only.baselines == {} and fit_only.provenance["baselines_pending"] == ["random_b", "shuffled"]
    assert fit_only.verdict("A_to_B").code == "unknown"  # no baselines yet: no verdict against chance
    assert set(full.baselines) == {"random_b", "shuffled"} and "baselines_pending" not in full.provenance
    assert full.directions is fit_only.directions  # the fit itself is kept as it was, not refitted
    # compare() is the two steps: the same numbers, seed for seed
    for kind in ("random_b", "shuffled"):
        for key in ("A_to_B", "B_to_A"):
            assert full.baselines[kind].reports[key].instability == once.baselines[kind].reports[key].instability
    assert full.metrics()["directions"]["A_to_B"]["verdict"] == once.metrics()["directions"]["A_to_B"]["verdict"]


def test_add_baselines_refuses_a_run_folder_and_another_b(two_steps, tmp_path):
    from kcore.pipeline import add_baselines, read_run, write_run

    fit_only, _, _, images, _ = two_steps
    back = read_run(write_run(fit_only, tmp_path / "run"))
    with pytest.raises(ValueError, match=r"comparison must hold all 40 images' features.*got \d+ images'.*Fix:"):
        add_baselines(back, None, images)
    other = loaded(tiny_net(7), "other.pt")
    with pytest.raises(ValueError, match=r"b must be the comparison's network B \(b.pt .*got other.pt.*Fix:"):
        add_baselines(fit_only, other, images, ["random_b"])


def test_update_run_baselines_equals_a_one_shot_write(two_steps, tmp_path):
    from kcore.pipeline import read_run, update_run_baselines, write_run

    fit_only, full, _, _, _ = two_steps
    one = write_run(full, tmp_path / "one" / "run")
    two = write_run(fit_only, tmp_path / "two" / "run")  # the same name in another folder: the same provenance
    assert json.loads((two / "metrics.json").read_text())["baselines"] == {}
    assert update_run_baselines(two, full) == two
    assert (one / "metrics.json").read_bytes() == (two / "metrics.json").read_bytes()
    assert json.loads((one / "provenance.json").read_text()) == json.loads((two / "provenance.json").read_text())
    a, b = read_run(one), read_run(two)
    assert set(b.baselines) == {"random_b", "shuffled"}
    for kind in b.baselines:
        assert a.baselines[kind].reports == b.baselines[kind].reports


def test_update_run_baselines_refuses_another_run(two_steps, tmp_path):
    import dataclasses

    from kcore.pipeline import update_run_baselines, write_run

    fit_only, full, _, _, _ = two_steps
    run = write_run(fit_only, tmp_path / "run")
    other = dataclasses.replace(full, provenance={**full.provenance, "seed": 99})
    with pytest.raises(ValueError, match=r"holds another run than comparison.*\['seed'\].*Fix:"):
        update_run_baselines(run, other)
    with pytest.raises(ValueError, match=r"is not a kcore run folder: missing \['metrics.json', 'provenance.json'\]"):
        update_run_baselines(tmp_path, full)


def test_update_run_baselines_is_atomic_for_a_reader(two_steps, tmp_path):
    from kcore.pipeline import update_run_baselines, write_run

    fit_only, full, _, _, _ = two_steps
    run = write_run(fit_only, tmp_path / "run")
    states = {name: [json.loads((run / name).read_text())] for name in ("metrics.json", "provenance.json")}
    update_run_baselines(run, full)
    for name in states:
        states[name].append(json.loads((run / name).read_text()))
    assert all(before != after for before, after in states.values())  # the update changes both files
    stop, seen, bad = threading.Event(), [0], []

    def reader() -> None:
        while not stop.is_set():
            for name, allowed in states.items():
                text = (run / name).read_text()
                try:
                    ok = json.loads(text) in allowed
                except ValueError:  # a part of a file
                    ok = False
                if not ok:
                    bad.append((name, len(text)))
                seen[0] += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):  # back and forth between the folder before and after its baselines
            update_run_baselines(run, fit_only if i % 2 else full)
    finally:
        stop.set()
        t.join()
    assert not bad and seen[0] > 0


# ----------------------------------------------------------------------------------------------- progress and ETA
def test_progress_fraction_is_the_stage_step_over_its_steps(random_images):
    from kcore.pipeline import compare_fit

    a, b = _nets()
    seen = []
    compare_fit(a, "2", b, "2", random_images(), orders=1, epochs=3, baselines=["shuffled"], both_directions=True,
                progress=seen.append)
    fits = [p for p in seen if p.stage.startswith("fit ") and "(step " in p.message]
    assert fits
    for p in fits:
        step, steps = map(int, re.search(r"\(step (\d+)/(\d+)\)", p.message).groups())
        assert p.fraction == step / steps
        # 1 extraction + 2 directions + the shuffled baseline in 2 directions, said in the text
        assert p.count == 5 and p.message.startswith(f"stage {p.index} of 5 · ")
    assert {p.index for p in fits} == {2, 3}
    assert all(0.0 <= p.fraction <= 1.0 for p in seen)


def _planted(rates, every, total, start=2.0):
    """Reports (elapsed, step) of a fit whose step k takes rates[k // every % len(rates)] seconds, one report every
    ``every`` steps after a set-up of ``start`` seconds; and the elapsed time at every step."""
    t, at = start, [start]
    for k in range(total):
        t += rates[(k // every) % len(rates)]
        at.append(t)
    return [(at[s], s) for s in range(every, total + 1, every)], at


@pytest.mark.parametrize("done", [40, 120, 200])
def test_eta_range_contains_the_true_time_left(done):
    rates, every, total = (0.9, 1.3, 1.1, 0.7), 10, 300  # a planted cycle of step times, each over 10 steps
    reports, at = _planted(rates, every, total)
    upto = [r for r in reports if r[1] <= done]
    eta = eta_range(upto, total, window=len(rates))
    true = at[total] - at[done]
    assert eta.low <= true <= eta.high
    assert eta.low == pytest.approx((total - done) * min(rates)) and eta.high == pytest.approx((total - done) * max(rates))


def test_eta_range_low_end_is_the_early_stopping_bound():
    reports, at = _planted((1.0, 1.2), 10, 300)
    upto = [r for r in reports if r[1] <= 100]
    eta = eta_range(upto, 300, stop_step=150)  # may stop at step 150, must stop by 300
    assert eta.low == pytest.approx(50 * 1.0) and eta.high == pytest.approx(200 * 1.2)
    assert eta.low <= at[150] - at[100] <= eta.high  # stopped early: inside the range
    assert eta.low <= at[300] - at[100] <= eta.high  # ran to the end: inside too
    assert eta_range(upto[:1], 300) is None  # one report: no rate measured, nothing claimed
    with pytest.raises(ValueError, match="window must be >= 1"):
        eta_range(upto, 300, window=0)


def test_eta_range_ignores_the_slow_start():
    reports, at = _planted((1.0,), 10, 300, start=500.0)  # a long set-up before the first step
    eta = eta_range([r for r in reports if r[1] <= 50], 300)
    assert eta.low == eta.high == pytest.approx(250.0)  # the set-up does not inflate the rate


def test_format_span_and_eta_text():
    assert format_span(40, 55) == "40–55 s"
    assert format_span(100, 170) == "1–3 min"
    assert format_span(120, 120) == "2 min"
    assert format_span(5400, 7200) == "1.5–2 h"
    assert Eta(100, 170).text() == "about 1–3 min left"
    with pytest.raises(ValueError, match=r"0 <= low <= high.*low=5.*high=3.*Fix:"):
        format_span(5, 3)


def test_stage_clock_bounds_later_stages_by_the_fits_already_run():
    from types import SimpleNamespace as P

    got = []
    clock = StageClock(["extract", "fit A_to_B", "baseline shuffled A_to_B"], got.append)
    on_fit = clock.fit_progress("fit A_to_B", lambda p, eta: f"step {p.step}/{p.steps}")
    on_fit(P(phase="init", epoch=0, epochs=3, elapsed=0.0, steps=30, step=0, stop_step=0, fraction=0.0))
    for i, s in enumerate((10, 20, 30), 1):
        on_fit(P(phase="train", epoch=i, epochs=3, elapsed=1.0 + s, steps=30, step=s, stop_step=0, fraction=s / 30))
    assert got[-1].eta == Eta(0.0, got[-1].eta.high) and got[-1].eta_total is None  # nothing measured to bound stage 3
    on_fit(P(phase="calibrate", epoch=3, epochs=3, elapsed=31.0, steps=0, step=0, stop_step=0, fraction=1.0))
    on_fit(P(phase="done", epoch=3, epochs=3, elapsed=35.0, steps=0, step=0, stop_step=0, fraction=1.0))
    assert clock.fits[0].seconds == 35.0 and clock.fits[0].tail == 4.0
    clock.tell("baseline shuffled A_to_B", 0.0, "starting")
    assert got[-1].index == 3 and got[-1].message == "stage 3 of 3 · starting" and got[-1].fraction == 0.0


# ------------------------------------------------------------------------------------- the CLI writes the fit first
@needs_samples
def test_cli_writes_the_run_folder_before_the_baselines(tmp_path, monkeypatch, capsys):
    import kcore.pipeline
    from kcore.cli import main
    from kcore.pipeline import read_run

    out = tmp_path / "run"
    seen = {}

    def killed(comparison, *args, **kwargs):  # the baseline stage starts: the folder is complete already
        back = read_run(out)
        seen["directions"], seen["baselines"] = set(back.directions), dict(back.baselines)
        seen["pending"] = back.provenance.get("baselines_pending")
        raise KeyboardInterrupt  # then the process is interrupted during the baselines

    monkeypatch.setattr(kcore.pipeline, "add_baselines", killed)
    rc = main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", "kshapes", "--n-images", "60", "--epochs", "1",
               "--orders", "1", "--baselines", "--out", str(out)])
    assert rc == 130
    assert seen == {"directions": {"A_to_B"}, "baselines": {}, "pending": ["random_b", "shuffled"]}
    back = read_run(out)  # still complete and readable after the interruption
    assert back.baselines == {} and back.directions["A_to_B"].fit.heldout_report.n_heldout > 0
    assert "the fit is written to" in capsys.readouterr().err


# ------------------------------------------------------------------------------- the dashboard shows the fit first
@needs_samples
def test_overview_shows_the_fit_while_a_slow_baseline_runs_then_the_baselines(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import kcore.baselines
    from dashboard import state

    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path / "runs"))
    release, entered = threading.Event(), threading.Event()
    original = kcore.baselines.random_network_baseline

    def slow(*args, **kwargs):  # the random-init B stage blocks until the test releases it
        entered.set()
        if not release.wait(300):
            raise RuntimeError("the test never released the planted baseline")
        return original(*args, **kwargs)

    monkeypatch.setattr(kcore.baselines, "random_network_baseline", slow)
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    try:
        at.slider(key="kc_img_n").set_value(60).run()
        at.switch_page("app_pages/fit.py").run()
        at.number_input(key="kc_fit_epochs").set_value(1).run()
        at.checkbox(key="kc_fit_baselines").check().run()
        at.button(key="kc_fit_start").click().run()
        job = state.registry().get(at.session_state["kc_jobs"][-1])
        alive = lambda: state.registry().touch(at.session_state["kc_session"])  # noqa: E731  (the tab stays open)
        t0 = time.perf_counter()
        while not entered.wait(2) and job.running and time.perf_counter() - t0 < 600:
            alive()
        assert entered.is_set(), f"the fit did not reach its baselines: {job.state} {job.error}"
        at.run()  # the fit's result is adopted while the baseline is blocked
        assert job.running and list(at.session_state["kc_runs"]) == [job.id]
        run = at.session_state["kc_runs"][job.id]
        assert run.comparison.baselines == {} and (run.run_dir / "metrics.json").is_file()
        assert any("The fit is done" in s.value for s in at.success)

        at.switch_page("app_pages/overview.py").run()
        assert not at.exception, [e.value for e in at.exception]
        infos = [i.value for i in at.info]
        assert any(i.startswith("Chance baselines running: random-init B, A → B 0%") for i in infos), infos
        inst = next(m for m in at.metric if m.label.startswith("Instability"))  # the fit's own number, shown
        shown = float(re.match(r"-?\d+\.\d+", inst.value).group())
        assert shown == pytest.approx(run.comparison.directions["A_to_B"].fit.heldout_report.instability, abs=6e-4)
        for page in ("explorer", "filters"):  # the other result pages work meanwhile
            at.switch_page(f"app_pages/{page}.py").run()
            assert not at.exception, [e.value for e in at.exception]
        at.switch_page("app_pages/overview.py").run()

        release.set()
        t0 = time.perf_counter()
        while job.running and time.perf_counter() - t0 < 600:
            alive()
            time.sleep(0.5)
        assert job.state == "done", job.error
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        final = at.session_state["kc_runs"][job.id]
        assert set(final.comparison.baselines) == {"random_b", "shuffled"}
        assert at.session_state["kc_active_run"] == job.id  # the user's place is kept
        assert not any(i.value.startswith("Chance baselines running") for i in at.info)
        captions = [c.value for c in at.caption]
        assert any(c.startswith("Chance baseline, random-init B: instability") for c in captions), captions
        on_disk = json.loads((final.run_dir / "metrics.json").read_text())
        assert set(on_disk["baselines"]) == {"random_b", "shuffled"}
    finally:
        release.set()
        state.registry().wait(at.session_state["kc_jobs"][-1], timeout=300)
