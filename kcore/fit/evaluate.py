"""Errors of a g_θ on prepared maps: the monitor error, the calibration of Σ_(k) and the held-out evaluation."""
from __future__ import annotations

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore.decompose import components
from kcore.fit.config import FitConfig
from kcore.fit.data import FitData
from kcore.gtheta import GTheta
from kcore.metrics import (
    Baseline,
    ChannelMoments,
    LinearMap,
    VarianceAccumulator,
    VarianceReport,
    fit_linear_map,
    linear_baseline,
)
from kcore.streaming import batch_slices, gram_cka, merge_accumulator, merge_moments

STREAMED_CKA_IMAGES = 1024
"""A streamed fit's linear CKA baseline uses at most this many held-out images (two 1024² float64 Gram
matrices, 16 MiB); its R² baseline and every variance use all of them."""


def relative_error(
    model: GTheta, xs: Tensor, xt: Tensor, batch_size: int, device: torch.device, ctx: kd.Context | None = None
) -> float:
    """Σ(x* − g(x))² / Σ(x* − channel mean)² over prepared maps, in eval mode (sums over all ranks of ``ctx``).

    Args:
        model: the g_θ, in eval mode.
        xs, xt: normalised source (N, C_a, H, W) and target (N, C_b, H, W) maps (:class:`FitData`'s).
        batch_size: images per batch (any value gives the same number).
        device: where ``model`` runs.
        ctx: the torchrun job whose ranks each pass their share of the batches (default: this process).

    Returns:
        The relative squared error (1 − R²), ``nan`` for constant targets.
    """
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


def monitor_error(model: GTheta, data: FitData, tot_mse: float, n_images: int) -> float:
    """The relative error on the monitor split; without one, the training split's from the running mean squared
    error ``tot_mse`` (summed over ``n_images`` images) of the last steps, which costs no extra pass."""
    if data.xs_mon is not None and data.xt_mon is not None:
        return relative_error(model, data.xs_mon, data.xt_mon, data.eval_batch, data.device, data.ctx)
    if not data.train_sst > 0 or n_images == 0:
        return float("nan")
    n_tr = data.xt_tr.shape[0]
    return tot_mse / n_images * n_tr * data.xt_tr[0].numel() / data.train_sst


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
        held_groups = data.heldout_groups()  # the bootstrap resamples whole groups when there are groups
        for i in range(0, xs_h.shape[0], step):
            comps = components(model, xs_h[i : i + step].to(data.device))
            tb = xt_h[i : i + step].to(data.device)
            acc.update(comps, tb - torch.stack(comps).sum(0), tb,
                       None if held_groups is None else held_groups[i : i + step])
    baseline = linear_baseline(
        data.xs_tr.cpu(), data.xt_tr.cpu(), xs_h.cpu(), xt_h.cpu(), cfg.kernel_size, lin=lin
    )
    sst = float(acc.target.m2.sum())  # = relative_error on the held-out images, without another forward pass
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
            acc.update(comps, tb - torch.stack(comps).sum(0), tb, data.heldout_groups(sl), positions=sl)
    acc = merge_accumulator(acc, ctx)
    (lin_sse,) = kd.all_reduce_floats(lin_sse, ctx=ctx)
    sst = float(acc.target.m2.sum())
    cka_rows = torch.arange(min(len(xs_h), STREAMED_CKA_IMAGES))
    cka = gram_cka(xs_h.take(cka_rows), xt_h.take(cka_rows), data.eval_batch) if ctx.is_main else None
    cka = kd.broadcast_object(cka, 0, ctx)
    baseline = Baseline(1.0 - lin_sse / sst if sst > 0 else float("nan"), lin.kernel_size, float(cka))
    err = acc.sq_err / sst if sst > 0 else float("nan")
    return err, acc.report(), baseline
