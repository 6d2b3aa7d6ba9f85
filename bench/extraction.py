"""Feature extraction with the float16 disk cache: images per second and peak memory, per number of images.

Each size runs in a fresh Python process (``python -m bench.extraction N CACHE_DIR``), so that its peak
resident set (``VmHWM``) belongs to that size alone. A sampling thread also records the peak of anonymous
memory (``RssAnon``: the heap, what the process really holds) apart from file-backed pages (``RssFile``: mostly
torch's shared libraries; the cache is written with plain file writes, so its pages stay in the kernel's page
cache and out of this count).

The two networks are the sample architectures with random weights (``kc_tinynet`` block2 → 32×16×16 and
``kc_resnet`` layer2 → 32×16×16, the embedded default's layers), and the images are 64×64 random RGB tensors
made per index, so rendering images costs nothing and the numbers are extraction alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from bench.common import proc_status


class RandomImages(Dataset):
    """``n`` deterministic 64×64 RGB images in [0, 1] (one seed per index), with ids."""

    def __init__(self, n: int, size: int = 64):
        self.n, self.size = n, size
        self.ids = tuple(f"rand/{i:06d}" for i in range(n))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i % 10


def _worker(n: int, cache_dir: Path) -> dict[str, Any]:
    from kcore.features import extract_features
    from kcore.zoo import DEFAULT_LAYERS, kc_resnet, kc_tinynet

    torch.manual_seed(0)
    a, b = kc_tinynet(10), kc_resnet(10)
    peak = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = proc_status()
            for k in peak:
                peak[k] = max(peak[k], s.get(k, 0))
            time.sleep(0.01)

    base = proc_status()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    feats = extract_features(
        a, DEFAULT_LAYERS["kc_tinynet"].name, b, DEFAULT_LAYERS["kc_resnet"].name, RandomImages(n),
        batch_size=64, device="cpu", cache_dir=cache_dir, cache_key=f"bench-random-{n}",
    )
    seconds = time.perf_counter() - t
    stop.set()
    sampler.join()
    end = proc_status()
    return {
        "n_images": n,
        "seconds": seconds,
        "images_per_second": n / seconds,
        "cache_bytes": feats.nbytes,
        "baseline_rss": base.get("VmRSS"),
        "peak_rss": end.get("VmHWM"),
        "peak_rss_anon": peak["RssAnon"],
        "peak_rss_file": peak["RssFile"],
    }


def extraction_run(n: int, cache_root: Path | None = None, timeout: float = 3600) -> dict[str, Any]:
    """Extract ``n`` images into a fresh cache folder in a child process; return its measurements."""
    with tempfile.TemporaryDirectory(dir=cache_root) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.extraction", str(n), tmp],
            capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
        )
    if proc.returncode != 0:
        raise RuntimeError(f"extraction worker for {n} images failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    torch.set_num_threads(int(__import__("os").environ.get("BENCH_THREADS", torch.get_num_threads())))
    print(json.dumps(_worker(int(sys.argv[1]), Path(sys.argv[2]))))
