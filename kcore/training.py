"""Training and evaluating image classifiers: the generic loop the sample models and the studies share.

:func:`train_classifier` trains with cross-entropy, a linear warm-up over the first epoch and a cosine
decay to 0 per step, deterministically for a seed; :func:`evaluate` and :func:`predict` run in float64 on
a copy of the model, so accuracies do not depend on the batch size or the thread count.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kcore.zoo import SAMPLE_ARCHITECTURES

Optimizer = Literal["sgd", "adamw"]
OPTIMIZERS: dict[str, str] = {
    "sgd": "SGD, Nesterov momentum 0.9, weight decay on all parameters",
    "adamw": "AdamW, betas (0.9, 0.999), decoupled weight decay",
}
"""Valid optimizer names and what each means."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EpochLog:
    """Training statistics of one epoch (measured on the fly, in train mode)."""

    epoch: int
    loss: float
    accuracy: float
    seconds: float


@dataclass(frozen=True)
class TrainResult:
    """Output of ``train_classifier``.

    Attributes:
        model: the trained model, in eval mode.
        test_accuracy: accuracy on the test set (float64 evaluation), or NaN without one.
        train_seconds: wall time of the training loop (without the final evaluation).
        history: one ``EpochLog`` per epoch.
    """

    model: nn.Module
    test_accuracy: float
    train_seconds: float
    history: tuple[EpochLog, ...]


def _say(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


def _materialize(dataset: Dataset) -> TensorDataset:
    """All ``(x, y)`` pairs of ``dataset`` stacked in memory (rendered once, not every epoch)."""
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))  # type: ignore[arg-type]
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.long))


@torch.no_grad()
def _predict_and_labels(model: nn.Module, dataset: Dataset, batch_size: int,
                        dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    device = next(model.parameters()).device
    clone = copy.deepcopy(model).to(dtype=dtype).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    preds, labels = [], []
    for x, y in loader:
        preds.append(clone(x.to(device=device, dtype=dtype)).argmax(1).cpu())
        labels.append(torch.as_tensor(y))
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def predict(model: nn.Module, dataset: Dataset, *, batch_size: int = 250,
            dtype: torch.dtype = torch.float64) -> np.ndarray:
    """Predicted class of every item of ``dataset``, deterministically.

    The model is evaluated on a copy converted to ``dtype``: float64 makes predictions
    independent of the thread count and of the convolution kernels chosen, so an accuracy
    written to a model card is reproduced exactly on another machine. The caller's model is
    neither modified nor switched out of its mode.

    Args:
        model: a classifier ``(N, 3, H, W) -> (N, num_classes)``.
        dataset: yields ``(image (3, H, W), label)``.
        batch_size: images per forward pass.
        dtype: dtype of the evaluation.

    Returns:
        ``(N,)`` int64 predicted classes.
    """
    return _predict_and_labels(model, dataset, batch_size, dtype)[0]


def evaluate(model: nn.Module, dataset: Dataset, *, batch_size: int = 250,
             dtype: torch.dtype = torch.float64) -> float:
    """Accuracy of ``model`` on ``dataset`` (see ``predict`` for why float64).

    Raises:
        ValueError: the dataset is empty.
    """
    preds, labels = _predict_and_labels(model, dataset, batch_size, dtype)
    if len(labels) == 0:
        raise ValueError("dataset is empty: an accuracy needs at least one image; got 0. "
                         "Fix: pass a non-empty dataset (check the folder or the split's n).")
    return float((preds == labels).mean())


def _make_optimizer(model: nn.Module, optimizer: Optimizer, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    if optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                               weight_decay=weight_decay)
    if optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}. "
                     f"Fix: pass optimizer={sorted(OPTIMIZERS)[0]!r} or another listed name.")


def train_classifier(model: nn.Module | str, train_set: Dataset, test_set: Dataset | None = None,
                     *, epochs: int, seed: int, num_classes: int | None = None, lr: float = 0.1,
                     optimizer: Optimizer = "sgd", weight_decay: float = 5e-4,
                     batch_size: int = 64, cache: bool = True,
                     progress: Progress | None = None) -> TrainResult:
    """Train a classifier with cross-entropy, deterministically for a given seed.

    Schedule: linear warm-up over the first epoch, then cosine decay to 0 (per step).
    Determinism: ``torch.manual_seed(seed)`` before building the model, a seeded generator
    for the shuffling, ``num_workers=0``. Bit-identical weights additionally need the same
    torch build and thread count.

    Args:
        model: an ``nn.Module`` (trained in place) or a key of ``SAMPLE_ARCHITECTURES``
            (built after seeding, so the initialisation depends on ``seed``).
        train_set: yields ``(image (3, H, W) float32, label int)``.
        test_set: evaluated after training (float64, see ``evaluate``); optional.
        epochs: passes over ``train_set``.
        seed: seed of initialisation (for a named architecture) and data order.
        num_classes: classes of a named architecture; default ``len(train_set.class_names)``.
        lr: peak learning rate.
        optimizer: one of ``OPTIMIZERS``.
        weight_decay: weight decay.
        batch_size: images per step.
        cache: stack the whole training set into one float tensor first (memory
            ``N * 3 * H * W * 4`` bytes) instead of calling ``train_set[i]`` every epoch.
        progress: called with one line of text per epoch.

    Returns:
        A ``TrainResult`` with the model in eval mode.

    Raises:
        ValueError: unknown architecture or optimizer, bad epochs, or missing num_classes.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs}. Fix: pass epochs=1 or more.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}. "
                         f"Fix: pass optimizer={sorted(OPTIMIZERS)[0]!r} or another listed name.")
    torch.manual_seed(seed)
    if isinstance(model, str):
        if model not in SAMPLE_ARCHITECTURES:
            raise ValueError(f"model must be an nn.Module or one of {sorted(SAMPLE_ARCHITECTURES)}, "
                             f"got {model!r}. Fix: pass a listed name or build the module yourself.")
        if num_classes is None:
            names = getattr(train_set, "class_names", None)
            if names is None:
                raise ValueError("num_classes is required: train_set has no class_names attribute, so the "
                                 "classifier size cannot be inferred. Fix: pass num_classes=N.")
            num_classes = len(names)
        model = SAMPLE_ARCHITECTURES[model](num_classes)
    data = _materialize(train_set) if cache else train_set
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    opt = _make_optimizer(model, optimizer, lr, weight_decay)
    total = epochs * len(loader)
    warmup = max(1, len(loader))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    device = next(model.parameters()).device
    history = []
    start = time.perf_counter()
    model.train()
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        log = EpochLog(epoch, loss_sum / seen, correct / seen, time.perf_counter() - t0)
        history.append(log)
        _say(progress, f"epoch {epoch}/{epochs}: loss {log.loss:.4f}, train acc {log.accuracy:.3f}, "
                       f"{log.seconds:.1f} s")
    train_seconds = time.perf_counter() - start
    model.eval()
    accuracy = evaluate(model, test_set) if test_set is not None else float("nan")
    return TrainResult(model=model, test_accuracy=accuracy, train_seconds=train_seconds,
                       history=tuple(history))
