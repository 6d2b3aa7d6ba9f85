"""One streaming pass over batches of (components, residual, target) to a :class:`VarianceReport`, with the
per-image sums a bootstrap over held-out images needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from kcore.metrics.moments import ChannelMoments, CrossMoments
from kcore.metrics.report import (
    CI_BOOTSTRAPS,
    CI_LEVEL,
    CI_SEED,
    ChannelProfile,
    ConfidenceIntervals,
    VarianceReport,
    _floats,
)

#: per-image, per-channel moments are kept up to this many float64 values (images × channels × (2K+7));
#: beyond it only the per-image sums over channels are kept (run-level intervals only)
MAX_IMAGE_MOMENTS = 2**25


def resample_weights(n: int, n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED,
                     groups: Tensor | Sequence[int] | None = None) -> Tensor:
    """How often each of ``n`` images is drawn in each of ``n_boot`` resamples with replacement (seeded).

    Args:
        n: images resampled. n_boot: resamples. seed: the generator's seed.
        groups: optional group label of each image: then whole groups are drawn (a cluster bootstrap: the G
            groups, in sorted label order, drawn G times with replacement) and each image weighs what its group
            does. Labels that are all different give exactly the image bootstrap.

    Returns:
        (n_boot, n) float64 counts; each row sums to ``n`` for the image bootstrap (to the drawn groups' images
        for a cluster bootstrap). The same ``(n, n_boot, seed, groups)`` gives the same resamples, so intervals of
        different quantities over the same images are drawn from the same resamples.

    Raises:
        ValueError: ``groups`` does not give one label per image.
    """
    inv, n_groups = group_index(groups, n)
    draws = n if inv is None else n_groups
    idx = torch.randint(draws, (n_boot, draws), generator=torch.Generator().manual_seed(int(seed)))
    w = torch.zeros(n_boot, draws, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, draws, dtype=torch.float64))
    return w if inv is None else w[:, inv]


def group_index(groups: Tensor | Sequence[int] | None, n: int) -> tuple[Tensor | None, int]:
    """``(index of each image's group in sorted label order, number of groups)``; ``(None, n)`` without groups
    or when every image is its own group (the image bootstrap).

    Raises:
        ValueError: not one label per image.
    """
    if groups is None:
        return None, n
    labels = torch.as_tensor(groups, dtype=torch.long).flatten().cpu()
    if labels.numel() != n:
        raise ValueError(f"groups must give one label per image: expected {n}, got {labels.numel()}. Fix: pass the "
                         "group labels of the images the moments were added for, in the same order.")
    uniq, inv = torch.unique(labels, return_inverse=True)
    return (None, n) if len(uniq) == n else (inv, len(uniq))


def percentile_interval(x: Tensor, level: float = CI_LEVEL) -> Tensor:
    """The percentile interval at ``level`` of bootstrap values ``x`` (B, …) → (…, 2) (low, high)."""
    q = (1 - level) / 2
    return torch.stack([torch.quantile(x, q, dim=0), torch.quantile(x, 1 - q, dim=0)], -1)


class ImageMoments:
    """Per-image sums that let a bootstrap over images recompute every variance and share without a refit.

    For each image and channel, with one fixed shift per part (taken from the first batch, for precision):
    Σ(p − s_p) for the parts p = x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ, x*; Σ(p − s_p)(x* − s_*) for the same parts; Σ(x^Δ − s_Δ)²
    (2K+7 numbers). Covariances are shift-invariant, so any resample's Var and Cov follow from weighted sums.
    """

    def __init__(self, orders: int, channels: int):
        self.orders, self.channels = orders, channels
        self.shifts: list[float] | None = None
        self.batches: list[Tensor] = []  # (n, 2K+7, C) or, once too large, (n, 2K+7, 1)
        self.per_channel = True
        self.units = 0  # elements per image per channel (H·W)
        self.kept = 0
        self.groups: list[Tensor] | None = None  # per batch: the images' group labels (None: no grouping)
        self.positions: list[Tensor] = []  # per batch: the images' positions among all images of the pass

    def update(self, comps: Sequence[Tensor], r: Tensor, t: Tensor, groups: Tensor | None = None,
               positions: slice | Tensor | None = None) -> None:
        """Add one batch's sums: the components ``comps`` (x⁽⁰⁾ … x⁽ᴷ⁾), x^Δ ``r`` and x* ``t``, each (N, C, H, W),
        and optionally the images' group labels ``groups`` (N,) for a cluster bootstrap (every batch or none) and
        their ``positions`` among the images of the whole pass (default: after the images added so far); a rank of
        a torchrun job passes its batches' positions so that :func:`kcore.streaming.merge_image_moments` can put
        every rank's images in the order one process adds them.

        Raises:
            ValueError: ``groups`` given for some batches and not others, or not one label per image.
        """
        if (groups is None) != (self.groups is None) and self.batches:
            raise ValueError("groups must be given for every batch or for none; got them for only some. Fix: pass "
                             "the held-out images' group labels with every batch (kcore.fit.FitData.heldout_groups).")
        if groups is not None:
            groups = torch.as_tensor(groups, dtype=torch.long).flatten().cpu()
            if groups.numel() != t.shape[0]:
                raise ValueError(f"groups must give one label per image of the batch: expected {t.shape[0]}, got "
                                 f"{groups.numel()}.")
            self.groups = (self.groups or []) + [groups]
        start = sum(len(p) for p in self.positions)
        if positions is None:
            positions = torch.arange(start, start + t.shape[0])
        elif isinstance(positions, slice):
            positions = torch.arange(positions.start or 0, (positions.start or 0) + t.shape[0])
        positions = torch.as_tensor(positions, dtype=torch.long).flatten().cpu()
        if positions.numel() != t.shape[0]:
            raise ValueError(f"positions must give one position per image of the batch: expected {t.shape[0]}, got "
                             f"{positions.numel()}. Fix: pass the batch's slice of the held-out order.")
        self.positions.append(positions)
        parts = list(comps) + [r, t]
        if self.shifts is None:
            self.shifts = [float(p.mean()) for p in parts]
        self.units = t.shape[2] * t.shape[3]
        cen = [p - s for p, s in zip(parts, self.shifts)]
        tc, rc = cen[-1], cen[-2]
        rows = [p.sum(dim=(2, 3)) for p in cen] + [(p * tc).sum(dim=(2, 3)) for p in cen] + [(rc * rc).sum(dim=(2, 3))]
        block = torch.stack(rows, 1).cpu()  # (n, 2K+7, C)
        self.kept += block.numel()
        if self.per_channel and self.kept > MAX_IMAGE_MOMENTS:
            self.per_channel = False
            self.batches = [b.sum(-1, keepdim=True) for b in self.batches]
        self.batches.append(block if self.per_channel else block.sum(-1, keepdim=True))

    def rows(self, shifts: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
        """Every image's sums in position order, optionally re-centred on other ``shifts``.

        Args:
            shifts: K+3 shifts (x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ, x*) to express the sums around instead of this object's own
                (another rank's, so that the ranks' sums add up); ``None``: this object's.

        Returns:
            ``(sums (N, 2K+7, C'), order)``: ``order`` sorts the images as added into position order (the
            positions given to :meth:`update`). With p − s' = (p − s) + δ, δ = s − s', u elements per image:
            Σ(p − s') = Σ(p − s) + uδ_p, Σ(p − s')(x* − s'_*) = Σ(p − s)(x* − s_*) + δ_* Σ(p − s) + δ_p Σ(x* − s_*)
            + uδ_pδ_*, Σ(x^Δ − s'_Δ)² = Σ(x^Δ − s_Δ)² + 2δ_Δ Σ(x^Δ − s_Δ) + uδ_Δ².
        """
        if not self.batches:
            return torch.zeros(0, 2 * self.orders + 7, self.channels, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
        order = torch.argsort(torch.cat(self.positions))
        s = torch.cat(self.batches)[order]
        if shifts is None or self.shifts is None:
            return s, order
        k3 = self.orders + 3
        if len(shifts) != k3:
            raise ValueError(f"shifts must hold K+3 = {k3} numbers (x⁽⁰⁾ … x⁽ᴷ⁾, x^Δ, x*); got {len(shifts)}.")
        delta = torch.tensor(self.shifts, dtype=torch.float64) - torch.tensor(list(shifts), dtype=torch.float64)
        u = self.units * (self.channels // s.shape[-1])  # elements per image in each column (all channels once summed)
        d = delta.view(1, k3, 1)
        sums, cross, sq = s[:, :k3], s[:, k3 : 2 * k3], s[:, 2 * k3 :]
        d_t, s_t = d[:, -1:], sums[:, -1:]
        out = torch.cat([sums + u * d,
                         cross + d_t * sums + d * s_t + u * d * d_t,
                         sq + 2 * d[:, -2:-1] * sums[:, -2:-1] + u * d[:, -2:-1] ** 2], 1)
        return out, order

    def bootstrap(self, level: float = CI_LEVEL, n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED,
                  groups: Tensor | Sequence[int] | None = None) -> ConfidenceIntervals | None:
        """Percentile intervals from ``n_boot`` resamples (with replacement) of the images, or of their groups.

        With group labels (``groups``, one per image in the order they were added, else those given to
        :meth:`update`), whole groups are resampled (a cluster bootstrap, :func:`resample_weights`), so images
        that are near-copies of each other count as the one observation they are. When every image is its own
        group this is exactly the image bootstrap (same seed, same numbers).

        Returns:
            The :class:`ConfidenceIntervals` (``n_groups`` set for a cluster bootstrap), or ``None`` below 2
            images or 2 groups.

        Raises:
            ValueError: ``level`` outside (0, 1), ``n_boot`` below 10, or not one group label per image.
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), e.g. 0.95; got {level}.")
        if n_boot < 10:
            raise ValueError(f"n_boot must be at least 10; got {n_boot}.")
        if not self.batches:
            return None
        s, order = self.rows()  # (N, 2K+7, C'), images in position order
        n = s.shape[0]
        if n < 2:
            return None
        if groups is None and self.groups is not None:
            groups = torch.cat(self.groups)[order]
        inv, n_groups = group_index(groups, n)
        if inv is not None and n_groups < 2:
            return None
        k1 = self.orders + 1

        def stats(tot: Tensor, m: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """tot (..., 2K+7) weighted sums over m elements (a number, or a tensor shaped like tot[..., :1])
            → (instability, shares of orders (…, K+1), x^Δ share)."""
            m_last = m[..., 0] if isinstance(m, Tensor) else m
            mean = tot[..., : k1 + 2] / m
            cross = tot[..., k1 + 2 : 2 * k1 + 4] / m
            cov = cross - mean * mean[..., -1:]  # Cov(part, x*), the last one Var(x*)
            var_t = cov[..., -1]
            var_r = tot[..., -1] / m_last - mean[..., k1] ** 2
            safe = torch.where(var_t > 0, var_t, torch.ones_like(var_t))
            return var_r / safe, cov[..., :k1] / safe.unsqueeze(-1), cov[..., k1] / safe

        def interval(x: Tensor) -> Tensor:  # (B, …) -> (…, 2)
            return percentile_interval(x, level)

        w = resample_weights(n, n_boot, seed, None if inv is None else groups)
        # images in each resample: n for the image bootstrap, the drawn groups' images for a cluster bootstrap
        images: float | Tensor = n if inv is None else w.sum(1, keepdim=True)
        glob = w @ s.sum(-1)  # (B, 2K+7)
        inst, sh, shr = stats(glob, images * self.units * self.channels)
        out = dict(instability=_floats(interval(inst)), share_orders=_floats(interval(sh)),
                   share_residual=_floats(interval(shr)))
        if self.per_channel and s.shape[-1] == self.channels:
            flat = s.reshape(n, -1)
            chunk = max(1, 2**24 // max(flat.shape[1], 1))
            tot = torch.cat([w[i : i + chunk] @ flat for i in range(0, n_boot, chunk)])
            tot = tot.view(n_boot, s.shape[1], self.channels).transpose(1, 2)  # (B, C, 2K+7)
            inst_c, sh_c, shr_c = stats(tot, images * self.units if inv is None else (images * self.units)[:, None])
            out.update(channel_instability=_floats(interval(inst_c)),
                       channel_share_orders=_floats(interval(sh_c).transpose(0, 1)),  # (K+1, C, 2)
                       channel_share_residual=_floats(interval(shr_c)))
        return ConfidenceIntervals(level=float(level), n_boot=int(n_boot), seed=int(seed), n_heldout=n,
                                   n_groups=None if inv is None else n_groups, **out)


class VarianceAccumulator:
    """One streaming pass over batches of (components, residual, target) -> a :class:`VarianceReport`.

    Moments are float64 whatever the input dtype. The shares sum to 1 as exactly as the caller's x^Δ equals
    x* − Σₖ x⁽ᵏ⁾ (float64 inputs: ~1e-15; float32 ones: ~1e-7).
    """

    def __init__(self, orders: int, channels: int):
        self.orders = orders
        self.comp = [ChannelMoments(channels) for _ in range(orders + 1)]
        self.output = ChannelMoments(channels)
        self.residual = ChannelMoments(channels)
        self.target = ChannelMoments(channels)
        self.cross = [CrossMoments(channels) for _ in range(orders + 2)]  # Cov(x^(k), x*) …, Cov(x^Δ, x*)
        self.sq_err = 0.0
        self.images = 0
        self.image_moments = ImageMoments(orders, channels)

    def update(self, components: Sequence[Tensor], residual: Tensor, target: Tensor,
               groups: Tensor | None = None, positions: slice | Tensor | None = None) -> None:
        """Add one batch: ``components`` K+1 tensors (n, C_b, H, W), ``residual`` and ``target`` (n, C_b, H, W),
        and optionally the images' group labels ``groups`` (n,): then the intervals resample groups; and their
        ``positions`` among all images (a torchrun rank's batches; see :meth:`ImageMoments.update`)."""
        if len(components) != self.orders + 1:
            raise ValueError(f"expected {self.orders + 1} components (K = {self.orders}); got {len(components)}.")
        t64 = target.detach().to(torch.float64)
        out = None
        for acc, cross, c in zip(self.comp, self.cross, components):
            c64 = c.detach().to(torch.float64)
            acc.update(c64)
            cross.update(c64, t64)
            out = c64 if out is None else out + c64
        r64 = residual.detach().to(torch.float64)
        self.output.update(out)
        self.residual.update(r64)
        self.cross[-1].update(r64, t64)
        self.target.update(t64)
        self.sq_err += float((r64**2).sum())
        self.images += int(target.shape[0])
        self.image_moments.update([c.detach().to(torch.float64) for c in components], r64, t64, groups,
                                 positions)

    def report(self, ci: bool = True, level: float = CI_LEVEL, n_boot: int = CI_BOOTSTRAPS, seed: int = CI_SEED
               ) -> VarianceReport:
        """The :class:`VarianceReport` of everything added so far, with bootstrap intervals when ``ci``."""
        var_t = self.target.global_var()
        ch_t = self.target.channel_var()
        safe_t = torch.where(ch_t > 0, ch_t, torch.ones_like(ch_t))
        numel = self.target.n * self.target.mean.numel()
        covs = [c.global_cov() for c in self.cross]
        ch_cov = torch.stack([c.channel_cov() for c in self.cross])  # (K+2, C)
        ch_share = torch.where(ch_t > 0, ch_cov / safe_t, torch.zeros_like(ch_cov))
        profile = ChannelProfile(
            var_orders=_floats(torch.stack([a.channel_var() for a in self.comp])),
            var_residual=_floats(self.residual.channel_var()),
            var_target=_floats(ch_t),
            share_orders=_floats(ch_share[:-1]),
            share_residual=_floats(ch_share[-1]),
        )
        nan = float("nan")
        return VarianceReport(
            n_images=self.images,
            orders=self.orders,
            var_orders=tuple(a.global_var() for a in self.comp),
            var_output=self.output.global_var(),
            var_residual=self.residual.global_var(),
            var_target=var_t,
            instability=self.residual.global_var() / var_t if var_t > 0 else nan,
            mse=self.sq_err / numel if numel else nan,
            var_orders_channel_centred=tuple(a.channel_centred_var() for a in self.comp),
            var_residual_channel_centred=self.residual.channel_centred_var(),
            var_target_channel_centred=self.target.channel_centred_var(),
            per_channel=profile,
            share_orders=tuple(c / var_t if var_t > 0 else nan for c in covs[:-1]),
            share_residual=covs[-1] / var_t if var_t > 0 else nan,
            ci=self.image_moments.bootstrap(level, n_boot, seed) if ci else None,
        )


def variance_report(components: Sequence[Tensor], residual: Tensor, target: Tensor, batch_size: int = 256) -> VarianceReport:
    """:class:`VarianceReport` for whole tensors, computed by streaming over batches.

    ``components``: K+1 tensors (N, C, H, W); ``residual``: x^Δ = x* − Σ x⁽ᵏ⁾; ``target``: x*.
    """
    acc = VarianceAccumulator(len(components) - 1, target.shape[1])
    for i in range(0, target.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        acc.update([c[sl] for c in components], residual[sl], target[sl])
    return acc.report()
