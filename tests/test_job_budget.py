"""One budget for work in the dashboard: typed options capped, one bounded job queue, jobs end with their session.

The registry is driven by hand: planted jobs block on Events, the clock of the session sweep is a number the
test moves, and a study's process is a harmless ``sleep``. Nothing here asserts on wall-clock time.
"""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dashboard.jobs import (  # noqa: E402
    ORPHAN_MESSAGE,
    JobCancelled,
    JobRegistry,
    check_fit_request,
    fit_work,
    ordinal,
    wait_for_process,
)
from kcore.limits import ENV_VARS, LimitExceeded, Limits, limits  # noqa: E402
from kcore.study_options import STUDY_CAPS, study_arguments, study_command, study_options  # noqa: E402

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
WAIT = 30.0  # generous bound on joins; never asserted as a duration


class Planted:
    """Tasks that block until released and record when they start, how many run at once, and the peak."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now = self.peak = 0
        self.order: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def task(self, name: str):
        gate = self.gates.setdefault(name, threading.Event())
        started = self.started.setdefault(name, threading.Event())

        def run(job):
            with self.lock:
                self.order.append(name)
                self.now += 1
                self.peak = max(self.peak, self.now)
            started.set()
            try:
                while not gate.wait(0.05):
                    if job.cancel.is_set():
                        raise JobCancelled("cancelled")
                return name
            finally:
                with self.lock:
                    self.now -= 1

        return run


def _drain(reg: JobRegistry, jobs, planted: Planted) -> None:
    for g in planted.gates.values():
        g.set()
    for j in jobs:
        reg.wait(j.id, WAIT)


# -- the queue ------------------------------------------------------------------------------------------------

def test_never_more_than_max_running_and_the_queue_is_fifo_with_positions():
    reg, planted = JobRegistry(max_running=2), Planted()
    jobs = [reg.submit(f"job {i}", planted.task(f"j{i}")) for i in range(6)]
    try:
        assert planted.started["j0"].wait(WAIT) and planted.started["j1"].wait(WAIT)
        assert [j.state for j in jobs] == ["running"] * 2 + ["queued"] * 4
        assert [reg.position(j.id) for j in jobs] == [None, None, 1, 2, 3, 4]
        assert [j.message.split(" (")[0] for j in jobs[2:]] == [f"queued: {ordinal(i)} in line" for i in (1, 2, 3, 4)]
        # release the running jobs one at a time, out of order: the next in line starts each time, never a third
        for name, started in (("j1", "j2"), ("j0", "j3"), ("j3", "j4"), ("j2", "j5")):
            planted.gates[name].set()
            reg.wait(next(j.id for j in jobs if j.label == f"job {name[1]}"), WAIT)
            nxt = next(j for j in jobs if j.label == f"job {started[1]}")
            assert nxt.state == "running" and reg.position(nxt.id) is None
            assert planted.started[started].wait(WAIT)  # its task began before the next slot is freed
            assert len(reg.running_jobs()) <= 2
            waiting = reg.queued_jobs()
            assert [reg.position(j.id) for j in waiting] == list(range(1, len(waiting) + 1))
            assert all(f"queued: {ordinal(i)} in line" in j.message for i, j in enumerate(waiting, 1))
    finally:
        _drain(reg, jobs, planted)
    assert [j.state for j in jobs] == ["done"] * 6
    assert planted.peak == 2
    assert sorted(planted.order[:2]) == ["j0", "j1"] and planted.order[2:] == ["j2", "j3", "j4", "j5"]  # FIFO


def test_a_cancelled_queued_job_never_starts_and_the_line_moves_up():
    reg, planted = JobRegistry(max_running=1), Planted()
    first, second, third = (reg.submit(n, planted.task(n)) for n in ("a", "b", "c"))
    try:
        assert (reg.position(second.id), reg.position(third.id)) == (1, 2)
        reg.cancel(second.id)
        assert second.state == "cancelled" and second.done.is_set() and not second.running
        assert reg.position(third.id) == 1 and "1st in line" in third.message
        planted.gates["a"].set()
        reg.wait(first.id, WAIT)
        planted.gates["c"].set()
        reg.wait(third.id, WAIT)
    finally:
        _drain(reg, [first, second, third], planted)
    assert "b" not in planted.order and planted.order == ["a", "c"]
    assert (first.state, second.state, third.state) == ("done", "cancelled", "done")
    assert second.thread is None  # no worker was ever made for it


def test_cancelling_a_running_job_frees_its_slot_for_the_next():
    reg, planted = JobRegistry(max_running=1), Planted()
    first, second = reg.submit("a", planted.task("a")), reg.submit("b", planted.task("b"))
    try:
        reg.cancel(first.id)
        reg.wait(first.id, WAIT)
        assert first.state == "cancelled"
        assert second.state == "running"
    finally:
        _drain(reg, [first, second], planted)
    assert second.state == "done"


def test_one_session_gets_at_most_its_share_and_the_message_names_the_variable():
    reg, planted = JobRegistry(max_running=4, per_session=1), Planted()
    mine = reg.submit("my fit", planted.task("m"), session="s1")
    other = reg.submit("their fit", planted.task("o"), session="s2")  # another session is not affected
    try:
        with pytest.raises(LimitExceeded) as err:
            reg.submit("my second fit", planted.task("m2"), session="s1")
        msg = str(err.value)
        assert "KCORE_MAX_SESSION_JOBS" in msg and "my fit" in msg and "at most 1" in msg and "Fix:" in msg
        assert err.value.env == "KCORE_MAX_SESSION_JOBS" and err.value.cap == 1
        assert "m2" not in planted.order
        planted.gates["m"].set()
        reg.wait(mine.id, WAIT)
        again = reg.submit("my next fit", planted.task("m3"), session="s1")  # the finished one no longer counts
        assert again.state == "running"
    finally:
        _drain(reg, [mine, other, *reg.queued_jobs(), *reg.running_jobs()], planted)


def test_bad_bounds_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match=r"max_running must be None or an integer >= 1; got 0"):
        JobRegistry(max_running=0)
    with pytest.raises(ValueError, match=r"per_session must be None or an integer >= 1; got True"):
        JobRegistry(per_session=True)
    with pytest.raises(ValueError, match=r"orphan_seconds must be None or a number >= 0; got -1"):
        JobRegistry(orphan_seconds=-1)


def test_the_registry_takes_its_bounds_from_the_environment(monkeypatch):
    monkeypatch.setenv("KCORE_MAX_JOBS", "3")
    monkeypatch.setenv("KCORE_MAX_SESSION_JOBS", "2")
    monkeypatch.setenv("KCORE_JOB_ORPHAN_SECONDS", "45")
    reg = JobRegistry.from_limits()
    assert (reg.max_running, reg.per_session, reg.orphan_seconds) == (3, 2, 45)
    monkeypatch.setenv("KCORE_MAX_JOBS", "two")
    with pytest.raises(ValueError, match="KCORE_MAX_JOBS must be a whole number"):
        JobRegistry.from_limits()


# -- jobs end with their session ------------------------------------------------------------------------------

def test_an_orphaned_sessions_jobs_are_cancelled_and_a_live_ones_kept():
    t = [1000.0]
    connected = {"tab-open"}
    reg = JobRegistry(max_running=2, orphan_seconds=100, clock=lambda: t[0], session_alive=lambda s: s in connected)
    planted = Planted()
    gone = reg.submit("closed tab", planted.task("gone"), session="closed")
    busy = reg.submit("heartbeat", planted.task("busy"), session="beating")
    idle = reg.submit("idle tab", planted.task("idle"), session="tab-open")  # queued behind the two
    queued_gone = reg.submit("closed tab, second job", planted.task("gone2"), session="closed")
    try:
        assert idle.state == queued_gone.state == "queued"
        t[0] += 60
        reg.touch("beating")  # a page of this session ran
        assert reg.sweep() == []  # nobody is over 100 s yet
        t[0] += 60  # closed: 120 s unseen; beating: 60 s; tab-open: connected, never touched
        cancelled = reg.sweep()
        assert {j.id for j in cancelled} == {gone.id, queued_gone.id}
        reg.wait(gone.id, WAIT)
        assert gone.state == queued_gone.state == "cancelled"
        assert gone.error == queued_gone.error == ORPHAN_MESSAGE
        assert "gone2" not in planted.order  # the queued job of the ended session never started
        assert busy.state == "running" and idle.state == "running"  # the freed slot went to the next in line
        t[0] += 1000  # beating stops beating; tab-open stays connected
        assert {j.id for j in reg.sweep()} == {busy.id}
        assert idle.state == "running"
    finally:
        _drain(reg, [gone, busy, idle, queued_gone], planted)
    t[0] += 1000
    connected.clear()
    reg.sweep()
    assert reg.get(gone.id) is None and reg.get(idle.id) is None  # finished jobs of ended sessions are forgotten


def test_a_job_without_a_session_or_without_an_orphan_limit_is_never_swept():
    t = [0.0]
    reg, planted = JobRegistry(orphan_seconds=None, clock=lambda: t[0]), Planted()
    job = reg.submit("a", planted.task("a"), session="s")
    reg2 = JobRegistry(orphan_seconds=1, clock=lambda: t[0])
    job2 = reg2.submit("b", planted.task("b"))
    try:
        t[0] += 10_000
        assert reg.sweep() == [] and reg2.sweep() == []
        assert job.state == job2.state == "running"
    finally:
        _drain(reg, [job], planted)
        _drain(reg2, [job2], planted)


def test_a_probe_that_raises_says_nothing_and_the_heartbeat_still_counts():
    t = [0.0]

    def broken(session):
        raise RuntimeError("no runtime")

    reg, planted = JobRegistry(orphan_seconds=10, clock=lambda: t[0], session_alive=broken), Planted()
    job = reg.submit("a", planted.task("a"), session="s")
    try:
        t[0] = 8
        reg.touch("s")
        t[0] = 15
        assert reg.sweep() == []
        t[0] = 30
        assert [j.id for j in reg.sweep()] == [job.id]
    finally:
        _drain(reg, [job], planted)


def test_a_study_process_of_an_ended_session_is_terminated():
    t = [0.0]
    reg = JobRegistry(max_running=1, orphan_seconds=30, clock=lambda: t[0])
    started: list[subprocess.Popen] = []

    def launch(job):
        started.append(subprocess.Popen(SLEEPER))
        return started[-1]

    job = reg.submit("study", lambda j: wait_for_process(j, j.handle, poll=0.05, grace=WAIT), session="tab",
                     prepare=launch)
    try:
        assert job.state == "running" and started and started[0].poll() is None
        t[0] = 31
        assert [j.id for j in reg.sweep()] == [job.id]
        assert started[0].wait(WAIT) == -signal.SIGTERM
        reg.wait(job.id, WAIT)
        assert job.state == "cancelled" and job.error == ORPHAN_MESSAGE
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_shutdown_stops_every_job_queued_or_running_and_its_process():
    from dashboard.jobs import SHUTDOWN_MESSAGE

    reg, started = JobRegistry(max_running=1), []

    def launch(job):
        started.append(subprocess.Popen(SLEEPER))
        return started[-1]

    def task(job):
        return wait_for_process(job, job.handle, poll=0.05, grace=WAIT)

    running = reg.submit("study 1", task, prepare=launch)
    queued = reg.submit("study 2", task, prepare=launch)
    try:
        assert (running.state, queued.state, len(started)) == ("running", "queued", 1)
        assert {j.id for j in reg.shutdown(timeout=WAIT)} == {running.id, queued.id}
        assert started[0].poll() == -signal.SIGTERM and len(started) == 1  # the queued one never started
        assert running.state == queued.state == "cancelled"
        assert running.error == queued.error == SHUTDOWN_MESSAGE
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_process_that_ignores_sigterm_is_killed():
    from dashboard.jobs import stop_process

    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                             "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\n"
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # SIGTERM is ignored from here on
        assert stop_process(proc, grace=0.5) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


# -- typed study options --------------------------------------------------------------------------------------

def _number_options(study: str) -> set[str]:
    from kcore.study_options import NEVER_FROM_A_BROWSER, _study_parser

    return {a.dest for a in _study_parser(study)._actions
            if type(a) is argparse._StoreAction and a.nargs is None and a.choices is None and a.type in (int, float)
            and a.dest not in NEVER_FROM_A_BROWSER}


def _studies():
    from kcore.experiments import STUDIES

    return list(STUDIES)


def test_every_number_option_of_every_study_has_a_cap_row():
    for study in _studies():
        offered = {o.name for o in study_options(study) if o.kind in ("int", "float")}
        missing = _number_options(study) - set(STUDY_CAPS)
        assert not missing, f"add {sorted(missing)} of {study} to kcore.study_options.STUDY_CAPS"
        assert offered == _number_options(study)
    assert set(STUDY_CAPS.values()) <= set(ENV_VARS)


@pytest.mark.parametrize("study", ["diagnosis", "stability", "refinement", "compression", "distillation",
                                   "cross_task"])
def test_each_number_option_over_its_cap_is_refused_naming_option_cap_and_variable(study):
    caps = limits()
    for opt in study_options(study):
        if opt.kind not in ("int", "float"):
            continue
        cap = getattr(caps, STUDY_CAPS[opt.name])
        assert (opt.maximum, opt.env) == (cap, ENV_VARS[STUDY_CAPS[opt.name]])
        over = cap + 1 if opt.kind == "int" else cap * 1.5
        for build in (lambda v: study_arguments(study, v), lambda v: study_command(study, v, "/tmp/unused")):
            with pytest.raises(LimitExceeded) as err:
                build({opt.name: over})
            msg = str(err.value)
            assert repr(opt.name) in msg and opt.flag in msg, msg
            assert f"at most {cap:,}" in msg and opt.env in msg and "Fix:" in msg, msg
        assert study_arguments(study, {opt.name: cap if opt.kind == "int" else float(cap)})[0] == opt.flag


def test_the_issues_study_request_is_refused_and_real_work_passes():
    for name, value, env in (("image_size", 2000, "KCORE_MAX_STUDY_IMAGE_SIZE"),
                             ("n_train", 100_000, "KCORE_MAX_STUDY_IMAGES"),
                             ("epochs", 1_000_000, "KCORE_MAX_STUDY_EPOCHS")):
        with pytest.raises(LimitExceeded, match=env):
            study_arguments("stability", {name: value})
    with pytest.raises(ValueError, match=r"'epochs' \(--epochs\) must be an integer; got 1000000.0"):
        study_arguments("stability", {"epochs": 1e6})  # the issue's 1e6 is not even an integer
    assert study_arguments("stability", {"image_size": 224, "n_train": 5000, "n_test": 500, "epochs": 60}) == [
        "--image-size", "224", "--n-train", "5000", "--n-test", "500", "--epochs", "60"]


def test_the_caps_follow_the_operators_environment(monkeypatch):
    monkeypatch.setenv("KCORE_MAX_STUDY_IMAGES", "50")
    assert study_arguments("diagnosis", {"n_train": 50}) == ["--n-train", "50"]
    with pytest.raises(LimitExceeded, match=r"n_train.*at most 50 .*KCORE_MAX_STUDY_IMAGES"):
        study_arguments("diagnosis", {"n_train": 51})
    assert next(o for o in study_options("diagnosis") if o.name == "n_test").maximum == 50
    # a Limits passed by hand wins over the environment
    assert study_arguments("diagnosis", {"n_train": 51}, Limits(max_study_images=51)) == ["--n-train", "51"]


def test_a_studys_images_at_their_size_are_bounded_by_the_input_bytes_cap():
    caps = Limits(max_input_bytes=3 * 32 * 32 * 4 * 1000)  # 1000 images at 32 px
    assert study_arguments("stability", {"n_train": 500, "n_test": 200, "n_images": 300}, caps)
    with pytest.raises(LimitExceeded) as err:
        study_arguments("stability", {"n_train": 501, "n_test": 200, "n_images": 300}, caps)
    assert "1001 images" in str(err.value) and "image_size 32" in str(err.value)
    assert "KCORE_MAX_INPUT_BYTES" in str(err.value)
    # the default caps refuse 10 000 + 10 000 + 10 000 images at 224 px (about 18 GB of float32)
    with pytest.raises(LimitExceeded, match="KCORE_MAX_INPUT_BYTES"):
        study_arguments("stability", {"n_train": 10_000, "n_test": 10_000, "n_images": 10_000, "image_size": 224})


def test_negative_and_mistyped_numbers_are_refused():
    with pytest.raises(ValueError, match=r"'lam' \(--lambda\) must be 0 or more; got -1.0"):
        study_arguments("diagnosis", {"lam": -1.0})
    with pytest.raises(ValueError, match=r"'epochs' \(--epochs\) must be an integer; got 2.5"):
        study_arguments("diagnosis", {"epochs": 2.5})
    with pytest.raises(ValueError, match=r"'lr' \(--lr\) must be a finite number; got nan"):
        study_arguments("diagnosis", {"lr": float("nan")})


# -- the Fit page's budget ------------------------------------------------------------------------------------

def _params(**kw):
    base = dict(orders=2, lam=0.1, epochs=None, seed=0, device="cpu", preset="fast", both_directions=False,
                baselines=False)
    return {**base, **kw}


def test_the_issues_fit_request_is_refused_and_real_work_passes():
    # 5000 epochs of the authors' preset, both directions, with baselines
    with pytest.raises(LimitExceeded) as err:
        check_fit_request(_params(preset="authors", epochs=5000, both_directions=True, baselines=True), 60)
    msg = str(err.value)
    assert "'epochs'" in msg and "at most 1,000" in msg and "KCORE_MAX_FIT_EPOCHS" in msg
    # the authors' 1000 epochs both ways with baselines on 5000 images: 30 M image-epochs
    with pytest.raises(LimitExceeded) as err:
        check_fit_request(_params(preset="authors", both_directions=True, baselines=True), 5000)
    msg = str(err.value)
    assert "30,000,000 image-epochs" in msg and "KCORE_MAX_FIT_WORK" in msg and "at most 20,000,000" in msg
    assert "both directions" in msg and "2 chance baselines" in msg and "Fix:" in msg
    # real work: 5000 images, the authors' preset on one direction (with its baselines too)
    assert check_fit_request(_params(preset="authors"), 5000) == fit_work(5000, 1000) == 5_000_000
    assert check_fit_request(_params(preset="authors", baselines=True), 5000) == 15_000_000
    assert check_fit_request(_params(epochs=1000, both_directions=True), 5000) == 10_000_000


def test_each_fit_setting_over_its_cap_names_it_and_its_variable(monkeypatch):
    for kw, env in ((dict(orders=7), "KCORE_MAX_ORDERS"), (dict(lam=101.0), "KCORE_MAX_COEFFICIENT"),
                    (dict(seed=2**31), "KCORE_MAX_SEED"), (dict(epochs=1001), "KCORE_MAX_FIT_EPOCHS")):
        with pytest.raises(LimitExceeded, match=env):
            check_fit_request(_params(**kw), 10)
    with pytest.raises(TypeError, match=r"'epochs' must be an integer; got '5'"):
        check_fit_request(_params(epochs="5"), 10)
    with pytest.raises(ValueError, match=r"'seed' must be a finite number >= 0; got -1"):
        check_fit_request(_params(seed=-1), 10)
    monkeypatch.setenv("KCORE_MAX_FIT_EPOCHS", "500")  # the operator's cap also binds the preset's schedule
    with pytest.raises(LimitExceeded, match=r"'authors' preset's schedule.*KCORE_MAX_FIT_EPOCHS"):
        check_fit_request(_params(preset="authors"), 10)


def test_start_fit_checks_the_request_on_the_server_whatever_the_browser_sent():
    """A forged request never reaches the queue: the check is in start_fit, not only in the widgets."""
    from dashboard.state import _jobs
    from dashboard.state._images import ImageChoice

    big = ImageChoice(images=range(5000), description="5000 images", kind="upload")
    with pytest.raises(LimitExceeded, match="KCORE_MAX_FIT_EPOCHS"):
        _jobs.start_fit(None, "x", None, "y", big, _params(epochs=5000, both_directions=True, baselines=True))
    with pytest.raises(LimitExceeded, match="KCORE_MAX_FIT_WORK"):
        _jobs.start_fit(None, "x", None, "y", big, _params(preset="authors", both_directions=True, baselines=True))


# -- the pages under AppTest ----------------------------------------------------------------------------------

@pytest.fixture
def app(monkeypatch, tmp_path):
    """A fresh app with its own registry (max 1 job at once) in place of the server's, and a clock we move."""
    from streamlit.testing.v1 import AppTest

    from dashboard.state import _jobs, _studies

    t = [0.0]
    reg = JobRegistry(max_running=1, per_session=1, orphan_seconds=60, clock=lambda: t[0])
    monkeypatch.setattr(_jobs, "registry", lambda: reg)
    monkeypatch.setattr(_studies, "registry", lambda: reg)
    monkeypatch.setenv("KCORE_STUDIES_DIR", str(tmp_path / "studies"))
    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60)
    return at, reg, t


