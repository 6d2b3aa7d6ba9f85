"""Which held-out images make a nested gain negative: per-image errors of g₀ … g_K on the sample pair.

``PYTHONPATH=. python -m bench.nested_diagnose [--n-images 200] [--seed 0]`` re-runs one nested fit of the sample
pair (the ``fast`` preset) and prints, for the held-out images where gₖ is most worse than g₀, each image's
Σ(x* − gₖ(x))² relative to the mean per-image Σ(x* − channel mean)² of the held-out images, how large its input is
(the mean square of the prepared x) and its largest |h⁽¹⁾|, against the training images'. It reads the held-out
images: a diagnosis, never a decision of the fit (the guard decides on the monitor images only).
"""
from __future__ import annotations

import argparse

import torch

import kcore
from bench.nested import sample_features


def main(argv: list[str] | None = None) -> int:
    """Print the diagnosis; returns 0."""
    ap = argparse.ArgumentParser(prog="python -m bench.nested_diagnose", description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--order", type=int, default=1, help="compare g_k with g_0 for this k (default 1)")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    xa, xb = sample_features(args.n_images)
    res = kcore.fit(xa, xb, device="cpu", nested=True, seed=args.seed)
    nested = res.nested
    held = [int(i) for i in res.heldout_indices]
    train = sorted(set(range(args.n_images)) - set(held))
    xs, xt = res.norm.source(xa), res.norm.target(xb)
    with torch.no_grad():
        outs = [m(xs) for m in nested.models]
        h1 = nested.models[args.order].hidden(xs, down_to=1)[-1] if args.order >= 1 else None  # g_k's h⁽¹⁾
    sst = float(((xt[held] - xt[held].mean((0, 2, 3), keepdim=True)) ** 2).sum()) / len(held)
    err = [((xt - o) ** 2).sum((1, 2, 3)) / sst for o in outs]
    x_ms = (xs ** 2).mean((1, 2, 3))
    print("stages:", [(s.order, s.accepted, s.guard) for s in nested.stages])
    print("gains (points):", " / ".join(f"{100 * g:.1f}" for g in nested.gains.gain_orders))
    print(f"training images: mean square of x up to {float(x_ms[train].max()):.2f}"
          + ("" if h1 is None else f", |h1| up to {float(h1[train].abs().amax()):.1f}"))
    d = (err[args.order] - err[0])[held]
    order = d.argsort(descending=True)
    for j in order[: args.top].tolist():
        i = held[j]
        errs = " ".join(f"e{k} {float(e[i]):.2f}" for k, e in enumerate(err))
        print(f"  held-out image {i}: {errs}; mean square of x {float(x_ms[i]):.2f}"
              + ("" if h1 is None else f", |h1| up to {float(h1[i].abs().max()):.1f}"))
    worst = int(order[0])
    rest = torch.cat([d[:worst], d[worst + 1:]])
    print(f"g{args.order} − g0 summed over the {len(held)} held-out images {float(d.sum()):.2f} "
          f"(the worst image {float(d[worst]):.2f}; the others {float(rest.mean()):+.3f} each on average)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
