"""Feature maps a fit reads batch by batch: from tensors in memory or from the on-disk cache, on one or many ranks.

:class:`Rows` is a lazy, prepared (resampled, normalised, float32) view of selected images of a raw feature
array; slicing it reads and prepares only those images, so a fit from the float16 cache
(:class:`kcore.feature_cache.CachedArray`) holds about one batch of features whatever the number of
images. :func:`batch_slices` (from :mod:`kcore.distributed`) gives this rank's batches of a split (whole batches
of the single-process order), and the merges below turn per-rank moments into the job's.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore.distributed import batch_slices
from kcore.metrics.moments import ChannelMoments, CrossMoments
from kcore.metrics.variance import ImageMoments, VarianceAccumulator

__all__ = ["Rows", "batch_slices", "gram_cka", "merge_accumulator", "merge_image_moments", "merge_moments",
           "sum_by_position"]

Moments = TypeVar("Moments", ChannelMoments, CrossMoments)


class Rows:
    """Prepared maps of images ``index`` of ``raw``: ``rows[i:j]`` / ``rows[positions]`` -> float32 tensor.

    Args:
        raw: (N, C, H, W) raw features: a tensor (float32 or float16, possibly memory-mapped) or a
            :class:`kcore.feature_cache.CachedArray`.
        fn: the preparation (``Normalization.source`` or ``.target``), applied per batch.
        index: the images of ``raw`` this view covers, in order.
        memory_format: layout of the returned batches.
        shape: per-image shape after ``fn`` (C, H, W).
    """

    def __init__(self, raw: Any, fn: Callable[[Tensor], Tensor], index: Tensor, memory_format: torch.memory_format,
                 shape: tuple[int, ...]) -> None:
        self.raw, self.fn, self.index, self.memory_format = raw, fn, index.to(torch.long), memory_format
        self.shape = torch.Size((len(self.index), *shape))
        self.device = torch.device("cpu")

    def __len__(self) -> int:
        return len(self.index)

    def take(self, positions: Tensor) -> "Rows":
        """The view of ``self.index[positions]``."""
        return Rows(self.raw, self.fn, self.index[positions.to(torch.long).cpu()], self.memory_format, tuple(self.shape[1:]))

    def __getitem__(self, key: int | slice | Tensor) -> Tensor:
        if isinstance(key, int):
            return self[key : key + 1][0]
        picks = self.index[key] if isinstance(key, slice) else self.index[key.to(torch.long).cpu()]
        if len(picks) == 0:
            return torch.empty(0, *self.shape[1:])
        order = torch.argsort(picks)  # read the file forwards, then put the images back in the asked order
        xb = self.raw[picks[order]]
        xb = xb.float() if xb.dtype in (torch.float16, torch.bfloat16) else xb
        with torch.no_grad():
            out = self.fn(xb).float()
        out = out[torch.argsort(order)] if not bool((order == torch.arange(len(order))).all()) else out
        return out.contiguous(memory_format=self.memory_format)


def merge_moments(moments: Moments, ctx: kd.Context | None = None) -> Moments:
    """Moments holding every rank's elements, the same on every rank; ``moments`` itself for one process.

    Args:
        moments: this rank's :class:`~kcore.metrics.ChannelMoments` or :class:`~kcore.metrics.CrossMoments`.
        ctx: the job's context (default: one process).

    Returns:
        New moments of the same kind: every rank's :meth:`pack` gathered and merged in rank order (Chan et al.'s
        parallel update), so every rank gets the same numbers; ``moments`` is not changed.
    """
    ctx = ctx or kd.Context()
    if not ctx.distributed:
        return moments
    merged = type(moments)(moments.channels)
    merged.merge(torch.stack(kd.all_gather_tensors(moments.pack(), ctx)))
    return merged


def merge_accumulator(acc: VarianceAccumulator, ctx: kd.Context | None = None) -> VarianceAccumulator:
    """A :class:`kcore.metrics.VarianceAccumulator` holding every rank's images (the same on every rank).

    Args:
        acc: this rank's accumulator; it is not changed.
        ctx: the job's context (default: one process, which gets ``acc`` back).

    Returns:
        A new accumulator whose moments, squared error and image count are the job's (:func:`merge_moments`),
        and whose per-image sums for the bootstrap hold every rank's images in position order
        (:func:`merge_image_moments`), so its intervals are those of one process over the same images.
    """
    ctx = ctx or kd.Context()
    if not ctx.distributed:
        return acc
    out = copy.copy(acc)
    out.comp = [merge_moments(m, ctx) for m in acc.comp]
    out.output = merge_moments(acc.output, ctx)
    out.residual = merge_moments(acc.residual, ctx)
    out.target = merge_moments(acc.target, ctx)
    out.cross = [merge_moments(m, ctx) for m in acc.cross]
    out.sq_err, images = kd.all_reduce_floats(acc.sq_err, float(acc.images), ctx=ctx)
    out.images = int(images)
    out.image_moments = merge_image_moments(acc.image_moments, out.images, ctx)
    return out


def merge_image_moments(moments: ImageMoments, n: int, ctx: kd.Context | None = None) -> ImageMoments:
    """Per-image sums holding every rank's images, placed by position, the same on every rank.

    The nested gains' bootstrap does the same (:class:`kcore.fit.GainAccumulator`): each rank writes its images'
    rows at their positions among the ``n`` images (zeros elsewhere) and the rows are summed over ranks, so a
    bootstrap resample draws the same images, with the same numbers, as in one process. The ranks took their
    shifts from their own first batches; every rank's sums are re-centred on the first rank's that added images
    (rank 0's, which are one process's: rank 0 reads the first batch), see :meth:`ImageMoments.rows`.

    Args:
        moments: this rank's :class:`~kcore.metrics.ImageMoments`, updated with each batch's ``positions``.
        n: the images of the whole pass (every rank's together). ctx: the job's context (default: one process).

    Returns:
        ``moments`` itself for one process; else new moments with one block (n, 2K+7, C) in position order (one
        column summed over channels when any rank had too many to keep per channel) and the group labels.

    Raises:
        ValueError: the ranks' positions do not cover 0 … n−1 once each (the batches were not the job's split).
    """
    ctx = ctx or kd.Context()
    if not ctx.distributed:
        return moments
    k3 = moments.orders + 3
    has = bool(moments.batches)
    collapsed = has and moments.batches[0].shape[-1] != moments.channels
    mine = torch.tensor((moments.shifts if has else [float("nan")] * k3)
                        + [float(collapsed), float(moments.groups is not None), float(moments.units)], dtype=torch.float64)
    every = torch.stack(kd.all_gather_tensors(mine, ctx))  # (R, K+6), rank order
    firsts = [row for row in every if not bool(torch.isnan(row[:k3]).any())]
    out = ImageMoments(moments.orders, moments.channels)
    if not firsts:
        return out  # no rank added an image
    shifts = firsts[0][:k3].tolist()
    collapsed, grouped, units = bool(every[:, k3].max() > 0), bool(every[:, k3 + 1].max() > 0), int(every[:, k3 + 2].max())
    width = 1 if collapsed else moments.channels
    rows, order = moments.rows(shifts)
    if rows.shape[-1] != width:
        rows = rows.sum(-1, keepdim=True)
    positions = torch.cat(moments.positions)[order] if has else torch.zeros(0, dtype=torch.long)
    labels = torch.zeros(len(positions), 1, 1, dtype=torch.float64)  # group label + 1 (0: none)
    if grouped and moments.groups is not None:
        labels[:, 0, 0] = torch.cat(moments.groups)[order].to(torch.float64) + 1.0
    dense = sum_by_position(torch.cat([rows, labels.expand(-1, 1, width)], 1), positions, n, ctx)
    out.shifts, out.units, out.per_channel = shifts, units, not collapsed
    out.batches, out.positions = [dense[:, :-1].contiguous()], [torch.arange(n)]
    out.kept = out.batches[0].numel()
    out.groups = [(dense[:, -1, 0] - 1.0).round().to(torch.long)] if grouped else None
    return out


def sum_by_position(rows: Tensor, positions: Tensor, n: int, ctx: kd.Context | None = None) -> Tensor:
    """Every rank's per-image ``rows`` placed at their ``positions`` among ``n`` images, summed over the ranks.

    The one way per-image sums of a torchrun job are merged, for the shares' bootstrap
    (:func:`merge_image_moments`) and the nested gains' (:class:`kcore.fit.GainAccumulator`): each image is
    evaluated by exactly one rank, so the sum over ranks of rows placed by position (zeros elsewhere) is the
    (n, …) tensor one process fills, whatever the number of ranks.

    Args:
        rows: (m, …) float64 rows of this rank's m images. positions: (m,) their positions in 0 … n−1.
        n: the images of the whole pass. ctx: the job's context (default: one process).

    Returns:
        (n, …) float64, the same on every rank.

    Raises:
        ValueError: the ranks' positions do not cover 0 … n−1 once each (the batches were not the job's split).
    """
    ctx = ctx or kd.Context()
    positions = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
    dense = torch.zeros(n, *rows.shape[1:], dtype=torch.float64)
    dense[positions] = rows.to(torch.float64).cpu()
    placed = torch.zeros(n, dtype=torch.float64)
    placed.index_add_(0, positions, torch.ones(len(positions), dtype=torch.float64))
    if ctx.distributed:
        flat = kd.all_reduce_sum(torch.cat([dense.reshape(n, -1), placed[:, None]], 1), ctx)
        dense, placed = flat[:, :-1].reshape(dense.shape), flat[:, -1]
    if not bool((placed == 1).all()):
        raise ValueError(f"the ranks' images must cover positions 0 … {n - 1} once each; got "
                         f"{int((placed == 0).sum())} missing and {int((placed > 1).sum())} repeated. Fix: pass every "
                         "batch's positions from kcore.distributed.batch_slices of the same split.")
    return dense


def gram_cka(x: Any, y: Any, batch_size: int = 256) -> float:
    """Linear CKA between the images of ``x`` and ``y`` (Rows or tensors), from Gram matrices built block by block.

    Equal to :func:`kcore.metrics.linear_cka` (the Gram form ⟨HKH, HLH⟩ / (‖HKH‖ ‖HLH‖), float64), with
    memory of an N × N matrix and two blocks of images rather than all N images' features.
    """
    n = x.shape[0]
    if n < 2:
        return float("nan")
    ka = torch.zeros(n, n, dtype=torch.float64)
    kb = torch.zeros(n, n, dtype=torch.float64)
    starts = range(0, n, batch_size)
    for i in starts:
        xi = x[i : i + batch_size].reshape(min(batch_size, n - i), -1).to(torch.float64)
        yi = y[i : i + batch_size].reshape(min(batch_size, n - i), -1).to(torch.float64)
        for j in starts:
            if j < i:
                continue
            xj = xi if j == i else x[j : j + batch_size].reshape(min(batch_size, n - j), -1).to(torch.float64)
            yj = yi if j == i else y[j : j + batch_size].reshape(min(batch_size, n - j), -1).to(torch.float64)
            for k, a, b in ((ka, xi, xj), (kb, yi, yj)):
                block = a @ b.T
                k[i : i + batch_size, j : j + batch_size] = block
                k[j : j + batch_size, i : i + batch_size] = block.T
    for k in (ka, kb):  # H K H in place: minus column means, then minus row means (grand mean restored)
        k.sub_(k.mean(0, keepdim=True))
        k.sub_(k.mean(1, keepdim=True))
    den = ka.norm() * kb.norm()
    return float(torch.dot(ka.view(-1), kb.view(-1)) / den) if float(den) > 0 else float("nan")
