"""kcore on torch.distributed: sharding, the streamed fit from the disk cache, and 2-rank gloo jobs under torchrun.

The multi-process tests start ``torchrun --standalone`` (rendezvous on 127.0.0.1, a free port) as a subprocess
with a time limit and compare its output with the same job run in one process.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kcore import distributed as kd
from kcore.feature_cache import CachedArray
from kcore.fit import fit
from kcore.streaming import batch_slices

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), KCORE_DIST_TIMEOUT="120")
    return env


def _planted(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, 6, 8, 8) and x* = tanh(conv(x)) + noise: a planted, mostly linear relation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 8, 8, generator=g)
    w = torch.randn(5, 6, 3, 3, generator=g) * 0.3
    y = torch.tanh(torch.nn.functional.conv2d(x, w, padding=1)) + 0.1 * torch.randn(n, 5, 8, 8, generator=g)
    return x.half(), y.half()


def _save(folder: Path, name: str, x: torch.Tensor) -> CachedArray:
    np.save(folder / f"{name}.npy", x.numpy())
    return CachedArray(folder / f"{name}.npy")


# ------------------------------------------------------------------------------------------------ one process
def test_shards_are_whole_blocks_that_cover_every_item_once() -> None:
    n, block, world = 23, 4, 3
    shards = [kd.shard(n, block, kd.Context(rank=r, world_size=world)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert shards[0] == [0, 1, 2, 3, 12, 13, 14, 15] and shards[2] == [8, 9, 10, 11, 20, 21, 22]
    assert kd.shard(n, block) == list(range(n))  # one process: everything
    ids = [f"img{i}" for i in range(n)]
    assert kd.shard(ids, block, kd.Context(rank=1, world_size=world)) == [ids[i] for i in shards[1]]
    # the batches of one process, dealt out to the ranks
    one = batch_slices(n, block)
    dealt = [batch_slices(n, block, kd.Context(rank=r, world_size=world)) for r in range(world)]
    assert sorted((s.start, s.stop) for d in dealt for s in d) == [(s.start, s.stop) for s in one]
    with pytest.raises(ValueError, match="block must be a positive integer"):
        kd.shard(n, 0)


def test_single_process_collectives_are_identities() -> None:
    t = torch.arange(5.0)
    assert kd.all_reduce_sum(t) is t
    assert kd.all_reduce_floats(1.5, 2.0) == (1.5, 2.0)
    assert kd.broadcast_object({"a": 1}) == {"a": 1}
    assert kd.main_first(lambda: 7) == 7
    ctx = kd.init("cpu")  # no torchrun variables: a single process, no process group
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)


def test_torchrun_environment_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match="inconsistent torchrun environment"):
        kd.env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="must be integers"):
        kd.env_world()


def test_fit_from_the_disk_cache_equals_the_fit_from_tensors(tmp_path: Path) -> None:
    """The streamed fit reads the same float16 values and prepares every batch as the in-memory fit does."""
    xs, xt = _planted(240)
    torch.set_num_threads(1)
    a, b = fit(xs.float(), xt.float(), epochs=3, device="cpu"), fit(
        _save(tmp_path, "a", xs), _save(tmp_path, "b", xt), epochs=3, device="cpu"
    )
    for k, v in a.norm.state().items():
        assert torch.equal(v, b.norm.state()[k]), k
    assert a.heldout_indices == b.heldout_indices and a.best_epoch == b.best_epoch
    assert b.heldout_report.instability == pytest.approx(a.heldout_report.instability, abs=1e-6)
    assert b.baseline.linear_r2 == pytest.approx(a.baseline.linear_r2, abs=1e-9)
    assert b.baseline.cka == pytest.approx(a.baseline.cka, abs=1e-9)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_fit_from_the_cache_refuses_mismatched_arrays(tmp_path: Path) -> None:
    xs, xt = _planted(40)
    with pytest.raises(ValueError, match="same images"):
        fit(_save(tmp_path, "a", xs), _save(tmp_path, "b", xt[:30]), epochs=1, device="cpu")


_MEMORY_JOB = """
import sys, torch
from pathlib import Path
from bench.common import proc_status
from kcore.feature_cache import CachedArray
from kcore.fit import fit
torch.set_num_threads(1)
folder = Path(sys.argv[1])
peak = [proc_status()["VmRSS"]]
def watch(p):
    peak[0] = max(peak[0], proc_status()["VmRSS"])
