"""The ``kcore`` command: list layers, and compare two checkpoints at one layer each.

    kcore layers CKPT
    kcore fit --a A.safetensors --layer-a layer2 --b B.safetensors --layer-b layer2 --data kshapes --out runs/ab
    kcore train-samples --out sample_models
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from kcore.conventions import CONVENTIONS
from kcore.data import BUNDLED_DATA
from kcore.devices import DEVICE_CHOICES
from kcore.fit import PRESETS

EPILOG_FIT = """\
examples:
  # the bundled sample models on the bundled images (works offline, < 1 min on a CPU)
  kcore fit --a sample_models/kshapes_tinynet_s0.safetensors --b sample_models/kshapes_resnet_s0.safetensors \\
            --data kshapes --both-directions --out runs/tiny_vs_resnet
  # your own: architecture + weights-only state dict, a folder of images (class subfolders or flat)
  kcore fit --a a.pth --arch-a resnet18 --num-classes-a 200 --layer-a layer3 \\
            --b b.pth --arch-b resnet18 --num-classes-b 200 --layer-b layer3 --data ~/images --out runs/a_vs_b

A -> B finds the blind spots of A (what B encodes that A cannot reconstruct); with --both-directions,
B -> A also finds the unreliable features of A. Results: RUN_DIR/metrics.json (held-out variances per
order, Var(x^Delta), Var(x*), instability, per channel, 0-order baseline), the fitted g_theta as
safetensors, config.json and provenance.json. Use `kcore layers CKPT` to find layer names.

