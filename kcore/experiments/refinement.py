"""Feature refinement with knowledge consistency (Sec. 4.3, Table 3, App. A).

Two networks A and B trained for the same task. g_θ is fitted to reconstruct B's feature x_B from A's
feature x_A at one layer each, **without labels**, and then frozen. The upper layers of B (everything above
``layer_b``, initialised from the trained B) are fine-tuned on the consistent components
x⁽⁰⁾, x⁽⁰⁾+x⁽¹⁾, …, x⁽⁰⁾+…+x⁽ᴷ⁾ = g(x_A). Baselines (App. A): A's and B's own upper layers fine-tuned on their
own raw features x_A and x_B. Every arm has the same optimiser, schedule, epochs, batch order and seed; the
lower layers of A and B and g_θ are frozen (the features are computed once, under ``no_grad``) and the study
checks that their weights are unchanged afterwards.

Units: g_θ is fitted in the paper's convention (standardised x and x*); the components fed to B's upper
layers are mapped back to B's raw feature units, σ_c·(x⁽⁰⁾+…+x⁽ᵏ⁾) + μ_c (the channel mean μ_c of x_B, which
no component carries in this convention, is added once to every partial sum).

The same trainer (:func:`train_upper`) serves the diagnosis study (Sec. 4.1).

Paper: Sec. 4.3 "Exp. 1, removing unreliable features", "Fairness of comparisons", App. A; the authors'
``transClassifier.py`` (Adam, lr 1e-5 decayed log-linearly over two decades, weight decay 1e-4, batch 64,
100 epochs). The defaults here keep Adam, the two-decade log-linear decay, the weight decay and the batch
size, with a larger lr (1e-3) for fewer epochs (10).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from kcore.checkpoints import LoadedModel
from kcore.experiments._common import FromLayer, state_fingerprint, unchanged, write_study
from kcore.experiments.families import (
    Progress, as_jsonable, input_shape, labelled_images, layer_of, pair_features, say, source_revision,
    stderr_progress,
)


# ------------------------------------------------------------------------------------- shared classifier
@dataclass(frozen=True)
class TrainConfig:
    """How every classifier arm of a study is trained (identical for all arms, for fairness).

    Attributes:
        epochs: passes over the training features.
        lr: Adam's learning rate in the first epoch; it falls log-linearly per epoch to ``lr_final``.
        lr_final: learning rate of the last epoch.
        weight_decay: Adam's L2 weight decay.
        batch_size: features per step.
        seed: seed of the batch order (the same order for every arm).
    """

    epochs: int = 10
    lr: float = 1e-3
    lr_final: float = 1e-5
    weight_decay: float = 1e-4
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if not (self.lr > 0 and self.lr_final > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr and lr_final must be > 0; got lr={self.lr}, lr_final={self.lr_final}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0; got {self.weight_decay}.")


@dataclass(frozen=True)
class ArmResult:
    """One classifier arm: which features fed which upper layers, and the accuracies.

    Attributes:
        name: short name of the arm, e.g. ``"x(0)+x(1)"``.
        features: what the classifier was fed.
        upper_layers: which upper layers, and how they were initialised.
        channels: channels of the features fed.
        test_accuracy_before: test accuracy before training.
        test_accuracy: test accuracy after training.
        train_accuracy: accuracy on the training features after training (eval mode).
        train_loss: mean cross-entropy of each epoch.
        n_trainable: number of trained parameter elements.
        lower_unchanged: every parameter and buffer below the layer (in the classifier's copy of the
            network) equals its value before training.
        seconds: wall time of the training.
        seed: the training seed (batch order; and the initialisation where the caller seeded it).
    """

    name: str
    features: str
    upper_layers: str
    channels: int
    test_accuracy_before: float
    test_accuracy: float
    train_accuracy: float
    train_loss: tuple[float, ...]
    n_trainable: int
    lower_unchanged: bool
    seconds: float
    seed: int = 0


@torch.no_grad()
def accuracy(clf: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of ``clf`` on features ``x`` (N, C, H, W) with labels ``y`` (N,), in eval mode."""
    dev = next(clf.parameters()).device
    was = clf.training
    clf.eval()
    correct = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            # clone: a later in-place op (e.g. ReLU(inplace=True)) must never write into the caller's features
            out = clf(x[i : i + batch_size].clone().to(dev))
            correct += int((out.argmax(1).cpu() == y[i : i + batch_size]).sum())
    finally:
        clf.train(was)
    return correct / max(x.shape[0], 1)