def test_the_fit_page_shows_the_caps_and_queues_a_fit_behind_the_servers_jobs(app, monkeypatch):
    at, reg, t = app
    monkeypatch.setenv("KCORE_MAX_FIT_EPOCHS", "50")
    gate = threading.Event()
    other = reg.submit("another user's fit", lambda job: gate.wait(WAIT), session="someone else")
    try:
        at.run()
        at.switch_page("app_pages/fit.py").run()
        assert not at.exception, [e.value for e in at.exception]
        epochs = at.number_input(key="kc_fit_epochs")
        assert epochs.max == 50 and "KCORE_MAX_FIT_EPOCHS" in epochs.help
        assert at.number_input(key="kc_fit_K").max == limits().max_orders
        assert any("KCORE_MAX_FIT_WORK" in c.value and "KCORE_MAX_JOBS" in c.value for c in at.caption)
        at.button(key="kc_fit_start").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        (jid,) = at.session_state["kc_jobs"]
        job = reg.get(jid)
        assert job.state == "queued" and reg.position(jid) == 1
        assert any("Queued: 1st in line" in i.value for i in at.info), [i.value for i in at.info]
        assert at.button(key="kc_fit_start").disabled
        at.button(key="kc_fit_cancel").click().run()
        assert job.state == "cancelled" and job.thread is None  # cancelled in the queue: it never started
        assert not at.button(key="kc_fit_start").disabled
    finally:
        gate.set()
        reg.wait(other.id, WAIT)


