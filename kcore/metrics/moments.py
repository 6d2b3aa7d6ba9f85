"""Streaming per-channel moments in float64 (Chan et al.'s parallel update), and the paper's Var and Cov computed
directly on whole tensors (the reference the stream is tested against).
"""
from __future__ import annotations

import torch
from torch import Tensor


class _Moments:
    """What both kinds of streaming moments share: packing to one flat tensor and merging packed moments back.

    A subclass holds a count ``n`` and per-channel float64 tensors named in ``_FIELDS``, and ``_add`` merges the
    moments of ``nb`` more elements into them (Chan et al.'s update).
    """

    _FIELDS: tuple[str, ...] = ()
    n: int

    def _add(self, nb: int, *moments: Tensor) -> None:
        raise NotImplementedError

    @property
    def channels(self) -> int:
        """C, the number of channels these moments describe."""
        return getattr(self, self._FIELDS[0]).numel()

    def pack(self) -> Tensor:
        """These moments as one flat float64 tensor, what :meth:`merge` reads back.

        Returns:
            (1 + F·C,): the count, then each of the F per-channel fields in order (``mean``, ``m2`` for
            :class:`ChannelMoments`; ``mean_a``, ``mean_b``, ``c2`` for :class:`CrossMoments`). A collective
            (:func:`kcore.distributed.all_gather_tensors`) carries it between ranks.
        """
        n = torch.tensor([float(self.n)], dtype=torch.float64)
        return torch.cat([n, *(getattr(self, f) for f in self._FIELDS)])

    def merge(self, packed: Tensor) -> None:
        """Merge moments that :meth:`pack` produced into these, in order (Chan et al.'s parallel update).

        Args:
            packed: (1 + F·C,) one set of packed moments, or (R, 1 + F·C) several (e.g. every rank's, in rank
                order); sets with a count of 0 are skipped.

        Raises:
            TypeError: ``packed`` is not a tensor.
            ValueError: ``packed`` is not packed moments of this kind and these C channels.
        """
        kind, c, f = type(self).__name__, self.channels, len(self._FIELDS)
        if not isinstance(packed, Tensor):
            raise TypeError(f"packed must be a tensor from {kind}.pack(); got {type(packed).__name__}. "
                            f"Fix: pass moments.pack() (or a stack of them), not the moments object.")
        rows = packed.detach().to("cpu", torch.float64)
        rows = rows.unsqueeze(0) if rows.dim() == 1 else rows
        if rows.dim() != 2 or rows.shape[1] != 1 + f * c:
            raise ValueError(f"packed must be ({1 + f * c},) or (R, {1 + f * c}) for {kind} of {c} channels; got "
                             f"shape {tuple(packed.shape)}. Fix: merge moments of the same channels, packed by "
                             f"{kind}.pack().")
        for part in rows:
            n_b = int(part[0])
            if n_b:
                self._add(n_b, *part[1:].reshape(f, c))


class ChannelMoments(_Moments):
    """Streaming per-channel count, mean and sum of squared deviations of (N, C, H, W) tensors (float64)."""

    _FIELDS = ("mean", "m2")

    def __init__(self, channels: int):
        self.n = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, x: Tensor) -> None:
        """Merge a batch ``x`` (N, C, H, W) into the running moments."""
        xb = x.detach().to(dtype=torch.float64)
        nb = xb.shape[0] * xb.shape[2] * xb.shape[3]
        if nb == 0:
            return
        mb = xb.mean(dim=(0, 2, 3))
        m2b = ((xb - mb.view(1, -1, 1, 1)) ** 2).sum(dim=(0, 2, 3))
        self._add(nb, mb.cpu(), m2b.cpu())

    def _add(self, nb: int, mb: Tensor, m2b: Tensor) -> None:
        """Chan et al.'s update with the moments of ``nb`` more elements per channel (mean ``mb``, sum ``m2b``)."""
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta**2 * (self.n * nb / n)
        self.n = n

    def channel_var(self) -> Tensor:
        """(C,) variance of each channel around its own mean."""
        return self.m2 / max(self.n, 1)

    def global_var(self) -> float:
        """The paper's Var: every element around the single mean over images and units."""
        grand = self.mean.mean()
        return float((self.m2.sum() + self.n * ((self.mean - grand) ** 2).sum()) / (self.n * self.mean.numel()))

    def channel_centred_var(self) -> float:
        """Variance pooled over channels around per-channel means (the authors' ``Variance.py``)."""
        return float(self.channel_var().mean())


def paper_var(x: Tensor) -> float:
    """Var(x) of the paper for a whole tensor (N, C, H, W), computed directly (reference for the stream)."""
    x = x.detach().to(torch.float64)
    return float(((x - x.mean()) ** 2).mean())


def paper_cov(x: Tensor, y: Tensor) -> float:
    """Cov(x, y) with the paper's single global mean of each tensor, computed directly (reference for the stream)."""
    x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
    return float(((x - x.mean()) * (y - y.mean())).mean())


class CrossMoments(_Moments):
    """Streaming per-channel co-moment Σ(a − mean_a)(b − mean_b) of two (N, C, H, W) tensors (float64)."""

    _FIELDS = ("mean_a", "mean_b", "c2")

    def __init__(self, channels: int):
        self.n = 0
        self.mean_a = torch.zeros(channels, dtype=torch.float64)
        self.mean_b = torch.zeros(channels, dtype=torch.float64)
        self.c2 = torch.zeros(channels, dtype=torch.float64)

    def update(self, a: Tensor, b: Tensor) -> None:
        """Merge a batch of paired tensors (float64 on any device) into the running co-moment."""
        nb = a.shape[0] * a.shape[2] * a.shape[3]
        if nb == 0:
            return
        ma, mb = a.mean(dim=(0, 2, 3)), b.mean(dim=(0, 2, 3))
        c2b = ((a - ma.view(1, -1, 1, 1)) * (b - mb.view(1, -1, 1, 1))).sum(dim=(0, 2, 3))
        self._add(nb, ma.cpu(), mb.cpu(), c2b.cpu())

    def _add(self, nb: int, ma: Tensor, mb: Tensor, c2b: Tensor) -> None:
        """The co-moment form of Chan's update with ``nb`` more elements per channel (means ``ma``, ``mb``)."""
        n = self.n + nb
        da, db = ma - self.mean_a, mb - self.mean_b
        self.mean_a = self.mean_a + da * (nb / n)
        self.mean_b = self.mean_b + db * (nb / n)
        self.c2 = self.c2 + c2b + da * db * (self.n * nb / n)
        self.n = n

    def channel_cov(self) -> Tensor:
        """(C,) covariance of each channel around its own means."""
        return self.c2 / max(self.n, 1)

    def global_cov(self) -> float:
        """Cov with the paper's single mean over images and units for each of the two tensors."""
        ga, gb = self.mean_a.mean(), self.mean_b.mean()
        num = self.c2.sum() + self.n * ((self.mean_a - ga) * (self.mean_b - gb)).sum()
        return float(num / (self.n * self.mean_a.numel()))