exit status: 0 done; 2 bad input (nothing written); 3 the fit is written to RUN_DIR but a chance
baseline (--baselines) failed: its error is printed and kept in RUN_DIR/provenance.json under
'baselines_failed' (and metrics.json's 'baselines_failed'); 130 interrupted.
"""
#: `kcore fit`'s exit status when the fit is written but a chance baseline failed (see EPILOG_FIT)
EXIT_BASELINE_FAILED = 3


class ProgressBar:
    """A text progress bar on stderr: on a terminal one line redrawn at most 10 times a second; otherwise (a log
    file, a pipe) a new line at each stage and at most every ``every`` seconds within one."""

    def __init__(self, stream=sys.stderr, width: int = 30, every: float = 5.0):
        self.stream, self.width, self.last, self.t0 = stream, width, 0.0, time.perf_counter()
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.stage = None
        self.every = every
        self.last_line = 0.0

    def __call__(self, p) -> None:
        """Show the progress ``p`` (stage, fraction, message), throttled as the class says."""
        now = time.perf_counter()
        new_stage = p.stage.split(" ")[0] != (self.stage or "").split(" ")[0] or p.stage != self.stage
        if not new_stage and now - self.last < 0.1 and p.fraction < 1.0:
            return
        if not self.tty and not (new_stage or p.fraction >= 1.0 or now - self.last_line >= self.every):
            return
        self.last = now
        filled = int(self.width * min(max(p.fraction, 0.0), 1.0))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {p.fraction:4.0%} {now - self.t0:6.1f}s  {p.message}"
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            if p.fraction >= 1.0:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
            self.last_line = now
        self.stream.flush()
        self.stage = p.stage


def _add_model_args(p: argparse.ArgumentParser, which: str, layer: bool = True) -> None:
    w = which.lower()
    p.add_argument(f"--{w}", required=True, metavar="CKPT", help=f"checkpoint of network {which}: .safetensors, "
                   ".pt/.pth state dict (weights-only), TorchScript or torch.export .pt2")
    if layer:  # (`kcore sweep` names several layers instead)
        p.add_argument(f"--layer-{w}", metavar="NAME", help=f"layer of {which} (default: the model card's "
                       "default_layer); see `kcore layers CKPT`")
    p.add_argument(f"--arch-{w}", metavar="ARCH", help="architecture name when the file is a bare state dict "
                   "without a model card (e.g. resnet18, vgg16_bn, kc_resnet, or timm:NAME with "
                   "pip install -e '.[timm]')")
    p.add_argument(f"--num-classes-{w}", type=int, metavar="N", help="classifier outputs, when no card says it")
    p.add_argument(f"--input-size-{w}", type=int, nargs=2, metavar=("H", "W"),
                   help=f"input size of {which} (default: its model card's; for a torchvision architecture without a "
                   "card, its standard evaluation transform, e.g. shorter side 256 and centre crop 224)")
    p.add_argument(f"--mean-{w}", type=float, nargs=3, metavar=("R", "G", "B"),
                   help=f"normalisation mean of {which} on [0, 1] RGB (default: card's, else torchvision's ImageNet mean)")
    p.add_argument(f"--std-{w}", type=float, nargs=3, metavar=("R", "G", "B"),
                   help=f"normalisation std of {which} (default: card's, else torchvision's ImageNet std)")


def _add_groups_arg(p: argparse.ArgumentParser) -> None:
    """The --groups option of every command that splits images (``kcore fit``, ``kcore sweep``)."""
    p.add_argument("--groups", default=None, metavar="folder|FILE.csv",
                   help="which images belong together (crops of one photo, frames of one video): 'folder' = each "
                   "image's subfolder of --data (group/image.png, or class/group/image.png), or a CSV with the "
                   "columns image,group (image relative to --data; every image listed). No group is split between "
                   "training and held-out images, and the intervals resample whole groups (default: none, every "
                   "image its own group)")


def _add_recipe_args(p: argparse.ArgumentParser, budget_of: str) -> None:
    """How g is fitted, and where: the options ``kcore fit`` and ``kcore sweep`` share (``budget_of`` names what
    one --budget bounds)."""
    p.add_argument("--orders", type=int, default=2, metavar="K", help="highest order K (default 2, as in the paper)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="L",
                   help="penalty lambda on the gates p (default 0.1; the paper uses 8.0 for AlexNet)")
    p.add_argument("--epochs", type=int, default=None, metavar="E", help="maximum epochs (default: the preset's)")
    p.add_argument("--preset", default="fast", choices=list(PRESETS), help="training recipe (default fast)")
    p.add_argument("--budget", type=_duration, default=None, metavar="TIME",
                   help=f"wall-time budget of {budget_of}, e.g. 60s, 2m or 90: training stops in time and keeps "
                   "the weights with the best monitor error so far (default: none, the fit ends when converged)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default=None,
                   help="normalisation convention (default: the preset's)")
    p.add_argument("--device", default="auto", choices=list(DEVICE_CHOICES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass during extraction")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kcore`` command."""
    parser = argparse.ArgumentParser(
        prog="kcore",
        description="Knowledge consistency between two neural networks (Liang et al., ICLR 2020): fit g_theta "
        "from one network's feature map to another's and split it into order-wise consistent components "
        "x^(0..K) and the inconsistent rest x^Delta.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("layers", help="list a model's layers with their output shapes",
                       description="List the layers of a checkpoint with output shapes from one dry run.")
    p.add_argument("ckpt", metavar="CKPT")
    p.add_argument("--arch", help="architecture, when the file is a bare state dict without a model card")
    p.add_argument("--num-classes", type=int)
    p.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="input size (default: card's, or 224 224)")
    p.add_argument("--all", action="store_true", help="also list layers whose output is not a 4-D feature map")
    p.add_argument("--trust-pickle", action="store_true", help="allow a full pickled nn.Module or a TorchScript archive (runs code from the file!)")
    p.add_argument("--non-strict", action="store_true", help="load a state dict whose tensor names differ from the "
                   "architecture's: the matching ones, the rest left at random initialisation (listed)")

    from kcore import convert_cli

    convert_cli.add_cli(sub)

    p = sub.add_parser("fit", help="compare two checkpoints at one layer each and write a run folder",
                       description="Extract features, fit g_theta on a training split, decompose the held-out "
                       "images, and write RUN_DIR atomically.", epilog=EPILOG_FIT,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, "A")
    _add_model_args(p, "B")
    for w in ("a", "b"):
        p.add_argument(f"--non-strict-{w}", action="store_true", help=f"load {w.upper()}'s state dict even where its "
                       "tensor names differ from the architecture's (the rest left at random initialisation, listed)")
    p.add_argument("--data", default=BUNDLED_DATA, metavar=f"DIR|{BUNDLED_DATA}",
                   help=f"images: a folder (class subfolders or flat) or '{BUNDLED_DATA}' for the bundled images "
                   "('sample' is a deprecated alias)")
    p.add_argument("--n-images", type=int, default=None, metavar="N", help="use at most N images (default: all; "
                   f"400 for '{BUNDLED_DATA}')")
    _add_groups_arg(p)
    _add_recipe_args(p, budget_of="each direction's fit")
    p.add_argument("--both-directions", action="store_true", help="also fit B -> A (unreliable features of A)")
    p.add_argument("--baselines", action="store_true",
                   help="also fit the chance-level references with the same recipe: B replaced by a randomly "
                        "initialised network of its architecture, and the image pairing shuffled (near 1; an interval above 1 "
                        "means g over-fits: too few images); "
                        "stored in RUN_DIR/metrics.json under 'baselines'")
    p.add_argument("--fit-seeds", type=int, default=1, metavar="N",
                   help="refit g with N seeds (SEED, SEED+1, …; each its own split and initialisation) and report "
                        "the spread of the instability and of the order split (metrics.json 'seed_spread')")
    p.add_argument("--nested", action="store_true",
                   help="fit the orders as nested models g_0 (least squares) … g_K, each from the one before with "
                   "its new gate at 0 (linear gates, with every preset), and report the order-wise gains R²(g_k) − "
                   "R²(g_k-1) with 95 %% intervals beside the split of g_K (metrics.json 'gain_orders', 'gain_ci', "
                   "'nested'); costs about 1.5-2× the fit")
    p.add_argument("--cache-dir", default=None, help="float16 on-disk feature cache (bounded memory for many images)")
    p.add_argument("--trust-pickle", action="store_true", help="allow full pickled nn.Module and TorchScript checkpoints (runs code from the file!)")
    p.add_argument("--overwrite", action="store_true", help="replace RUN_DIR if it exists")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="output folder (written atomically)")

    p = sub.add_parser("train-samples", help="retrain the bundled sample models from scratch (CPU, minutes)")
    p.add_argument("--out", default="sample_models")
    p.add_argument("--quick", action="store_true", help="fewer epochs (for a smoke run)")

    from kcore import sweep_cli
    from kcore.experiments import study_modules

    sweep_cli.add_cli(sub)
    for module in study_modules():  # `kcore <study>` subcommands of the paper's studies
        module.add_cli(sub)
    return parser


