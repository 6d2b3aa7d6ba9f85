"""Sec. 4.4: what network compression discards, as Var(x^Δ) of the original reconstructed from the pruned net.

For every pruning ratio r the network is magnitude-pruned (:mod:`kcore.experiments.pruning`), optionally
fine-tuned with the pruned weights held at zero, and g_θ is fitted so that the **pruned** net's features x
reconstruct the **original** net's features x* at the same layer. x^Δ = x* − g(x) is the knowledge of the
original that the compressed net discarded; the study reports Var(x^Δ) next to the accuracy, as a curve
(the paper's Fig. 4 left), and draws x^Δ for a few images at the strongest pruning.

Units: the fit's default ("paper") convention standardises x* per channel with statistics of the fit's
training split. The target is the original net's features at every ratio, so the units (and Var(x*) ≈ 1)
are the same for every point of the curve and Var(x^Δ) compares directly across ratios.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_fit_args, add_nested_argument
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
from kcore.experiments.pruning import PRUNE_SCOPES, PruneScope, kept_pruned, prune_magnitude
from kcore.imagesets import StudyData, study_data
from kcore.provenance import checkpoint_provenance
from kcore.samples import SAMPLE_CHECKPOINTS

DEFAULT_RATIOS: tuple[float, ...] = (0.0, 0.3, 0.5, 0.7, 0.9, 0.95)
DEFAULT_MODEL = SAMPLE_CHECKPOINTS["kshapes_resnet_s0"]


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
        row: :func:`consistency_row` of the fit pruned → original (Var(x^Δ) = ``row.var_residual``).
    """

    ratio: float
    n_weights: int
    n_pruned: int
    masked_nonzero: int
    accuracy_pruned: float
    accuracy: float
    row: ConsistencyRow = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        """One table row: the pruning numbers, the accuracies and the consistency row."""
        return {"ratio": self.ratio, "n_weights": self.n_weights, "n_pruned": self.n_pruned,
                "sparsity": self.n_pruned / self.n_weights, "masked_nonzero": self.masked_nonzero,
                "accuracy_pruned": self.accuracy_pruned, "accuracy": self.accuracy, **self.row.as_row()}


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
        """The JSON form of the result (study.json)."""
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

    from kcore.viz.figure1 import GRID_IN
    from kcore.viz.style import TEXT_PT, TITLE_PT

    r = [p.ratio for p in result.points]
    v = [p.row.var_residual for p in result.points]
    acc = [p.accuracy for p in result.points]
    fig = Figure(figsize=(GRID_IN, 6.8), layout="constrained")  # stacked: text stays readable at 1024 px
    ax1, ax3 = fig.subplots(2, 1)
    ax1.plot(r, v, "o-", color="#c0392b", label="Var(x^Δ)")
    ax1.set_xlabel("pruning ratio r", fontsize=TITLE_PT)
    ax1.set_ylabel("Var(x^Δ) (held out, standardised units)", color="#c0392b", fontsize=TITLE_PT)
    ax2 = ax1.twinx()
    ax2.plot(r, acc, "s--", color="#2c3e50", label="accuracy")
    if result.finetune_epochs:
        ax2.plot(r, [p.accuracy_pruned for p in result.points], "x:", color="#7f8c8d", label="accuracy before fine-tuning")
    ax2.set_ylabel("test accuracy", fontsize=TITLE_PT)
    ax2.legend(fontsize=TEXT_PT, loc="center left")
    scope = {"layer": "per-layer"}.get(result.scope, result.scope)
    ax1.set_title(f"{scope} magnitude pruning, layer {result.layer}", fontsize=TITLE_PT)
    ax3.plot(v, acc, "o-", color="#2c3e50")
    for p, x, y in zip(result.points, v, acc):
        ax3.annotate(f"r={p.ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=TEXT_PT)
    ax3.margins(x=0.12, y=0.1)  # room for the last point's r= label inside the panel
    ax3.set_xlabel("Var(x^Δ): knowledge discarded", fontsize=TITLE_PT)
    ax3.set_ylabel("test accuracy", fontsize=TITLE_PT)
    ax3.set_title("accuracy against discarded knowledge", fontsize=TITLE_PT)
    for ax in (ax1, ax2, ax3):
        ax.tick_params(labelsize=TEXT_PT)
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
    ctx: Any = None,
) -> CompressionResult:
    """Prune ``model`` at each ratio, optionally fine-tune, and measure what the original loses (Sec. 4.4).

    Args:
        model: the trained original network (not modified).
        layer: layer compared in both nets (see :func:`kcore.features.list_layers`).
        data: :class:`StudyData`: ``train`` for fine-tuning, ``test`` for accuracy, ``images`` for the fits.
        ratios: pruning fractions in [0, 1].
        scope: ``"layer"`` or ``"global"`` (:data:`kcore.experiments.pruning.PRUNE_SCOPES`).
        finetune_epochs: epochs of fine-tuning after pruning, with the pruned weights held at zero (SGD,
            :func:`kcore.training.train_classifier`, peak lr ``finetune_lr``); applied to every ratio, 0
            included (the r = 0 point then shows what fine-tuning alone changes); 0 = no fine-tuning.
        finetune_lr: peak learning rate of the fine-tuning.
        fit: how each g_θ is fitted (:class:`FitSettings`).
        seed: seed of fine-tuning.
        device: where everything runs.
        n_maps: held-out images drawn in the ``discarded_components`` figure.
        progress: called with one line per step.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the ratios (prune, fine-tune, fit) are dealt out to
            the ranks, each ratio run whole on one rank, and every rank gets every point; ``None``: one process.

    Returns:
        A :class:`CompressionResult`.

    Raises:
        ValueError: bad ratios, scope, epochs or layer.

    Paper: Sec. 4.4 and Fig. 4 (left).
    """
    from kcore.devices import resolve_device
    from kcore.features import validate_layer
    from kcore.training import evaluate, train_classifier

    ratios = _check_ratios(ratios)
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {sorted(PRUNE_SCOPES)}; got {scope!r}.")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an integer >= 0; got {finetune_epochs!r}.")
    validate_layer(model, layer)
    dev = resolve_device(device)
    original = _eval_copy(model, dev)
    acc0 = evaluate(original, data.test)
    say(progress, f"original net: test accuracy {acc0:.4f}")
    def one_ratio(r: float) -> tuple[CompressionPoint, tuple | None]:
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
        say(progress, f"r = {r:g}: {pruned.n_pruned}/{pruned.n_weights} weights zeroed, accuracy {acc_pruned:.4f}"
                       + (f" -> {acc:.4f} after fine-tuning" if finetune_epochs else "")
                       + f"; Var(x^D) {row.var_residual:.4g}, instability {row.instability:.4f}")
        maps = None
        if r == max(ratios) and n_maps > 0:
            held, channel = map_selection(res, n_maps)
            pos = torch.as_tensor(held)
            dec = res.decompose(feats.x_a[pos].float(), feats.x_b[pos].float())
            maps = (dec, tuple(display_image(data.images, j) for j in held),
                    tuple(feats.image_ids[j] for j in held), channel)
        return CompressionPoint(r, pruned.n_weights, pruned.n_pruned, nonzero, acc_pruned, acc, row), maps

    done = map_over_ranks(one_ratio, list(ratios), ctx)  # every ratio is independent of the others
    points = [point for point, _ in done]
    maps = next((m for _, m in done if m is not None), (None, (), (), 0))
    settings = {"ratios": list(ratios), "finetune_lr": finetune_lr, "fit": fit.as_dict(), "seed": seed,
                "device": str(dev), "n_train": len(data.train), "n_test": len(data.test),
                "n_images": len(data.images), "data": data.source, "fit_preset": "fast",
                "convention": "paper (x* standardised per channel with the fit's training-split statistics)"}
    return CompressionResult(layer, scope, finetune_epochs, acc0, tuple(points), maps[0], maps[1], maps[2], maps[3],
                             settings)


