"""How much crops of one photo on both sides of the split flatter the held-out numbers (docs/conventions.md, groups).

Makes a folder of PHOTOS bundled kshapes images with CROPS random crops (some flipped) of each, written as
``photoN/cropK.png``, then compares the two sample models on it with and without ``--groups folder`` (the same
seeds), and prints a Markdown table: held-out error, instability with its 95 % interval and the interval's width.

    .venv/bin/python tools/groups_leak.py [--photos 60] [--crops 5] [--seeds 0 1 2] [--epochs E]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from kcore import data as kdata
from kcore.checkpoints import load_model
from kcore.pipeline import compare

ROOT = Path(__file__).resolve().parents[1]


def write_crops(folder: Path, photos: int, crops: int, seed: int = 0) -> None:
    """``photos`` kshapes test images at 96 px, each as ``crops`` random 64 px crops (every other one flipped)."""
    rng = np.random.default_rng(seed)
    source = kdata.sample_images(photos, preprocess=(96, 96))
    for p in range(photos):
        img = source.raw(p)
        (folder / f"photo{p:03d}").mkdir(parents=True)
        for k in range(crops):
            y, x = rng.integers(0, 33, size=2)
            crop = img[y : y + 64, x : x + 64]
            if k % 2:
                crop = crop[:, ::-1]
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"photo{p:03d}" / f"crop{k}.png")


def main() -> None:
    """Fit with and without groups on the same crops and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--crops", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=None, help="default: the fast preset's")
    args = ap.parse_args()
    a = load_model(ROOT / "sample_models" / "kshapes_tinynet_s0.safetensors")
    b = load_model(ROOT / "sample_models" / "kshapes_resnet_s0.safetensors")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_crops(Path(tmp), args.photos, args.crops)
        plain = kdata.ImageSet.from_folder(tmp, (64, 64))
        grouped = plain.with_groups("folder")
        for seed in args.seeds:
            for name, images in (("none", plain), ("folder", grouped)):
                t0 = time.perf_counter()
                extra = {} if args.epochs is None else {"epochs": args.epochs}
                comp = compare(a, "block2", b, "layer2", images, preset="fast", device="cpu", seed=seed, **extra)
                f = comp.directions["A_to_B"].fit
                rep = f.heldout_report
                lo, hi = rep.ci.instability
                held_photos = len({plain.ids[i].split("/")[0] for i in f.heldout_indices})
                train_photos = {plain.ids[i].split("/")[0] for i in f.train_indices + f.monitor_indices}
                leaked = sum(plain.ids[i].split("/")[0] in train_photos for i in f.heldout_indices)
                rows.append((seed, name, len(f.heldout_indices), held_photos, leaked, f.heldout_error,
                             rep.instability, lo, hi, time.perf_counter() - t0))
    print(f"{args.photos} photos × {args.crops} crops, tinynet block2 → resnet layer2 (fast preset), "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d')}\n")
    print("| seed | --groups | held-out images (photos) | held-out crops whose photo is also trained on | "
          "held-out error | instability [95 % interval] | interval width |")
    print("|---|---|---|---|---|---|---|")
    for seed, name, n_held, photos, leaked, err, inst, lo, hi, _ in rows:
        print(f"| {seed} | {name} | {n_held} ({photos}) | {leaked} | {err:.4f} | {inst:.4f} [{lo:.4f}, {hi:.4f}] | "
              f"{hi - lo:.4f} |")


if __name__ == "__main__":
    main()
