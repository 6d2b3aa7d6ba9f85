"""Shared helpers of the benchmark: timing, machine description, memory readings, results.

Timings on a shared machine are noisy, so every comparison the benchmark reports is a ratio of two timings
taken in the same process, interleaved (A, B, A, B, …), as the median over repeats.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kcore.devices import cpu_has_native_bf16


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], Any]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall time of each function, timed round-robin so that load changes hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def proc_status() -> dict[str, int]:
    """Memory lines of /proc/self/status in bytes (VmHWM = peak resident set, VmRSS, RssAnon, RssFile).

    Returns an empty dict where /proc is missing (not Linux).
    """
    out: dict[str, int] = {}
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def load_average() -> float | None:
    """The 1-minute load average (how busy the shared machine was), or None."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def cpu_model() -> str:
    """The CPU's model name (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": cpu_model(),
        # "AMD EPYC" names CPUs of very different speed: the vector width and native bfloat16 tell them apart
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_1min": load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def jsonable(o: Any) -> Any:
    """Dataclasses, tuples, tensors and paths as plain JSON values."""
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(o).items()}
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and o != o:
        return None
    return o


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=1))
    return path


def fmt_seconds(s: float | None) -> str:
    """Seconds in a short human form: ``0.0123 -> "12 ms"``, ``75 -> "75 s"``, ``4000 -> "67 min"``."""
    if s is None or s != s:
        return "n/a"
    if s < 1.0:
        return f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.1f} ms"
    if s < 600:
        return f"{s:.1f} s" if s < 100 else f"{s:.0f} s"
    return f"{s / 60:.0f} min"


def fmt_bytes(n: float | None) -> str:
    """Bytes in MiB."""
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"