r = fit(CachedArray(folder / "a.npy"), CachedArray(folder / "b.npy"), epochs=1, min_steps=0, device="cpu",
        progress=watch, on_epoch=lambda e, m: watch(None), batch_size=64)
watch(None)
print(peak[0], proc_status()["VmHWM"], r.heldout_report.n_images)
"""


def _fit_memory(folder: Path, n: int, shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(sampled peak VmRSS, VmHWM, held-out images) of a fresh process fitting g_θ from n cached images."""
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        arr = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.float16, shape=(n, *shape))
        for i in range(0, n, 512):
            arr[i : i + 512] = torch.randn(min(512, n - i), *shape, generator=g).numpy()
        arr.flush()
        del arr
    # glibc would otherwise keep freed batch buffers of up to 32 MiB in its heap, a noise of ±50 MiB that says
    # nothing about what the fit holds; a fixed threshold hands every buffer over 256 KiB back when it is freed
    env = {**_env(), "MALLOC_MMAP_THRESHOLD_": "262144"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_JOB, str(folder)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rss, hwm, held = (int(v) for v in proc.stdout.split())
    return rss, hwm, held


def test_fit_from_the_cache_keeps_resident_memory_flat_in_n(tmp_path: Path) -> None:
    """Fitting g_θ (one epoch, monitor and held-out passes, calibration, baseline) from 1024 and from 4096
    cached images of (16, 16, 16) features in a fresh process: the 3072 extra images are 96 MiB as float32
    tensors (48 MiB of float16 files), but the resident set (VmRSS, mapped pages included) grows by less
    than 16 MiB and its kernel-measured peak (VmHWM) by less than 48 MiB.
    """
    from bench.common import proc_status

    if "VmRSS" not in proc_status():
        pytest.skip("needs /proc/self/status")
    shape = (16, 16, 16)
    rss_small, hwm_small, held_small = _fit_memory(tmp_path / "small", 1024, shape)
    rss_large, hwm_large, held_large = _fit_memory(tmp_path / "large", 4096, shape)
    assert (held_small, held_large) == (round(1024 * 0.2), round(4096 * 0.2))
    float32_growth = 2 * 3072 * 16 * 16 * 16 * 4
    assert float32_growth == 96 << 20
    mib = {k: v >> 20 for k, v in dict(rss_small=rss_small, rss_large=rss_large, hwm_small=hwm_small,
                                          hwm_large=hwm_large).items()}
    assert rss_large - rss_small < 16 << 20, mib
    assert hwm_large - hwm_small < 48 << 20, mib


# ------------------------------------------------------------------------------------------------ two processes
def _run_job(args: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sample pair compared in one process and by two gloo ranks (each with its own cache folder)."""
    tmp = tmp_path_factory.mktemp("dist")
    job = str(ROOT / "tests" / "dist_job.py")
    _run_job([sys.executable, job, str(tmp / "one.json"), str(tmp / "cache1")])
    _run_job([*TORCHRUN, job, str(tmp / "two.json"), str(tmp / "cache2")])
    return {"one": json.loads((tmp / "one.json").read_text()), "two": json.loads((tmp / "two.json").read_text()),
            "tmp": tmp}


@pytest.mark.slow
def test_two_ranks_give_the_statistics_and_start_of_one_process(two_runs: dict) -> None:
    one, two = two_runs["one"], two_runs["two"]
    assert (one["world_size"], two["world_size"]) == (1, 2) and len(two["hosts"]) == 2
    assert one["heldout"] == two["heldout"]  # the split is global
    for key in one["norm"]:
        np.testing.assert_allclose(two["norm"][key], one["norm"][key], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(two["norm_again"][key], one["norm"][key], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(two["lstsq"], one["lstsq"], rtol=1e-6, atol=1e-6)
    assert abs(two["instability"] - one["instability"]) < 0.01, (one["instability"], two["instability"])
    assert 0.0 < one["instability"] < 1.0


@pytest.mark.slow
def test_two_ranks_write_the_cache_one_process_writes(two_runs: dict) -> None:
    e1, e2 = Path(two_runs["one"]["entry"]), Path(two_runs["two"]["entry"])
    assert e1.name == e2.name  # the same content key
    names = sorted(p.name for p in e1.iterdir())
    assert names == sorted(p.name for p in e2.iterdir()) and "x_a.npy" in names
    for name in names:
        assert (e1 / name).read_bytes() == (e2 / name).read_bytes(), name
    assert [p.name for p in e2.parent.iterdir()] == [e2.name]  # the ranks' parts were removed


@pytest.mark.slow
def test_a_killed_rank_fails_the_job_clearly_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "ab"
    args = [*TORCHRUN, "-m", "kcore", "fit", "--a", "sample_models/kshapes_tinynet_s0.safetensors",
            "--b", "sample_models/kshapes_resnet_s0.safetensors", "--data", "kshapes", "--n-images", "120",
            "--epochs", "400", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stderr is not None
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "train epoch" in line or "g_θ A_to_B: init" in line:
                break
        assert any("g_θ A_to_B" in line for line in lines), "".join(lines)[-3000:]
        time.sleep(2.0)
        victim = _rank_pid(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        _, rest = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = "".join(lines) + rest
    assert proc.returncode != 0
    assert "rank 1" in err or "local_rank: 1" in err, err[-3000:]
    assert "SIGKILL" in err or "another rank of the job stopped" in err, err[-3000:]
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], leftovers


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the worker of ``rank`` among the descendants of ``parent`` (from /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == parent and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


# ------------------------------------------------------------------------------------------------ CUDA / NCCL
@pytest.mark.needs_cuda
def test_streamed_fit_on_cuda_matches_the_cpu(tmp_path: Path) -> None:
    xs, xt = _planted(200)
    a_cpu = fit(_save(tmp_path, "a", xs), _save(tmp_path, "b", xt), epochs=2, device="cpu")
    a_gpu = fit(CachedArray(tmp_path / "a.npy"), CachedArray(tmp_path / "b.npy"), epochs=2, device="cuda")
    assert a_gpu.device.startswith("cuda")
    assert a_gpu.heldout_report.instability == pytest.approx(a_cpu.heldout_report.instability, abs=0.02)


@pytest.mark.needs_cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (one per rank)")
def test_two_nccl_ranks_match_one_process(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, json\nfrom kcore import distributed as kd\nfrom kcore.feature_cache import CachedArray\n"
        "from kcore.fit import fit\n"
        "with kd.job('cuda') as ctx:\n"
        "    assert ctx.backend == ('nccl' if ctx.distributed else None)\n"
        "    r = fit(CachedArray(sys.argv[1] + '/a.npy'), CachedArray(sys.argv[1] + '/b.npy'), epochs=2, ctx=ctx,\n"
        "            device='cuda')\n"
        "    if ctx.is_main:\n"
        "        open(sys.argv[2], 'w').write(json.dumps(r.heldout_report.instability))\n"
    )
    xs, xt = _planted(200)
    _save(tmp_path, "a", xs), _save(tmp_path, "b", xt)
    _run_job([sys.executable, str(script), str(tmp_path), str(tmp_path / "one.json")])
    _run_job([*TORCHRUN, str(script), str(tmp_path), str(tmp_path / "two.json")])
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert abs(one - two) < 0.01


def test_no_cuda_variant_runs_here_without_cuda() -> None:
    """The CUDA tests above skip on this machine; this one documents which backend a CPU job gets."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the NCCL tests run instead")
    with pytest.raises(ValueError, match="CUDA"):
        kd.init("cuda")
    assert kd.init("auto").device.type == "cpu"


# ------------------------------------------------------------------------------------------------ studies
@pytest.mark.slow
def test_stability_study_spreads_its_fits_over_two_ranks(tmp_path: Path) -> None:
    """All pairs of a 3-member family (6 fits): 2 gloo ranks (3 fits each) write the study one process writes."""
    from kcore.cli import main
    from kcore.experiments._folder import read_study

    fam = tmp_path / "fam"
    assert main(["train-family", "--arch", "kc_tinynet", "--seeds", "0", "1", "2", "--epochs", "1", "--n-train", "30",
                 "--n-test", "10", "--image-size", "32", "--out", str(fam)]) == 0
    study = ["-m", "kcore", "stability", "--family", str(fam), "--layers", "block2", "--n-images", "30", "--orders",
             "1", "--fit-epochs", "1", "--threads", "1", "--device", "cpu"]
    _run_job([sys.executable, *study, "--out", str(tmp_path / "one")])
    _run_job([*TORCHRUN, *study, "--out", str(tmp_path / "two")])
    one, two = read_study(tmp_path / "one"), read_study(tmp_path / "two")
    assert (one.provenance["world_size"], two.provenance["world_size"]) == (1, 2)
    d1, d2 = one.result["directions"], two.result["directions"]
    assert len(d1) == 6 and [(d["source"], d["target"]) for d in d1] == [(d["source"], d["target"]) for d in d2]
    for a, b in zip(d1, d2):  # each fit ran whole on one rank: the same numbers
        assert b["instability"] == pytest.approx(a["instability"], abs=1e-9)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def _same_numbers(a: Any, b: Any, where: str = "result") -> None:
    """Two study results hold the same values (floats to 1e-9), timings aside."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, sorted(set(a) ^ set(b)))
        for k in a:
            if "seconds" not in k:
                _same_numbers(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_numbers(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert (a != a and b != b) or b == pytest.approx(a, rel=1e-9, abs=1e-9), (where, a, b)
    else:
        assert a == b, (where, a, b)


SAMPLES = ROOT / "sample_models"
TINY_STUDIES = {  # every multi-fit study at a size that takes seconds; each deals its independent pieces out
    "compression": ["compression", "--model", str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--ratios", "0,0.5,0.9",
                    "--finetune-epochs", "0", "--n-train", "10", "--n-test", "10", "--n-images", "20",
                    "--fit-epochs", "1"],
    "cross-task": ["cross-task", "--image-size", "32", "--epochs", "1", "--n-train", "20", "--n-test", "10",
                   "--n-images", "20", "--fit-epochs", "1"],
    "distillation": ["distillation", "--teacher", "scratch", "--teacher-epochs", "1", "--image-size", "32",
                     "--generations", "2", "--epochs", "1", "--n-train", "20", "--n-test", "10", "--n-images", "20",
                     "--fit-epochs", "1"],
    "diagnosis": ["diagnosis", "--weak", str(SAMPLES / "kshapes_tinynet_s0.safetensors"), "--strong",
                  str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--n-train", "24", "--n-test", "12", "--orders", "1",
                  "--fit-epochs", "1", "--epochs", "1", "--n-maps", "2", "--repeats", "1"],
    "refinement": ["refinement", "--a", str(SAMPLES / "kshapes_resnet_s0.safetensors"), "--b",
                   str(SAMPLES / "kshapes_resnet_s1.safetensors"), "--n-train", "24", "--n-test", "12", "--orders",
                   "1", "--fit-epochs", "1", "--epochs", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("study", sorted(TINY_STUDIES))
def test_multi_fit_studies_spread_over_two_ranks(study: str, tmp_path: Path) -> None:
    """Each study's independent fits/arms dealt out to 2 gloo ranks give the study one process writes."""
    from kcore.experiments._folder import read_study

    args = ["-m", "kcore", *TINY_STUDIES[study], "--threads", "1", "--device", "cpu"]
    _run_job([sys.executable, *args, "--out", str(tmp_path / "one")])
    _run_job([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    one_s, two_s = read_study(tmp_path / "one"), read_study(tmp_path / "two")
    assert (one_s.provenance["world_size"], two_s.provenance["world_size"]) == (1, 2)
    _same_numbers(one_s.result, two_s.result)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_train_family_deals_its_networks_to_two_ranks(tmp_path: Path) -> None:
    """`train-family` under torchrun: each network trained whole on one rank, rank 0 alone writes the folder."""
    args = ["-m", "kcore", "train-family", "--arch", "kc_tinynet", "--seeds", "0", "1", "2", "--epochs", "1",
            "--n-train", "30", "--n-test", "10", "--image-size", "32", "--threads", "1"]
    _run_job([sys.executable, *args, "--out", str(tmp_path / "one")])
    _run_job([*TORCHRUN, *args, "--out", str(tmp_path / "two")])
    one = json.loads((tmp_path / "one" / "family.json").read_text())
    two = json.loads((tmp_path / "two" / "family.json").read_text())
    assert [m["sha256"] for m in two["members"]] == [m["sha256"] for m in one["members"]]  # byte-equal weights
    from safetensors import safe_open

    with safe_open(str(tmp_path / "two" / "kc_tinynet_s2.safetensors"), "pt") as f:
        # one metadata entry: safetensors writes several in no fixed order (the files' hashes then varied)
        assert json.loads(f.metadata()["kcore"]) == {"format": "kcore-family-member/1", "name": "kc_tinynet_s2"}
        assert list(f.metadata()) == ["kcore"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


_LEAVE_JOB = '''
import json, sys
import torch.distributed as dist
from kcore import distributed as kd
with kd.job("cpu") as ctx:
    store = dist.distributed_c10d._get_default_store()
    rank = ctx.rank
seen = {"initialized_after": dist.is_initialized(), "arrived": store.add("kcore/leave/0/arrived", 0),
        "all": store.check(["kcore/leave/0/all"])}
open(sys.argv[1] + f".{rank}", "w").write(json.dumps(seen))
'''


def test_ranks_leave_the_job_together_after_a_second_barrier_on_the_store(tmp_path: Path) -> None:
    """After the gloo barrier every rank also waits on the job's store (pytorch/gloo#155), then leaves the group."""
    script = tmp_path / "leave.py"
    script.write_text(_LEAVE_JOB)
    _run_job([*TORCHRUN, str(script), str(tmp_path / "seen")], timeout=120)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"seen.{rank}").read_text())
        assert seen == {"initialized_after": False, "arrived": 2, "all": True}, (rank, seen)


_EXIT_JOB = """
import json, os, sys
import torch
from kcore import distributed as kd
out, threads, trigger = sys.argv[1:4]
torch.set_num_threads(1)
with kd.job("cpu") as ctx:
    model = torch.nn.Linear(4, 2)
    if trigger == "optimizer":  # as every fit and training does: the first optimizer imports torch._dynamo
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    else:  # only the module of torch that optimizer ends up importing, which captures the group (4 CPU-s cheaper)
        import torch.distributed.nn.functional
    total = kd.all_reduce_floats(float(ctx.rank + 1), ctx=ctx)
    squares = kd.map_over_ranks(lambda i: i * i, list(range(5)), ctx)
    kd.main_first(lambda: open(out, "w").write(json.dumps({"total": total, "squares": squares})), ctx)
names = []
if threads != "-":  # the threads this rank still runs once it has left the job
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{task}/comm").read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    open(f"{threads}.{ctx.rank}", "w").write(json.dumps(names))
"""


_EXIT_RESULT = {"total": [3.0], "squares": [0, 1, 4, 9, 16]}  # ranks 1 + 2; i * i over 5 items


def _exit_job(tmp_path: Path, i: int, trigger: str, threads: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    """One run of the tiny 2-rank job above (a fresh torchrun), without asserting its exit status."""
    script = tmp_path / "exit_job.py"
    if not script.exists():
        script.write_text(_EXIT_JOB)
    out = tmp_path / f"result{i}.json"
    args = [*TORCHRUN, str(script), str(out), str(tmp_path / f"threads{i}") if threads else "-", trigger]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=_env(), cwd=ROOT), out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the thread names from /proc")
def test_a_rank_that_built_an_optimizer_joins_the_group_threads_before_leaving(tmp_path: Path) -> None:
    """Leaving the job destroys the process group for real, so no gloo thread outlives it into interpreter exit.

    An optimizer imports torch._dynamo, which imports torch.distributed.nn.functional, whose defaults
    (``group=group.WORLD``) would hold the job's group for ever; its gloo threads then lived on into every rank's
    exit (the likely source of the rank that aborted now and then). ``kd.init`` imports that module before the
    group exists. Without it, both ranks list gloo_tcp_loop and two pt_gloo_runloop threads here.
    """
    proc, out = _exit_job(tmp_path, 0, "optimizer", threads=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads(out.read_text()) == _EXIT_RESULT
    for rank in (0, 1):
        names = json.loads((tmp_path / f"threads0.{rank}").read_text())
        assert names and not [n for n in names if "gloo" in n], (rank, names)


@pytest.mark.slow
def test_thirty_two_rank_jobs_in_a_row_all_exit_cleanly(tmp_path: Path) -> None:
    """30 fresh torchrun jobs of 2 gloo ranks: every one exits with 0, no rank aborts on the way out."""
    failed = []
    for i in range(30):
        proc, out = _exit_job(tmp_path, i, "import")
        aborted = "terminate called" in proc.stderr or "SIGABRT" in proc.stderr
        if proc.returncode != 0 or aborted or not out.exists() or json.loads(out.read_text()) != _EXIT_RESULT:
            failed.append((i, proc.returncode, proc.stderr[-1500:]))
    assert failed == [], f"{len(failed)} of 30 runs did not exit cleanly: {failed}"
