"""Fit g_θ on feature tensors with a held-out split (Sec. 3, Eq. 2) → a :class:`FitResult`.

Two presets ship: ``"fast"`` (the default; the paper's conventions with a closed-form start and a short
schedule) and ``"authors"`` (the authors' code and recipe, for comparison with the paper's numbers). Every
field of :class:`FitConfig` can be overridden by keyword.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from kcore._validate import check_informative, check_orders, check_pair
from kcore.conventions import Convention, Normalization, check_convention
from kcore import distributed as kd
from kcore.decompose import Decomposition, Method, components
from kcore.devices import resolve_device
from kcore.gtheta import Gate, GTheta, GThetaSpec, gtheta_loss
from kcore.provenance import json_default
from kcore.streaming import Rows, batch_slices, gram_cka, merge_accumulator, merge_moments
from kcore.metrics import (
    Baseline,
    ChannelMoments,
    LinearMap,
    VarianceAccumulator,
    VarianceReport,
    fit_linear_map,
    linear_baseline,
)

Schedule = Literal["cosine", "loglinear"]
EVAL_BATCH_SIZE = 256
EVAL_BATCH_ELEMENTS = 2**23
"""Evaluation passes (monitor, calibration, held-out, decomposition) take at most ``EVAL_BATCH_SIZE`` images and
at most this many values per map in one batch (32 MiB in float32): 256 images at 64×14×14, 20 at 512×28×28."""


def eval_batch_size(shape: Any) -> int:
    """Images per evaluation batch for maps of ``shape`` ((N, C, H, W) or (C, H, W)): bounded in images and values."""
    per_image = math.prod(int(v) for v in tuple(shape)[-3:])
    return max(1, min(EVAL_BATCH_SIZE, EVAL_BATCH_ELEMENTS // max(per_image, 1)))
"""Images per batch of the passes without gradients (monitor error, calibration, held-out evaluation, predict,
decompose): bounds their working memory; any value gives the same numbers."""
Init = Literal["torch", "lstsq"]
Precision = Literal["float32", "auto"]


@dataclass(frozen=True)
class FitConfig:
    """Everything that defines a fit of g_θ.

    Attributes:
        orders: K (K+1 blocks).
        kernel_size: odd kernel of every W^(k).
        convention: ``"paper"`` or ``"authors"`` (:mod:`kcore.conventions`).
        gate: ``"linear"`` (raw p, Eq. 2) or ``"sigmoid"`` (p = sigmoid(p_pre), the authors' code).
        p_init: initial p^(k).
        lam: λ of Eq. 2 (against a per-element mean squared error).
        lr, lr_final: Adam learning rate, decayed to ``lr_final`` by ``schedule``.
        lr_w0_scale: W^(0)'s learning rate relative to the others'. With the least-squares start W^(0) already
            sits at the best linear map; Adam's first steps move every weight by about ``lr`` whatever its
            gradient, so a full rate first throws that start away and spends steps recovering it.
        schedule: ``"cosine"`` (per step) or ``"loglinear"`` (per epoch, the authors' ``logspace``).
        warmup: share of the scheduled steps (cosine schedule) over which the learning rate ramps up linearly
            from ``lr_final`` to ``lr``. Adam's first steps move every weight by about ``lr`` whatever its
            gradient, which throws the least-squares start away.
        warmup_steps: the warm-up lasts at least this many steps (at most half the schedule), however short the
            schedule: on wide maps Adam's first full-rate steps blow W^(1)…W^(K) up (their weights are of size
            about 1/sqrt(9·C_a), the steps about ``lr`` each; at 1024 channels the monitor error went from 0.198
            to 1.07 in one step while W^(0) moved 2 %), and that cost does not shrink with the plan.
        weight_decay: Adam's L2 weight decay.
        epochs: maximum number of epochs.
        batch_size: images per step.
        init: ``"lstsq"`` starts W^(0) at the closed-form least-squares map; ``"torch"`` uses PyTorch's
            default conv init only (what the authors' code effectively does).
        val_fraction: share of images held out (never used for training or early stopping).
        monitor_fraction: share of the training images set aside to pick the best epoch (early stopping).
        patience: stop after this many epochs without a better monitor error; ``None`` = never.
        min_delta: a monitor error counts as better when it is below the best one by more than this
            share of it.
        min_steps: at least this many optimiser steps: on small training sets ``epochs`` and ``patience``
            are scaled up by the same factor so that the fit still converges.
        max_steps: when set, the length of the schedule in optimiser steps, whatever the number of images
            (the learning-rate schedule spans these steps; ``epochs`` and ``min_steps`` are then not used).
        flops_budget: with ``max_steps``, fewer steps where steps are expensive: on the CPU the schedule spans
            ``min(max_steps, flops_budget / FLOPs of one training step)`` steps, at least ``MIN_PLANNED_STEPS``
            (deterministic: it depends on the shapes and the device type, never on the clock); on a GPU
            ``max_steps`` alone.
        small_batch: with ``flops_budget``: where the budget binds (on the CPU, fewer than ``max_steps`` steps
            of ``batch_size`` images), the fit spends the same FLOPs in ``batch_size // small_batch`` times as
            many steps of ``small_batch`` images; ``patience_steps`` and ``eval_every`` grow by the same factor,
            so the monitor is measured after as many images as before (:func:`small_batch_config`). Passing
            ``batch_size`` to :func:`make_config` clears it. ``None`` = always ``batch_size``.
        patience_steps: when set, stop after this many optimiser steps without a better monitor error
            (instead of ``patience`` epochs).
        eval_every: the monitor error is measured at the end of every epoch and, when set, every this many
            steps within long epochs (each measurement is one entry of the history).
        budget: wall-time budget in seconds for the whole fit; training stops early enough to finish within it
            and keeps the best weights so far. ``None`` = no budget.
        seed: seeds the split, the initialisation and the batch order.
        train_precision: ``"float32"``, or ``"auto"``: the training steps' forward pass runs under bfloat16
            autocast on a CPU with native bfloat16 arithmetic (``avx512_bf16`` or ``amx_bf16``) when a step is
            large enough to gain from it (at least :data:`BF16_MIN_STEP_FLOPS`), else in float32. Weights,
            gradients, Adam, the loss, the least-squares start, the monitor and held-out errors, the
            calibration and every decomposition stay float32; ``FitResult.extra["train_precision"]`` says
            what ran.

    With a monitor split, the starting weights (the least-squares start with ``init="lstsq"``) are a candidate
    too, measured before the first step ("epoch 0"): a fit never keeps weights worse on the monitor split
    than its start.

    Examples::

        cfg = kcore.FitConfig(orders=2, lam=0.1)                     # or the preset's: kcore.PRESETS["fast"]
        res = kcore.fit(x_src, x_tgt, orders=cfg.orders, lam=cfg.lam)
        res.config                                                     # the FitConfig that ran
    """

    orders: int = 2
    kernel_size: int = 3
    convention: Convention = "paper"
    gate: Gate = "linear"
    p_init: float = 0.1
    lam: float = 0.1
    lr: float = 3e-3
    lr_final: float = 3e-5
    lr_w0_scale: float = 1.0
    schedule: Schedule = "cosine"
    warmup: float = 0.05
    warmup_steps: int = 0
    weight_decay: float = 0.0
    epochs: int = 40
    batch_size: int = 64
    init: Init = "lstsq"
    val_fraction: float = 0.2
    monitor_fraction: float = 0.1
    patience: int | None = 8
    min_delta: float = 1e-6
    min_steps: int = 800
    max_steps: int | None = None
    flops_budget: float | None = None
    small_batch: int | None = None
    patience_steps: int | None = None
    eval_every: int | None = None
    budget: float | None = None
    seed: int = 0
    train_precision: Precision = "float32"

    def __post_init__(self) -> None:
        check_orders(self.orders)
        check_convention(self.convention)
        if self.schedule not in ("cosine", "loglinear"):
            raise ValueError(f"schedule must be 'cosine' or 'loglinear'; got {self.schedule!r}.")
        if self.init not in ("torch", "lstsq"):
            raise ValueError(f"init must be 'torch' or 'lstsq'; got {self.init!r}.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1); got {self.val_fraction}. Fix: use 0.2.")
        if not 0.0 <= self.monitor_fraction < 1.0:
            raise ValueError(f"monitor_fraction must lie in [0, 1); got {self.monitor_fraction}.")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}.")
        if self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError(f"lam (λ) must be a finite number >= 0; got {self.lam}.")
        if not (0.0 < self.lr_w0_scale <= 1.0):
            raise ValueError(f"lr_w0_scale must lie in (0, 1]; got {self.lr_w0_scale}.")
        if not (self.lr > 0 and self.lr_final > 0):
            raise ValueError(f"lr and lr_final must be > 0; got lr={self.lr}, lr_final={self.lr_final}.")
        if self.min_steps < 0:
            raise ValueError(f"min_steps must be >= 0; got {self.min_steps}.")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must lie in [0, 1) (a share of the steps); got {self.warmup}.")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}.")
        if not 0.0 <= self.min_delta < 1.0:
            raise ValueError(f"min_delta must lie in [0, 1) (a relative improvement); got {self.min_delta}.")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None; got {self.patience}.")
        for name in ("max_steps", "patience_steps", "eval_every", "small_batch"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer or None; got {v!r}.")
        if self.train_precision not in ("float32", "auto"):
            raise ValueError(f"train_precision must be 'float32' or 'auto'; got {self.train_precision!r}.")
        if self.flops_budget is not None and not self.flops_budget > 0:
            raise ValueError(f"flops_budget must be > 0 or None; got {self.flops_budget}.")
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and self.budget > 0
                                            and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number of seconds or None; got {self.budget!r}. "
                             "Fix: e.g. budget=60.")


#: Named recipes. "authors" is the authors' Training_TransNet.py recipe (see the README for the differences).
PRESETS: dict[str, FitConfig] = {
    # A fixed number of optimiser steps whatever the number of images (the step, not the epoch, is what
    # converges), measured on the monitor split every 10 steps, from the least-squares start with W^(0) at a
    # tenth of the rate (see lr_w0_scale); the start itself is a candidate. bench/ and the README's Performance
    # section give the measurements behind these numbers.
    # 800 steps where they are cheap (the sample models: seconds), fewer where they are not: a whole schedule of
    # at most 2.6e13 training FLOPs (195 float32 steps at resnet18 layer3, 256×14×14). Large steps run their
    # forward pass in bfloat16 where the CPU does that natively (train_precision="auto"); such a step counts
    # half (BF16_STEP_COST), so 390 bfloat16 steps at 256×14×14 (about 40 s of steps on an idle 2-core AMX Xeon).
    # The budget binds on the CPU only: on a GPU the schedule is 800 steps at every size.
    # The warm-up lasts 5 % of the steps but at least 30 (40 of the 800; 30 of 390 or of the floor of 60).
    # Where the budget binds, its FLOPs go into 4x as many steps of 16 images (small_batch): at the same cost
    # that fit better at 256, 512 and 1024 channels (README, Real sizes).
    "fast": FitConfig(max_steps=800, flops_budget=2.6e13, patience_steps=60, eval_every=10, lr_w0_scale=0.1,
                      min_steps=0, train_precision="auto", warmup_steps=30, small_batch=16),
    "authors": FitConfig(
        orders=2, kernel_size=3, convention="authors", gate="sigmoid", p_init=0.5, lam=0.1, lr=1e-4,
        lr_final=1e-6, schedule="loglinear", warmup=0.0, weight_decay=1e-4, epochs=1000, batch_size=64, init="torch",
        monitor_fraction=0.0, patience=None, min_steps=0,
    ),
}


def make_config(preset: str = "fast", **overrides: Any) -> FitConfig:
    """A preset with some fields replaced; unknown names raise a ValueError that lists the valid ones.

    ``None`` values keep the preset's. Passing ``epochs`` (without ``max_steps``) also sets ``max_steps=None``,
    ``min_steps=0``, ``eval_every=None`` and ``warmup_steps=0`` (unless given), so that an explicit number of
    epochs is what runs, with the share of warm-up the studies were measured with; passing ``batch_size``
    clears ``small_batch`` (unless given);
    passing ``patience`` (epochs, ``None`` = never stop early) clears ``patience_steps``.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {preset!r}.")
    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown fit option(s) {unknown}; valid options are {sorted(names)}.")
    given = {k: v for k, v in overrides.items() if v is not None}
    if "max_steps" in given and "flops_budget" not in given:  # an explicit number of steps is taken literally
        given["flops_budget"] = None
    if "epochs" in given and "max_steps" not in given:  # an explicit number of epochs is taken literally
        given.setdefault("min_steps", 0)
        given["max_steps"] = None
        given.setdefault("eval_every", None)
        given.setdefault("warmup_steps", 0)
    if "batch_size" in given and "small_batch" not in given:  # an explicit batch is the batch every step uses
        given["small_batch"] = None
    if "patience" in overrides and "patience_steps" not in given:  # patience in epochs as asked (None: never stop)
        given["patience"] = overrides["patience"]
        given["patience_steps"] = None
    return dataclasses.replace(PRESETS[preset], **given)


@dataclass(frozen=True)
class FitProgress:
    """What a progress callback receives (after every monitor measurement, and at phase changes).

    ``epoch``/``epochs`` count monitor measurements (one per epoch unless ``eval_every`` splits epochs);
    ``step``/``steps`` are optimiser steps done and planned; ``eta`` is the estimated time left in training
    (seconds; early stopping may end it sooner).
    """

    phase: str  # "init", "train", "calibrate", "evaluate", "done"
    epoch: int
    epochs: int
    train_loss: float = float("nan")
    monitor_error: float = float("nan")
    lr: float = float("nan")
    gates: tuple[float, ...] = ()
    elapsed: float = 0.0
    step: int = 0
    steps: int = 0
    eta: float = float("nan")

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (by optimiser steps while training)."""
        if self.phase == "train" and self.steps > 0:
            return min(1.0, self.step / self.steps)
        return {"init": 0.0, "done": 1.0}.get(self.phase, min(1.0, self.epoch / max(self.epochs, 1)))


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of the loss history.

    ``monitor_error`` is the relative error Σ(x* − g(x))² / Σ(x* − channel mean)² on the monitor split after
    the epoch; without a monitor split (the authors' recipe, tiny data sets) it is the training split's, from
    the epoch's running squared error (weights change during the epoch), which costs no extra pass.
    """

    epoch: int
    train_loss: float
    train_mse: float
    monitor_error: float
    lr: float
    gates: tuple[float, ...]
    seconds: float
    step: int = 0


class FitCancelled(RuntimeError):
    """Raised by :func:`fit` when its ``cancel`` callback asked it to stop.

    Examples::

        stop = threading.Event()
        try:
            kcore.fit(x_src, x_tgt, cancel=stop)                      # stop.set() from another thread
        except kcore.FitCancelled:
            ...
    """


@dataclass(frozen=True)
class FitResult:
    """A fitted g_θ with everything needed to reuse, judge and reproduce it.

    Attributes:
        model: the fitted :class:`GTheta` (CPU, eval mode).
        norm: the :class:`Normalization` (conventions and stored statistics).
        config: the :class:`FitConfig` used.
        history: one :class:`EpochRecord` per epoch run.
        best_epoch: the epoch whose weights were kept (early stopping on the monitor split).
        heldout_error: relative squared error Σ(x* − g(x))² / Σ(x* − channel mean)² on held-out images (= 1 − R²).
        heldout_report: the :class:`~kcore.metrics.VarianceReport` on held-out images.
        baseline: the 0-order baseline (least-squares R², linear CKA) on the same held-out images.
        train_indices, heldout_indices: the split (image indices into the fit's inputs).
        device: where it was fitted; seconds: wall time of the fit.

    Examples::

        res = kcore.fit(x_src, x_tgt)
        res.gates, res.heldout_error, res.heldout_report.share_residual
        dec = res.decompose(x_src[:8], x_tgt[:8])
    """

    model: GTheta
    norm: Normalization
    config: FitConfig
    history: tuple[EpochRecord, ...]
    best_epoch: int
    heldout_error: float
    heldout_report: VarianceReport
    baseline: Baseline
    train_indices: tuple[int, ...]
    heldout_indices: tuple[int, ...]
    device: str = "cpu"
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gates(self) -> tuple[float, ...]:
        """Fitted (p^(1), …, p^(K))."""
        return tuple(float(v) for v in self.model.gates().detach())

    def _check(self, x_src: Tensor, x_tgt: Tensor | None) -> None:
        spec = self.model.spec
        if x_src.shape[1] != spec.in_channels:
            raise ValueError(
                f"x_src has {x_src.shape[1]} channels, but this g_θ was fitted on {spec.in_channels}. "
                "Fix: use features of the same layer of network A as in the fit."
            )
        if x_tgt is not None:
            if x_tgt.shape[1] != spec.out_channels or tuple(x_tgt.shape[-2:]) != self.norm.target_size:
                raise ValueError(
                    f"x_tgt has shape (C, H, W) = {tuple(x_tgt.shape[1:])}, but this g_θ was fitted on "
                    f"({spec.out_channels}, {self.norm.target_size[0]}, {self.norm.target_size[1]}). "
                    "Fix: use features of the same layer of network B as in the fit."
                )

    def predict(self, x_src: Tensor, batch_size: int | None = None) -> Tensor:
        """g(x) in the fit's target units for raw source features (N, C_a, H_a, W_a) -> (N, C_b, H, W)."""
        from kcore._validate import check_feature_map

        check_feature_map("x_src", x_src)
        self._check(x_src, None)
        batch_size = batch_size or eval_batch_size(x_src.shape)
        dev = _model_device(self.model)
        with torch.no_grad():
            return torch.cat(
                [self.model(self.norm.source(x_src[i : i + batch_size].to(dev))).cpu() for i in range(0, len(x_src), batch_size)]
            )

    def iter_decompose(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None, method: Method = "batched"):
        """Yield (components, residual, target) batch by batch (memory bounded by ``batch_size``; default
        :func:`eval_batch_size`)."""
        x_src, x_tgt = check_pair(x_src, x_tgt)
        self._check(x_src, x_tgt)
        batch_size = batch_size or max(1, min(eval_batch_size(x_src.shape), eval_batch_size(x_tgt.shape)))
        dev = _model_device(self.model)
        dtype = next(self.model.parameters()).dtype
        for i in range(0, x_src.shape[0], batch_size):
            xs = self.norm.source(x_src[i : i + batch_size].to(dev, dtype))
            xt = self.norm.target(x_tgt[i : i + batch_size].to(dev, dtype))
            comps = components(self.model, xs, method)
            resid = xt - torch.stack(comps).sum(0)
            yield comps, resid, xt

    def decompose(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None, method: Method = "batched") -> Decomposition:
        """Split x* into x^(0) … x^(K) and x^Δ (Eq. 3–4) for raw features of the same images.

        Args:
            x_src: (N, C_a, H_a, W_a) features of network A.
            x_tgt: (N, C_b, H, W) features of network B.
            batch_size: images per batch (bounds the working memory; default :func:`eval_batch_size`).
            method: ``"batched"`` (default) or ``"branchwise"`` (reference).

        Returns:
            A :class:`Decomposition` (tensors on the CPU, in the fit's target units).
        """
        parts: list[list[Tensor]] = [[] for _ in range(self.model.orders + 1)]
        res, tgt = [], []
        for comps, resid, xt in self.iter_decompose(x_src, x_tgt, batch_size, method):
            for k, c in enumerate(comps):
                parts[k].append(c.cpu())
            res.append(resid.cpu())
            tgt.append(xt.cpu())
        return Decomposition([torch.cat(p) for p in parts], torch.cat(res), torch.cat(tgt), self.norm.convention)

    def report(self, x_src: Tensor, x_tgt: Tensor, batch_size: int | None = None) -> VarianceReport:
        """The :class:`~kcore.metrics.VarianceReport` for these images in one streaming pass, without keeping the components."""
        acc = VarianceAccumulator(self.model.orders, self.model.spec.out_channels)
        for comps, resid, xt in self.iter_decompose(x_src, x_tgt, batch_size):
            acc.update(comps, resid, xt)
        return acc.report()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``g.safetensors`` (weights, Σ statistics, normalisation) and ``fit.json`` into ``directory``."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {f"g.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tensors.update({f"norm.{k}": v.contiguous() for k, v in self.norm.state().items()})
        save_file(tensors, str(out / "g.safetensors"))
        meta = {
            "format": "kcore-fit/1",
            "spec": dataclasses.asdict(self.model.spec),
            "config": dataclasses.asdict(self.config),
            "target_size": list(self.norm.target_size),
            "history": [dataclasses.asdict(r) for r in self.history],
            "best_epoch": self.best_epoch,
            "heldout_error": self.heldout_error,
            "heldout_report": self.heldout_report.as_dict(),
            "baseline": self.baseline.as_dict(),
            "train_indices": list(self.train_indices),
            "heldout_indices": list(self.heldout_indices),
            "device": self.device,
            "seconds": self.seconds,
            "extra": self.extra,
        }
        (out / "fit.json").write_text(json.dumps(meta, indent=1, default=json_default))
        return out

    @staticmethod
    def load(directory: str | Path, *, root: str | Path | None = None) -> "FitResult":
        """Read a result written by :meth:`save` (weights-only: safetensors + JSON), checked field by field.

        Both files are read like uploads (:mod:`kcore._readback`): regular files inside the folder, no symlink
        followed, under a size cap; every field of ``fit.json`` has the type it was written with, its lengths
        agree with K and the channels, the headline numbers and every tensor are finite.

        Args:
            directory: the folder written by :meth:`save`; relative to ``root`` when ``root`` is given.
            root: the folder the result lies in (e.g. a run folder): then no symlink below ``root`` is followed,
                ``directory`` included. Default: ``directory`` itself.

        Returns:
            The :class:`FitResult`.

        Raises:
            ValueError: a file is missing, unsafe (symlink, FIFO, device), too large, truncated, edited or
                inconsistent with the other; the message names the file and the field.

        Examples::

            res = kcore.load_result("runs/g")               # the folder written by res.save("runs/g")
            dec = res.decompose(x_src, x_tgt)
        """
        from kcore import _readback as rb

        top = Path(root) if root is not None else Path(directory)
        sub = Path(directory) if root is not None else Path()
        names = {n: str(sub / n) for n in ("fit.json", "g.safetensors")}
        try:
            meta = rb.read_json(top, names["fit.json"])
            tensors = rb.read_safetensors(top, names["g.safetensors"])
        except FileNotFoundError:
            missing = [n for n in names.values() if not (top / n).is_file()] or list(names.values())
            raise ValueError(f"directory {str(top / sub)!r} holds no {missing[0]}: expected a folder written by "
                             "FitResult.save().") from None
        spec, meta = _checked_fit_json(meta, tensors, top, names)
        try:
            return FitResult._from_parts(top / sub, meta, spec, tensors)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise rb.folder_error(top, names["fit.json"], f"is inconsistent ({type(exc).__name__}: "
                                                          f"{str(exc)[:200]})") from None

    @staticmethod
    def _from_parts(d: Path, meta: dict, spec: GThetaSpec, tensors: dict) -> "FitResult":
        model = GTheta(spec)
        model.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("g.")})
        model.eval()
        nt = {k[5:]: v for k, v in tensors.items() if k.startswith("norm.")}
        norm = Normalization(spec.convention, tuple(meta["target_size"]), **nt)
        return FitResult(
            model=model,
            norm=norm,
            # fits saved before these options existed ran without warm-up and with the 1e-6 improvement threshold
            config=FitConfig(**{"warmup": 0.0, "min_delta": 1e-6, **meta["config"]}),
            history=tuple(EpochRecord(**{**r, "gates": tuple(r["gates"])}) for r in meta["history"]),
            best_epoch=meta["best_epoch"],
            heldout_error=meta["heldout_error"],
            heldout_report=VarianceReport.from_dict(meta["heldout_report"]),
            baseline=Baseline(**meta["baseline"]),
            train_indices=tuple(meta["train_indices"]),
            heldout_indices=tuple(meta["heldout_indices"]),
            device=meta["device"],
            seconds=meta["seconds"],
            extra=meta.get("extra", {}),
        )



