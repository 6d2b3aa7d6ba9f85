"""What defines a fit of g_θ: :class:`FitConfig`, the named :data:`PRESETS` and :func:`make_config`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from kcore._validate import check_orders
from kcore.conventions import Convention, check_convention
from kcore.gtheta import Gate

Schedule = Literal["cosine", "loglinear"]
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
            schedule: on wide maps Adam's first full-rate steps blow W^(1)…W^(K) up, a cost that does not shrink
            with the plan (docs/conventions.md).
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
            calibration and every decomposition stay float32; ``FitResult.train_precision`` says
            what ran.
        nested: fit the orders as nested models (:mod:`kcore.fit.nested`): g₀ the closed-form least-squares
            map (whatever ``init``), then g₁ … g_K, each started from the one before with its new gate at
            p⁽ᵏ⁾ = 0 and trained with this config's schedule; the result's ``nested`` holds the order-wise gains
            Δₖ = R²(gₖ) − R²(gₖ₋₁) on the held-out images. Needs ``gate="linear"`` (a sigmoid gate cannot start
            at 0).

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
    nested: bool = False

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
        if not isinstance(self.nested, bool):
            raise TypeError(f"nested must be True or False; got {self.nested!r}. Fix: pass nested=True or omit it.")
        if self.nested and self.gate != "linear":
            raise ValueError(
                f"nested=True needs gate='linear': every new order starts at p = 0, which gate={self.gate!r} cannot "
                "represent (sigmoid(p) > 0). Fix: pass gate='linear' (with preset 'authors' too)."
            )
        if self.budget is not None and not (isinstance(self.budget, (int, float)) and self.budget > 0
                                            and math.isfinite(self.budget)):
            raise ValueError(f"budget must be a positive number of seconds or None; got {self.budget!r}. "
                             "Fix: e.g. budget=60.")


#: Named recipes: "fast" (the default) and "authors" (the authors' code and recipe).
PRESETS: dict[str, FitConfig] = {
    # 800 steps from the least-squares start, monitored every 10 steps; on the CPU at most 2.6e13 training FLOPs,
    # spent in steps of 16 images where that binds (docs/performance.md gives the measurements behind each number).
    "fast": FitConfig(max_steps=800, flops_budget=2.6e13, patience_steps=60, eval_every=10, lr_w0_scale=0.1,
                      min_steps=0, train_precision="auto", warmup_steps=30, small_batch=16),
    # the authors' Training_TransNet.py recipe, for comparison with the paper's numbers (docs/conventions.md)
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