def _split_upper(clf: FromLayer, example: Tensor) -> tuple[list[nn.Parameter], set[str], list[nn.Module]]:
    """(upper parameters, state-dict keys of the upper part, modules of the lower part with parameters)."""
    clf.eval()
    params = clf.upper_parameters(example)
    ids = {id(p) for p in params}
    upper_keys: set[str] = set()
    lower_modules: list[nn.Module] = []
    for mname, m in clf.net.named_modules():
        own = list(m.named_parameters(recurse=False))
        if not own:
            continue
        prefix = f"net.{mname}." if mname else "net."
        if any(id(p) in ids for _, p in own):
            upper_keys.update(prefix + n for n, _ in own)
            upper_keys.update(prefix + n for n, _ in m.named_buffers(recurse=False))
        else:
            lower_modules.append(m)
    return params, upper_keys, lower_modules


@torch.no_grad()
def _cheap_input_shape(clf: FromLayer, example: Tensor) -> tuple[int, int, int]:
    """The smallest dummy image (of a few sizes tried) with which ``clf`` gives exactly the same output.

    FromLayer runs the lower layers on a zero image whose result the hook discards; a smaller one saves
    that cost. The output is compared bit for bit with the full-size one, in eval mode.
    """
    full = tuple(clf.input_shape)
    was = clf.training
    clf.eval()
    try:
        ref = clf(example.clone())
        for side in (8, 16, 32, 64):
            if side >= min(full[1:]):
                break
            clf.input_shape = (full[0], side, side)
            try:
                if torch.equal(clf(example.clone()), ref):
                    return clf.input_shape
            except RuntimeError:  # the lower layers cannot take an image this small
                continue
        return full
    finally:
        clf.input_shape = full
        clf.train(was)


