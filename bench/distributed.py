"""Scaling out: one fit from the float16 disk cache in 1 vs 2 processes (torchrun, gloo), and memory of a fit
from the cache on more images than fit in a RAM budget as float32.

Both fit the same synthetic pair (x (N, 16, 16, 16) and a planted x* = tanh(conv(x)) + noise), written as a
float16 cache (``x_a.npy`` / ``x_b.npy``), for a fixed number of epochs. Every run is a fresh process (or a
fresh torchrun job), so its peak resident set (``VmHWM``) is its own.

    python -m bench.distributed worker CACHE_DIR EPOCHS        # one process, or every rank under torchrun
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import proc_status

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (16, 16, 16)


def write_cache(folder: Path, n: int, seed: int = 0) -> int:
    """Write the synthetic pair of ``n`` images as float16 ``a.npy``/``b.npy`` batch by batch; return bytes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(SHAPE[0], SHAPE[0], 3, 3, generator=g) * 0.2
    a = np.lib.format.open_memmap(folder / "a.npy", mode="w+", dtype=np.float16, shape=(n, *SHAPE))
    b = np.lib.format.open_memmap(folder / "b.npy", mode="w+", dtype=np.float16, shape=(n, *SHAPE))
    for i in range(0, n, 1024):
        x = torch.randn(min(1024, n - i), *SHAPE, generator=g)
        y = torch.tanh(torch.nn.functional.conv2d(x, w, padding=1)) + 0.1 * torch.randn(x.shape, generator=g)
        a[i : i + len(x)], b[i : i + len(x)] = x.numpy(), y.numpy()
    a.flush(), b.flush()
    del a, b
    return 2 * n * int(np.prod(SHAPE)) * 2


def _worker(folder: Path, epochs: int) -> None:
    from kcore import distributed as kd
    from kcore.feature_cache import CachedArray
    from kcore.fit import fit

    torch.set_num_threads(1)
    with kd.job("cpu") as ctx:
        base = proc_status()
        t = time.perf_counter()
        r = fit(CachedArray(folder / "a.npy"), CachedArray(folder / "b.npy"), epochs=epochs, min_steps=0,
                device="cpu", ctx=ctx)
        seconds = time.perf_counter() - t
        peaks = kd.all_gather_tensors(torch.tensor([float(proc_status()["VmHWM"])], dtype=torch.float64), ctx)
        if ctx.is_main:
            print(json.dumps({
                "world_size": ctx.world_size, "seconds": seconds, "instability": r.heldout_report.instability,
                "heldout_error": r.heldout_error, "baseline_rss": base.get("VmRSS"),
                "peak_rss_per_rank": [int(p[0]) for p in peaks], "n_images": len(CachedArray(folder / "a.npy")),
            }))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # glibc otherwise keeps freed batch buffers of up to 32 MiB in its heap (±50 MiB of noise in VmHWM that says
    # nothing about what the fit holds); a fixed threshold hands every buffer over 256 KiB back when freed
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="262144")
    return env


def _run(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])} … failed:\n{proc.stderr[-3000:]}")
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def scaling_run(n: int, epochs: int, timeout: float = 1800) -> dict[str, Any]:
    """The same fit from the cache in one process and by two gloo ranks on this machine."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache_bytes = write_cache(folder, n)
        worker = [sys.executable, "-m", "bench.distributed", "worker", str(folder), str(epochs)]
        one = _run(worker, timeout)
        two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "bench.distributed", "worker", str(folder), str(epochs)], timeout)
    return {"n_images": n, "epochs": epochs, "cache_bytes": cache_bytes, "one": one, "two": two}


def disk_memory_run(budget_bytes: int, factor: int = 4, epochs: int = 1, timeout: float = 3600) -> dict[str, Any]:
    """Fit from the cache on ``factor`` × the images whose float32 features fill ``budget_bytes``, and on 1/16
    of those images, each in a fresh process.

    Returns the float32 size the features would take, the cache size, and both fits' peak resident sets
    (``VmHWM``): their difference is what the extra images cost in memory (a fit also touches a few hundred
    MiB of torch's libraries and allocator pools whatever N is, which the small run measures).
    """
    per_image_f32 = 2 * int(np.prod(SHAPE)) * 4
    n = factor * budget_bytes // per_image_f32
    runs = {}
    for label, size in (("small", max(64, n // 16)), ("large", n)):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            cache_bytes = write_cache(folder, size)
            runs[label] = _run([sys.executable, "-m", "bench.distributed", "worker", str(folder), str(epochs)], timeout)
            runs[label]["cache_bytes"] = cache_bytes
    large, small = runs["large"], runs["small"]
    return {"budget_bytes": budget_bytes, "factor": factor, "n_images": n, "n_small": small["n_images"],
            "float32_bytes": n * per_image_f32, "cache_bytes": large["cache_bytes"], "seconds": large["seconds"],
            "peak_rss": large["peak_rss_per_rank"][0], "peak_rss_small": small["peak_rss_per_rank"][0],
            "peak_growth": large["peak_rss_per_rank"][0] - small["peak_rss_per_rank"][0], "runs": runs}


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        raise SystemExit(__doc__)