FIT_JSON_FIELDS: dict[str, Any] = {
    "format": Literal["kcore-fit/1"], "spec": GThetaSpec, "config": FitConfig, "target_size": tuple[int, int],
    "history": tuple[EpochRecord, ...], "best_epoch": int, "heldout_error": float, "heldout_report": VarianceReport,
    "baseline": Baseline, "train_indices": tuple[int, ...], "heldout_indices": tuple[int, ...], "device": str,
    "seconds": float, "extra": dict | None,
}
"""The fields of ``fit.json`` and the types :meth:`FitResult.save` writes them with."""


def check_report_lengths(rep: dict, orders: int, channels: int, folder: Path, name: str, where: str) -> None:
    """Check that a variance report read from JSON has K+1 orders and ``channels`` channels everywhere.

    Raises:
        ValueError: a list of another length; the message names the file and the field.
    """
    from kcore import _readback as rb

    k1 = orders + 1
    why_k, why_c = f"K+1 = {k1} orders", f"{channels} channels of the target"
    if rep.get("orders") != orders:
        raise rb.folder_error(folder, name, f"has field '{where}.orders' = {rep.get('orders')!r}; expected "
                                            f"{orders} (the spec's K)")
    for key in ("var_orders", "var_orders_channel_centred", "share_orders"):
        rb.check_length(rep.get(key), k1, folder, name, f"{where}.{key}", why_k)
    pc = rep["per_channel"]
    for key in ("var_orders", "share_orders"):
        rb.check_length(pc.get(key), k1, folder, name, f"{where}.per_channel.{key}", why_k)
        for i, row in enumerate(pc.get(key) or ()):
            rb.check_length(row, channels, folder, name, f"{where}.per_channel.{key}[{i}]", why_c)
    for key in ("var_residual", "var_target", "share_residual"):
        rb.check_length(pc.get(key), channels, folder, name, f"{where}.per_channel.{key}", why_c)
    ci = rep.get("ci")
    if ci:
        rb.check_length(ci["share_orders"], k1, folder, name, f"{where}.ci.share_orders", why_k)
        cso = ci.get("channel_share_orders")
        rb.check_length(cso, k1, folder, name, f"{where}.ci.channel_share_orders", why_k)
        for i, row in enumerate(cso or ()):
            rb.check_length(row, channels, folder, name, f"{where}.ci.channel_share_orders[{i}]", why_c)
        for key in ("channel_share_residual", "channel_instability"):
            rb.check_length(ci.get(key), channels, folder, name, f"{where}.ci.{key}", why_c)
    rb.check_finite({f"{where}.{k}": rep.get(k) for k in (
        "instability", "var_orders", "var_output", "var_residual", "var_target", "mse", "share_orders",
        "share_residual")}, folder, name)