def train_upper(
    net: nn.Module,
    layer: str,
    in_shape: tuple[int, int, int],
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    config: TrainConfig,
    *,
    name: str,
    features: str,
    upper_layers: str,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> ArmResult:
    """Train the layers of ``net`` above ``layer`` on fixed features; the layers below stay untouched.

    The classifier is :class:`kcore.experiments._common.FromLayer` on a copy of ``net`` (``net`` itself is
    not changed). Only the parameters that receive a gradient from the features are optimised (Adam); the
    lower part of the copy stays in eval mode and is checked to be unchanged afterwards.

    Args:
        net: the network whose upper layers classify (its current weights are the initialisation).
        layer: the module whose output the features replace.
        in_shape: (3, H, W) of the network's input.
        x_train, y_train: training features (N, C, H', W') and labels (N,).
        x_test, y_test: test features and labels.
        config: the :class:`TrainConfig`.
        name, features, upper_layers: descriptions stored in the result.
        device: where to train.
        progress: one line per epoch.

    Returns:
        An :class:`ArmResult`.
    """
    from kcore.devices import resolve_device

    dev = resolve_device(device)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    clf = FromLayer(net, layer, in_shape).to(dev)
    params, upper_keys, lower_modules = _split_upper(clf, x_train[:2].clone().to(dev))
    clf.input_shape = _cheap_input_shape(clf, x_train[:4].clone().to(dev))
    if not params:
        raise ValueError(f"no parameters above layer {layer!r}: nothing to train. Fix: pick a lower layer.")
    before = {k: v for k, v in state_fingerprint(clf).items() if k not in upper_keys}
    acc_before = accuracy(clf, x_test, y_test)
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    n = x_train.shape[0]
    losses = []
    for epoch in range(config.epochs):
        lr = config.lr * (config.lr_final / config.lr) ** (epoch / max(config.epochs - 1, 1))
        for g in opt.param_groups:
            g["lr"] = lr
        clf.train()
        for m in lower_modules:  # the layers below stay exactly as they are (no BatchNorm statistics either)
            m.eval()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, config.batch_size):
            idx = perm[i : i + config.batch_size]
            xb, yb = x_train[idx].to(dev), y_train[idx].to(dev)  # indexing copies: features stay intact
            loss = nn.functional.cross_entropy(clf(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / n)
        say(progress, f"{name}: epoch {epoch + 1}/{config.epochs}, loss {losses[-1]:.4f}, lr {lr:.2g}")
    clf.eval()
    now = clf.state_dict()
    lower_same = all(torch.equal(now[k], v) for k, v in before.items())
    return ArmResult(
        name=name, features=features, upper_layers=upper_layers, channels=int(x_train.shape[1]),
        test_accuracy_before=acc_before, test_accuracy=accuracy(clf, x_test, y_test),
        train_accuracy=accuracy(clf, x_train, y_train), train_loss=tuple(losses),
        n_trainable=sum(p.numel() for p in params), lower_unchanged=lower_same, seconds=time.perf_counter() - t0,
        seed=config.seed,
    )


def arms_table(arms: Sequence[ArmResult]):
    """The accuracy table of some arms (one row each)."""
    import pandas as pd

    return pd.DataFrame([{
        "arm": a.name, "seed": a.seed, "features": a.features, "upper_layers": a.upper_layers, "channels": a.channels,
        "test_accuracy_before": a.test_accuracy_before, "test_accuracy": a.test_accuracy,
        "train_accuracy": a.train_accuracy, "final_train_loss": a.train_loss[-1] if a.train_loss else float("nan"),
        "n_trainable": a.n_trainable, "lower_unchanged": a.lower_unchanged, "seconds": round(a.seconds, 2),
    } for a in arms])


def accuracy_figure(arms: Sequence[ArmResult], title: str, *, before: bool = True):
    """Bars of mean test accuracy per arm name (dots: each seed; outlined bars: before training)."""
    import numpy as np
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(a.name for a in arms))
    groups = [[a for a in arms if a.name == n] for n in names]
    fig = Figure(figsize=(1.2 + 1.1 * len(names), 3.4), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(len(names))
    after = [100 * float(np.mean([a.test_accuracy for a in g])) for g in groups]
    ax.bar(xs, after, color="#1f4e79", width=0.6, label="after training" + (" (mean over seeds)" if
           max(len(g) for g in groups) > 1 else ""))
    lows = list(after)
    if before:
        prior = [100 * float(np.mean([a.test_accuracy_before for a in g])) for g in groups]
        ax.bar(xs, prior, width=0.6, fill=False, edgecolor="0.45", linestyle="--", label="before training")
        lows += prior
    for x, g in zip(xs, groups):
        if len(g) > 1:
            ys = [100 * a.test_accuracy for a in g]
            ax.scatter([x] * len(ys), ys, s=10, color="#f2a541", zorder=3)
            lows += ys
    for x, v, g in zip(xs, after, groups):
        top = max([v] + [100 * a.test_accuracy for a in g])
        ax.text(x, top + 0.6, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("test accuracy [%]", fontsize=8)
    ax.set_ylim(max(0.0, min(lows) - 10), min(100.0, max(after) + 6))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.tick_params(labelsize=7)
    return fig


def fit_summary(res: Any, report: Any = None) -> dict:
    """The numbers of one fitted g_θ worth keeping in a study result (``report``: a VarianceReport)."""
    rep = report if report is not None else res.heldout_report
    return {
        "heldout_error": res.heldout_error, "instability": rep.instability, "var_orders": list(rep.var_orders),
        "var_residual": rep.var_residual, "var_target": rep.var_target, "n_images": rep.n_images,
        "share_orders": None if rep.share_orders is None else list(rep.share_orders),
        "share_residual": rep.share_residual,
        "gates": list(res.gates), "linear_r2": res.baseline.linear_r2, "best_epoch": res.best_epoch,
        "epochs_run": len(res.history), "config": dataclasses.asdict(res.config),
    }


def model_info(m: LoadedModel, layer: str) -> dict:
    """Checkpoint provenance: name, hash, architecture, layer, accuracy."""
    from kcore.pipeline import ModelInfo

    return dataclasses.asdict(ModelInfo.from_loaded(m, layer))


# -------------------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class RefinementResult:
    """Table 3 for one pair of networks: accuracy of fine-tuned upper layers on raw and refined features.

    Attributes:
        a, b: checkpoint provenance of A and B (name, sha256, layer, …).
        layer_a, layer_b: the layers.
        orders: K of g_θ.
        fit: summary of g_θ (A → B): held-out error, instability, Var per order, gates.
        arms: "network A", "network B", then "x(0)", "x(0)+x(1)", … (:class:`ArmResult`).
        frozen: ``{"A lower layers", "B lower layers", "g_theta"}`` → True when unchanged after all arms.
        train: the :class:`TrainConfig` of every arm.
        n_train, n_test: images used to train (g_θ and the classifiers) and to test.
        data: where the images came from.
        seed: the study's seed.
        seconds: wall time.
    """

    a: dict
    b: dict
    layer_a: str
    layer_b: str
    orders: int
    fit: dict
    arms: tuple[ArmResult, ...]
    frozen: dict
    train: TrainConfig
    n_train: int
    n_test: int
    data: str
    seed: int
    seconds: float

    def arm(self, name: str) -> ArmResult:
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(f"no arm {name!r}; arms are {[a.name for a in self.arms]}.")

    def tables(self) -> dict:
        import pandas as pd

        fit_rows = [{"direction": "A_to_B", "order": k, "var": v} for k, v in enumerate(self.fit["var_orders"])]
        fit_rows.append({"direction": "A_to_B", "order": "delta", "var": self.fit["var_residual"]})
        fit_rows.append({"direction": "A_to_B", "order": "target", "var": self.fit["var_target"]})
        return {"accuracy": arms_table(self.arms), "fit_variances": pd.DataFrame(fit_rows)}

    def figures(self) -> dict:
        title = (f"Refinement: B's upper layers above {self.layer_b} on raw vs consistent features "
                 f"(n_test={self.n_test})")
        return {"accuracy": accuracy_figure(self.arms, title)}

    def as_dict(self) -> dict:
        return as_jsonable({
            "a": self.a, "b": self.b, "layer_a": self.layer_a, "layer_b": self.layer_b, "orders": self.orders,
            "fit": self.fit, "arms": [dataclasses.asdict(a) for a in self.arms], "frozen": self.frozen,
            "train": dataclasses.asdict(self.train), "n_train": self.n_train, "n_test": self.n_test,
            "data": self.data, "seed": self.seed, "seconds": self.seconds,
            "accuracy": {a.name: a.test_accuracy for a in self.arms},
        })


def component_sums(res: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int = 256) -> list[Tensor]:
    """[x⁽⁰⁾, x⁽⁰⁾+x⁽¹⁾, …, g(x)] in raw target units (σ_c·sum + μ_c), each (N, C_b, H, W)."""
    sums: list[list[Tensor]] = [[] for _ in range(res.model.orders + 1)]
    for comps, _, _ in res.iter_decompose(x_src, x_tgt, batch_size):
        run = None
        for k, c in enumerate(comps):
            run = c if run is None else run + c
            sums[k].append(res.norm.target_to_raw(run, add_mean=True).cpu())
    return [torch.cat(s) for s in sums]


def refine(
    a: LoadedModel,
    b: LoadedModel,
    train_images: Any,
    test_images: Any,
    *,
    layer_a: str | None = None,
    layer_b: str | None = None,
    g: Any = None,
    orders: int = 2,
    lam: float | None = None,
    fit_epochs: int | None = None,
    convention: str = "paper",
    train: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    data: str = "",
    progress: Progress | None = None,
) -> RefinementResult:
    """Fine-tune upper layers on raw features (A, B) and on B-consistent components of A (Table 3).

    Args:
        a, b: networks trained for the same task (:func:`kcore.checkpoints.load_model`).
        train_images, test_images: Datasets of ``(image (3, H, W) in [0, 1], label)``; each model's card
            resizes and normalises them.
        layer_a, layer_b: layers (default: the cards' default layers).
        g: an already fitted :class:`kcore.FitResult` A → B on these layers (default: fitted here on the
            training images' features, without labels).
        orders, lam, fit_epochs: g_θ's K, λ and epochs (:func:`kcore.fit`; ``None`` = its defaults).
        convention: g_θ's normalisation, ``"paper"`` (default) or ``"authors"`` (:mod:`kcore.conventions`).
        train: the :class:`TrainConfig` of every arm.
        seed: seed of g_θ's fit.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        data: description of the images (for the result).
        progress: one line per step.

    Returns:
        A :class:`RefinementResult`.

    Raises:
        ValueError: bad layers, too few images, or a g whose shapes do not match.
    """
    import kcore

    t0 = time.perf_counter()
    la, lb = layer_of(a, layer_a, "layer_a"), layer_of(b, layer_b, "layer_b")
    say(progress, f"features: {a.name}:{la} and {b.name}:{lb} of {len(train_images)} train + "
                  f"{len(test_images)} test images")
    tr = pair_features(a, la, b, lb, train_images, device=device)
    te = pair_features(a, la, b, lb, test_images, device=device)
    if tr.labels is None or te.labels is None:
        raise ValueError("the images came without labels; refinement needs (image, label) pairs.")
    xa_tr, xb_tr, xa_te, xb_te = tr.x_a.float(), tr.x_b.float(), te.x_a.float(), te.x_b.float()
    if g is None:
        say(progress, f"fitting g_θ A → B (K={orders}) on {len(xa_tr)} training images' features, no labels")
        g = kcore.fit(xa_tr, xb_tr, orders=orders, lam=lam, epochs=fit_epochs, seed=seed, device=device,
                      convention=convention)
    frozen_before = {"A lower layers": state_fingerprint(a.model), "B lower layers": state_fingerprint(b.model),
                     "g_theta": state_fingerprint(g.model)}
    sums_tr = component_sums(g, xa_tr, xb_tr)
    sums_te = component_sums(g, xa_te, xb_te)
    fit_info = fit_summary(g, g.report(xa_te, xb_te))
    fit_info["reported_on"] = "test images"
    say(progress, f"g_θ: held-out 1−R² {g.heldout_error:.3f}, gates {tuple(round(p, 3) for p in g.gates)}")
    y_tr, y_te = tr.labels, te.labels
    sa, sb = input_shape(a), input_shape(b)
    arms: list[ArmResult] = []
    common = dict(config=train, device=device, progress=progress)
    arms.append(train_upper(a.model, la, sa, xa_tr, y_tr, xa_te, y_te, name="network A", features="raw x_A",
                            upper_layers=f"A's layers above {la}, from trained A", **common))
    arms.append(train_upper(b.model, lb, sb, xb_tr, y_tr, xb_te, y_te, name="network B", features="raw x_B",
                            upper_layers=f"B's layers above {lb}, from trained B", **common))
    for k in range(g.model.orders + 1):
        nm = "+".join(f"x({j})" for j in range(k + 1))
        arms.append(train_upper(b.model, lb, sb, sums_tr[k], y_tr, sums_te[k], y_te, name=nm,
                                features=f"{nm} of g(x_A) (A → B), raw B units",
                                upper_layers=f"B's layers above {lb}, from trained B", **common))
    frozen = {
        "A lower layers": unchanged(a.model, frozen_before["A lower layers"]),
        "B lower layers": unchanged(b.model, frozen_before["B lower layers"]),
        "g_theta": unchanged(g.model, frozen_before["g_theta"]),
        "classifier copies below the layer": all(arm.lower_unchanged for arm in arms),
    }
    return RefinementResult(
        a=model_info(a, la), b=model_info(b, lb), layer_a=la, layer_b=lb, orders=g.model.orders, fit=fit_info,
        arms=tuple(arms), frozen=frozen, train=train, n_train=len(xa_tr), n_test=len(xa_te), data=data, seed=seed,
        seconds=time.perf_counter() - t0,
    )


# -------------------------------------------------------------------------------------------------- CLI
SAMPLE_A = "sample_models/kshapes_resnet_s0.safetensors"
SAMPLE_B = "sample_models/kshapes_resnet_s1.safetensors"


def load_checkpoint(path: str, argument: str) -> LoadedModel:
    """Load a checkpoint given on the command line, with an error that names the option."""
    from kcore.checkpoints import load_model

    if not Path(path).is_file():
        raise ValueError(f"{argument} {path!r} does not exist. Fix: pass a checkpoint path (the sample models "
                         "are made by `python -m kcore.samples train --out sample_models`).")
    return load_model(path)


def add_training_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, lr_final: float, n_train: int,
                           convention: str) -> None:
    """Options of the classifier arms and of g_θ (shared by the diagnosis and refinement commands)."""
    p.add_argument("--data", default="kshapes", metavar="kshapes|DIR",
                   help="'kshapes' (embedded, default) or a folder DIR/{train,test}/<class>/*")
    p.add_argument("--n-train", type=int, default=n_train, metavar="N",
                   help=f"training images for g_theta and the classifiers (default {n_train})")
    p.add_argument("--n-test", type=int, default=500, metavar="N", help="test images (default 500)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="lambda of g_theta (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=15, metavar="E", help="epochs of g_theta (default 15)")
    p.add_argument("--convention", choices=["paper", "authors"], default=convention,
                   help=f"normalisation of g_theta's input and target (default {convention}; see kcore.conventions)")
    p.add_argument("--epochs", type=int, default=epochs, metavar="E", help=f"epochs of every classifier arm "
                   f"(default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate of the arms (default {lr:g}), "
                   f"falling log-linearly to --lr-final")
    p.add_argument("--lr-final", type=float, default=lr_final, help=f"last epoch's learning rate "
                   f"(default {lr_final:g})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of g_theta and of the arms' batch order")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace RUN_DIR if it exists")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="study folder to write")


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(epochs=args.epochs, lr=args.lr, lr_final=args.lr_final, batch_size=args.batch_size,
                       seed=args.seed)


def images_for(args: argparse.Namespace, model: LoadedModel) -> tuple[Any, Any]:
    """Train and test images at ``model``'s input size."""
    size = input_shape(model)[1]
    return (labelled_images(args.data, "train", args.n_train, size),
            labelled_images(args.data, "test", args.n_test, size))


def command_line() -> str:
    return " ".join(["kcore", *sys.argv[1:]])


def add_cli(sub: Any) -> None:
    """Register ``kcore refinement``."""
    p = sub.add_parser(
        "refinement", help="Sec. 4.3 / Table 3: fine-tune B's upper layers on A → B consistent components",
        description="Fit g_theta A -> B without labels and freeze it; fine-tune B's upper layers (from trained B) on "
        "x(0), x(0)+x(1), ..., and, as baselines, A's and B's upper layers on raw x_A and x_B (same optimiser, "
        "epochs and batch order for every arm). Writes accuracy.csv, fit_variances.csv, accuracy.png, "
        "result.json and provenance.json into RUN_DIR.")
    p.add_argument("--a", default=SAMPLE_A, metavar="CKPT", help=f"network A (default {SAMPLE_A})")
    p.add_argument("--b", default=SAMPLE_B, metavar="CKPT", help=f"network B (default {SAMPLE_B})")
    p.add_argument("--layer-a", default=None, help="layer of A (default: its card's default layer)")
    p.add_argument("--layer-b", default=None, help="layer of B (default: its card's default layer)")
    add_training_arguments(p, epochs=10, lr=1e-3, lr_final=1e-5, n_train=2000, convention="paper")
    p.set_defaults(handler=_cmd_refinement)


def _cmd_refinement(args: argparse.Namespace) -> int:
    from kcore._io import check_out_dir

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = stderr_progress("refinement")
    a, b = load_checkpoint(args.a, "--a"), load_checkpoint(args.b, "--b")
    train_images, test_images = images_for(args, b)
    res = refine(a, b, train_images, test_images, layer_a=args.layer_a, layer_b=args.layer_b, orders=args.orders,
                 lam=args.lam, fit_epochs=args.fit_epochs, convention=args.convention,
                 train=train_config_from(args), seed=args.seed,
                 device=args.device, data=args.data, progress=log)
    prov = {"command": command_line(), "source": source_revision(),
            "checkpoint_a": res.a, "checkpoint_b": res.b,
            "layers": {"A": res.layer_a, "B": res.layer_b}, "seed": args.seed, "data": args.data,
            "n_train": res.n_train, "n_test": res.n_test, "device": args.device,
            "threads": torch.get_num_threads()}
    out = write_study(args.out, "refinement", res.as_dict(), res.tables(), res.figures(), prov,
                      overwrite=args.overwrite)
    for arm in res.arms:
        print(f"{arm.name:28s} test accuracy {arm.test_accuracy:.4f} (before {arm.test_accuracy_before:.4f})")
    print(f"frozen parts unchanged: {res.frozen}")
    print(f"wrote {out}")
    return 0
