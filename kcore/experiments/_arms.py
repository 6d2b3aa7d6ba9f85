"""Classifier arms on fixed features: the upper layers of a network trained on given feature maps.

The diagnosis (Sec. 4.1) and refinement (Sec. 4.3) studies feed features (a network's own, g_θ's output,
x^Δ added back or removed) to the layers above one layer of a network and compare the accuracies. The
upper layers run through :class:`FromLayer` (the network above ``layer``, as a module taking that layer's
feature map); :func:`train_upper` trains them while the layers below stay exactly as they were.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from kcore.experiments._study import Progress, say


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

    The classifier is :class:`FromLayer` on a copy of ``net`` (``net`` itself is
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

    from kcore.viz.figure1 import GRID_IN
    from kcore.viz.style import TEXT_PT, TITLE_PT, tick_rotation

    names = list(dict.fromkeys(a.name for a in arms))
    groups = [[a for a in arms if a.name == n] for n in names]
    fig = Figure(figsize=(GRID_IN, 4.2), layout="constrained")  # room for a long title; readable at 1024 px
    ax = fig.add_subplot()
    xs = np.arange(len(names))
    after = [100 * float(np.mean([a.test_accuracy for a in g])) for g in groups]
    ax.bar(xs, after, color="#1f4e79", width=0.6, label="after training" + (" (mean over seeds)" if
           max(len(g) for g in groups) > 1 else ""))
    if before:
        prior = [100 * float(np.mean([a.test_accuracy_before for a in g])) for g in groups]
        ax.bar(xs, prior, width=0.6, fill=False, edgecolor="0.45", linestyle="--", label="before training")
    for x, g in zip(xs, groups):
        if len(g) > 1:
            ys = [100 * a.test_accuracy for a in g]
            ax.scatter([x] * len(ys), ys, s=10, color="#f2a541", zorder=3)
    for x, v, g in zip(xs, after, groups):
        top = max([v] + [100 * a.test_accuracy for a in g])
        ax.text(x, top + 0.6, f"{v:.1f}", ha="center", va="bottom", fontsize=TEXT_PT)
    slot_in = (fig.get_figwidth() - 1.0) / max(len(names), 1)  # the width of one bar's slot
    ax.set_xticks(xs, names, fontsize=TEXT_PT, rotation=tick_rotation(names, slot_in))
    ax.set_ylabel("test accuracy [%]", fontsize=TITLE_PT)
    ax.set_ylim(0.0, min(100.0, max(after) + 6) if after else 100.0)  # bars: their length is the value, from 0
    ax.set_title(title, fontsize=TITLE_PT)
    ax.legend(fontsize=TEXT_PT, loc="lower right")
    ax.tick_params(labelsize=TEXT_PT)
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


def train_config_from(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` that the options of :func:`add_training_arguments` describe."""
    return TrainConfig(epochs=args.epochs, lr=args.lr, lr_final=args.lr_final, batch_size=args.batch_size,
                       seed=args.seed)