def _duration(text: str) -> float:
    """``60s``, ``2m``, ``1h`` or a plain number of seconds → seconds (argparse type)."""
    raw = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(raw[-1:], None)
    try:
        value = float(raw[:-1] if scale else raw) * (scale or 1.0)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive duration such as 60s, 2m or 90; got {text!r}")
    return value


def _flags(which: str) -> dict[str, str]:
    """How the command line names the loader's arguments (kcore.arguments) for model ``which``: '' (`kcore layers`),
    'a' or 'b' (`kcore fit`)."""
    s = f"-{which}" if which else ""
    return {"arch": f"--arch{s} {{value}}", "num_classes": f"--num-classes{s} {{value}}", "strict": f"--non-strict{s}",
            "input_size": f"--input-size{s} {{value}}"}


def _load(path: str, arch: str | None, num_classes: int | None, trust: bool, *, which: str | None = None,
          strict: bool = True):
    """Load a checkpoint; with ``which``, errors name the flags of that model (:func:`_flags`) instead of Python's."""
    from kcore.arguments import ArgumentError
    from kcore.checkpoints import load_model

    if not Path(path).is_file():
        raise ValueError(f"checkpoint {path!r} does not exist. Fix: check the path (relative to {Path.cwd()}).")
    try:
        m = load_model(path, arch=arch, num_classes=num_classes, trust_pickle=trust, strict=strict)
    except ArgumentError as exc:
        if which is None:
            raise
        raise exc.respelled(_flags(which)) from exc
    for what, keys in (("missing from the file, left at their random initialisation", m.missing_keys),
                       ("in the file but not in the architecture, left out", m.unexpected_keys)):
        if keys:
            print(f"warning: {m.name}: {len(keys)} tensor(s) {what}: {', '.join(keys[:5])}"
                  + (", …" if len(keys) > 5 else ""), file=sys.stderr)
    return m