def test_the_fit_page_refuses_a_request_over_the_budget(app, monkeypatch):
    at, reg, t = app
    monkeypatch.setenv("KCORE_MAX_FIT_WORK", "100")  # 60 bundled images × 40 epochs of the fast preset = 2400
    at.run()
    at.switch_page("app_pages/fit.py").run()
    assert any("KCORE_MAX_FIT_WORK" in w.value and "image-epochs" in w.value for w in at.warning)
    assert at.button(key="kc_fit_start").disabled
    monkeypatch.delenv("KCORE_MAX_FIT_WORK")
    at.run()
    assert not at.button(key="kc_fit_start").disabled and not at.warning
    assert "kc_jobs" not in at.session_state or not at.session_state["kc_jobs"]
    assert reg.queued_jobs() == [] and reg.running_jobs() == []


def test_a_queued_study_starts_in_its_turn_and_its_process_ends_with_the_session(app, monkeypatch):
    import kcore.study_options

    at, reg, t = app
    monkeypatch.setattr(kcore.study_options, "study_command", lambda study, values, out, caps=None: list(SLEEPER))
    gate = threading.Event()
    other = reg.submit("another user's fit", lambda job: gate.wait(WAIT), session="someone else")
    job = None
    try:
        at.run()
        at.switch_page("app_pages/studies.py").run()
        assert any("KCORE_MAX_JOBS" in c.value for c in at.caption)
        at.button(key="kc_st_run").click().run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        (job,) = at.session_state["kc_study_jobs"].values()
        assert job.state == "queued" and job.proc is None  # no process before its turn
        assert any("queued: 1st in line" in m.value for m in at.markdown), [m.value for m in at.markdown]
        assert at.button(key="kc_st_run").disabled
        gate.set()
        reg.wait(other.id, WAIT)
        assert job.proc is not None and job.proc.poll() is None and job.state == "running"  # its turn came
        t[0] = 50
        at.run()  # the page polls: the session is alive
        assert reg.sweep() == []
        t[0] = 115  # the tab was closed: no page ran for 65 s
        assert [j.id for j in reg.sweep()] == [job.job.id]
        assert job.proc.wait(WAIT) == -signal.SIGTERM
        reg.wait(job.job.id, WAIT)
        assert job.state == "cancelled" and job.job.error == ORPHAN_MESSAGE
    finally:
        gate.set()
        if job is not None and job.proc is not None and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()


def test_the_studies_page_shows_the_caps_and_refuses_a_study_over_the_budget(app, monkeypatch):
    at, reg, t = app
    monkeypatch.setenv("KCORE_MAX_STUDY_IMAGES", "100")  # below the quick settings' 1500 training images
    monkeypatch.setenv("KCORE_MAX_INPUT_BYTES", "1000000")  # 100 + 100 + 100 images at 32 px take 3.7 MB
    at.run()
    at.switch_page("app_pages/studies.py").run()
    at.selectbox(key="kc_st_study").set_value("stability").run()
    n_train = at.number_input(key="kc_st_opt_stability_quick_n_train")
    assert n_train.max == 100 and n_train.value == 100 and "KCORE_MAX_STUDY_IMAGES" in n_train.help
    at.button(key="kc_st_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("KCORE_MAX_INPUT_BYTES" in e.value and "image_size 32" in e.value for e in at.error), \
        [e.value for e in at.error]
    assert "kc_study_jobs" not in at.session_state or not at.session_state["kc_study_jobs"]
    assert reg.queued_jobs() == [] and reg.running_jobs() == []
