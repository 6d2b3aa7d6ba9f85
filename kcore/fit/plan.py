"""How long a fit trains and in which precision, decided before the first step from shapes, never the clock.

:func:`train_plan` (steps, rounds between monitor measurements, patience), the CPU's FLOP budget
(:func:`step_flops`, :func:`small_batch_config`), the training precision (:func:`training_dtype`), the
learning-rate schedule (:func:`cosine_lr`) and the size of the evaluation batches (:func:`eval_batch_size`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from kcore.devices import cpu_has_native_bf16
from kcore.fit.config import FitConfig

EVAL_BATCH_SIZE = 256
"""The most images in one batch of an evaluation pass."""
EVAL_BATCH_ELEMENTS = 2**23
"""Evaluation passes (monitor, calibration, held-out, decomposition) take at most ``EVAL_BATCH_SIZE`` images and
at most this many values per map in one batch (32 MiB in float32): 256 images at 64×14×14, 20 at 512×28×28."""


def eval_batch_size(shape: Any) -> int:
    """Images per evaluation batch for maps of ``shape`` ((N, C, H, W) or (C, H, W)): bounded in images and values.

    The passes without gradients (monitor error, calibration, held-out evaluation, predict, decompose) use it to
    bound their working memory; any value gives the same numbers.
    """
    per_image = math.prod(int(v) for v in tuple(shape)[-3:])
    return max(1, min(EVAL_BATCH_SIZE, EVAL_BATCH_ELEMENTS // max(per_image, 1)))


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

Such steps run faster on CPUs with native bfloat16, so a plan in bfloat16 has more steps (the speed-ups measured
are in docs/performance.md)."""


BF16_MIN_STEP_FLOPS = 5e9
"""The smallest training step (FLOPs) that ``train_precision="auto"`` runs in bfloat16: below it the casts cost
about what the faster convolutions save."""


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


def cosine_lr(cfg: FitConfig, step: int, total_steps: int) -> float:
    """The learning rate of step ``step`` (from 0) of ``total_steps`` on the cosine schedule.

    A linear warm-up over ``cfg.warmup`` of the steps (at least ``cfg.warmup_steps``, at most half of them), from
    ``lr_final`` to ``lr``, then a cosine decay from ``lr`` to ``lr_final``.
    """
    warm = max(int(cfg.warmup * total_steps), min(cfg.warmup_steps, total_steps // 2))
    if step < warm:
        return cfg.lr_final + (cfg.lr - cfg.lr_final) * (step + 1) / warm
    frac = (step - warm) / max(total_steps - warm, 1)
    return cfg.lr_final + 0.5 * (cfg.lr - cfg.lr_final) * (1 + math.cos(math.pi * frac))
