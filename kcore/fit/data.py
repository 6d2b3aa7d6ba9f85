"""The fit's inputs: checked, split (seeded) into training, monitor and held-out images, and normalised."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import Tensor

from kcore import distributed as kd
from kcore._validate import check_pair
from kcore.conventions import Normalization
from kcore.fit.config import FitConfig
from kcore.fit.plan import eval_batch_size
from kcore.groups import Groups, as_groups, group_split
from kcore.metrics import ChannelMoments
from kcore.streaming import Rows, batch_slices, merge_moments


def split_indices(n: int, val_fraction: float, monitor_fraction: float, seed: int,
                  groups: Groups | Sequence[Hashable] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Seeded (train, monitor, held-out) index split of ``n`` images; with ``groups``, no group is split.

    Args:
        n: images.
        val_fraction: share of the images held out (at least one image, or one group).
        monitor_fraction: share of the training images set aside to pick the best epoch (none below 10).
        seed: the split's seed.
        groups: one group per image (:class:`kcore.groups.Groups` or N keys): whole groups go to each part
            (:func:`kcore.groups.group_split`). ``None``, or every image its own group, gives the ungrouped split.

    Returns:
        ``(train, monitor, held_out)`` sorted int64 index tensors.

    Raises:
        ValueError: when fewer than 1 held-out or 2 training images (or fewer than 2 groups) would remain.
    """
    grouped = as_groups(groups, n)
    if grouped is not None and not grouped.trivial:
        return group_split(grouped, val_fraction, monitor_fraction, seed)
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
        groups: the images' groups (:class:`kcore.groups.Groups`), or ``None`` when every image is its own group;
            the split keeps groups whole and the held-out bootstrap resamples them (:meth:`heldout_groups`).

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
    groups: Groups | None = None

    def heldout_groups(self, positions: slice | Tensor | None = None) -> Tensor | None:
        """Group labels (int64) of the held-out images at ``positions`` of the held-out order (default: all);
        ``None`` without a grouping (then the bootstrap resamples images)."""
        if self.groups is None or self.groups.trivial:
            return None
        labels = self.groups.label_tensor()[self.heldout_idx.cpu()]
        return labels if positions is None else labels[positions]

    @property
    def has_monitor(self) -> bool:
        """True when some training images are set aside to pick the best epoch (the monitor split)."""
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
    x_src: Tensor, x_tgt: Tensor, cfg: FitConfig, dev: torch.device, ctx: kd.Context | None = None,
    groups: Groups | Sequence[Hashable] | None = None,
) -> FitData:
    """Split the images (seeded), fit the normalisation on the training split and normalise every map.

    With ``groups`` (one per image), no group is split between training, monitor and held-out images.

    In-memory tensors in one process are normalised once and kept (fastest). Cached arrays
    (:class:`kcore.feature_cache.CachedArray`), or a fit shared by several ranks, are streamed instead: the
    statistics come from (all-reduced) sums and every batch is read and prepared when it is used.
    """
    ctx = ctx or kd.Context()
    groups = as_groups(groups, x_src.shape[0])
    train_idx, mon_idx, held_idx = split_indices(x_src.shape[0], cfg.val_fraction, cfg.monitor_fraction, cfg.seed,
                                                 groups)
    norm = Normalization.fit(x_src, x_tgt, cfg.convention, indices=train_idx, ctx=ctx)
    # On the CPU, oneDNN's convolutions run faster on channels-last (NHWC) maps than on NCHW ones (bench/).
    fmt = torch.channels_last if dev.type == "cpu" else torch.contiguous_format
    if ctx.distributed or not (isinstance(x_src, Tensor) and isinstance(x_tgt, Tensor)):
        return _streamed_data(x_src, x_tgt, norm, (train_idx, mon_idx, held_idx), dev, fmt, ctx, groups)
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
    return FitData(norm, xs, xt, train_idx, mon_idx, held_idx, xs_tr, xt_tr, xs_mon, xt_mon, train_sst, dev, fmt,
                   groups=groups)


def _streamed_data(
    x_src: Any,
    x_tgt: Any,
    norm: Normalization,
    split: tuple[Tensor, Tensor, Tensor],
    dev: torch.device,
    fmt: torch.memory_format,
    ctx: kd.Context,
    groups: Groups | None = None,
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
    return FitData(norm, xs, xt, train_idx, mon_idx, held_idx, xs_tr, xt_tr, xs_mon, xt_mon, train_sst, dev, fmt, ctx,
                   groups)


def check_inputs(x_src: Any, x_tgt: Any) -> tuple[Any, Any]:
    """The fit's inputs checked: :func:`check_pair` for tensors; shapes only for cached arrays.

    (The feature cache stores finite values only.)

    Raises:
        ValueError: not (N, C, H, W) arrays, an empty one, or different N.
    """
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
