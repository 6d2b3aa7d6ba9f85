"""The training loop of g_θ (Eq. 2): the seeded start, Adam steps, early stopping on the monitor split, DDP."""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore.fit.config import FitConfig
from kcore.fit.data import FitData
from kcore.fit.evaluate import monitor_error
from kcore.fit.plan import TrainPlan, cosine_lr
from kcore.fit.result import EpochRecord, RanPrecision, StoppedBy
from kcore.gtheta import GTheta, GThetaSpec, gtheta_loss
from kcore.metrics import LinearMap, fit_linear_map


@dataclass(frozen=True)
class FitProgress:
    """What a progress callback receives (after every monitor measurement, and at phase changes).

    ``epoch``/``epochs`` count monitor measurements (one per epoch unless ``eval_every`` splits epochs);
    ``step``/``steps`` are optimiser steps done and planned; ``eta`` is the estimated time left in training
    (seconds; early stopping may end it sooner); ``stop_step`` is the earliest step at which early stopping may end
    training (0: no early stopping) if the monitor error does not improve (:func:`kcore.progress.eta_range`).
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
    stop_step: int = 0

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] (by optimiser steps while training)."""
        if self.phase == "train" and self.steps > 0:
            return min(1.0, self.step / self.steps)
        return {"init": 0.0, "done": 1.0}.get(self.phase, min(1.0, self.epoch / max(self.epochs, 1)))


class FitCancelled(RuntimeError):
    """Raised by :func:`fit` when its ``cancel`` callback asked it to stop.

    Examples::

        stop = threading.Event()
        try:
            kcore.fit(x_src, x_tgt, cancel=stop)                      # stop.set() from another thread
        except kcore.FitCancelled:
            ...
    """


def _is_cancelled(cancel: Any) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


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
            _set_lr(opt, cosine_lr(cfg, first_step + taken, total_steps))
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


@dataclass(frozen=True)
class TrainRun:
    """What :func:`train` did: one record per monitor measurement, the kept one, and the steps planned and run.

    Attributes:
        history: one :class:`EpochRecord` per monitor measurement.
        best_epoch: the index of the kept measurement (0 = the start).
        steps_planned, epochs_planned: the plan's length; steps_run, epochs_run: what ran.
        stopped_by, train_precision, start_monitor_error: as :class:`FitResult` records them.
    """

    history: tuple[EpochRecord, ...]
    best_epoch: int
    steps_planned: int
    epochs_planned: int
    steps_run: int
    epochs_run: int
    stopped_by: StoppedBy
    train_precision: RanPrecision
    start_monitor_error: float | None


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
) -> TrainRun:
    """The training loop with early stopping on the monitor split; leaves the kept weights in ``model``.

    Returns:
        A :class:`TrainRun`: the history, the kept measurement and the steps planned and run.

    Raises:
        FitCancelled: ``cancel`` asked to stop.
        ValueError: the training loss became NaN or infinite (the message says how to lower ``lr``).
    """
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_tr = data.xs_tr.shape[0]
    forward = _ddp(model, data.ctx)
    history: list[EpochRecord] = []
    stopper = EarlyStopping(cfg.min_delta, plan.patience_steps, keep_weights=data.has_monitor)
    stopper.best_state = _snapshot(model)
    dtype = plan.precision
    start_error = None
    n_other = n_tr + len(data.heldout_idx)  # images the calibration and held-out passes go through
    t_start = time.perf_counter()
    if data.has_monitor:  # the start is a candidate ("epoch 0"): never keep weights worse than it
        model.eval()
        with _start_candidate(model, cfg):
            start_error = monitor_error(model, data, 0.0, 0)
            stopper.update(0, 0, start_error, model)
        per_image = (time.perf_counter() - t_start) / max(len(data.monitor_idx), 1)
    else:
        per_image = None
    deadline = None
    step, perm = 0, None
    stopped_by: StoppedBy = "schedule"
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
        # the earliest step early stopping may end at (best step before this measurement: a lower bound)
        stop_step = stopper.best_step + plan.patience_steps if plan.patience_steps is not None else 0
        report(FitProgress("train", index, len(plan.rounds), rec.train_loss, mon, rec.lr, gates, now - t0,
                           step=step, steps=plan.total_steps, eta=eta, stop_step=stop_step))
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
    best = len(history)  # without a monitor split, the last weights are kept
    if data.has_monitor:
        model.load_state_dict(stopper.best_state)
        best = stopper.best_index
    return TrainRun(
        tuple(history), best, steps_planned=plan.total_steps, epochs_planned=plan.epochs, steps_run=step,
        epochs_run=plan.rounds[len(history) - 1][0] if history else 0, stopped_by=stopped_by,
        train_precision="bfloat16 autocast" if dtype == torch.bfloat16 else "float32", start_monitor_error=start_error,
    )


def _ddp(model: GTheta, ctx: kd.Context) -> torch.nn.Module | None:
    """``model`` wrapped in DistributedDataParallel when the fit is shared by several ranks, else None."""
    if not ctx.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def _snapshot(model: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("scale", 1.0)
