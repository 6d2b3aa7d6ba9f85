"""How soon the default fit's result is visible, and how honest its time left was.

Runs what the dashboard runs on "Start fit" with everything at its default (the default pair over the 400 bundled
images, one direction, the ``fast`` preset, chance baselines on): :func:`kcore.pipeline.compare_fit`, whose result
the dashboard shows at once, then :func:`kcore.pipeline.add_baselines`. Every progress report is kept with its
time; afterwards each report's time left (the stage's, and the whole run's) is compared with the time that was
really left. Prints one JSON object.

    python -m bench.eta_check [--n-images N] [--epochs E]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

from bench.data import DEFAULT_N_IMAGES, load_default_pair, sample_images


def _coverage(rows: list[tuple[float, Any, float]]) -> dict[str, Any]:
    """Share of reports whose range held the true time left, and how far the middle of the range was off."""
    if not rows:
        return {"reports": 0}
    inside = [lo <= true <= hi for (_, (lo, hi), true) in rows]
    ratios = [((lo + hi) / 2) / true for (_, (lo, hi), true) in rows if true > 1.0]
    return {"reports": len(rows), "inside": sum(inside) / len(rows),
            "mid_over_true_median": statistics.median(ratios) if ratios else None,
            "mid_over_true_range": [min(ratios), max(ratios)] if ratios else None}


def run(n_images: int = DEFAULT_N_IMAGES, log: Any = None, epochs: int | None = None) -> dict[str, Any] | None:
    """Time the default request in its two steps and check every ETA it gave; None without the sample models.

    ``log``: a text stream that gets one line per stage as it starts; ``epochs`` caps every fit (a smoke run only;
    None is the default preset's own schedule).
    """
    from kcore.fit import make_config
    from kcore.pipeline import add_baselines, compare_fit

    loaded = load_default_pair()
    if loaded is None:
        return None
    a, la, b, lb = loaded
    images = sample_images(n_images)
    seen: list[tuple[float, Any]] = []
    t0 = time.perf_counter()

    def on_progress(p: Any) -> None:
        seen.append((time.perf_counter() - t0, p))
        if log is not None and (p.stage != seen[-2][1].stage if len(seen) > 1 else True):
            print(f"{seen[-1][0]:7.1f} s  {p.message}", file=log, flush=True)

    comp = compare_fit(a, la, b, lb, images, make_config("fast", epochs=epochs), preset="fast", device="cpu", baselines=True,
                       progress=on_progress)
    t_first = time.perf_counter() - t0
    full = add_baselines(comp, b, images, progress=on_progress)
    t_end = time.perf_counter() - t0
    ends: dict[str, float] = {}
    for t, p in seen:
        ends[p.stage] = t
    stage_rows, total_rows = [], []
    for t, p in seen:
        if p.eta is not None and p.stage in ends and p.stage != "done" and p.fraction < 1.0:
            stage_rows.append((t, (p.eta.low, p.eta.high), ends[p.stage] - t))
        if p.eta_total is not None and p.stage != "done" and p.fraction < 1.0:
            total_rows.append((t, (p.eta_total.low, p.eta_total.high), t_end - t))
    return {
        "n_images": n_images, "pair": [a.name, la, b.name, lb],
        "first_result_seconds": round(t_first, 1), "with_baselines_seconds": round(t_end, 1),
        "baselines": sorted(full.baselines), "stage_eta": _coverage(stage_rows), "total_eta": _coverage(total_rows),
        "stages": {k: round(v, 1) for k, v in ends.items()},
    }


def main() -> None:
    """Command line: print the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-images", type=int, default=DEFAULT_N_IMAGES)
    p.add_argument("--epochs", type=int, default=None, help="cap every fit (a smoke run; default: the preset's)")
    args = p.parse_args()
    print(json.dumps(run(args.n_images, log=sys.stderr, epochs=args.epochs), indent=1))


if __name__ == "__main__":
    main()
