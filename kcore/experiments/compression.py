"""Sec. 4.4: what network compression discards, as Var(x^Δ) of the original reconstructed from the pruned net.

For every pruning ratio r the network is magnitude-pruned (:mod:`kcore.experiments.pruning`), optionally
fine-tuned with the pruned weights held at zero, and g_θ is fitted so that the **pruned** net's features x
reconstruct the **original** net's features x* at the same layer. x^Δ = x* − g(x) is the knowledge of the
original that the compressed net discarded; the study reports Var(x^Δ) next to the accuracy, as a curve
(the paper's Fig. 4 left), and draws x^Δ for a few images at the strongest pruning.

Units: the fit's default ("paper") convention standardises x* per channel with statistics of the fit's
training split. The target is the original net's features at every ratio, so the units (and Var(x*) ≈ 1)
are the same for every point of the curve and Var(x^Δ) compares directly across ratios.

This module also holds small helpers shared by the compression, distillation and cross-task studies
(:func:`study_data`, :func:`fit_consistency`, :func:`consistency_row`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kcore.experiments.pruning import PRUNE_SCOPES, PruneScope, kept_pruned, prune_magnitude

Progress = Callable[[str], None]

DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.9, 0.95)
DEFAULT_MODEL = "sample_models/kshapes_resnet_s0.safetensors"


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def stderr_progress(study: str) -> Progress:
    """A progress callback that prints ``[study] message`` lines to stderr."""
    def say(message: str) -> None:
        print(f"[{study}] {message}", file=sys.stderr, flush=True)
    return say


# ------------------------------------------------------------------------------------------ shared: data
class _FolderSplit(Dataset):
    """Images of ``root/<class>/*`` (torchvision ImageFolder), resized and normalised, with ``ids``."""

    def __init__(self, root: Path, input_size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 n: int | None, relabel: dict[str, str] | None, coarse_names: tuple[str, ...] | None):
        from torchvision import datasets, transforms

        self.folder = datasets.ImageFolder(str(root))
        self.transform = transforms.Compose([transforms.Resize(tuple(input_size)), transforms.ToTensor(),
                                             transforms.Normalize(list(mean), list(std))])
        total = len(self.folder)
        if n is not None and n < total:  # a seeded subset that covers every class, in a fixed order
            idx = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values.tolist()
        else:
            idx = list(range(total))
        self.index = idx
        self.mean, self.std = tuple(mean), tuple(std)
        self.ids = tuple(os.path.relpath(self.folder.samples[i][0], root) for i in idx)
        self.fine_names = tuple(self.folder.classes)
        self._map = None
        self.class_names = self.fine_names
        if relabel is not None:
            missing = sorted(set(self.fine_names) - set(relabel))
            if missing:
                raise ValueError(f"the coarse label map has no entry for class(es) {missing} of {str(root)!r}. "
                                 "Fix: map every class folder name to a coarse class name.")
            self.class_names = coarse_names or tuple(sorted(set(relabel.values())))
            self._map = [self.class_names.index(relabel[c]) for c in self.fine_names]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.folder.samples[self.index[i]]
        image = self.transform(self.folder.loader(path))
        return image, (label if self._map is None else self._map[label])


@dataclass(frozen=True, eq=False)
class StudyData:
    """The images of a study.

    Attributes:
        train: labelled training images (fine-tuning, training students).
        test: labelled test images (accuracy).
        images: the images whose features g_θ is fitted on and evaluated with (its own held-out split).
        source: a description for provenance.
        class_names: names of the labels.
    """

    train: Dataset
    test: Dataset
    images: Dataset
    source: str
    class_names: tuple[str, ...]


def study_data(data: str = "sample", *, labels: str = "fine", image_size: int = 64, n_train: int = 800,
               n_test: int = 500, n_images: int = 300, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, coarse_map: dict[str, str] | None = None) -> StudyData:
    """Training, test and consistency images, from the embedded kshapes data or from a folder.

    Args:
        data: ``"sample"`` (kshapes, dataset seed 0: the first ``n_train`` images of its train split, the first
            ``n_test`` of its test split, and the first ``n_images`` of its val split for the fits) or a folder
            holding ``train/<class>/*`` and ``test/<class>/*`` (and optionally ``val/<class>/*``, else the
            fits use test images) in torchvision ImageFolder layout.
        labels: ``"fine"`` or ``"coarse"`` (kshapes: round vs angular; folders: through ``coarse_map``).
        image_size: side of the images (kshapes), or of the resized folder images.
        n_train, n_test, n_images: how many images of each part (a seeded subset of a folder's split).
        mean, std: normalisation of the images (default: kshapes'; pass the model card's).
        coarse_map: for folders with ``labels="coarse"``: fine class folder name → coarse class name.

    Raises:
        ValueError: bad sizes, a missing folder, or an incomplete coarse map.
    """
    from kcore.synthetic import MEAN, STD, KShapesDataset, KShapesSpec

    for name, v in (("n_train", n_train), ("n_test", n_test), ("n_images", n_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse'; got {labels!r}.")
    norm = {"mean": tuple(mean or MEAN), "std": tuple(std or STD)}
    if data == "sample":
        spec = KShapesSpec(seed=0, image_size=image_size, n_train=n_train, n_test=max(n_test, n_images))
        return StudyData(
            KShapesDataset(spec, "train", labels, n=n_train, **norm),
            KShapesDataset(spec, "test", labels, n=n_test, **norm),
            KShapesDataset(spec, "val", labels, n=n_images, **norm),
            f"kshapes ({spec.name}, {labels} labels): train[:{n_train}], test[:{n_test}], val[:{n_images}] for the fits",
            KShapesDataset(spec, "test", labels, n=0).class_names)
    root = Path(data)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise ValueError(f"data folder {str(root)!r} has no {part}/ subfolder. Fix: pass 'sample', or a folder "
                             "with train/<class>/* and test/<class>/* images.")
    relabel = None
    if labels == "coarse":
        if coarse_map is None:
            raise ValueError("labels='coarse' on a folder needs coarse_map (fine class name -> coarse class name). "
                             "Fix: pass --coarse-map FILE.json.")
        relabel = dict(coarse_map)
    size = (image_size, image_size)
    mean, std = tuple(mean or MEAN), tuple(std or STD)
    coarse_names = tuple(sorted(set(relabel.values()))) if relabel else None
    parts = [_FolderSplit(root / p, size, mean, std, n, relabel, coarse_names)
             for p, n in (("train", n_train), ("test", n_test))]
    img_part = "val" if (root / "val").is_dir() else "test"
    images = _FolderSplit(root / img_part, size, mean, std, n_images, relabel, coarse_names)
    return StudyData(parts[0], parts[1], images, f"folder {root} ({labels} labels; fits on {img_part}/)",
                     parts[0].class_names)


def display_image(dataset: Dataset, i: int) -> np.ndarray:
    """Item ``i`` of a study dataset as an (H, W, 3) uint8 image (for figures)."""
    if hasattr(dataset, "raw"):
        return dataset.raw(i)
    x = dataset[i][0]
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0))).view(-1, 1, 1)
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0))).view(-1, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


# ------------------------------------------------------------------------------------ shared: consistency
@dataclass(frozen=True)
class FitSettings:
    """How each g_θ of a study is fitted (passed to :func:`kcore.fit` with the ``"fast"`` preset).

    Attributes:
        orders: K.
        lam: λ of Eq. 2.
        epochs: epochs of g_θ (taken literally).
        seed: seed of the split, the initialisation and the batch order.
    """

    orders: int = 2
    lam: float = 0.1
    epochs: int = 10
    seed: int = 0


def fit_consistency(src: nn.Module, src_layer: str, tgt: nn.Module, tgt_layer: str, images: Dataset,
                    settings: FitSettings, *, device: str | torch.device = "cpu", batch_size: int = 64):
    """Fit g_θ from ``src``'s features at ``src_layer`` to ``tgt``'s at ``tgt_layer`` on ``images``.

    Returns:
        ``(FitResult, FeaturePair)``; the pair's ``x_a`` is the source (x), ``x_b`` the target (x*).
    """
    import kcore
    from kcore.features import extract_features

    feats = extract_features(src, src_layer, tgt, tgt_layer, images, batch_size=batch_size, device=device)
    res = kcore.fit(feats.x_a, feats.x_b, orders=settings.orders, lam=settings.lam, epochs=settings.epochs,
                    seed=settings.seed, device=device)
    return res, feats


def consistency_row(res: Any) -> dict[str, Any]:
    """The held-out numbers of a fit as a flat row: Var per order, Var(x^Δ), Var(x*), instability, baselines."""
    rep = res.heldout_report
    row = {f"var_x{k}": float(v) for k, v in enumerate(rep.var_orders)}
    row.update({
        "var_residual": float(rep.var_residual), "var_target": float(rep.var_target),
        "instability": float(rep.instability), "heldout_error": float(res.heldout_error),
        "linear_r2": float(res.baseline.linear_r2), "cka": float(res.baseline.cka),
    })
    row.update({f"p{k + 1}": float(p) for k, p in enumerate(res.gates)})
    return row


def map_selection(res: Any, n_images: int) -> tuple[list[int], int]:
    """Held-out image positions (the first ``n_images``) and the x* channel with the largest Var(x^Δ)."""
    held = list(res.heldout_indices)[:n_images]
    per = res.heldout_report.per_channel.var_residual
    return held, int(np.argmax(per))


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter count and a hash of the weights (for provenance of models trained in memory)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": h.hexdigest()}


# ------------------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class CompressionPoint:
    """One pruning ratio: how much was pruned, the accuracy, and what the pruned net discarded.

    Attributes:
        ratio: the requested fraction r.
        n_weights: size of the pruned set (all conv/linear weights).
        n_pruned: weights zeroed by the mask.
        masked_nonzero: masked weights that are not exactly 0 at the end (0 unless something is broken).
        accuracy_pruned: test accuracy right after pruning.
        accuracy: test accuracy after the optional fine-tuning (= ``accuracy_pruned`` without it).
        row: :func:`consistency_row` of the fit pruned → original (Var(x^Δ) = ``row["var_residual"]``).
    """

    ratio: float
    n_weights: int
    n_pruned: int
    masked_nonzero: int
    accuracy_pruned: float
    accuracy: float
    row: dict = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "n_weights": self.n_weights, "n_pruned": self.n_pruned,
                "sparsity": self.n_pruned / self.n_weights, "masked_nonzero": self.masked_nonzero,
                "accuracy_pruned": self.accuracy_pruned, "accuracy": self.accuracy, **self.row}


@dataclass(frozen=True, eq=False)
class CompressionResult:
    """Var(x^Δ) of the original net reconstructed from pruned nets, against accuracy.

    Attributes:
        layer: the compared layer (the same in both nets).
        scope: pruning scope.
        finetune_epochs: fine-tuning epochs after pruning (0 = none).
        original_accuracy: test accuracy of the unpruned net.
        points: one :class:`CompressionPoint` per ratio, in the given order.
        maps: decomposition of a few held-out images at the largest ratio (x* = original, x = pruned).
        map_images: those images, (H, W, 3) uint8.
        map_ids: their ids.
        map_channel: the channel drawn (largest Var(x^Δ) at the largest ratio).
        settings: everything else that defines the run.
    """

    layer: str
    scope: str
    finetune_epochs: int
    original_accuracy: float
    points: tuple[CompressionPoint, ...]
    maps: Any
    map_images: tuple[np.ndarray, ...]
    map_ids: tuple[str, ...]
    map_channel: int
    settings: dict = field(default_factory=dict)

    def tables(self) -> dict[str, Any]:
        """``compression``: one row per ratio."""
        import pandas as pd

        return {"compression": pd.DataFrame([p.as_dict() for p in self.points])}

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "scope": self.scope, "finetune_epochs": self.finetune_epochs,
                "original_accuracy": self.original_accuracy, "points": [p.as_dict() for p in self.points],
                "map_ids": list(self.map_ids), "map_channel": self.map_channel, "settings": self.settings,
                "direction": "pruned -> original (x = pruned net's features, x* = original net's features)"}

    def figures(self) -> dict[str, Any]:
        """``compression_curve`` (Var(x^Δ) and accuracy against r, and accuracy against Var(x^Δ)) and
        ``discarded_components`` (x*, x⁽ᵏ⁾, x^Δ at the largest ratio)."""
        from kcore.viz import figure1_grid

        figs = {"compression_curve": compression_figure(self)}
        if self.maps is not None:
            r = max(self.points, key=lambda p: p.ratio).ratio
            figs["discarded_components"] = figure1_grid(
                self.maps, range(len(self.map_ids)), [self.map_channel], list(self.map_images), scale="image",
                row_labels=list(self.map_ids),
                caption=f"original net's layer {self.layer} reconstructed from the net pruned at r = {r:g} "
                        f"({self.scope}); x^Δ = discarded knowledge; standardised target units")
        return figs


def compression_figure(result: CompressionResult):
    """Var(x^Δ) and accuracy against the pruning ratio, and accuracy against Var(x^Δ) (paper Fig. 4 left)."""
    from matplotlib.figure import Figure

    r = [p.ratio for p in result.points]
    v = [p.row["var_residual"] for p in result.points]
    acc = [p.accuracy for p in result.points]
    fig = Figure(figsize=(9.0, 3.4), layout="constrained")
    ax1, ax3 = fig.subplots(1, 2)
    ax1.plot(r, v, "o-", color="#c0392b", label=r"Var($x^{\Delta}$)")
    ax1.set_xlabel("pruning ratio r")
    ax1.set_ylabel(r"Var($x^{\Delta}$) (held out, standardised units)", color="#c0392b", fontsize=8)
    ax2 = ax1.twinx()
    ax2.plot(r, acc, "s--", color="#2c3e50", label="accuracy")
    if result.finetune_epochs:
        ax2.plot(r, [p.accuracy_pruned for p in result.points], "x:", color="#7f8c8d", label="accuracy before fine-tuning")
    ax2.set_ylabel("test accuracy", fontsize=8)
    ax2.legend(fontsize=7, loc="center left")
    scope = {"layer": "per-layer"}.get(result.scope, result.scope)
    ax1.set_title(f"{scope} magnitude pruning, layer {result.layer}", fontsize=9)
    ax3.plot(v, acc, "o-", color="#2c3e50")
    for p, x, y in zip(result.points, v, acc):
        ax3.annotate(f"r={p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax3.set_xlabel(r"Var($x^{\Delta}$): knowledge discarded")
    ax3.set_ylabel("test accuracy")
    ax3.set_title("accuracy against discarded knowledge", fontsize=9)
    for ax in (ax1, ax3):
        ax.grid(alpha=0.3)
    return fig


def _check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(r) for r in ratios)
    if not out:
        raise ValueError("ratios is empty. Fix: pass e.g. ratios=(0, 0.5, 0.9).")
    bad = [r for r in out if not 0.0 <= r <= 1.0]
    if bad:
        raise ValueError(f"ratios must lie in [0, 1]; got {bad}. Fix: e.g. 0.9 zeroes 90% of the weights.")
    return out


def compression_study(
    model: nn.Module,
    layer: str,
    data: StudyData,
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    scope: PruneScope = "layer",
    finetune_epochs: int = 0,
    finetune_lr: float = 0.01,
    fit: FitSettings = FitSettings(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    n_maps: int = 2,
    progress: Progress | None = None,
) -> CompressionResult:
    """Prune ``model`` at each ratio, optionally fine-tune, and measure what the original loses (Sec. 4.4).

    Args:
        model: the trained original network (not modified).
        layer: layer compared in both nets (see :func:`kcore.features.list_layers`).
        data: :class:`StudyData`: ``train`` for fine-tuning, ``test`` for accuracy, ``images`` for the fits.
        ratios: pruning fractions in [0, 1].
        scope: ``"layer"`` or ``"global"`` (:data:`kcore.experiments.pruning.PRUNE_SCOPES`).
        finetune_epochs: epochs of fine-tuning after pruning, with the pruned weights held at zero (SGD,
            :func:`kcore.samples.train_classifier`, peak lr ``finetune_lr``); applied to every ratio, 0
            included (the r = 0 point then shows what fine-tuning alone changes); 0 = no fine-tuning.
        finetune_lr: peak learning rate of the fine-tuning.
        fit: how each g_θ is fitted (:class:`FitSettings`).
        seed: seed of fine-tuning.
        device: where everything runs.
        n_maps: held-out images drawn in the ``discarded_components`` figure.
        progress: called with one line per step.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        ValueError: bad ratios, scope, epochs or layer.

    Paper: Sec. 4.4 and Fig. 4 (left).
    """
    from kcore.devices import resolve_device
    from kcore.features import validate_layer
    from kcore.samples import evaluate, train_classifier

    ratios = _check_ratios(ratios)
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {sorted(PRUNE_SCOPES)}; got {scope!r}.")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0; got {finetune_epochs!r}.")
    validate_layer(model, layer)
    dev = resolve_device(device)
    original = _eval_copy(model, dev)
    acc0 = evaluate(original, data.test)
    _say(progress, f"original net: test accuracy {acc0:.4f}")
    points, maps = [], (None, (), (), 0)
    for i, r in enumerate(ratios):
        pruned = prune_magnitude(original, r, scope)
        net = pruned.model
        acc_pruned = evaluate(net, data.test)
        acc = acc_pruned
        if finetune_epochs:
            with kept_pruned(net, pruned.masks):
                train_classifier(net, data.train, None, epochs=finetune_epochs, seed=seed, lr=finetune_lr)
            net.eval()
            acc = evaluate(net, data.test)
        modules = dict(net.named_modules())
        nonzero = sum(int((modules[n].weight.detach()[~k] != 0).sum()) for n, k in pruned.masks.items())
        res, feats = fit_consistency(net, layer, original, layer, data.images, fit, device=dev)
        row = consistency_row(res)
        points.append(CompressionPoint(r, pruned.n_weights, pruned.n_pruned, nonzero, acc_pruned, acc, row))
        _say(progress, f"r = {r:g}: {pruned.n_pruned}/{pruned.n_weights} weights zeroed, accuracy {acc_pruned:.4f}"
                       + (f" -> {acc:.4f} after fine-tuning" if finetune_epochs else "")
                       + f"; Var(x^D) {row['var_residual']:.4g}, instability {row['instability']:.4f}")
        if r == max(ratios) and n_maps > 0 and maps[0] is None:
            held, channel = map_selection(res, n_maps)
            pos = torch.as_tensor(held)
            dec = res.decompose(feats.x_a[pos].float(), feats.x_b[pos].float())
            maps = (dec, tuple(display_image(data.images, j) for j in held),
                    tuple(feats.image_ids[j] for j in held), channel)
    settings = {"ratios": list(ratios), "finetune_lr": finetune_lr, "fit": dataclasses.asdict(fit), "seed": seed,
                "device": str(dev), "n_train": len(data.train), "n_test": len(data.test),
                "n_images": len(data.images), "data": data.source, "fit_preset": "fast",
                "convention": "paper (x* standardised per channel with the fit's training-split statistics)"}
    return CompressionResult(layer, scope, finetune_epochs, acc0, tuple(points), maps[0], maps[1], maps[2], maps[3],
                             settings)


def _eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device).eval()


# --------------------------------------------------------------------------------------------------- CLI
def load_checkpoint(path: str, what: str):
    """Load a checkpoint for a study (``kcore.checkpoints.load_model``) with errors that name the option."""
    from kcore.checkpoints import load_model

    if not Path(path).is_file():
        hint = (" The sample models are made by `python -m kcore.samples train --out sample_models`."
                if "sample_models" in str(path) else "")
        raise ValueError(f"{what} {path!r} does not exist.{hint} Fix: pass an existing checkpoint.")
    return load_model(path)


def checkpoint_provenance(m: Any, path: str, layer: str) -> dict[str, Any]:
    """Name, hash, layer, architecture and accuracy of a loaded checkpoint."""
    card = m.card
    return {"name": m.name, "path": str(Path(path).resolve()), "sha256": m.sha256, "layer": layer,
            "architecture": card.architecture if card else None, "num_parameters": m.num_parameters,
            "card_test_accuracy": card.test_accuracy if card else None}


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """The options of g_θ and of the consistency images, shared by the studies of this package."""
    p.add_argument("--n-images", type=int, default=300, metavar="N",
                   help="images whose features g_theta is fitted on (20%% held out for the numbers; default 300)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="highest order K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.1, metavar="L", help="lambda of Eq. 2 (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=10, metavar="E", help="epochs of each g_theta fit (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and fits (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace RUN_DIR if it exists")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="study folder to write (atomically)")


def fit_settings_from(args: argparse.Namespace) -> FitSettings:
    return FitSettings(orders=args.orders, lam=args.lam, epochs=args.fit_epochs, seed=args.seed)


def check_out(args: argparse.Namespace) -> None:
    from kcore._io import check_out_dir

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")


def _parse_ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ValueError(f"--ratios must be comma-separated numbers such as 0,0.5,0.9; got {text!r}.") from exc


def add_cli(sub: Any) -> None:
    """Register ``kcore compression``."""
    p = sub.add_parser(
        "compression", help="Sec. 4.4: knowledge discarded by magnitude pruning, Var(x^Delta) against accuracy",
        description="Prune a network at several ratios (magnitude pruning of conv/linear weights), optionally "
        "fine-tune with the pruned weights held at zero, and fit g_theta from the pruned net's features to the "
        "original net's at one layer: Var(x^Delta) is the knowledge the compressed net discarded.")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="CKPT", help=f"the original network (default {DEFAULT_MODEL})")
    p.add_argument("--layer", default=None, help="layer to compare (default: the model card's default_layer)")
    p.add_argument("--ratios", default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
                   help="comma-separated pruning ratios (default %(default)s)")
    p.add_argument("--scope", default="layer", choices=sorted(PRUNE_SCOPES),
                   help="layer: round(r*n_l) weights of each layer; global: round(r*n) over all layers (default layer)")
    p.add_argument("--finetune-epochs", type=int, default=1, metavar="E",
                   help="fine-tuning epochs after pruning, pruned weights held at 0 (default 1; 0 = none)")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="peak SGD learning rate of fine-tuning (default 0.01)")
    p.add_argument("--data", default="sample", metavar="DIR|sample",
                   help="'sample' (kshapes) or a folder with train/<class>/ and test/<class>/ images")
    p.add_argument("--n-train", type=int, default=500, help="training images for fine-tuning (default 500)")
    p.add_argument("--n-test", type=int, default=500, help="test images for the accuracy (default 500)")
    add_fit_args(p)
    p.set_defaults(handler=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    from kcore.experiments._common import write_study

    check_out(args)
    say = stderr_progress("compression")
    m = load_checkpoint(args.model, "--model")
    layer = args.layer or (m.card.default_layer if m.card else None)
    if not layer:
        raise ValueError("--layer is required: the checkpoint has no model card with a default_layer. "
                         "Fix: list candidates with `kcore layers CKPT`.")
    size = tuple(m.card.input_size) if m.card and m.card.input_size else (64, 64)
    data = study_data(args.data, image_size=size[0], n_train=args.n_train, n_test=args.n_test, n_images=args.n_images,
                      mean=m.card.mean if m.card else None, std=m.card.std if m.card else None)
    say(f"{m.name} [{m.short_hash}] layer {layer}; {data.source}")
    res = compression_study(m.model, layer, data, ratios=_parse_ratios(args.ratios), scope=args.scope,
                            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                            fit=fit_settings_from(args), seed=args.seed, device=args.device, progress=say)
    prov = {"checkpoint": checkpoint_provenance(m, args.model, layer), "layers": {"pruned": layer, "original": layer},
            "seeds": {"finetune": args.seed, "fit": args.seed}, "data": data.source,
            "command": " ".join(["kcore", *sys.argv[1:]]) if sys.argv else ""}
    out = write_study(args.out, "compression", res.as_dict(), res.tables(), res.figures(), prov, overwrite=args.overwrite)
    print(res.tables()["compression"][["ratio", "n_pruned", "accuracy_pruned", "accuracy", "var_residual",
                                       "instability"]].to_string(index=False))
    print(f"wrote {out}")
    return 0
