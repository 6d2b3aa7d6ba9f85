"""Nested fits against today's fit: how much the order-wise numbers move with the seed, the schedule's length and
the convention, and what the nested fit costs.

``python -m bench.nested [--pair sample|resnet18] [--n-images N] [--seeds 0 1 2] [--no-longer] [--no-convention]
[--longer-factor F] [--no-recipe] [--nested-only] [--threads T] [--out FILE.json]`` (or ``--merge A.json B.json``) prints one markdown row per fit (today's additive shares of x⁽⁰⁾ … x⁽ᴷ⁾ and the
nested gains Δ₀ … Δ_K, each in % of Var(x*), the held-out error and the process CPU time, which a loaded
machine does not inflate as it does wall time) and the spread of each number
over the rows (max − min, in points of Var(x*)), and writes every number to ``--out``.

Rows, on the same features: the ``fast`` preset with each seed; the ``fast`` preset with 10× its planned steps and
patience (:func:`bench.real_size.longer_overrides`), seed 0; the ``fast`` preset in the authors' convention, seed 0;
the ``authors`` preset (their recipe: 1000 epochs, no early stopping; today's fit with its sigmoid gates, the nested
fit with linear ones, which it needs), seed 0. Each row runs today's fit and the nested fit (``nested=True``) one
after the other.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import kcore
from bench.common import machine


def sample_features(n: int) -> tuple[Tensor, Tensor]:
    """tinynet ``block2`` → resnet ``layer2`` of the bundled sample models on ``n`` bundled images."""
    from bench.data import sample_pair_features

    feats = sample_pair_features(n)
    if feats is None:
        raise SystemExit("sample_models/ is missing: run `python -m kcore.samples train --out sample_models`.")
    return feats


def resnet18_features(n: int) -> tuple[Tensor, Tensor]:
    """``layer3`` of two random-weight torchvision resnet18 (seeds 0, 1) at 224 px on ``n`` kshapes images."""
    import torchvision

    from kcore.data import ImageSet, Preprocess
    from kcore.features import extract_features
    from kcore.preprocessing import standard_preprocessing
    from kcore.synthetic import KShapesSpec

    prep = standard_preprocessing("resnet18")
    size = prep.load_size
    images = ImageSet.from_kshapes(KShapesSpec(seed=0, image_size=size[0], n_train=n, n_test=10), "train", n,
                                   Preprocess(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
    torch.manual_seed(0)
    a = torchvision.models.get_model("resnet18", num_classes=10).eval()
    torch.manual_seed(1)
    b = torchvision.models.get_model("resnet18", num_classes=10).eval()
    feats = extract_features(a, "layer3", b, "layer3", images, batch_size=32, device="cpu",
                             transform_a=prep.transform(), transform_b=prep.transform())
    return feats.x_a.float(), feats.x_b.float()


def one_row(name: str, xa: Tensor, xb: Tensor, nested_overrides: dict[str, Any] | None = None,
            plain_fit: bool = True, **overrides: Any) -> dict[str, Any]:
    """Today's fit (unless ``plain_fit`` is False) and the nested fit with the same ``overrides`` (the nested fit
    also takes ``nested_overrides``, e.g. the linear gate it needs): shares, gains, errors and wall times."""
    out: dict[str, Any] = {"row": name, "overrides": overrides, "nested_overrides": nested_overrides or {}}
    if plain_fit:
        t, c = time.perf_counter(), time.process_time()
        plain = kcore.fit(xa, xb, device="cpu", **overrides)
        out["plain_seconds"], out["plain_cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
        rep = plain.heldout_report
        out.update(plain_shares=list(rep.share_orders) + [rep.share_residual], plain_error=plain.heldout_error,
                   plain_steps=plain.steps_run, plain_stopped_by=plain.stopped_by, plain_gates=list(plain.gates),
                   lstsq_r2=plain.baseline.linear_r2, plain_config=dataclasses.asdict(plain.config),
                   plain_steps_planned=plain.steps_planned)
    t, c = time.perf_counter(), time.process_time()
    nest = kcore.fit(xa, xb, device="cpu", nested=True, **{**overrides, **(nested_overrides or {})})
    out["nested_seconds"], out["nested_cpu_seconds"] = time.perf_counter() - t, time.process_time() - c
    g = nest.nested.gains
    rep = nest.heldout_report
    out.update(gains=list(g.gain_orders) + [g.instability], r2_orders=list(g.r2_orders),
               gain_ci=[list(iv) for iv in g.ci.gain_orders] if g.ci else None, nested_error=nest.heldout_error,
               nested_split_shares=list(rep.share_orders) + [rep.share_residual],
               stages=[s.as_dict() for s in nest.nested.stages],
               paper_unit_gains=gains_in_paper_units(nest, xa, xb))
    plain_text = (f"plain {out['plain_cpu_seconds']:.0f} s CPU err {out['plain_error']:.4f}; " if plain_fit
                  else "plain not run; ")
    print(f"[nested] {name}: {plain_text}nested "
          f"{out['nested_cpu_seconds']:.0f} s CPU err {out['nested_error']:.4f}; gains "
          + " / ".join(f"{100 * v:.1f}" for v in out["gains"]) + "; guard " + guard_cell(out),
          file=sys.stderr, flush=True)
    return out


def gains_in_paper_units(res: Any, xa: Tensor, xb: Tensor) -> list[float]:
    """Δ₀ … Δ_K and x^Δ of a nested fit on its held-out images, with R² in the paper's units whatever the fit's
    convention: x* and every gₖ(x) in raw units, then standardised per channel with the training images' mean
    and std (:meth:`kcore.conventions.Normalization.fit` with ``"paper"``), and R² = 1 − Var(x* − gₖ(x))/Var(x*)
    with one global mean each, as kcore defines it. For a paper-convention
    fit these are its own gains (to 0.01 points: float32 components); for an authors'-convention fit (raw target) they say whether the convention moved
    the fit or only the units in which R² is read."""
    from kcore.conventions import Normalization
    from kcore.fit import nested_decompose

    held, train = torch.tensor(res.heldout_indices), torch.tensor(res.train_indices)
    dec = nested_decompose(res, xa[held], xb[held])
    paper = Normalization.fit(xa, xb, "paper", indices=train)
    z_t = paper.target(xb[held].double())
    ss_tot = float(((z_t - z_t.mean()) ** 2).sum())
    r2, pred = [], torch.zeros_like(dec.target, dtype=torch.float64)
    for comp in dec.components:
        pred = pred + comp.double()
        resid = z_t - paper.target(res.norm.target_to_raw(pred).double())
        r2.append(1.0 - float(((resid - resid.mean()) ** 2).sum()) / ss_tot)  # Var(x^Δ), as kcore defines it
    gains = [r2[0]] + [b - a for a, b in zip(r2, r2[1:])]
    return gains + [1.0 - r2[-1]]


def training_flops(row: dict[str, Any], shape: tuple[int, int, int, int]) -> tuple[float, float]:
    """(today's, the nested fit's) training FLOPs: the steps run × :func:`kcore.fit.step_flops` of each model
    (a cost that a loaded machine does not change; g₀'s closed-form solve is left out of both)."""
    from kcore.fit import FitConfig, step_flops

    cfg = FitConfig(**{k: v for k, v in row["plain_config"].items() if k in FitConfig.__dataclass_fields__})
    plain = row["plain_steps"] * step_flops(*shape, cfg)
    nested = sum(s["steps_run"] * step_flops(*shape, dataclasses.replace(cfg, orders=s["order"]))
                 for s in row["stages"])
    return plain, nested


def guard_cell(row: dict[str, Any]) -> str:
    """``g1 ✓ (+10.1 ± 1.2) g2 ✗ (+0.3 ± 0.4)``: each trained gₖ's monitor gain (points, ± its s.e.) and the
    guard's decision; "not recorded" for rows measured before the guard."""
    cells = []
    for s in row["stages"][1:]:
        if "accepted" not in s:
            return "not recorded"
        gain = "" if s.get("monitor_gain") is None else \
            f" ({100 * s['monitor_gain']:+.1f} ± {100 * s['monitor_gain_se']:.1f})"
        cells.append(f"g{s['order']} {'✓' if s['accepted'] else '✗'}{gain}")
    return " ".join(cells)


def table(rows: list[dict[str, Any]], shape: tuple[int, int, int, int] | None = None) -> str:
    """The markdown table of the rows and the spread of every number over them; ``shape`` (C_a, C_b, H, W) adds
    the ratio of training FLOPs."""
    k1 = len(rows[0]["gains"]) - 1

    def pct(v: list[float]) -> str:
        return " / ".join(f"{100 * x:.1f}" for x in v)

    head = ("| row | today's shares x⁽⁰⁾ … x⁽ᴷ⁾ / x^Δ (%) | nested gains Δ₀ … Δ_K / x^Δ (%) | "
            "the same in the paper's units (%) | "
            "held-out error today / nested | CPU time today / nested | training FLOPs nested / today | "
            "guard (gₖ accepted ✓ or gₖ₋₁ kept ✗) |")
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = ""
        if shape is not None and "plain_config" in r:
            plain, nested = training_flops(r, shape)
            flops = f"{nested:.3g} / {plain:.3g} ({nested / plain:.2f}×)"
        cpu = "not recorded" if "plain_shares" in r else f"not run / {r['nested_cpu_seconds']:.0f} s"
        if "plain_cpu_seconds" in r and "plain_shares" in r:
            cpu = (f"{r['plain_cpu_seconds']:.0f} s / {r['nested_cpu_seconds']:.0f} s "
                   f"({r['nested_cpu_seconds'] / r['plain_cpu_seconds']:.2f}×)")
        units = pct(r["paper_unit_gains"]) if "paper_unit_gains" in r else "not recorded"
        shares, err = ((pct(r["plain_shares"]), f"{r['plain_error']:.4f}") if "plain_shares" in r
                       else ("not run", "not run"))
        lines.append(f"| {r['row']} | {shares} | {pct(r['gains'])} | {units} | {err} / "
                     f"{r['nested_error']:.4f} | {cpu} | {flops} | {guard_cell(r)} |")

    def spread(key: str) -> str:  # over the rows that have the number
        cols = list(zip(*(r[key] for r in rows if key in r)))
        return " / ".join(f"{100 * (max(c) - min(c)):.1f}" for c in cols)

    units = spread("paper_unit_gains")
    lines.append(f"| spread (max − min, points) | {spread('plain_shares')} | {spread('gains')} | {units} | | | | |")
    lines.append(f"\n(K = {k1 - 1}; spread over {len(rows)} rows.)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rows asked for; print the table; write the JSON."""
    ap = argparse.ArgumentParser(prog="python -m bench.nested", description=__doc__.splitlines()[0])
    ap.add_argument("--pair", choices=("sample", "resnet18"), default="sample")
    ap.add_argument("--n-images", type=int, default=None, help="default: 400 (sample), 600 (resnet18)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="the fast rows' seeds (none: no rows)")
    ap.add_argument("--no-longer", action="store_true", help="skip the longer row")
    ap.add_argument("--longer-factor", type=int, default=10, help="the longer row's steps and patience (×)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, help="print the table of these --out files")
    ap.add_argument("--no-convention", action="store_true", help="skip the authors' convention row")
    ap.add_argument("--no-recipe", action="store_true", help="skip the authors' recipe row")
    ap.add_argument("--nested-only", action="store_true",
                    help="the nested fits alone (no today's fit beside them): half the CPU of a row, for the gains")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(f.read_text()) for f in args.merge]
        x_shape, y_shape = runs[0]["shape"]
        print(table([r for run in runs for r in run["rows"]], (x_shape[1], y_shape[1], y_shape[2], y_shape[3])))
        return 0
    torch.set_num_threads(args.threads)
    n = args.n_images or (400 if args.pair == "sample" else 600)
    t = time.perf_counter()
    xa, xb = sample_features(n) if args.pair == "sample" else resnet18_features(n)
    extract = time.perf_counter() - t
    print(f"[nested] features {tuple(xa.shape)} → {tuple(xb.shape)} in {extract:.0f} s", file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []

    def save() -> str:  # after every row, so that a stopped run keeps what it measured
        text = table(rows, (xa.shape[1], xb.shape[1], xb.shape[2], xb.shape[3])) if rows else ""
        if args.out is not None:
            args.out.write_text(json.dumps({"pair": args.pair, "n_images": n, "shape": [list(xa.shape), list(xb.shape)],
                                            "extract_seconds": extract, "machine": machine(), "rows": rows,
                                            "date": time.strftime("%Y-%m-%d"), "table": text}, indent=1, default=str))
        return text

    for s in args.seeds:
        rows.append(one_row(f"fast, seed {s}", xa, xb, plain_fit=not args.nested_only, seed=s))
        save()
    seed = args.seeds[0] if args.seeds else 0
    if not args.no_longer:
        from bench.real_size import longer_overrides
        from kcore.fit import _planned, make_config, prepare_data

        cfg = make_config("fast", seed=seed)
        ran, plan = _planned(cfg, prepare_data(xa, xb, cfg, torch.device("cpu")), torch.device("cpu"))
        over = longer_overrides(ran, plan.total_steps, args.longer_factor)
        rows.append(one_row(f"fast ×{args.longer_factor} steps, seed {seed}", xa, xb, plain_fit=not args.nested_only,
                            seed=seed, **over))
        save()
    if not args.no_convention:
        rows.append(one_row(f"fast, authors' convention, seed {seed}", xa, xb, plain_fit=not args.nested_only,
                            seed=seed, convention="authors"))
        save()
    if not args.no_recipe:  # today's fit as the authors ran it (sigmoid gates); nested fits need linear ones
        rows.append(one_row(f"authors' recipe, seed {seed}", xa, xb, {"gate": "linear"}, not args.nested_only,
                            preset="authors", seed=seed))
    print(save())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
