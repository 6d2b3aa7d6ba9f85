"""Streaming per-channel moments in float64 (Chan et al.'s parallel update), and the paper's Var and Cov computed
directly on whole tensors (the reference the stream is tested against).
"""
from __future__ import annotations

import torch
from torch import Tensor


class ChannelMoments:
    """Streaming per-channel count, mean and sum of squared deviations of (N, C, H, W) tensors (float64)."""

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

    @property
    def channels(self) -> int:
        """C, the number of channels these moments describe."""
        return self.mean.numel()

    def pack(self) -> Tensor:
        """These moments as one flat float64 tensor, what :meth:`merge` reads back.

        Returns:
            (1 + 2C,): the count, the C means, the C sums of squared deviations (a collective such as
            :func:`kcore.distributed.all_gather_tensors` carries it between ranks).
        """
        return torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean, self.m2])

    def merge(self, packed: Tensor) -> None:
        """Merge moments that :meth:`pack` produced into these, in order (Chan et al.'s parallel update).

        Args:
            packed: (1 + 2C,) one set of packed moments, or (R, 1 + 2C) several (e.g. every rank's, in rank
                order); sets with a count of 0 are skipped.

        Raises:
            TypeError: ``packed`` is not a tensor.
            ValueError: ``packed`` is not packed moments of these C channels.
        """
        c = self.channels
        for part in _packed_rows(packed, 1 + 2 * c, "ChannelMoments", c):
            n_b = int(part[0])
            if n_b:
                self._add(n_b, part[1 : 1 + c], part[1 + c :])

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


class CrossMoments:
    """Streaming per-channel co-moment Σ(a − mean_a)(b − mean_b) of two (N, C, H, W) tensors (float64)."""

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

    @property
    def channels(self) -> int:
        """C, the number of channels these co-moments describe."""
        return self.c2.numel()

    def pack(self) -> Tensor:
        """These co-moments as one flat float64 tensor, what :meth:`merge` reads back.

        Returns:
            (1 + 3C,): the count, the C means of a, the C means of b, the C co-moments.
        """
        return torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.mean_a, self.mean_b, self.c2])

    def merge(self, packed: Tensor) -> None:
        """Merge co-moments that :meth:`pack` produced into these, in order (the co-moment form of Chan's update).

        Args:
            packed: (1 + 3C,) one set of packed co-moments, or (R, 1 + 3C) several (e.g. every rank's, in rank
                order); sets with a count of 0 are skipped.

        Raises:
            TypeError: ``packed`` is not a tensor.
            ValueError: ``packed`` is not packed co-moments of these C channels.
        """
        c = self.channels
        for part in _packed_rows(packed, 1 + 3 * c, "CrossMoments", c):
            n_b = int(part[0])
            if n_b:
                self._add(n_b, part[1 : 1 + c], part[1 + c : 1 + 2 * c], part[1 + 2 * c :])

    def channel_cov(self) -> Tensor:
        """(C,) covariance of each channel around its own means."""
        return self.c2 / max(self.n, 1)

    def global_cov(self) -> float:
        """Cov with the paper's single mean over images and units for each of the two tensors."""
        ga, gb = self.mean_a.mean(), self.mean_b.mean()
        num = self.c2.sum() + self.n * ((self.mean_a - ga) * (self.mean_b - gb)).sum()
        return float(num / (self.n * self.mean_a.numel()))


def _packed_rows(packed: Tensor, width: int, kind: str, channels: int) -> Tensor:
    """``packed`` as (R, width) float64 rows, or a ValueError that says what was expected."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"packed must be a tensor from {kind}.pack(); got {type(packed).__name__}. "
                        f"Fix: pass moments.pack() (or a stack of them), not the moments object.")
    rows = packed.detach().to("cpu", torch.float64)
    rows = rows.unsqueeze(0) if rows.dim() == 1 else rows
    if rows.dim() != 2 or rows.shape[1] != width:
        raise ValueError(f"packed must be ({width},) or (R, {width}) for {kind} of {channels} channels; got shape "
                         f"{tuple(packed.shape)}. Fix: merge moments of the same channels, packed by {kind}.pack().")
    return rows
