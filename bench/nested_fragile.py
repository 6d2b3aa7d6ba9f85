"""The fragility check of nested gains on the sample pair: each gain's interval width and the largest share one
held-out image holds of its change, and the warnings (kcore.fit.nested.fragile_gains).

``PYTHONPATH=. python -m bench.nested_fragile [--n-images 200] [--seeds 0 1 2]`` runs one nested fit of the sample
pair (tinynet ``block2`` → resnet ``layer2``, the ``fast`` preset) per seed and prints one line per gain Δₖ (k ≥ 1):
the gain and its interval in points of Var(x*), the interval's width, the held-out image that moves it most, its
share of the change, and whether the gain is flagged; then the warnings themselves.
"""
from __future__ import annotations

import argparse

import torch

import kcore
from bench.nested import sample_features


def main(argv: list[str] | None = None) -> int:
    """Print the table; returns 0."""
    ap = argparse.ArgumentParser(prog="python -m bench.nested_fragile", description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    xa, xb = sample_features(args.n_images)
    print("| images | seed | gain | Δₖ [95 % interval] (points) | width | top image (its share of the change) | flagged |")
    print("|---|---|---|---|---|---|---|")
    warnings = []
    for seed in args.seeds:
        g = kcore.fit(xa, xb, device="cpu", nested=True, seed=seed).nested.gains
        for k in range(1, g.orders + 1):
            lo, hi = g.ci.gain_orders[k]
            flagged = any(w.startswith(f"Δ{k} ") for w in g.fragile)
            print(f"| {args.n_images} ({g.n_images} held out) | {seed} | Δ{k} | {100 * g.gain_orders[k]:+.1f} "
                  f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {100 * (hi - lo):.1f} | {g.top_image[k]} "
                  f"({g.top_image_share[k]:.0%}) | {'yes' if flagged else 'no'} |", flush=True)
        warnings += [f"seed {seed}: {w}" for w in g.fragile]
    for w in warnings:
        print(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