def _listed_layers(m, size: tuple[int, ...], which: str, **kw):
    """``list_layers`` whose errors name the --input-size flag of model ``which``."""
    from kcore.arguments import ArgumentError
    from kcore.features import list_layers

    try:
        return list_layers(m.model, size, **kw)
    except ArgumentError as exc:
        raise exc.respelled(_flags(which)) from exc


def _input_size(m, given=None) -> tuple[int, int]:
    from kcore.preprocessing import preprocessing_of

    if given:
        from kcore.limits import limits

        h, w = given
        if h < 1 or w < 1:
            raise ValueError(f"--input-size must be two positive integers H W; got {h} {w}. Fix: e.g. --input-size 224 224.")
        limits().check("max_input_side", max(h, w), what=f"--input-size {h} {w}",
                       fix="give a smaller --input-size (the model's own input size is usually 224 224)")
        return (h, w)
    return preprocessing_of(m).input_size or (224, 224)


def _with_preprocessing(m, which: str, args, say=sys.stderr):
    """``m`` with the user's --input-size/--mean/--std for model ``which`` applied; says what is used."""
    import dataclasses

    from kcore.preprocessing import preprocessing_of

    w = which.lower()
    given = {k: getattr(args, f"{k}_{w}") for k in ("input_size", "mean", "std")}
    flags = " ".join(f"--{k.replace('_', '-')}-{w}" for k, v in given.items() if v is not None)
    prep = preprocessing_of(m).with_overrides(**given, what=f"from {flags}")
    print(f"{which}: preprocessing {prep.describe()}", file=say)
    return dataclasses.replace(m, preprocessing=prep)


def _cmd_layers(args) -> int:
    m = _load(args.ckpt, args.arch, args.num_classes, args.trust_pickle, which="", strict=not args.non_strict)
    h, w = _input_size(m, args.input_size)
    layers = _listed_layers(m, (3, h, w), "", spatial_only=not args.all)
    default = m.card.default_layer if m.card else None
    print(f"{m.name}  sha256 {m.short_hash}  {m.kind}  {m.num_parameters:,} parameters  input 3x{h}x{w}")
    print(f"{'layer':40s} {'type':20s} output shape")
    for info in layers:
        mark = "  (card default)" if info.name == default else ""
        print(f"{info.name:40s} {info.type:20s} {'x'.join(map(str, info.shape))}{mark}")
    return 0


def _images(data: str, n: int | None, size: tuple[int, int], groups: str | None = None):
    """The images as [0, 1] RGB at ``size`` (shorter side scaled, centre cropped: the dashboard loads them the same
    way); each model's preprocessing resizes, crops and normalises them (kcore.preprocessing). ``groups``: the
    --groups option (kcore.groups.groups_option)."""
    from kcore import data as kdata
    from kcore.groups import groups_option

    if kdata.is_bundled(data):
        if groups:
            raise ValueError(f"--groups {groups} needs a folder of images (--data DIR); the bundled images are each "
                             "rendered independently (no groups). Fix: drop --groups, or give --data DIR.")
        return kdata.sample_images(n=n or 400, preprocess=tuple(size)), "kshapes test split (bundled)"
    images = kdata.ImageSet.from_folder(data, tuple(size), limit=n)
    if images.skipped:
        print(f"skipped {len(images.skipped)} unreadable file(s), e.g. {images.skipped[0][0]}: {images.skipped[0][1]}",
              file=sys.stderr)
    if groups:
        images = images.with_groups(groups_option(groups, images.ids, ignore=[s[0] for s in images.skipped],
                                                  partial=n is not None))
        print(f"groups: {images.groups.describe()}", file=sys.stderr)
    return images, f"folder {data}"


