"""Sec. 4.6: consistent and inconsistent features of networks trained for a fine and a coarse task.

Two networks of the same architecture see the same images: A is trained for the fine labelling (kshapes: 10
shapes), B for the coarse one (kshapes: "round" vs "angular"). g_θ is fitted in both directions at one layer:

- ``fine_to_coarse``: x = A's features, x* = B's; x^Δ = what the coarse net encodes that the fine net lacks;
- ``coarse_to_fine``: x = B's features, x* = A's; x^Δ = what the fine net encodes that the coarse net lacks.

The paper (Fig. 5) found that the fine-grained net's features reconstruct more of the coarse net's than vice
versa, i.e. a lower instability Var(x^Δ)/Var(x*) in ``fine_to_coarse``. Var(x*) is ≈ 1 in both directions
(standardised targets), so the instability is the number to compare.

Trained here, both nets use the same seed (initialisation and batch order) and the same images; they start
from identical weights except the last classifier layer, whose shape differs (:func:`train_task_pair`).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kcore.data import is_bundled
from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_fit_args, add_recipe_args
from kcore.experiments._features import display_image, load_checkpoint
from kcore.experiments._fits import (
    ConsistencyRow,
    FitSettings,
    consistency_row,
    fit_consistency,
    fit_settings_from,
    map_selection,
)
from kcore.experiments._study import Progress, StudyRun, StudySettings, say, study_command
from kcore.imagesets import StudyData, study_data
from kcore.provenance import checkpoint_provenance, model_summary

DIRECTIONS: dict[str, str] = {
    "fine_to_coarse": "x = fine net, x* = coarse net: x^Delta = what the coarse net encodes that the fine net lacks",
    "coarse_to_fine": "x = coarse net, x* = fine net: x^Delta = what the fine net encodes that the coarse net lacks",
}
"""The two directions of the study and what x^Δ means in each."""


def train_task_pair(arch: str, fine: StudyData, coarse: StudyData, *, epochs: int, seed: int, lr: float = 0.1,
                    optimizer: str = "sgd", weight_decay: float = 5e-4, device: str | torch.device = "cpu",
                    progress: Progress | None = None):
    """Train the fine and the coarse net: same architecture, seed, images, recipe and initial weights.

    The coarse net is built with the same seed and then given the fine net's initial weights wherever the
    shapes agree (everything but the last classifier layer), so the two differ only by their task.

    Returns:
        ``(fine TrainResult, coarse TrainResult)`` (:func:`kcore.training.train_classifier`).
    """
    from kcore.architectures import build_model
    from kcore.devices import resolve_device
    from kcore.training import train_classifier

    dev = resolve_device(device)
    torch.manual_seed(seed)
    net_f = build_model(arch, len(fine.class_names)).to(dev)
    torch.manual_seed(seed)
    net_c = build_model(arch, len(coarse.class_names)).to(dev)
    shared = {k: v for k, v in net_f.state_dict().items() if net_c.state_dict()[k].shape == v.shape}
    net_c.load_state_dict({**net_c.state_dict(), **shared})
    say(progress, f"training the fine net ({len(fine.class_names)} classes, {epochs} epochs, seed {seed})")
    opts = dict(epochs=epochs, seed=seed, lr=lr, optimizer=optimizer, weight_decay=weight_decay)
    res_f = train_classifier(net_f, fine.train, fine.test, **opts)
    say(progress, f"fine net: test accuracy {res_f.test_accuracy:.4f}")
    say(progress, f"training the coarse net ({len(coarse.class_names)} classes, {epochs} epochs, seed {seed})")
    res_c = train_classifier(net_c, coarse.train, coarse.test, **opts)
    say(progress, f"coarse net: test accuracy {res_c.test_accuracy:.4f}")
    return res_f, res_c


@dataclass(frozen=True, eq=False)
class CrossTaskResult:
    """Consistency between a fine-task and a coarse-task net in both directions.

    Attributes:
        layer: the compared layer (the same in both nets).
        accuracy_fine: the fine net's test accuracy on fine labels.
        accuracy_coarse: the coarse net's test accuracy on coarse labels.
        accuracy_fine_as_coarse: the fine net's predictions mapped to coarse labels (NaN without a mapping).
        rows: direction → :func:`consistency_row` (held-out Var per order, Var(x^Δ), Var(x*), instability …).
        maps: direction → decomposition of a few held-out images (the same images in both directions).
        map_channels: direction → the x* channel drawn (largest Var(x^Δ)).
        map_images, map_ids: the drawn images (H, W, 3) uint8 and their ids.
        settings: everything else that defines the run.
    """

    layer: str
    accuracy_fine: float
    accuracy_coarse: float
    accuracy_fine_as_coarse: float
    rows: dict[str, ConsistencyRow]
    maps: dict
    map_channels: dict
    map_images: tuple[np.ndarray, ...]
    map_ids: tuple[str, ...]
    settings: dict = field(default_factory=dict)

    @property
    def fine_reconstructs_more(self) -> bool:
        """The paper's finding: lower instability when the fine net's features reconstruct the coarse net's."""
        return self.rows["fine_to_coarse"].instability < self.rows["coarse_to_fine"].instability

    def tables(self) -> dict[str, Any]:
        """``directions`` (one row per direction) and ``accuracy``."""
        import pandas as pd

        dirs = pd.DataFrame([{"direction": k, "meaning": DIRECTIONS[k], **r.as_row()} for k, r in self.rows.items()])
        acc = pd.DataFrame([
            {"net": "fine", "labels": "fine", "accuracy": self.accuracy_fine},
            {"net": "coarse", "labels": "coarse", "accuracy": self.accuracy_coarse},
            {"net": "fine (predictions mapped to coarse)", "labels": "coarse", "accuracy": self.accuracy_fine_as_coarse},
        ])
        return {"directions": dirs, "accuracy": acc}

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the result (study.json)."""
        return {"layer": self.layer, "accuracy_fine": self.accuracy_fine, "accuracy_coarse": self.accuracy_coarse,
                "accuracy_fine_as_coarse": self.accuracy_fine_as_coarse,
                "directions": {k: {"meaning": DIRECTIONS[k], **r.as_row()} for k, r in self.rows.items()},
                "fine_reconstructs_more": self.fine_reconstructs_more, "map_ids": list(self.map_ids),
                "map_channels": dict(self.map_channels), "settings": self.settings}

    def figures(self) -> dict[str, Any]:
        """``variances`` (bars per direction) and ``maps_<direction>`` (x*, x⁽ᵏ⁾, x^Δ; the paper's Fig. 5)."""
        from kcore.viz import figure1_grid, variance_figure

        reports = {k: {"var_orders": list(r.var_orders), "var_residual": r.var_residual, "var_target": r.var_target,
                       "instability": r.instability} for k, r in self.rows.items()}  # rows, not reports
        figs = {"variances": variance_figure(reports, titles={k: k.replace("_", " ") for k in reports},
                                             caption=f"layer {self.layer}; held-out images; standardised target units")}
        for key, dec in self.maps.items():
            figs[f"maps_{key}"] = figure1_grid(
                dec, range(len(self.map_ids)), [self.map_channels[key]], list(self.map_images), scale="image",
                row_labels=list(self.map_ids), caption=f"{key}: {DIRECTIONS[key]} (layer {self.layer})")
        return figs


def cross_task_study(
    fine: nn.Module,
    coarse: nn.Module,
    layer: str,
    images: Dataset,
    *,
    fine_test: Dataset,
    coarse_test: Dataset,
    fine_to_coarse: Sequence[int] | None = None,
    fit: FitSettings = FitSettings(),
    device: str | torch.device = "cpu",
    n_maps: int = 2,
    progress: Progress | None = None,
    ctx: Any = None,
) -> CrossTaskResult:
    """Fit g_θ between a fine-task and a coarse-task net in both directions at ``layer`` (Sec. 4.6).

    Args:
        fine: the net trained for the fine labels.
        coarse: the net trained for the coarse labels (same architecture, so ``layer`` exists in both).
        layer: the compared layer.
        images: the images of the fits (both directions use the same images and held-out split).
        fine_test: test images with fine labels; coarse_test: the same kind with coarse labels.
        fine_to_coarse: coarse class of each fine class, to score the fine net on the coarse task (optional).
        fit: how each g_θ is fitted.
        device: where everything runs.
        n_maps: held-out images drawn per direction.
        progress: called with one line per step.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the two directions are fitted on different ranks,
            and every rank gets both; ``None``: one process.

    Returns:
        A :class:`CrossTaskResult`.

    Paper: Sec. 4.6 and Fig. 5.
    """
    from kcore.devices import resolve_device
    from kcore.features import validate_layer
    from kcore.training import evaluate, predict

    validate_layer(fine, layer)
    validate_layer(coarse, layer)
    dev = resolve_device(device)
    acc_f, acc_c = evaluate(fine, fine_test), evaluate(coarse, coarse_test)
    acc_fc = float("nan")
    if fine_to_coarse is not None:
        pred = np.asarray(fine_to_coarse)[predict(fine, fine_test)]
        labels = np.array([int(coarse_test[i][1]) for i in range(len(coarse_test))])
        acc_fc = float((pred == labels).mean())
    say(progress, f"accuracy: fine net {acc_f:.4f} (fine labels), coarse net {acc_c:.4f} (coarse labels), "
                   f"fine net mapped to coarse {acc_fc:.4f}")
    pairs = {"fine_to_coarse": (fine, coarse), "coarse_to_fine": (coarse, fine)}

    def one_direction(key: str) -> tuple[dict, Any, int, list[int], tuple[str, ...]]:
        src, tgt = pairs[key]
        res, feats = fit_consistency(src, layer, tgt, layer, images, fit, device=dev)
        row = consistency_row(res)
        dec, channel, held = None, 0, []
        if n_maps > 0:
            held, channel = map_selection(res, n_maps)
            pos = torch.as_tensor(held)
            dec = res.decompose(feats.x_a[pos].float(), feats.x_b[pos].float())
        say(progress, f"{key}: Var(x^D) {row.var_residual:.4g}, Var(x*) {row.var_target:.4g}, "
                       f"instability {row.instability:.4f}")
        return row, dec, channel, list(held), tuple(feats.image_ids[j] for j in held)

    done = dict(zip(pairs, map_over_ranks(one_direction, list(pairs), ctx)))
    rows = {key: d[0] for key, d in done.items()}
    maps = {key: d[1] for key, d in done.items() if d[1] is not None}
    channels = {key: d[2] for key, d in done.items() if d[1] is not None}
    # both directions share one held-out split (same images, same seed): the last one's images label the maps
    held, held_ids = (done["coarse_to_fine"][3], done["coarse_to_fine"][4]) if maps else ([], ())
    map_images = tuple(display_image(images, j) for j in held) if maps else ()
    map_ids = held_ids
    settings = {"fit": fit.as_dict(), "device": str(dev), "n_images": len(images),
                "n_test": len(fine_test), "fit_preset": "fast", "models": {"fine": model_summary(fine),
                                                                          "coarse": model_summary(coarse)},
                "convention": "paper (x* standardised per channel with the fit's training-split statistics)"}
    return CrossTaskResult(layer, acc_f, acc_c, acc_fc, rows, maps, channels, map_images, map_ids, settings)


# --------------------------------------------------------------------------------------------------- CLI
def add_cli(sub: Any) -> None:
    """Register ``kcore cross-task``."""
    p = sub.add_parser(
        "cross-task", help="Sec. 4.6: a fine-task and a coarse-task net, consistency in both directions",
        description="Train (or load) two nets of the same architecture on the same images, one for the fine "
        "labels and one for the coarse labels (kshapes: 10 shapes vs round/angular), and fit g_theta at one "
        "layer in both directions, with maps of x*, x^(k) and x^Delta.")
    p.add_argument("--fine", default=None, metavar="CKPT", help="a trained fine-task net (with --coarse; default: "
                   "train both here)")
    p.add_argument("--coarse", default=None, metavar="CKPT", help="a trained coarse-task net (with --fine)")
    add_recipe_args(p, epochs=5, nets="the two nets trained here")
    p.add_argument("--coarse-map", default=None, metavar="JSON",
                   help="with a folder: JSON object mapping each class folder name to a coarse class name")
    add_fit_args(p, n_train=2000, train_help="of each net")
    study_command(p, "cross_task", _compute, _report)


def _compute(args: argparse.Namespace, run: StudySettings, progress: Progress) -> StudyRun:
    from kcore.synthetic import COARSE_OF_CLASS

    if (args.fine is None) != (args.coarse is None):
        raise ValueError("--fine and --coarse go together. Fix: pass both checkpoints, or neither to train both here.")
    coarse_map = None
    if args.coarse_map:
        coarse_map = json.loads(Path(args.coarse_map).read_text())
        if not isinstance(coarse_map, dict):
            raise ValueError(f"--coarse-map {args.coarse_map!r} must hold a JSON object {{fine class: coarse class}}.")
    loaded = None
    if args.fine is not None:
        loaded = (load_checkpoint(args.fine, "--fine"), load_checkpoint(args.coarse, "--coarse"))
        card = loaded[0].card
        size = card.input_size[0] if card and card.input_size else args.image_size
        mean, std = (card.mean, card.std) if card else (None, None)
    else:
        size, mean, std = args.image_size, None, None
    kw = dict(image_size=size, n_train=args.n_train, n_test=args.n_test, n_images=args.n_images, mean=mean, std=std,
              coarse_map=coarse_map)
    fine_data = study_data(args.data, labels="fine", **kw)
    coarse_data = study_data(args.data, labels="coarse", **kw)
    if is_bundled(args.data):
        mapping = list(COARSE_OF_CLASS)
    elif coarse_map is not None:
        mapping = [coarse_data.class_names.index(coarse_map[c]) for c in fine_data.class_names]
    else:
        mapping = None
    if loaded is None:
        res_f, res_c = train_task_pair(args.arch, fine_data, coarse_data, epochs=args.epochs, seed=args.seed,
                                       lr=args.lr, optimizer=args.optimizer, weight_decay=args.weight_decay,
                                       device=run.device, progress=progress)
        fine, coarse = res_f.model, res_c.model
        layer = args.layer or "layer2"
        prov_nets: dict[str, Any] = {"trained": "here", "architecture": args.arch, "epochs": args.epochs,
                                     "seed": args.seed, "lr": args.lr, "optimizer": args.optimizer,
                                     "weight_decay": args.weight_decay, "n_train": args.n_train}
    else:
        fine, coarse = loaded[0].model, loaded[1].model
        layer = args.layer or (loaded[0].card.default_layer if loaded[0].card else None)
        if not layer:
            raise ValueError("--layer is required: the --fine checkpoint has no model card with a default_layer.")
        prov_nets = {"fine": checkpoint_provenance(loaded[0], args.fine, layer),
                     "coarse": checkpoint_provenance(loaded[1], args.coarse, layer)}
    progress(f"comparing layer {layer} on {len(fine_data.images)} images ({fine_data.source})")
    res = cross_task_study(fine, coarse, layer, fine_data.images, fine_test=fine_data.test,
                           coarse_test=coarse_data.test, fine_to_coarse=mapping, fit=fit_settings_from(args),
                           device=run.device, progress=progress, ctx=run.job)
    prov = {"networks": prov_nets, "layers": {"fine": layer, "coarse": layer},
            "seeds": {"train": args.seed, "fit": args.seed}, "data": fine_data.source}
    return StudyRun(res, prov)


def _report(res: CrossTaskResult) -> None:
    print(res.tables()["directions"][["direction", "var_residual", "var_target", "instability"]].to_string(index=False))
    print(f"fine net reconstructs more of the coarse net than vice versa: {res.fine_reconstructs_more}")