def _checked_fit_json(meta: Any, tensors: dict, folder: Path, names: dict[str, str]) -> tuple[GThetaSpec, dict]:
    """``fit.json`` checked field by field and against ``g.safetensors``: the spec and the JSON, or a ValueError."""
    from kcore import _readback as rb

    name = names["fit.json"]
    rb.check_fields(meta, FIT_JSON_FIELDS, folder, name)
    try:
        spec = GThetaSpec(**meta["spec"])
    except (TypeError, ValueError) as exc:
        raise rb.folder_error(folder, name, f"has an invalid field 'spec' ({str(exc)[:200]})") from None
    sizes = {k: meta["spec"][k] for k in ("in_channels", "out_channels", "kernel_size")}
    if max(sizes.values()) > 1 << 16 or spec.orders > 64:  # the spec must not build a model of terabytes
        raise rb.folder_error(folder, name, f"has field 'spec' with sizes {sizes} and K={spec.orders}, far beyond "
                                            "any network's (at most 65536 channels, K ≤ 64)")
    with torch.device("meta"):  # shapes only: an edited spec must not allocate anything
        expected = {k: tuple(v.shape) for k, v in GTheta(spec).state_dict().items()}
    got = {k[2:]: tuple(v.shape) for k, v in tensors.items() if k.startswith("g.")}
    if got != expected:
        diff = sorted(set(got.items()) ^ set(expected.items()))[:3]
        raise rb.folder_error(folder, name, f"has a spec that does not match the weights in g.safetensors: {diff}")
    norm = {"src_mean": spec.in_channels, "src_std": spec.in_channels, "tgt_mean": spec.out_channels,
            "tgt_std": spec.out_channels}
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} of dtype {t.dtype}; expected "
                                                                  "floating point")
        if key.startswith("norm.") and tuple(t.shape) != (norm.get(key[5:], -1),):
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} of shape {tuple(t.shape)}; "
                                                                  f"expected ({norm.get(key[5:], 'no such key')},)")
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {bad} NaN/Inf value(s) in {key!r}; "
                                                                  "expected finite weights and statistics")
        # the maps are divided by these: a std of 0 or a negative variance would give NaN/Inf components
        rule = {"norm.src_std": "> 0", "norm.tgt_std": "> 0", "g.running_var": ">= 0"}.get(key)
        if rule is not None and bool((t <= 0).any() if rule == "> 0" else (t < 0).any()):
            raise rb.folder_error(folder, names["g.safetensors"], f"holds {key!r} with values that are not {rule}; "
                                                                  "expected standard deviations and variances")
    if min(meta["target_size"]) < 1:
        raise rb.folder_error(folder, name, f"has field 'target_size' = {meta['target_size']}; expected two "
                                            "positive integers")
    for i, rec in enumerate(meta["history"]):
        rb.check_length(rec["gates"], spec.orders, folder, name, f"history[{i}].gates", f"K = {spec.orders} gates")
    check_report_lengths(meta["heldout_report"], spec.orders, spec.out_channels, folder, name, "heldout_report")
    rb.check_finite({"heldout_error": meta["heldout_error"]}, folder, name)
    for key in ("train_indices", "heldout_indices"):
        if any(i < 0 for i in meta[key]):
            raise rb.folder_error(folder, name, f"has a negative image index in field {key!r}")
    return spec, meta


