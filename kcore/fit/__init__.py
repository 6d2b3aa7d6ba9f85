"""Fit g_θ on feature tensors with a held-out split (Sec. 3, Eq. 2) → a :class:`FitResult`.

Two presets ship: ``"fast"`` (the default; the paper's conventions with a closed-form start and a short
schedule) and ``"authors"`` (the authors' code and recipe, for comparison with the paper's numbers). Every
field of :class:`FitConfig` can be overridden by keyword.

:func:`fit` is the face of the package; its steps live in one module per concern:

- :mod:`kcore.fit.config`: :class:`FitConfig`, :data:`PRESETS`, :func:`make_config`;
- :mod:`kcore.fit.data`: input checks, the seeded split and the normalised maps (:class:`FitData`);
- :mod:`kcore.fit.plan`: steps, the CPU's FLOP budget, the training precision, the learning-rate schedule;
- :mod:`kcore.fit.train`: the seeded start, the training loop, early stopping, DistributedDataParallel;
- :mod:`kcore.fit.evaluate`: the monitor error, the calibration of Σ_(k), the held-out evaluation;
- :mod:`kcore.fit.result`: :class:`FitResult` and its run folder (save/load);
- :mod:`kcore.fit.nested`: nested fits g₀ … g_K and their order-wise gains (``nested=True``).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore._validate import check_informative, check_orders
from kcore.devices import cpu_has_native_bf16, resolve_device
from kcore.fit.config import PRESETS, FitConfig, Init, Precision, Schedule, make_config
from kcore.fit.data import FitData, check_inputs, check_kernel_size, prepare_data, split_indices
from kcore.fit.evaluate import STREAMED_CKA_IMAGES, calibrate, evaluate_heldout, monitor_error, relative_error
from kcore.fit.nested import (
    GainAccumulator,
    GainIntervals,
    NestedFits,
    NestedGains,
    NestedStage,
    evaluate_gains,
    extend_order,
    nested_decompose,
    train_nested,
)
from kcore.fit.plan import (
    BF16_MIN_STEP_FLOPS,
    BF16_STEP_COST,
    EVAL_BATCH_ELEMENTS,
    EVAL_BATCH_SIZE,
    MIN_PLANNED_STEPS,
    TrainPlan,
    cosine_lr,
    eval_batch_size,
    small_batch_config,
    step_flops,
    train_plan,
    training_dtype,
)
from kcore.fit.result import (
    FIT_EXTRA_FIELDS,
    FIT_JSON_FIELDS,
    EpochRecord,
    FitResult,
    RanPrecision,
    StoppedBy,
    check_report_lengths,
)
from kcore.fit.train import (
    EarlyStopping,
    FitCancelled,
    FitProgress,
    TrainRun,
    init_model,
    make_optimizer,
    train,
    train_step,
    train_steps,
)
from kcore.gtheta import GTheta

__all__ = [
    "fit", "FitResult", "FitConfig", "PRESETS", "make_config", "FitProgress", "FitCancelled", "EpochRecord",
    "Schedule", "Init", "Precision", "FitData", "split_indices", "prepare_data", "check_inputs",
    "check_kernel_size", "TrainPlan", "train_plan", "small_batch_config", "step_flops", "training_dtype",
    "cosine_lr", "eval_batch_size", "EVAL_BATCH_SIZE", "EVAL_BATCH_ELEMENTS", "MIN_PLANNED_STEPS",
    "BF16_STEP_COST", "BF16_MIN_STEP_FLOPS", "cpu_has_native_bf16", "init_model", "make_optimizer", "train",
    "train_step", "train_steps", "EarlyStopping", "relative_error", "monitor_error", "calibrate",
    "evaluate_heldout", "STREAMED_CKA_IMAGES", "FIT_JSON_FIELDS", "check_report_lengths",
    "FIT_EXTRA_FIELDS", "StoppedBy", "RanPrecision", "TrainRun", "NestedFits", "NestedGains", "GainIntervals",
    "NestedStage", "GainAccumulator", "extend_order", "evaluate_gains", "nested_decompose", "train_nested",
]

_cosine_lr = cosine_lr  # the name tests/test_fit_schedule.py reads (kept until it uses cosine_lr)


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
    groups: Any = None,
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
        groups: which images belong together (crops of one photo, frames of one video): a
            :class:`kcore.groups.Groups` or one key per image. No group is split between training, monitor and
            held-out images, and the intervals resample whole groups. Default: every image its own group.
        **overrides: any :class:`FitConfig` field, e.g. ``lam=0.5, epochs=100, seed=1``, or ``nested=True``:
            fit g₀ … g_K one after another (:mod:`kcore.fit.nested`); the result's ``nested`` then holds them
            and their held-out order-wise gains, and ``model`` is g_K.

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
    x_src, x_tgt = check_inputs(x_src, x_tgt)
    if orders is not None:
        overrides["orders"] = check_orders(orders)
    cfg = config if config is not None else make_config(preset, **overrides)
    check_kernel_size(cfg.kernel_size, tuple(x_tgt.shape[2:]))
    ctx = ctx or kd.Context()
    if not ctx.distributed:  # (a distributed fit's ranks are checked by the pipeline that started them)
        check_informative(x_src, x_tgt)
    dev = ctx.device if ctx.distributed else resolve_device(device)
    report = progress or (lambda p: None)

    data = prepare_data(x_src, x_tgt, cfg, dev, ctx, groups=groups)
    nested = None
    if cfg.nested:
        report(FitProgress("init", 0, 0, elapsed=time.perf_counter() - t0))
        models, stages, last, lin = train_nested(data, cfg, lambda c: _planned(c, data, dev), report=report, t0=t0,
                                                 cancel=cancel, on_epoch=on_epoch)
        model = models[-1]
        run = last or TrainRun((), 0, 0, 0, 0, 0, "schedule", "float32", None)  # K = 0: g₀ is closed-form
        gains = evaluate_gains(models, data)
        nested = NestedFits(tuple(m.to("cpu", memory_format=torch.contiguous_format).eval() for m in models[:-1])
                            + (model,), gains, tuple(stages))
    else:
        cfg, plan = _planned(cfg, data, dev)
        report(FitProgress("init", 0, len(plan.rounds), elapsed=time.perf_counter() - t0, steps=plan.total_steps))
        model, lin = init_model(data, cfg)
        run = train(model, data, cfg, plan, report=report, t0=t0, cancel=cancel, on_epoch=on_epoch)
        epochs = len(run.history)  # measurements made: the totals shown from here on are what ran
        report(FitProgress("calibrate", epochs, epochs, elapsed=time.perf_counter() - t0))
        calibrate(model, data.xs_tr, data.eval_batch, dev, data.ctx)
        model.eval()
    history = run.history
    epochs = len(history)

    report(FitProgress("evaluate", len(history), epochs, elapsed=time.perf_counter() - t0))
    err, heldout, baseline = evaluate_heldout(model, data, cfg, lin)

    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    result = FitResult(
        model=model,
        norm=data.norm,
        config=cfg,
        history=history,
        best_epoch=run.best_epoch,
        heldout_error=err,
        heldout_report=heldout,
        baseline=baseline,
        train_indices=tuple(int(i) for i in data.train_idx),
        heldout_indices=tuple(int(i) for i in data.heldout_idx),
        device=str(dev),
        seconds=time.perf_counter() - t0,
        monitor_indices=tuple(int(i) for i in data.monitor_idx),
        steps_planned=run.steps_planned,
        steps_run=run.steps_run,
        epochs_planned=run.epochs_planned,
        epochs_run=run.epochs_run,
        stopped_by=run.stopped_by,
        train_precision=run.train_precision,
        start_monitor_error=run.start_monitor_error,
        nested=nested,
    )
    report(FitProgress("done", len(history), epochs, elapsed=result.seconds))
    return result


def _planned(cfg: FitConfig, data: FitData, dev: torch.device) -> tuple[FitConfig, TrainPlan]:
    """``cfg`` as it runs on these maps (:func:`small_batch_config`) and its :class:`TrainPlan`."""
    shape = (data.xs.shape[1], data.xt.shape[1], data.xt.shape[2], data.xt.shape[3])
    flops = step_flops(*shape, cfg)
    cfg = small_batch_config(cfg, data.xs_tr.shape[0], flops, training_dtype(cfg, torch.device(dev), flops), dev)
    flops = step_flops(*shape, cfg)
    return cfg, train_plan(cfg, data.xs_tr.shape[0], flops, training_dtype(cfg, torch.device(dev), flops), dev)