def _layer_shape(m, layer: str, which: str) -> tuple[int, ...]:
    from kcore.features import validate_layer

    layers = _listed_layers(m, (3, *_input_size(m)), which)
    validate_layer(m.model, layer, layers)
    info = next(i for i in layers if i.name == layer)
    if not info.is_spatial:
        raise ValueError(f"layer {layer!r} of {m.name} outputs shape {info.shape}; a feature map (C, H, W) is needed. "
                         "Fix: pick a convolutional layer from `kcore layers CKPT`.")
    return tuple(info.shape)


def _cmd_fit(args) -> int:
    from kcore import distributed as kd

    with kd.job(args.device) as ctx:  # under torchrun: one rank of the job; otherwise a single process
        return _fit_job(args, ctx)


def _fit_job(args, ctx) -> int:
    from kcore import distributed as kd
    from kcore.pipeline import add_baselines, compare_fit, update_run_baselines, write_run

    out = Path(args.out)
    from kcore._io import check_out_dir

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")
    say = sys.stderr if ctx.is_main else open(os.devnull, "w")  # only rank 0 talks
    if ctx.distributed and not args.cache_dir:
        raise ValueError(
            f"--cache-dir is required under torchrun ({ctx.world_size} ranks): each rank writes its share of the "
            "features there and every rank reads them back. Fix: pass --cache-dir on a folder all ranks can see "
            "(on several machines, a shared file system)."
        )
    a = _load(args.a, args.arch_a, args.num_classes_a, args.trust_pickle, which="a", strict=not args.non_strict_a)
    b = _load(args.b, args.arch_b, args.num_classes_b, args.trust_pickle, which="b", strict=not args.non_strict_b)
    layer_a = args.layer_a or (a.card.default_layer if a.card else None)
    layer_b = args.layer_b or (b.card.default_layer if b.card else None)
    for flag, layer in (("--layer-a", layer_a), ("--layer-b", layer_b)):
        if not layer:
            raise ValueError(f"{flag} is required: the checkpoint has no model card with a default_layer. "
                             "Fix: list candidates with `kcore layers CKPT`.")
    a, b = _with_preprocessing(a, "A", args, say), _with_preprocessing(b, "B", args, say)
    from kcore.preprocessing import load_size

    images, source = _images(args.data, args.n_images, load_size(a.preprocessing, b.preprocessing), args.groups)
    from kcore.features import estimate_feature_bytes, format_bytes

    shape_a = _layer_shape(a, layer_a, "a")
    shape_b = _layer_shape(b, layer_b, "b")
    print(f"A: {a.name} [{a.short_hash}] layer {layer_a} {shape_a}\nB: {b.name} [{b.short_hash}] layer {layer_b} "
          f"{shape_b}\nimages: {len(images)} from {source}", file=say)
    est = estimate_feature_bytes(len(images), shape_a, shape_b, 4)
    note = "" if tuple(shape_a[1:]) == tuple(shape_b[1:]) else "; A's map is resampled bilinearly to B's H×W (and back for B -> A)"
    where = f"in {ctx.world_size} ranks' shared float16 cache" if ctx.distributed else "in memory"
    if args.cache_dir and not ctx.distributed:
        where = "on disk (float16 cache, read batch by batch)"
        est //= 2
    print(f"features: about {format_bytes(est)} {where}{note}", file=say)
    from kcore.fit import make_config

    config = make_config(args.preset, orders=args.orders, lam=args.lam, epochs=args.epochs, seed=args.seed,
                         convention=args.convention or None, budget=args.budget,
                         nested=args.nested or None, gate="linear" if args.nested else None)
    bar = ProgressBar(say)
    comp = compare_fit(
        a, layer_a, b, layer_b, images, config, preset=args.preset, device=args.device,
        both_directions=args.both_directions, batch_size=args.batch_size, cache_dir=args.cache_dir,
        image_source=source, progress=bar, paths=(str(Path(args.a).resolve()), str(Path(args.b).resolve())),
        ctx=ctx, baselines=args.baselines, fit_seeds=args.fit_seeds,
    )
    # the fit is written before its chance baselines start: a baseline that fails or is killed never loses it
    kd.main_first(lambda: write_run(comp, out, overwrite=args.overwrite, images=images), ctx)  # rank 0 writes
    if not ctx.is_main:
        return 0
    if comp.provenance.get("baselines_pending"):  # (never under torchrun: compare_fit refuses baselines there)
        print(f"wrote {out} (the fit); now the chance baselines", file=say)
        try:
            comp = add_baselines(comp, b, images, batch_size=args.batch_size, progress=bar)
        except KeyboardInterrupt:
            print(f"kcore: interrupted during the chance baselines; the fit is written to {out} without them",
                  file=sys.stderr)
            return 130
        update_run_baselines(out, comp)
    from kcore.metrics import plus_minus, summary_lines

    for key, d in comp.directions.items():
        rep = d.fit.heldout_report
        vo = ", ".join(f"{v:.4g}" for v in rep.var_orders)
        print(f"{key} ({d.meaning}):\n  " + "\n  ".join(summary_lines(rep, args.preset)) + "\n"
              f"  Var per order [{vo}]; Var(x^D) {rep.var_residual:.4g}; Var(x*) {rep.var_target:.4g}\n"
              f"  held-out error {d.fit.heldout_error:.4f}; 0-order baseline: least-squares held-out error "
              f"{d.fit.baseline.linear_error:.4f} (R² {d.fit.baseline.linear_r2:.4f}), linear CKA "
              f"{d.fit.baseline.cka:.4f}")
        if d.fit.nested is not None:
            print(f"  {d.fit.nested.gains.summary_line()}")
            for w in d.fit.nested.gains.fragile:
                print(f"  warning: {w}")
            for s in d.fit.nested.stages[1:]:
                print(f"  g_{s.order}: {s.guard or 'accepted'}")
        for ref in comp.baselines.values():
            r = ref.reports.get(key)
            if r is not None:
                print(f"  chance baseline, {ref.label}: instability {plus_minus(r.instability, r.interval('instability'), '.4f')}")
        v = comp.verdict(key)
        print(f"  verdict against chance: {v.text}" + (f" {v.fix}" if v.fix else ""))
        for w in v.warnings:
            print(f"  warning: {w}")
        sp = comp.seed_spread.get(key)
        if sp:
            sm = sp["summary"]
            inst = sm["instability"]
            print(f"  over seeds {sp['seeds']}: instability {inst['mean']:.4f} (sd {inst['sd']:.4f}, "
                  f"{inst['min']:.4f}–{inst['max']:.4f})")
            if sm["share_orders"]:
                print("  shares over seeds (mean ± sd): " + ", ".join(
                    f"x{k} {s['mean']:.1%} ± {s['sd']:.1%}" for k, s in enumerate(sm["share_orders"]))
                    + f", x^D {sm['share_residual']['mean']:.1%} ± {sm['share_residual']['sd']:.1%}")
            print("  paper's Var ratios over seeds (mean ± sd): " + ", ".join(
                f"{s['mean']:.3f} ± {s['sd']:.3f}" for s in sm["var_ratio_orders"]))
    for kind, why in comp.provenance.get("baselines_skipped", {}).items():
        print(f"chance baseline {kind} skipped: {why}", file=sys.stderr)
    print(f"wrote {out}")
    failed = comp.provenance.get("baselines_failed", {})
    for kind, why in failed.items():
        print(f"error: chance baseline {kind} failed (the fit above is written to {out}; the failure is in its "
              f"provenance.json under 'baselines_failed'): {why}", file=sys.stderr)
    return EXIT_BASELINE_FAILED if failed else 0


def _cmd_train_samples(args) -> int:
    from kcore.samples import train_sample_models

    train_sample_models(args.out, quick=args.quick)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kcore`` command; returns the exit status (2 for bad input)."""
    from kcore.distributed import RankFailure, Terminated

    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"layers": _cmd_layers, "fit": _cmd_fit, "train-samples": _cmd_train_samples}
    try:
        handler = handlers.get(args.command) or args.handler
        return handler(args)
    except (ValueError, TypeError, OSError) as exc:  # bad input: a clear message, no traceback
        print(f"kcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kcore: interrupted; nothing was written", file=sys.stderr)
        return 130
    except (RankFailure, Terminated) as exc:  # a torchrun job lost a rank
        print(f"kcore {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