def _model_device(m: torch.nn.Module) -> torch.device:
    return next(m.parameters()).device


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def split_indices(n: int, val_fraction: float, monitor_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (train, monitor, held-out) index split of ``n`` images.

    Raises:
        ValueError: when fewer than 1 held-out or 2 training images would remain.
    """
    n_val = max(1, int(round(n * val_fraction)))
    n_train = n - n_val
    if n_train < 2:
        raise ValueError(
            f"too few samples for the held-out split: N={n} images with val_fraction={val_fraction} leaves "
            f"{n_train} for training and {n_val} held out; at least 2 training images and 1 held-out image are "
            f"needed (N >= 3). Fix: use more images (dozens at least for a meaningful fit)."
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held, train = perm[:n_val], perm[n_val:]
    n_mon = int(round(n_train * monitor_fraction)) if n_train >= 10 else 0
    monitor, train = train[:n_mon], train[n_mon:]
    return train.sort().values, monitor.sort().values, held.sort().values


def _relative_error(
    model: GTheta, xs: Tensor, xt: Tensor, batch_size: int, device: torch.device, ctx: kd.Context | None = None
) -> float:
    """Σ(x* − g(x))² / Σ(x* − channel mean)² over prepared maps, in eval mode (sums over all ranks of ``ctx``)."""
    sse, mom = 0.0, ChannelMoments(xt.shape[1])
    with torch.no_grad():
        for sl in batch_slices(xs.shape[0], batch_size, ctx):
            xb, tb = xs[sl].to(device), xt[sl].to(device)
            sse += float(((model(xb) - tb).double() ** 2).sum())
            mom.update(tb)
    (sse,) = kd.all_reduce_floats(sse, ctx=ctx)
    sst = float(merge_moments(mom, ctx).m2.sum())
    return sse / sst if sst > 0 else float("nan")


@torch.no_grad()
def calibrate(model: GTheta, xs: Tensor, batch_size: int, device: torch.device, ctx: kd.Context | None = None) -> None:
    """Set Σ_(k) (paper convention) to the exact per-channel variance of h^(k) over ``xs``, k = K … 1.

    With ``ctx`` of several ranks, each rank passes its share of the batches and the moments are merged.
    """
    if model.spec.convention != "paper":
        return
    model.eval()
    K = model.orders
    for k in range(K, 0, -1):
        mom = ChannelMoments(model.spec.in_channels)
        for sl in batch_slices(xs.shape[0], batch_size, ctx):
            mom.update(model.hidden(xs[sl].to(device), down_to=k)[-1])
        model.running_var[k - 1] = merge_moments(mom, ctx).channel_var().to(model.running_var)


@dataclass(frozen=True)
class FitData:
    """The fit's inputs after normalisation, on the fit's device, with the seeded split.

    Attributes:
        norm: the :class:`Normalization` fitted on the training split.
        xs, xt: all normalised source and target maps (channels-last on the CPU).
        train_idx, monitor_idx, heldout_idx: the split (:func:`split_indices`).
        xs_tr, xt_tr: the training split; xs_mon, xt_mon: the monitor split (``None`` without one).
        train_sst: Σ(x* − channel mean)² over the training targets, used for the monitor error when there is
            no monitor split (``nan`` otherwise).
        device: where the model runs; memory_format: the layout of the maps and the model.
        ctx: the torchrun job the fit is shared with (a single process by default).

    When the inputs are read from the disk cache or the fit is shared by several ranks, ``xs``/``xt`` and the
    splits are :class:`kcore.streaming.Rows`: prepared batch by batch when sliced, never held whole.
    """

    norm: Normalization
    xs: Tensor
    xt: Tensor
    train_idx: Tensor
    monitor_idx: Tensor
    heldout_idx: Tensor
    xs_tr: Tensor
    xt_tr: Tensor
    xs_mon: Tensor | None
    xt_mon: Tensor | None
    train_sst: float
    device: torch.device
    memory_format: torch.memory_format
    ctx: kd.Context = kd.Context()

    @property
    def has_monitor(self) -> bool:
        return self.xs_mon is not None

    @property
    def eval_batch(self) -> int:
        """Images per batch of the evaluation passes (:func:`eval_batch_size` of the larger of the two maps)."""
        return min(eval_batch_size(self.xs.shape), eval_batch_size(self.xt.shape))

    @property
    def streamed(self) -> bool:
        """True when the maps are read batch by batch (:class:`kcore.streaming.Rows`), not held in memory."""
        return isinstance(self.xs, Rows)


def prepare_data(
    x_src: Tensor, x_tgt: Tensor, cfg: FitConfig, dev: torch.device, ctx: kd.Context | None = None
) -> FitData:
    """Split the images (seeded), fit the normalisation on the training split and normalise every map.

    In-memory tensors in one process are normalised once and kept (fastest). Cached arrays
    (:class:`kcore.feature_cache.CachedArray`), or a fit shared by several ranks, are streamed instead: the
    statistics come from (all-reduced) sums and every batch is read and prepared when it is used.
    """
    ctx = ctx or kd.Context()
    train_idx, mon_idx, held_idx = split_indices(x_src.shape[0], cfg.val_fraction, cfg.monitor_fraction, cfg.seed)
    norm = Normalization.fit(x_src, x_tgt, cfg.convention, indices=train_idx, ctx=ctx)
    # On the CPU, oneDNN's convolutions run faster on channels-last (NHWC) maps than on NCHW ones (bench/).
    fmt = torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    if ctx.distributed or not (isinstance(x_src, Tensor) and isinstance(x_tgt, Tensor)):
        return _streamed_data(x_src, x_tgt, norm, (train_idx, mon_idx, held_idx), dev, fmt, ctx)
    xs = _prepare(norm.source, x_src, memory_format=fmt)
    xt = _prepare(norm.target, x_tgt, memory_format=fmt)
    if dev.type == "cuda":
        xs, xt = xs.to(dev), xt.to(dev)
    fit_idx = train_idx.to(xs.device)
    xs_tr, xt_tr = xs[fit_idx], xt[fit_idx]
    xs_mon = xt_mon = None
    train_sst = float("nan")
    if len(mon_idx) > 0:
        xs_mon, xt_mon = xs[mon_idx.to(xs.device)], xt[mon_idx.to(xs.device)]
    else:
        train_mom = ChannelMoments(xt_tr.shape[1])
        step = eval_batch_size(xt_tr.shape)
        for i in range(0, xt_tr.shape[0], step):
            train_mom.update(xt_tr[i : i + step])
        train_sst = float(train_mom.m2.sum())
    return FitData(norm, xs, xt, train_idx, mon_idx, held_idx, xs_tr, xt_tr, xs_mon, xt_mon, train_sst, dev, fmt)


def _streamed_data(
    x_src: Any,
    x_tgt: Any,
    norm: Normalization,
    split: tuple[Tensor, Tensor, Tensor],
    dev: torch.device,
    fmt: torch.memory_format,
    ctx: kd.Context,
) -> FitData:
    """The :class:`FitData` of a streamed fit: lazy :class:`Rows` over the raw arrays (nothing read yet)."""
    train_idx, mon_idx, held_idx = split
    size = norm.target_size
    everything = torch.arange(x_src.shape[0])
    xs = Rows(x_src, norm.source, everything, fmt, (x_src.shape[1], *size))
    xt = Rows(x_tgt, norm.target, everything, fmt, tuple(x_tgt.shape[1:]))
    xs_tr, xt_tr = xs.take(train_idx), xt.take(train_idx)
    xs_mon = xt_mon = None
    train_sst = float("nan")
    if len(mon_idx) > 0:
        xs_mon, xt_mon = xs.take(mon_idx), xt.take(mon_idx)
    else:
        mom = ChannelMoments(xt.shape[1])
        for sl in batch_slices(len(xt_tr), eval_batch_size(xt.shape), ctx):
            mom.update(xt_tr[sl])
        train_sst = float(merge_moments(mom, ctx).m2.sum())
    return FitData(norm, xs, xt, train_idx, mon_idx, held_idx, xs_tr, xt_tr, xs_mon, xt_mon, train_sst, dev, fmt, ctx)


def init_model(data: FitData, cfg: FitConfig) -> tuple[GTheta, LinearMap | None]:
    """A seeded g_θ on the fit's device; with ``init="lstsq"``, W^(0) starts at the least-squares map.

    Returns:
        The model and the least-squares map (``None`` with ``init="torch"``), reused by the baseline.
    """
    torch.manual_seed(cfg.seed)
    spec = GThetaSpec(
        data.xs.shape[1], data.xt.shape[1], cfg.orders, cfg.kernel_size, cfg.convention, cfg.gate, cfg.p_init
    )
    model = GTheta(spec).to(data.device, memory_format=data.memory_format)
    lin = None
    if cfg.init == "lstsq":
        lin = fit_linear_map(data.xs_tr, data.xt_tr, cfg.kernel_size, ctx=data.ctx)
        with torch.no_grad():
            w = torch.zeros_like(model.convs[0].weight)
            c, k = cfg.kernel_size // 2, lin.kernel_size // 2
            w[:, :, c - k : c + k + 1, c - k : c + k + 1] = lin.weight.to(w)
            model.convs[0].weight.copy_(w)
    return model, lin


@dataclass(frozen=True)
class TrainPlan:
    """How long a fit trains, decided before the first step.

    Attributes:
        steps_per_epoch: optimiser steps in one pass over the training split.
        total_steps: the length of the learning-rate schedule (the most steps that run).
        rounds: ``(epoch, steps)`` per stretch of training between two monitor measurements, in order.
        patience_steps: stop after this many steps without a better monitor error (``None`` = never).
        flops_per_step: FLOPs of one training step (:func:`step_flops`), when the plan was given them.
        precision: the dtype of the training steps' forward pass (:func:`training_dtype`).
    """

    steps_per_epoch: int
    total_steps: int
    rounds: tuple[tuple[int, int], ...]
    patience_steps: int | None
    flops_per_step: float | None = None
    precision: torch.dtype = torch.float32

    @property
    def epochs(self) -> int:
        """Epochs begun (the last may be partial when the schedule is set in steps)."""
        return self.rounds[-1][0] if self.rounds else 0


MIN_PLANNED_STEPS = 60
"""The fewest steps ``flops_budget`` can plan."""


def step_flops(c_in: int, c_out: int, h: int, w: int, cfg: FitConfig) -> float:
    """FLOPs of one training step of g_θ (forward + backward ≈ 3 forwards; a multiply-add counts 2)."""
    k2 = cfg.kernel_size**2
    return 3.0 * 2.0 * k2 * h * w * (c_in * c_out + cfg.orders * c_in * c_in) * cfg.batch_size


BF16_STEP_COST = 0.5
"""What one FLOP of a bfloat16-autocast training step counts in ``flops_budget`` (a float32 FLOP counts 1).

On CPUs with native bfloat16 such a step ran 1.6× (``avx512_bf16``, AMD EPYC) to 3.7–4× (AMX, Intel Xeon) faster
than in float32 at 256×14×14 and 1024×14×14 (README, Real sizes). Counting it at half plans twice the steps:
with AMX in about half the float32 plan's time (390 × 0.105 s against 195 × 0.39 s at 256×14×14), with
``avx512_bf16`` alone in about 1.1–1.2× its time (390 × 0.35 s against 195 × 0.57 s; the whole resnet18 layer3
fit took 139 s against the float32 plan's 126 s on a 2-core AMD EPYC)."""

BF16_MIN_STEP_FLOPS = 5e9
"""The smallest training step (FLOPs) that ``train_precision="auto"`` runs in bfloat16: below it the casts cost
about what the faster convolutions save."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bfloat16 arithmetic natively (``avx512_bf16`` or ``amx_bf16`` in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_dtype(cfg: FitConfig, device: torch.device, flops_per_step: float) -> torch.dtype:
    """The dtype of the training steps' forward pass: bfloat16 only with ``train_precision="auto"``, on a CPU
    with native bfloat16, for steps of at least :data:`BF16_MIN_STEP_FLOPS`; float32 otherwise."""
    if (cfg.train_precision == "auto" and device.type == "cpu" and flops_per_step >= BF16_MIN_STEP_FLOPS
            and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def train_plan(
    cfg: FitConfig, n_train: int, flops_per_step: float | None = None, precision: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> TrainPlan:
    """The plan of a fit on ``n_train`` images whose steps run in ``precision`` on ``device``.

    With ``max_steps`` the schedule spans that many steps whatever the number of images, fewer where
    ``flops_budget`` runs out first on the CPU (a bfloat16 step's FLOPs count :data:`BF16_STEP_COST` each; on
    a GPU, whose steps are one to two orders of magnitude faster by its FLOP rate, the budget does not bind).
    Otherwise it
    spans ``epochs`` epochs, and ``epochs`` and ``patience`` are scaled up by the same factor when they would
    give fewer than ``min_steps`` optimiser steps.
    """
    spe = math.ceil(n_train / cfg.batch_size)
    if cfg.max_steps is not None:
        total, scale = cfg.max_steps, 1
        if cfg.flops_budget and flops_per_step and torch.device(device).type == "cpu":
            cost = flops_per_step * (BF16_STEP_COST if precision == torch.bfloat16 else 1.0)
            total = max(min(cfg.max_steps, int(cfg.flops_budget / cost)), min(MIN_PLANNED_STEPS, total))
    else:
        scale = max(1, math.ceil(cfg.min_steps / (spe * cfg.epochs)))
        total = spe * cfg.epochs * scale
    if cfg.patience_steps is not None:
        patience = cfg.patience_steps
    else:
        patience = None if cfg.patience is None else cfg.patience * scale * spe
    chunk = min(spe, cfg.eval_every or spe)
    rounds, step, epoch = [], 0, 0
    while step < total:
        epoch += 1
        done = 0
        while done < spe and step < total:
            n = min(chunk, spe - done, total - step)
            rounds.append((epoch, n))
            done += n
            step += n
    return TrainPlan(spe, total, tuple(rounds), patience, flops_per_step, precision)


def small_batch_config(
    cfg: FitConfig, n_train: int, flops_per_step: float, precision: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> FitConfig:
    """``cfg`` as it runs: where ``flops_budget`` binds, the same FLOPs in more steps of ``small_batch`` images.

    The plan at ``batch_size`` (:func:`train_plan`, ``flops_per_step`` at that batch) is kept in FLOPs and
    multiplied in steps by ``f = batch_size // small_batch``: the returned config has ``batch_size=small_batch``,
    ``max_steps`` = f × the planned steps (taken literally: ``flops_budget=None``), ``patience_steps`` and
    ``eval_every`` × f, and ``small_batch=None``, so that re-running it runs the same plan. Where the budget
    does not bind (every plan of ``max_steps`` steps, e.g. the sample models') or does not apply (a GPU),
    ``cfg`` is returned as it is.
    """
    f = cfg.batch_size // cfg.small_batch if cfg.small_batch else 1
    if f < 2 or not (cfg.max_steps and cfg.flops_budget and flops_per_step):
        return cfg
    planned = train_plan(cfg, n_train, flops_per_step, precision, device).total_steps
    if planned >= cfg.max_steps:
        return cfg
    return dataclasses.replace(
        cfg, batch_size=cfg.small_batch, max_steps=planned * f, flops_budget=None, small_batch=None,
        patience_steps=cfg.patience_steps and cfg.patience_steps * f, eval_every=cfg.eval_every and cfg.eval_every * f,
    )


class EarlyStopping:
    """Keeps the weights with the best monitor error; says when patience (in optimiser steps) has run out.

    Without a monitor split nothing is kept (the last weights are used, as in the authors' recipe).
    """

    def __init__(self, min_delta: float, patience_steps: int | None, keep_weights: bool) -> None:
        self.min_delta = min_delta
        self.patience_steps = patience_steps
        self.keep_weights = keep_weights
        self.best_error = math.inf
        self.best_index = 0
        self.best_step = 0
        self.best_state: dict[str, Tensor] = {}

    def update(self, index: int, step: int, error: float, model: GTheta) -> bool:
        """Record the monitor error of measurement ``index`` after ``step`` steps; True when training should stop."""
        if error < self.best_error - self.min_delta * abs(self.best_error) or not math.isfinite(self.best_error):
            self.best_error, self.best_index, self.best_step = error, index, step
            self.best_state = _snapshot(model) if self.keep_weights else {}
            return False
        return self.patience_steps is not None and step - self.best_step >= self.patience_steps


def train_steps(
    model: GTheta,
    opt: torch.optim.Optimizer,
    data: FitData,
    cfg: FitConfig,
    batches: list[Tensor],
    *,
    first_step: int,
    total_steps: int,
    epoch: int,
    cancel: Any = None,
    deadline: float | None = None,
    forward: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float, int, int]:
    """Optimiser steps on the given batches of training indices (Eq. 2), until they run out or ``deadline``.

    Every rank draws the same order; with several ranks each takes its share of every batch (positions
    rank, rank + R, …) and ``forward`` (the model wrapped in DistributedDataParallel) averages the gradients.
    The sums returned are this rank's.

    Returns:
        (Σ loss, Σ mse) weighted by batch size, the number of images and the number of steps taken.

    Raises:
        FitCancelled: ``cancel`` asked to stop (checked before every step).
    """
    model.train()
    rank, world = data.ctx.rank, data.ctx.world_size
    tot_loss = tot_mse = 0.0
    n_images = taken = 0
    for idx in batches:
        if _is_cancelled(cancel):
            raise FitCancelled(f"fit cancelled at epoch {epoch}")
        if deadline is not None and time.perf_counter() >= deadline:
            break
        if cfg.schedule == "cosine":
            _set_lr(opt, _cosine_lr(cfg, first_step + taken, total_steps))
        idx = idx[rank::world]
        xb = data.xs_tr[idx].to(data.device, non_blocking=True)
        tb = data.xt_tr[idx].to(data.device, non_blocking=True)
        loss, mse = train_step(model, opt, xb, tb, cfg.lam, forward=forward, dtype=dtype)
        tot_loss += float(loss.detach()) * len(idx)
        tot_mse += float(mse.detach()) * len(idx)
        n_images += len(idx)
        taken += 1
    return tot_loss, tot_mse, n_images, taken


@contextmanager
def _start_candidate(model: GTheta, cfg: FitConfig) -> Iterator[None]:
    """The start as a candidate: with the least-squares start and linear gates, the gates are closed (p = 0) so
    that the candidate is exactly the least-squares map; training then starts from ``p_init`` as configured."""
    if cfg.init != "lstsq" or cfg.gate != "linear":
        yield
        return
    saved = model.p_param.detach().clone()
    with torch.no_grad():
        model.p_param.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            model.p_param.copy_(saved)


def monitor_error(model: GTheta, data: FitData, tot_mse: float, n_images: int) -> float:
    """The relative error on the monitor split; without one, the training split's from the running mean squared
    error ``tot_mse`` (summed over ``n_images`` images) of the last steps, which costs no extra pass."""
    if data.xs_mon is not None and data.xt_mon is not None:
        return _relative_error(model, data.xs_mon, data.xt_mon, data.eval_batch, data.device, data.ctx)
    if not data.train_sst > 0 or n_images == 0:
        return float("nan")
    n_tr = data.xt_tr.shape[0]
    return tot_mse / n_images * n_tr * data.xt_tr[0].numel() / data.train_sst


def train(
    model: GTheta,
    data: FitData,
    cfg: FitConfig,
    plan: TrainPlan,
    *,
    report: Callable[[FitProgress], None],
    t0: float,
    cancel: Any = None,
    on_epoch: Callable[[int, GTheta], None] | None = None,
) -> tuple[list[EpochRecord], int, dict[str, Any]]:
    """The training loop with early stopping on the monitor split; leaves the kept weights in ``model``.

    Returns:
        (history, index of the kept measurement (0 = the start), facts for ``FitResult.extra``).
    """
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_tr = data.xs_tr.shape[0]
    forward = _ddp(model, data.ctx)
    history: list[EpochRecord] = []
    stopper = EarlyStopping(cfg.min_delta, plan.patience_steps, keep_weights=data.has_monitor)
    stopper.best_state = _snapshot(model)
    dtype = plan.precision
    facts: dict[str, Any] = {"steps_planned": plan.total_steps, "epochs_planned": plan.epochs,
                             "train_precision": "bfloat16 autocast" if dtype == torch.bfloat16 else "float32"}
    n_other = n_tr + len(data.heldout_idx)  # images the calibration and held-out passes go through
    t_start = time.perf_counter()
    if data.has_monitor:  # the start is a candidate ("epoch 0"): never keep weights worse than it
        model.eval()
        with _start_candidate(model, cfg):
            start_error = monitor_error(model, data, 0.0, 0)
            stopper.update(0, 0, start_error, model)
        facts["start_monitor_error"] = start_error
        per_image = (time.perf_counter() - t_start) / max(len(data.monitor_idx), 1)
    else:
        per_image = None
    deadline = None
    step, perm, stopped_by = 0, None, "schedule"
    t_train = time.perf_counter()
    for index, (epoch, n_steps) in enumerate(plan.rounds, start=1):
        te = time.perf_counter()
        if perm is None or (index > 1 and plan.rounds[index - 2][0] != epoch):
            perm = torch.randperm(n_tr, generator=gen).to(data.xs_tr.device)
            offset = 0
            if cfg.schedule == "loglinear":
                frac = (epoch - 1) / max(plan.epochs - 1, 1)
                _set_lr(opt, cfg.lr * (cfg.lr_final / cfg.lr) ** frac)
        batches = [perm[(offset + b) * cfg.batch_size : (offset + b + 1) * cfg.batch_size] for b in range(n_steps)]
        offset += n_steps
        if cfg.budget is not None:
            if per_image is None and step > 0:  # no monitor pass timed: a forward costs about a third of a step
                per_image = (time.perf_counter() - t_train) / (step * cfg.batch_size * 3)
            reserve = 1.5 * (per_image or 0.0) * (n_other + len(data.monitor_idx))
            deadline = t0 + cfg.budget - reserve
            if data.ctx.distributed:  # ranks must take the same steps: rank 0 decides, between rounds only
                if kd.broadcast_object(time.perf_counter() >= deadline, 0, data.ctx):
                    stopped_by = "budget"
                    break
                deadline = None
        tot_loss, tot_mse, n_images, taken = train_steps(
            model, opt, data, cfg, batches, first_step=step, total_steps=plan.total_steps, epoch=epoch,
            cancel=cancel, deadline=deadline, forward=forward, dtype=dtype,
        )
        tot_loss, tot_mse, n_images = kd.all_reduce_floats(tot_loss, tot_mse, float(n_images), ctx=data.ctx)
        if taken == 0:
            stopped_by = "budget"
            break
        step += taken
        model.eval()
        mon = monitor_error(model, data, tot_mse, n_images)
        gates = tuple(float(v) for v in model.gates().detach().cpu())
        rec = EpochRecord(index, tot_loss / n_images, tot_mse / n_images, mon, opt.param_groups[0]["lr"], gates,
                          time.perf_counter() - te, step)
        history.append(rec)
        if on_epoch is not None:
            on_epoch(index, model)
        now = time.perf_counter()
        eta = (now - t_train) / step * (plan.total_steps - step)
        if cfg.budget is not None:
            eta = min(eta, max(0.0, t0 + cfg.budget - now))
        report(FitProgress("train", index, len(plan.rounds), rec.train_loss, mon, rec.lr, gates, now - t0,
                           step=step, steps=plan.total_steps, eta=eta))
        if not math.isfinite(rec.train_loss):
            raise ValueError(
                f"the fit diverged at epoch {epoch} (loss {rec.train_loss}). Fix: lower lr (now {cfg.lr}) "
                "or use the 'fast' preset."
            )
        if stopper.update(index, step, mon, model):
            stopped_by = "patience"
            break
        if taken < n_steps:
            stopped_by = "budget"
            break
    facts.update(steps_run=step, stopped_by=stopped_by, epochs_run=plan.rounds[len(history) - 1][0] if history else 0)
    if data.has_monitor:
        model.load_state_dict(stopper.best_state)
        return history, stopper.best_index, facts
    return history, len(history), facts  # without a monitor split, the last weights are kept


def evaluate_heldout(
    model: GTheta, data: FitData, cfg: FitConfig, lin: LinearMap | None
) -> tuple[float, VarianceReport, Baseline]:
    """The held-out relative error, variance report and 0-order baseline, in one streaming pass.

    Returns:
        (Σ(x* − g(x))² / Σ(x* − channel mean)², variance report, baseline) on the held-out images.
    """
    if data.streamed:
        return _evaluate_streamed(model, data, cfg, lin)
    held = data.heldout_idx.to(data.xs.device)
    xs_h, xt_h = data.xs[held], data.xt[held]
    acc = VarianceAccumulator(cfg.orders, data.xt.shape[1])
    with torch.no_grad():
        step = data.eval_batch
        for i in range(0, xs_h.shape[0], step):
            comps = components(model, xs_h[i : i + step].to(data.device))
            tb = xt_h[i : i + step].to(data.device)
            acc.update(comps, tb - torch.stack(comps).sum(0), tb)
    baseline = linear_baseline(
        data.xs_tr.cpu(), data.xt_tr.cpu(), xs_h.cpu(), xt_h.cpu(), cfg.kernel_size, lin=lin
    )
    sst = float(acc.target.m2.sum())  # = _relative_error on the held-out images, without another forward pass
    err = acc.sq_err / sst if sst > 0 else float("nan")
    return err, acc.report(), baseline


def _evaluate_streamed(
    model: GTheta, data: FitData, cfg: FitConfig, lin: LinearMap | None
) -> tuple[float, dict, Baseline]:
    """:func:`evaluate_heldout` batch by batch over :class:`Rows`, each rank its share, sums all-reduced.

    The least-squares baseline's R² comes from the same pass; the linear CKA from Gram matrices that rank 0
    builds block by block over the held-out images (N_held² numbers in memory, not their features), from the
    first :data:`STREAMED_CKA_IMAGES` held-out images when there are more (so memory stays bounded).
    """
    ctx = data.ctx
    xs_h, xt_h = data.xs.take(data.heldout_idx), data.xt.take(data.heldout_idx)
    if lin is None:
        lin = fit_linear_map(data.xs_tr, data.xt_tr, cfg.kernel_size, ctx=ctx)
    acc = VarianceAccumulator(cfg.orders, data.xt.shape[1])
    lin_sse = 0.0
    with torch.no_grad():
        for sl in batch_slices(len(xs_h), data.eval_batch, ctx):
            xb, tb = xs_h[sl], xt_h[sl]
            lin_sse += float(((tb.double() - lin(xb).double()) ** 2).sum())
            xb, tb = xb.to(data.device), tb.to(data.device)
            comps = components(model, xb)
            acc.update(comps, tb - torch.stack(comps).sum(0), tb)
    acc = merge_accumulator(acc, ctx)
    (lin_sse,) = kd.all_reduce_floats(lin_sse, ctx=ctx)
    sst = float(acc.target.m2.sum())
    cka_rows = torch.arange(min(len(xs_h), STREAMED_CKA_IMAGES))
    cka = gram_cka(xs_h.take(cka_rows), xt_h.take(cka_rows), data.eval_batch) if ctx.is_main else None
    cka = kd.broadcast_object(cka, 0, ctx)
    baseline = Baseline(1.0 - lin_sse / sst if sst > 0 else float("nan"), lin.kernel_size, float(cka))
    err = acc.sq_err / sst if sst > 0 else float("nan")
    return err, acc.report(), baseline


def _check_inputs(x_src: Any, x_tgt: Any) -> tuple[Any, Any]:
    """:func:`check_pair` for tensors; shapes only for cached arrays (the cache stores finite values only)."""
    from kcore.feature_cache import CachedArray

    if not (isinstance(x_src, CachedArray) or isinstance(x_tgt, CachedArray)):
        return check_pair(x_src, x_tgt)
    for name, x in (("x_src", x_src), ("x_tgt", x_tgt)):
        if not isinstance(x, (Tensor, CachedArray)) or len(x.shape) != 4 or min(x.shape) == 0:
            raise ValueError(
                f"{name} must be a (N, C, H, W) tensor or kcore.feature_cache.CachedArray; got "
                f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}."
            )
    if x_src.shape[0] != x_tgt.shape[0]:
        raise ValueError(
            f"x_src and x_tgt must hold the same images: expected equal N, got x_src N={x_src.shape[0]} and "
            f"x_tgt N={x_tgt.shape[0]}. Fix: use both arrays of one cache entry (cached_arrays(features))."
        )
    return x_src, x_tgt


def check_kernel_size(kernel_size: int, map_size: tuple[int, int]) -> None:
    """Refuse a kernel that reaches past a feature map and its zero border (``kernel_size > 2·min(H, W) + 1``).

    g_θ's convolutions and its least-squares start pad by ``kernel_size // 2`` on each side; a kernel wider than
    the map on both sides of every position has taps that never meet a value, and the least-squares start has
    no overlap to sum over for them.

    Args:
        kernel_size: the fit's ``kernel_size`` (odd).
        map_size: ``(H, W)`` of the target maps (the source maps are resampled to it).

    Raises:
        ValueError: ``kernel_size`` is larger than ``2·min(H, W) + 1``; the message names both and the fix.
    """
    h, w = (int(v) for v in map_size)
    largest = 2 * min(h, w) + 1
    if kernel_size > largest:
        raise ValueError(
            f"kernel_size must be at most 2·min(H, W)+1 = {largest} for feature maps of H×W = {h}×{w} (x_tgt's "
            f"size, which x_src is resampled to); got kernel_size={kernel_size}, a kernel larger than the map. "
            f"Fix: pass kernel_size={largest if largest % 2 else largest - 1} or smaller (odd), or compare layers "
            "with larger maps."
        )


STREAMED_CKA_IMAGES = 1024
"""A streamed fit's linear CKA baseline uses at most this many held-out images (two 1024² float64 Gram
matrices, 16 MiB); its R² baseline and every variance use all of them."""


def _ddp(model: GTheta, ctx: kd.Context) -> torch.nn.Module | None:
    """``model`` wrapped in DistributedDataParallel when the fit is shared by several ranks, else None."""
    if not ctx.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def fit(
    x_src: Tensor,
    x_tgt: Tensor,
    orders: int | None = None,
    *,
    preset: str = "fast",
    config: FitConfig | None = None,
    device: str | torch.device | None = "auto",
    progress: Callable[[FitProgress], None] | None = None,
    cancel: Any = None,
    on_epoch: Callable[[int, GTheta], None] | None = None,
    ctx: kd.Context | None = None,
    **overrides: Any,
) -> FitResult:
    """Fit g_θ so that g(x_src) reconstructs x_tgt, on a training split; evaluate on held-out images.

    The steps: :func:`prepare_data` (split, normalisation), :func:`init_model` (least-squares start),
    :func:`train` (loop, early stopping on the monitor split), :func:`calibrate` (exact Σ_(k)),
    :func:`evaluate_heldout`.

    Args:
        x_src: (N, C_a, H_a, W_a) features of network A (x). Resampled to x_tgt's H×W when they differ.
            A tensor, or a :class:`kcore.feature_cache.CachedArray` of the on-disk float16 cache
            (:func:`kcore.feature_cache.cached_arrays`): then every batch is read from disk when it is used
            and memory does not grow with N.
        x_tgt: (N, C_b, H, W) features of network B (x*), for the same N images in the same order.
        orders: K (default: the preset's, 2).
        preset: ``"fast"`` (default) or ``"authors"``; see :data:`PRESETS`.
        config: a full :class:`FitConfig` (then ``preset`` and ``overrides`` are ignored).
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        progress: called with a :class:`FitProgress` after every epoch and at phase changes.
        cancel: a ``threading.Event`` or a callable returning True to stop; checked every batch.
        on_epoch: for diagnostics and benchmarks: called after every epoch with (epoch, model), the model in
            eval mode on the fit's device, before early stopping is decided. It must not change the model;
            its time counts in the fit's wall time.
        ctx: a torchrun job (:func:`kcore.distributed.init`) to share the fit with. Every rank passes the
            same inputs (a shared cache) and gets the same result: the split is global, statistics and the
            least-squares start come from all-reduced sums, g_θ is trained with DistributedDataParallel
            (each rank a share of every batch) and early stopping follows the all-reduced monitor error.
            The device is the rank's (``ctx.device``). Default: this process alone.
        **overrides: any :class:`FitConfig` field, e.g. ``lam=0.5, epochs=100, seed=1``.

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: bad inputs (shapes, NaN/Inf, too few images, K < 0, unknown option).
        FitCancelled: ``cancel`` asked to stop.

    Examples::

        res = kcore.fit(x_src, x_tgt, orders=2)        # g_θ reconstructs x* = x_tgt from x = x_src
        res.heldout_report.instability                  # Var(x^Δ)/Var(x*) on the held-out images
        res.save("runs/g"); kcore.load_result("runs/g")
    """
    t0 = time.perf_counter()
    x_src, x_tgt = _check_inputs(x_src, x_tgt)
    if orders is not None:
        overrides["orders"] = check_orders(orders)
    cfg = config if config is not None else make_config(preset, **overrides)
    check_kernel_size(cfg.kernel_size, tuple(x_tgt.shape[2:]))
    ctx = ctx or kd.Context()
    if not ctx.distributed:  # (a distributed fit's ranks are checked by the pipeline that started them)
        check_informative(x_src, x_tgt)
    dev = ctx.device if ctx.distributed else resolve_device(device)
    report = progress or (lambda p: None)

    data = prepare_data(x_src, x_tgt, cfg, dev, ctx)
    shape = (data.xs.shape[1], data.xt.shape[1], data.xt.shape[2], data.xt.shape[3])
    flops = step_flops(*shape, cfg)
    cfg = small_batch_config(cfg, data.xs_tr.shape[0], flops, training_dtype(cfg, torch.device(dev), flops), dev)
    flops = step_flops(*shape, cfg)
    plan = train_plan(cfg, data.xs_tr.shape[0], flops, training_dtype(cfg, torch.device(dev), flops), dev)
    report(FitProgress("init", 0, len(plan.rounds), elapsed=time.perf_counter() - t0, steps=plan.total_steps))
    model, lin = init_model(data, cfg)
    history, best_epoch, facts = train(model, data, cfg, plan, report=report, t0=t0, cancel=cancel, on_epoch=on_epoch)
    epochs = len(history)  # measurements made: the totals shown from here on are what ran

    report(FitProgress("calibrate", len(history), epochs, elapsed=time.perf_counter() - t0))
    calibrate(model, data.xs_tr, data.eval_batch, dev, data.ctx)
    model.eval()

    report(FitProgress("evaluate", len(history), epochs, elapsed=time.perf_counter() - t0))
    err, heldout, baseline = evaluate_heldout(model, data, cfg, lin)

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    result = FitResult(
        model=model,
        norm=data.norm,
        config=cfg,
        history=tuple(history),
        best_epoch=best_epoch,
        heldout_error=err,
        heldout_report=heldout,
        baseline=baseline,
        train_indices=tuple(int(i) for i in data.train_idx),
        heldout_indices=tuple(int(i) for i in data.heldout_idx),
        device=str(dev),
        seconds=time.perf_counter() - t0,
        extra={"monitor_indices": [int(i) for i in data.monitor_idx], **facts},
    )
    report(FitProgress("done", len(history), epochs, elapsed=result.seconds))
    return result


def make_optimizer(model: GTheta, cfg: FitConfig) -> torch.optim.Optimizer:
    """The Adam optimiser of a fit, fused (one kernel per step instead of a dozen small ones per parameter) on the
    CPU and CUDA: on small feature maps the optimiser's small kernels otherwise cost as much as the convolutions."""
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in model.parameters())
    if cfg.lr_w0_scale == 1.0:
        groups: Any = model.parameters()
    else:  # W^(0) in its own group, at lr_w0_scale times the rate (see FitConfig.lr_w0_scale)
        w0 = model.convs[0].weight
        groups = [{"params": [p for p in model.parameters() if p is not w0], "scale": 1.0},
                  {"params": [w0], "scale": cfg.lr_w0_scale, "lr": cfg.lr * cfg.lr_w0_scale}]
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_step(
    model: GTheta, opt: torch.optim.Optimizer, xb: Tensor, tb: Tensor, lam: float, forward: torch.nn.Module | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a batch (Eq. 2); returns the detached (loss, mse).

    ``forward`` runs the model's forward pass instead of ``model`` (its DistributedDataParallel wrapper).
    ``dtype=torch.bfloat16`` runs that forward pass under CPU bfloat16 autocast (:func:`training_dtype`); the
    loss is computed in float32 from its output either way.
    """
    if dtype == torch.float32:
        out = (forward or model)(xb)
    else:
        with torch.autocast(xb.device.type, dtype=dtype):
            out = (forward or model)(xb)
        out = out.float()
    loss, mse = gtheta_loss(out, tb, model.gates(), lam)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), mse.detach()


def _prepare(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    batch_size: int = 512,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """Apply ``fn`` batch by batch (float16 inputs, e.g. from the feature cache, become float32 first)."""

    def batch(i: int) -> Tensor:
        xb = x[i : i + batch_size]
        out = fn(xb.float() if xb.dtype in (torch.float16, torch.bfloat16) else xb).float()
        return out.contiguous(memory_format=memory_format)

    with torch.no_grad():
        return torch.cat([batch(i) for i in range(0, x.shape[0], batch_size)])


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _cosine_lr(cfg: FitConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over ``cfg.warmup`` of the steps (at least ``cfg.warmup_steps``, at most half of them), then
    cosine decay from ``lr`` to ``lr_final``."""
    warm = max(int(cfg.warmup * total_steps), min(cfg.warmup_steps, total_steps // 2))
    if step < warm:
        return cfg.lr_final + (cfg.lr - cfg.lr_final) * (step + 1) / warm
    frac = (step - warm) / max(total_steps - warm, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * frac))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
