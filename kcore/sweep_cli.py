"""``kcore sweep``: compare two checkpoints layer by layer and write a sweep folder (:mod:`kcore.sweep`).

    kcore sweep --a A.safetensors --b B.safetensors --data kshapes --both-directions --out runs/sweep_ab
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kcore.data import BUNDLED_DATA
from kcore.sweep import PAIR_MODES

EPILOG = """\
examples:
  # the bundled sample models, every stage of each (stem, layer1, layer2, layer3), both directions
  kcore sweep --a sample_models/kshapes_resnet_s0.safetensors --b sample_models/kshapes_resnet_s1.safetensors \\
              --data kshapes --both-directions --out runs/sweep_resnets
  # chosen layers, every layer of A against every layer of B
  kcore sweep --a a.pth --arch-a resnet18 --num-classes-a 200 --layers-a layer2 layer3 \\
              --b b.pth --arch-b resnet18 --num-classes-b 200 --layers-b layer2 layer3 --pairs all \\
              --data ~/images --out runs/sweep_ab

Each network runs once over the images with all its layers captured; every pair is then fitted exactly as
`kcore fit` fits one pair. OUT/pairs/<NN>_<layer_a>__<layer_b>/ is a run folder per pair (the dashboard opens
each); OUT/sweep.json and OUT/sweep.csv hold, per pair and direction, the instability and the additive order
shares with their 95 % intervals, the chance baselines (--baselines) and the verdict, with provenance.
"""


def add_cli(sub: Any) -> None:
    """Register ``kcore sweep`` on the ``kcore`` command's subparsers."""
    from kcore.cli import _add_groups_arg, _add_model_args, _add_recipe_args

    p = sub.add_parser("sweep", help="compare two checkpoints layer by layer (one extraction per network)",
                       description="Fit g_theta for matched pairs of layers of two networks (every stage by "
                       "default), sharing one feature extraction per network, and write a sweep folder.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, "A", layer=False)
    _add_model_args(p, "B", layer=False)
    p.add_argument("--layers-a", nargs="+", metavar="NAME", default=None,
                   help="layers of A, shallow to deep (default: A's stages, e.g. layer1 … layer4 of a ResNet)")
    p.add_argument("--layers-b", nargs="+", metavar="NAME", default=None, help="layers of B (default: B's stages)")
    p.add_argument("--pairs", choices=list(PAIR_MODES), default="diagonal",
                   help="diagonal: the i-th layer of A with the i-th of B (default); all: every pair")
    p.add_argument("--data", default=BUNDLED_DATA, metavar=f"DIR|{BUNDLED_DATA}",
                   help=f"images: a folder (class subfolders or flat) or '{BUNDLED_DATA}' for the bundled images")
    p.add_argument("--n-images", type=int, default=None, metavar="N",
                   help=f"use at most N images (default: all; 400 for '{BUNDLED_DATA}')")
    _add_groups_arg(p)
    _add_recipe_args(p, budget_of="each direction's fit of each pair")
    p.add_argument("--both-directions", action="store_true", help="also fit B -> A for every pair")
    p.add_argument("--baselines", action="store_true",
                   help="also fit the chance baselines (random-init B, shuffled pairs) of every pair")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow full pickled nn.Module and TorchScript checkpoints (runs code from the file!)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it is a kcore folder")
    p.add_argument("--out", required=True, metavar="OUT", help="the sweep folder to write (atomically)")
    p.set_defaults(handler=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kcore import distributed as kd

    with kd.job(args.device) as ctx:  # under torchrun: the pairs are dealt to the ranks
        return _sweep_job(args, ctx)


def _sweep_job(args: argparse.Namespace, ctx: Any) -> int:
    from kcore import distributed as kd
    from kcore._io import check_out_dir
    from kcore.cli import ProgressBar, _images, _load, _with_preprocessing
    from kcore.fit import make_config
    from kcore.metrics import plus_minus
    from kcore.preprocessing import load_size
    from kcore.sweep import sweep, write_sweep

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")
    say = sys.stderr if ctx.is_main else open(os.devnull, "w")  # only rank 0 talks
    a = _with_preprocessing(_load(args.a, args.arch_a, args.num_classes_a, args.trust_pickle), "A", args, say)
    b = _with_preprocessing(_load(args.b, args.arch_b, args.num_classes_b, args.trust_pickle), "B", args, say)
    images, source = _images(args.data, args.n_images, load_size(a.preprocessing, b.preprocessing), args.groups)
    config = make_config(args.preset, orders=args.orders, lam=args.lam, epochs=args.epochs, seed=args.seed,
                         convention=args.convention or None, budget=args.budget)
    if args.baselines and ctx.distributed:
        raise ValueError("--baselines is not run under torchrun. Fix: run `kcore sweep --baselines` in one process.")

    def on_pair(p: Any) -> None:
        for key, d in p.comparison.directions.items():
            rep = d.fit.heldout_report
            print(f"\n{p.label} {key}: instability {plus_minus(rep.instability, rep.interval('instability'), '.4f')}",
                  file=say)

    result = sweep(a, args.layers_a, b, args.layers_b, images, config, pairs=args.pairs,
                   both_directions=args.both_directions, baselines=args.baselines, preset=args.preset,
                   device=args.device, batch_size=args.batch_size, image_source=source,
                   paths=(str(Path(args.a).resolve()), str(Path(args.b).resolve())), progress=ProgressBar(say),
                   on_pair=on_pair, ctx=ctx)
    kd.main_first(lambda: write_sweep(result, args.out, overwrite=args.overwrite, images=images), ctx)
    if not ctx.is_main:
        return 0
    print(f"{'pair':24s} {'direction':9s} {'instability (95% CI)':28s} verdict")
    for row in result.rows():
        print(f"{row.label:24s} {row.direction:9s} {plus_minus(row.instability, row.instability_ci, '.4f'):28s} "
              f"{row.verdict}")
    print(f"wrote {args.out} ({len(result.pairs)} run folders, sweep.json, sweep.csv)")
    return 0
