"""The study template and what the studies share.

A study module (``kcore/experiments/<study>.py``) supplies only its own arguments, its computation and its
report, and imports only this module and the core, never another study::

    def add_cli(sub):
        p = sub.add_parser("my-study", help=..., description=...)
        p.add_argument(...)                               # the study's own options
        add_fit_args(p)                                   # g_θ options shared by the studies (optional)
        study_command(p, "my_study", compute, report)     # --device --threads --overwrite --out, the handler

    def compute(args, say) -> StudyRun: ...               # load, run, return result + provenance
    def report(result) -> None: ...                       # the summary lines printed after writing

:func:`run_study` (the handler) checks the out folder before any work, sets and restores the torch
threads, adds the command line, the source revision and the versions to the provenance, writes the study
folder atomically (:func:`write_study`) and prints the summary.

Sections: progress and provenance; checkpoints and layers; images; g_θ fits; classifier arms on fixed
features; running a network from an intermediate layer; study folders; the command-line template.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kcore._io import atomic_folder, check_out_dir
from kcore.checkpoints import LoadedModel
from kcore.data import BUNDLED_DATA
from kcore.imagesets import Normalized, StudyData, Subset, labelled_images, study_data  # moved to the data layer
from kcore.conventions import CONVENTIONS
from kcore.devices import DEVICE_CHOICES
from kcore.provenance import json_default, versions
from kcore.training import OPTIMIZERS

Progress = Callable[[str], None]

__all__ = [  # what the studies use; labelled_images is re-exported from kcore.data
    "ArmResult", "FitSettings", "FromLayer", "Normalized", "Progress", "StudyData", "StudyFolder", "StudyRun",
    "Subset", "TrainConfig", "accuracy", "accuracy_figure", "add_fit_args", "add_training_arguments",
    "arms_table", "as_jsonable", "checkpoint_provenance", "command_line", "consistency_row", "display_image",
    "fit_consistency", "fit_settings_from", "fit_summary", "input_shape", "labelled_images", "layer_of",
    "load_checkpoint", "map_selection", "model_info", "model_summary", "pair_features", "read_study",
    "replaced_output", "run_study", "say", "single_features", "source_revision", "state_fingerprint",
    "stderr_progress", "study_command", "study_data", "train_config_from", "train_upper", "unchanged",
    "write_study", "zip_study",
]


# ------------------------------------------------------------------------------ progress and provenance
def say(progress: Progress | None, message: str) -> None:
    """Send one progress line, if anyone listens."""
    if progress is not None:
        progress(message)


def stderr_progress(prefix: str) -> Progress:
    """A progress callback printing ``[prefix  seconds] message`` lines to stderr."""
    t0 = time.perf_counter()

    def out(message: str) -> None:
        print(f"[{prefix} {time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    return out


def command_line() -> str:
    """The command that is running, as ``kcore <arguments>``."""
    return " ".join(["kcore", *sys.argv[1:]])


def source_revision() -> dict:
    """The git commit of the kcore checkout and whether its kcore/ files differ from it (empty outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kcore"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "kcore_modified": bool(dirty)}


def as_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: as_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    return obj


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter count and a hash of the weights (for provenance of models trained in memory)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": h.hexdigest()}


# -------------------------------------------------------------------------------- checkpoints and layers
def load_checkpoint(path: str, argument: str) -> LoadedModel:
    """Load a checkpoint given on the command line (:func:`kcore.checkpoints.load_model`), with an error that
    names the option."""
    from kcore.checkpoints import load_model

    if not Path(path).is_file():
        hint = (" The sample models are made by `python -m kcore.samples train --out sample_models`."
                if "sample_models" in str(path) else "")
        raise ValueError(f"{argument} {path!r} does not exist.{hint} Fix: pass an existing checkpoint.")
    return load_model(path)


def checkpoint_provenance(m: LoadedModel, path: str, layer: str) -> dict[str, Any]:
    """Name, path, hash, layer, architecture and accuracy of a loaded checkpoint."""
    card = m.card
    return {"name": m.name, "path": str(Path(path).resolve()), "sha256": m.sha256, "layer": layer,
            "architecture": card.architecture if card else None, "num_parameters": m.num_parameters,
            "card_test_accuracy": card.test_accuracy if card else None}


def model_info(m: LoadedModel, layer: str) -> dict:
    """Checkpoint provenance as :class:`kcore.pipeline.ModelInfo`: name, hash, architecture, layer, accuracy."""
    from kcore.pipeline import ModelInfo

    return dataclasses.asdict(ModelInfo.from_loaded(m, layer))


def input_shape(model: LoadedModel, default: int = 224) -> tuple[int, int, int]:
    """(3, H, W) of the model's input, from its card (else ``default`` square)."""
    if model.card is not None and model.card.input_size:
        return (3, int(model.card.input_size[0]), int(model.card.input_size[1]))
    return (3, default, default)


def layer_of(model: LoadedModel, layer: str | None, argument: str = "layer") -> str:
    """``layer``, or the card's default layer; a ValueError that names the fix when there is none."""
    from kcore.features import validate_layer

    if layer is None:
        layer = model.card.default_layer if model.card is not None else None
        if layer is None:
            raise ValueError(
                f"{argument} is required for {model.name!r}: its model card names no default_layer. "
                f"Fix: pass {argument} (see `kcore layers {model.name}`)."
            )
    validate_layer(model.model, layer)
    return layer


# ------------------------------------------------------------------------------------------------ images
def display_image(dataset: Dataset, i: int) -> np.ndarray:
    """Item ``i`` of a study dataset as an (H, W, 3) uint8 image (for figures)."""
    if hasattr(dataset, "raw"):
        return dataset.raw(i)
    x = dataset[i][0]
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0))).view(-1, 1, 1)
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0))).view(-1, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def pair_features(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, images: Dataset, *,
                  device: str | torch.device = "cpu", batch_size: int = 64):
    """A's and B's features at one layer each for [0, 1] ``images``, each model's card normalising them
    (a :class:`kcore.features.FeaturePair` with labels)."""
    from kcore.features import extract_features
    from kcore.pipeline import model_transform

    ta = model_transform(a.card)
    tb = ta if a is b else model_transform(b.card)
    return extract_features(a.model, layer_a, b.model, layer_b, images, batch_size=batch_size, device=device,
                            transform_a=ta, transform_b=tb)


def train_test_features(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, train_images: Dataset,
                        test_images: Dataset, *, device: str | torch.device = "cpu", needed_by: str = "the study"):
    """:func:`pair_features` of the training and of the test images: ``(train pair, test pair)``.

    Raises:
        ValueError: the images came without labels (``needed_by`` names what needs them).
    """
    tr = pair_features(a, layer_a, b, layer_b, train_images, device=device)
    te = pair_features(a, layer_a, b, layer_b, test_images, device=device)
    if tr.labels is None or te.labels is None:
        raise ValueError(f"the images came without labels; {needed_by} needs (image, label) pairs.")
    return tr, te


def train_test_images(args: argparse.Namespace, size: int) -> tuple[Dataset, Dataset]:
    """``--n-train`` training and ``--n-test`` test images of ``--data``, in [0, 1], at ``size`` px."""
    return (labelled_images(args.data, "train", args.n_train, size),
            labelled_images(args.data, "test", args.n_test, size))


def single_features(m: LoadedModel, layer: str, images: Dataset, *, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One model's features (N, C, H, W) at ``layer`` and the labels (N,) for ``images``."""
    fp = pair_features(m, layer, m, layer, images, device=device, batch_size=batch_size)
    if fp.labels is None:
        raise ValueError("images came without labels; the studies need (image, label) pairs.")
    return fp.x_a.float(), fp.labels


# ------------------------------------------------------------------------------------------- g_θ fits
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


def map_selection(res: Any, n_images: int) -> tuple[list[int], int]:
    """Held-out image positions (the first ``n_images``) and the x* channel with the largest Var(x^Δ)."""
    held = list(res.heldout_indices)[:n_images]
    per = res.heldout_report.per_channel.var_residual
    return held, int(np.argmax(per))


# ---------------------------------------------------------------------- classifier arms on fixed features
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


# ------------------------------------------------------------ a network from an intermediate layer
@contextmanager
def replaced_output(model: nn.Module, layer: str, value: dict[str, Tensor]) -> Iterator[None]:
    """Inside the block, ``layer``'s output is replaced by ``value["x"]`` (set before each forward).

    The hook is removed when the block ends, also after an error.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} not found in {type(model).__name__}; see kcore.features.list_layers(model).")

    def hook(_module, _inputs, _output):
        return value["x"]

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class FromLayer(nn.Module):
    """The part of a network above ``layer``, as a module that takes that layer's feature map.

    It runs the whole (copied) network on a constant dummy image and replaces ``layer``'s output with the
    given features through a forward hook, so it works for any architecture whose later layers only see
    ``layer`` through its output. Only the layers above ``layer`` affect the result (and get gradients).

    Args:
        model: the network (deep-copied; the original is not changed).
        layer: module name whose output the features replace.
        input_shape: (3, H, W) of the network's input.
    """

    def __init__(self, model: nn.Module, layer: str, input_shape: tuple[int, int, int]):
        super().__init__()
        self.net = copy.deepcopy(model)
        self.layer = layer
        self.input_shape = tuple(input_shape)
        self._value: dict[str, Tensor] = {}
        self._handle = None

    def forward(self, feats: Tensor) -> Tensor:
        self._value["x"] = feats
        dummy = feats.new_zeros((feats.shape[0], *self.input_shape))
        with replaced_output(self.net, self.layer, self._value):
            out = self.net(dummy)
        self._value.clear()
        return out

    def upper_parameters(self, example: Tensor) -> list[nn.Parameter]:
        """Parameters that receive a gradient from the output given features ``example`` (the upper layers)."""
        self.net.zero_grad(set_to_none=True)
        self(example.detach()).sum().backward()
        params = [p for p in self.net.parameters() if p.grad is not None]
        self.net.zero_grad(set_to_none=True)
        return params


def state_fingerprint(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (to prove later that nothing changed)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: Mapping[str, Tensor]) -> bool:
    """True when every parameter and buffer of ``module`` equals the fingerprint ``before`` exactly."""
    now = module.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


# ---------------------------------------------------------------------------------------- study folders
STUDY_FORMAT = "kcore-study/1"


STUDY_FILE_MAX_BYTES = 16 * 2**20
"""Largest JSON or CSV file of a study folder that :func:`read_study` reads (a study's tables take kilobytes)."""
STUDY_FIGURE_MAX_BYTES = 32 * 2**20
"""Largest figure (PNG) of a study folder that is shown."""
STUDY_ZIP_MAX_BYTES = 512 * 2**20
"""Largest sum of the files put into a study folder's zip for download (:func:`zip_study`)."""
STUDY_MAX_FILES = 2000
"""Most entries of a study folder's top level that :func:`read_study` lists."""


@dataclass(frozen=True)
class StudyFolder:
    """What a study folder holds once read back (:func:`read_study`).

    Attributes:
        path: the folder.
        study: the study's name (``result.json``'s ``study``).
        result: ``result.json``.
        tables: name → pandas DataFrame, one per ``<name>.csv``.
        figures: name → path of ``<name>.png`` (a regular file inside the folder; read it with :meth:`read_file`).
        provenance: ``provenance.json`` (empty when the folder has none).
        files: the regular files of the folder's top level (what :func:`zip_study` puts into the zip).
        skipped: file name → why it was left out (a symlink, FIFO, device, or a file above its size cap).
    """

    path: Path
    study: str
    result: dict
    tables: dict[str, Any]
    figures: dict[str, Path]
    provenance: dict = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)

    def read_file(self, name: str, max_bytes: int = STUDY_FIGURE_MAX_BYTES) -> bytes:
        """The bytes of the file ``name`` of the folder, read like an upload (regular file inside it, capped).

        Raises:
            ValueError: a symlink, FIFO, device, a file above ``max_bytes`` or outside the folder.
            FileNotFoundError: no such file.
        """
        from kcore import _readback as rb

        return rb.read_bytes(self.path, name, max_bytes)


def _study_entries(d: Path) -> tuple[list[Path], dict[str, str]]:
    """The regular files of a study folder's top level, and what was left out (name → why)."""
    from kcore.safe_files import scan_under

    files, skipped = [], {}
    for p, kind in scan_under(d, ".", max_files=STUDY_MAX_FILES, recursive=False):
        if kind == "file":
            files.append(p)
        else:
            skipped[p.name] = ("a symlink (never followed in a study folder)" if kind == "symlink"
                               else "not a regular file (a FIFO, device or socket)")
    return sorted(files), skipped


def read_study(path: str | os.PathLike) -> StudyFolder:
    """Re-open a study folder written by :func:`write_study`, reading it like an upload.

    Only regular files of the folder's top level are read (symlinks, FIFOs and devices are left out with a note in
    ``skipped``, never opened), each under a size cap (:data:`STUDY_FILE_MAX_BYTES` for JSON and CSV,
    :data:`STUDY_FIGURE_MAX_BYTES` for PNG; a larger table or figure is left out with a note); ``result.json`` must
    be an object whose ``study`` is a string, ``provenance.json`` an object.

    Args:
        path: the study folder.

    Returns:
        A :class:`StudyFolder`.

    Raises:
        ValueError: not a study folder, or ``result.json``/``provenance.json`` unsafe, too large, not JSON or of the
            wrong type (the message names the file and the field); a CSV that is not a table.
    """
    import io

    import pandas as pd

    from kcore import _readback as rb

    d = Path(path)
    if not os.path.lexists(d / "result.json"):
        raise ValueError(f"{str(d)!r} is not a kcore study folder (no result.json). Fix: pick a folder written by a `kcore <study>` command.")
    files, skipped = _study_entries(d)
    result = rb.read_json(d, "result.json", STUDY_FILE_MAX_BYTES)
    rb.check_fields(result, {"study": str | None, "format": str | None}, d, "result.json")
    prov = {}
    if os.path.lexists(d / "provenance.json"):
        prov = rb.read_json(d, "provenance.json", STUDY_FILE_MAX_BYTES)
        rb.check_fields(prov, dict, d, "provenance.json")
    tables, figures = {}, {}
    for p in files:
        cap = {".csv": STUDY_FILE_MAX_BYTES, ".png": STUDY_FIGURE_MAX_BYTES}.get(p.suffix)
        if cap is None:
            continue
        size = os.lstat(p).st_size
        if size > cap:
            skipped[p.name] = f"{size} bytes, above the limit of {cap} bytes for a {p.suffix[1:].upper()} file"
            continue
        if p.suffix == ".png":
            figures[p.stem] = p
            continue
        data = rb.read_bytes(d, p.name, cap)
        try:
            tables[p.stem] = pd.read_csv(io.BytesIO(data))
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
            raise rb.folder_error(d, p.name, f"is not a CSV table ({type(exc).__name__}: {str(exc)[:120]})") from None
    return StudyFolder(d, result.get("study") or "", result, tables, figures, prov, tuple(files), skipped)


def zip_study(folder: StudyFolder, max_bytes: int = STUDY_ZIP_MAX_BYTES) -> bytes:
    """A zip (in memory) of the regular files of a study folder's top level, each re-read like an upload.

    Args:
        folder: what :func:`read_study` returned (its ``files``; symlinks, FIFOs and devices are never among them).
        max_bytes: the largest sum of the files' sizes.

    Returns:
        The zip's bytes; entries are the files' names.

    Raises:
        ValueError: the files add up to more than ``max_bytes``, or one was swapped for a symlink, FIFO or device
            since the folder was read.
    """
    import io
    import zipfile

    from kcore import _readback as rb

    total = sum(os.lstat(p).st_size for p in folder.files)
    if total > max_bytes:
        raise ValueError(f"study folder {str(folder.path)!r}: its {len(folder.files)} files add up to {total} bytes, "
                         f"more than the limit of {max_bytes} bytes for a zip. Fix: download the files one by one, "
                         "or copy the folder on the server.")
    total = 0
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in folder.files:
            data = rb.read_bytes(folder.path, p.name, max(max_bytes - total, 0))
            total += len(data)
            zf.writestr(p.name, data)
    return buf.getvalue()


def write_study(
    out_dir: str | os.PathLike,
    study: str,
    result: dict,
    tables: Mapping[str, Any],
    figures: Mapping[str, Any],
    provenance: Mapping[str, Any],
    *,
    overwrite: bool = False,
    formats: tuple[str, ...] = ("png", "svg", "pdf"),
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a study folder atomically: ``result.json``, ``provenance.json``, ``<table>.csv``, ``<figure>.<fmt>``.

    Args:
        out_dir: the folder to create.
        study: the study's name (e.g. ``"stability"``).
        result: JSON-serialisable numbers of the study.
        tables: name → pandas DataFrame.
        figures: name → matplotlib Figure.
        provenance: checkpoints, layers, seeds, versions, command.
        overwrite: replace ``out_dir`` if it exists.
        formats: the file formats of every figure.
        extra: called with the folder being written, to add more files (e.g. a family of networks)
            before the folder is moved into place.
    """
    with atomic_folder(out_dir, overwrite=overwrite, kind="study") as tmp:
        (tmp / "result.json").write_text(json.dumps({"format": STUDY_FORMAT, "study": study, **result}, indent=1, default=json_default))
        prov = {"study": study, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **dict(provenance)}
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, default=json_default))
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        for name, fig in figures.items():
            for fmt in formats:
                fig.savefig(tmp / f"{name}.{fmt}", format=fmt, dpi=200, bbox_inches="tight", metadata=_fig_meta(fmt))
        if extra is not None:
            extra(tmp)
    return Path(out_dir)


def _fig_meta(fmt: str) -> dict | None:
    # fixed metadata keeps SVG/PDF bytes deterministic across runs
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return None


# ------------------------------------------------------------------------------- the command-line template
@dataclass(frozen=True, eq=False)
class StudyRun:
    """What a study's ``compute`` hands to :func:`run_study`.

    Attributes:
        result: the study's result (``as_dict()``, ``tables()``, ``figures()``).
        provenance: the study's own provenance (checkpoints, layers, seeds, data); the command line, the
            source revision, the versions, the device and the threads are added by :func:`run_study`.
        extra: writes more files into the study folder before it is moved into place (optional).
    """

    result: Any
    provenance: dict
    extra: Callable[[Path], None] | None = None


Compute = Callable[[argparse.Namespace, Progress], StudyRun]
Report = Callable[[Any], None]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Inside the block torch uses ``n`` threads (unchanged when ``n`` is None or 0); restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def add_output_arguments(p: argparse.ArgumentParser, *, metavar: str = "RUN_DIR",
                         help: str = "study folder to write (atomically)",
                         overwrite_help: str = "replace RUN_DIR if it exists") -> None:
    """``--threads``, ``--overwrite`` and ``--out``: the options of every command that writes a folder."""
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--out", required=True, metavar=metavar, help=help)


def study_command(p: argparse.ArgumentParser, study: str, compute: Compute, report: Report, *,
                  device: str = "auto") -> None:
    """Add the options every study shares (``--device --threads --overwrite --out``) and make
    :func:`run_study` with ``compute`` and ``report`` the handler of ``p``.

    Args:
        p: the study's subcommand parser, with its own options already added.
        study: the study's name in the study folder (e.g. ``"cross_task"``).
        compute: ``(args, progress) -> StudyRun``: the study's computation.
        report: ``(result) -> None``: prints the summary lines.
        device: the default of ``--device``.
    """
    from functools import partial

    p.add_argument("--device", default=device, choices=list(DEVICE_CHOICES),
                   help=f"where to run (default {device}; auto = CUDA when present)")
    add_output_arguments(p)
    p.set_defaults(handler=partial(run_study, study=study, compute=compute, report=report))


def run_study(args: argparse.Namespace, *, study: str, compute: Compute, report: Report) -> int:
    """Run one study from its parsed options: the handler that :func:`study_command` installs.

    Refuses an existing ``--out`` (without ``--overwrite``) before any work, runs ``compute`` on
    ``--threads`` torch threads (restored afterwards), writes the study folder atomically with the
    provenance completed, then prints ``report``'s summary and the folder written.

    Returns:
        0 (errors are raised).
    """
    from kcore import distributed as kd

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")
    # under torchrun every rank runs the study; studies that spread their fits read ``args.job`` (the others
    # compute everything on every rank); rank 0 alone writes the folder and prints the summary
    with kd.job(args.device) as ctx, torch_threads(args.threads):
        args.job = ctx
        if ctx.distributed:
            args.device = str(ctx.device)
        run = compute(args, stderr_progress(study.replace("_", "-")))
        prov = {"command": command_line(), "source": source_revision(), **run.provenance,
                "device": args.device, "threads": torch.get_num_threads(), "world_size": ctx.world_size,
                "hosts": kd.hosts(ctx)}
        res = run.result
        out = kd.main_first(lambda: write_study(args.out, study, res.as_dict(), res.tables(), res.figures(), prov,
                                                overwrite=args.overwrite, extra=run.extra), ctx)
        if not ctx.is_main:
            return 0
    report(res)
    print(f"wrote {out}")
    return 0


def add_fit_args(p: argparse.ArgumentParser, *, n_train: int, train_help: str) -> None:
    """The options of the images and of g_θ (compression, distillation, cross-task).

    Args:
        p: the study's parser.
        n_train: default of ``--n-train``.
        train_help: what the training images train, for the help (e.g. ``"of every generation"``).
    """
    add_data_argument(p)
    p.add_argument("--n-train", type=int, default=n_train, help=f"training images {train_help} (default {n_train})")
    p.add_argument("--n-test", type=int, default=500, help="test images for the accuracies (default 500)")
    p.add_argument("--n-images", type=int, default=300, metavar="N",
                   help="images whose features g_theta is fitted on (20%% held out for the numbers; default 300)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="highest order K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=0.1, metavar="L", help="lambda of Eq. 2 (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=10, metavar="E", help="epochs of each g_theta fit (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of training and fits (default 0)")


def add_recipe_args(p: argparse.ArgumentParser, *, epochs: int, nets: str) -> None:
    """``--arch --epochs --lr --optimizer --weight-decay --image-size --layer`` of networks trained by a study.

    Args:
        p: the study's parser.
        epochs: default of ``--epochs``.
        nets: which networks, for the help (e.g. ``"each net trained here"``).
    """
    p.add_argument("--arch", default="kc_resnet", help=f"architecture of {nets} (default kc_resnet)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"training epochs of {nets} (default {epochs})")
    p.add_argument("--lr", type=float, default=0.1, help=f"peak learning rate of {nets} (default 0.1)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help=f"optimiser of {nets} (default sgd; the sample models use adamw with --lr 0.003 "
                   "--weight-decay 0.0001)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default 0.0005)")
    p.add_argument("--image-size", type=int, default=32, help=f"image size of {nets} (default 32)")
    p.add_argument("--layer", default=None, help="layer to compare (default: the card's default_layer, or layer2)")


def fit_settings_from(args: argparse.Namespace) -> FitSettings:
    """The :class:`FitSettings` that the options of :func:`add_fit_args` describe."""
    return FitSettings(orders=args.orders, lam=args.lam, epochs=args.fit_epochs, seed=args.seed)


def add_data_argument(p: argparse.ArgumentParser, *, default: str = BUNDLED_DATA, help: str = "") -> None:
    """``--data``: the bundled kshapes images (``kshapes``; ``sample`` is a deprecated alias) or a folder."""
    p.add_argument("--data", default=default, metavar=f"{BUNDLED_DATA}|DIR",
                   help=help or f"'{BUNDLED_DATA}' (the bundled images, default) or a folder DIR with "
                   "DIR/train/<class>/* and DIR/test/<class>/* images")


def add_pair_arguments(p: argparse.ArgumentParser, names: tuple[str, str], defaults: tuple[str, str],
                       what: tuple[str, str]) -> None:
    """``--<name> CKPT`` and ``--layer-<name>`` for the two networks of a study (e.g. ``("a", "b")``)."""
    for name, default, desc in zip(names, defaults, what):
        p.add_argument(f"--{name}", default=default, metavar="CKPT", help=f"{desc} (default {default})")
    for name, desc in zip(names, what):
        p.add_argument(f"--layer-{name}", default=None, help=f"layer of {desc} (default: its card's default layer)")


def add_training_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, lr_final: float, n_train: int,
                           convention: str) -> None:
    """Options of the classifier arms and of g_θ (diagnosis and refinement)."""
    add_data_argument(p)
    p.add_argument("--n-train", type=int, default=n_train, metavar="N",
                   help=f"training images for g_theta and the classifiers (default {n_train})")
    p.add_argument("--n-test", type=int, default=500, metavar="N", help="test images (default 500)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="lambda of g_theta (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=15, metavar="E", help="epochs of g_theta (default 15)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default=convention,
                   help=f"normalisation of g_theta's input and target (default {convention}; see kcore.conventions)")
    p.add_argument("--epochs", type=int, default=epochs, metavar="E", help=f"epochs of every classifier arm "
                   f"(default {epochs})")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate of the arms (default {lr:g}), "
                   f"falling log-linearly to --lr-final")
    p.add_argument("--lr-final", type=float, default=lr_final, help=f"last epoch's learning rate "
                   f"(default {lr_final:g})")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of g_theta and of the arms' batch order")


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that the options of :func:`add_training_arguments` describe."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, lr_final=args.lr_final, batch_size=args.batch_size,
                       seed=args.seed)