def _eval_copy(model: nn.Module, device: torch.device) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(device).eval()


# --------------------------------------------------------------------------------------------------- CLI
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
    add_fit_args(p, n_train=500, train_help="for fine-tuning")
    add_nested_argument(p)
    study_command(p, "compression", _compute, _report)


def _compute(args: argparse.Namespace, run: StudySettings, progress: Progress) -> StudyRun:
    m = load_checkpoint(args.model, "--model")
    layer = args.layer or (m.card.default_layer if m.card else None)
    if not layer:
        raise ValueError("--layer is required: the checkpoint has no model card with a default_layer. "
                         "Fix: list candidates with `kcore layers CKPT`.")
    size = tuple(m.card.input_size) if m.card and m.card.input_size else (64, 64)
    data = study_data(args.data, image_size=size[0], n_train=args.n_train, n_test=args.n_test, n_images=args.n_images,
                      mean=m.card.mean if m.card else None, std=m.card.std if m.card else None)
    progress(f"{m.name} [{m.short_hash}] layer {layer}; {data.source}")
    res = compression_study(m.model, layer, data, ratios=_parse_ratios(args.ratios), scope=args.scope,
                            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                            fit=fit_settings_from(args), seed=args.seed, device=run.device, progress=progress,
                            ctx=run.job)
    prov = {"checkpoint": checkpoint_provenance(m, args.model, layer), "layers": {"pruned": layer, "original": layer},
            "seeds": {"finetune": args.seed, "fit": args.seed}, "data": data.source}
    return StudyRun(res, prov)


def _report(res: CompressionResult) -> None:
    print(res.tables()["compression"][["ratio", "n_pruned", "accuracy_pruned", "accuracy", "var_residual",
                                       "instability"]].to_string(index=False))
    if any(p.row.gains is not None for p in res.points):
        print("order split of g_K (Var(x^(k))/Var(x*)) and order-wise gains of the nested fits (held-out images):")
        for p in res.points:
            split = ", ".join(f"x{k} {100 * v / p.row.var_target:.1f} %" for k, v in enumerate(p.row.var_orders))
            print(f"  r = {p.ratio:g}: split {split}; gains {p.row.gains.line()}")
