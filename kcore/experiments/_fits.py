"""The g_θ fits of a study: how each is fitted, and the numbers of one kept in a study's tables.

A study fits g_θ (Eq. 1–2) between two networks' features with the same :class:`FitSettings` throughout,
and keeps the held-out numbers of each fit (:func:`consistency_row`, :func:`fit_summary`: frozen rows with their
JSON form).
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kcore.fit.config import FitConfig


@dataclass(frozen=True)
class FitSettings:
    """How each g_θ of a study is fitted (passed to :func:`kcore.fit` with the ``"fast"`` preset).

    Attributes:
        orders: K.
        lam: λ of Eq. 2.
        epochs: epochs of g_θ (taken literally).
        seed: seed of the split, the initialisation and the batch order.
    """

    orders: int = 2
    lam: float = 0.1
    epochs: int = 10
    seed: int = 0


def fit_consistency(src: nn.Module, src_layer: str, tgt: nn.Module, tgt_layer: str, images: Dataset,
                    settings: FitSettings, *, device: str | torch.device = "cpu", batch_size: int = 64):
    """Fit g_θ from ``src``'s features at ``src_layer`` to ``tgt``'s at ``tgt_layer`` on ``images``.

    Returns:
        ``(FitResult, FeaturePair)``; the pair's ``x_a`` is the source (x), ``x_b`` the target (x*).
    """
    import kcore
    from kcore.features import extract_features

    feats = extract_features(src, src_layer, tgt, tgt_layer, images, batch_size=batch_size, device=device)
    res = kcore.fit(feats.x_a, feats.x_b, orders=settings.orders, lam=settings.lam, epochs=settings.epochs,
                    seed=settings.seed, device=device)
    return res, feats


@dataclass(frozen=True)
class ConsistencyRow:
    """The held-out numbers of one g_θ fit that a study keeps (one row of its table).

    Attributes:
        var_orders: Var(x^(k)) of each order k = 0 … K.
        var_residual: Var(x^Δ).
        var_target: Var(x*).
        instability: the held-out instability.
        heldout_error: the fit's held-out error.
        linear_r2: R² of the linear baseline.
        cka: linear CKA of the two features.
        gates: the gate p_k of each order k = 1 … K.
    """

    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    instability: float
    heldout_error: float
    linear_r2: float
    cka: float
    gates: tuple[float, ...]

    def as_row(self) -> dict[str, float]:
        """The numbers as a flat table row: ``var_x0 … var_xK``, ``var_residual`` … ``cka``, ``p1 … pK``."""
        row = {f"var_x{k}": v for k, v in enumerate(self.var_orders)}
        row.update({"var_residual": self.var_residual, "var_target": self.var_target, "instability": self.instability,
                    "heldout_error": self.heldout_error, "linear_r2": self.linear_r2, "cka": self.cka})
        row.update({f"p{k + 1}": p for k, p in enumerate(self.gates)})
        return row


def consistency_row(res: Any) -> ConsistencyRow:
    """The held-out numbers of a fit: Var per order, Var(x^Δ), Var(x*), instability, baselines, gates."""
    rep = res.heldout_report
    return ConsistencyRow(
        var_orders=tuple(float(v) for v in rep.var_orders), var_residual=float(rep.var_residual),
        var_target=float(rep.var_target), instability=float(rep.instability),
        heldout_error=float(res.heldout_error), linear_r2=float(res.baseline.linear_r2), cka=float(res.baseline.cka),
        gates=tuple(float(p) for p in res.gates),
    )


@dataclass(frozen=True)
class FitSummary:
    """The numbers of one fitted g_θ that a study keeps in its result (one direction of a pair).

    Attributes:
        heldout_error: the fit's held-out error (1 − R²).
        instability: Var(x^Δ)/Var(x*) on the images of the report.
        var_orders: Var(x^(k)) of each order k = 0 … K.
        var_residual: Var(x^Δ).
        var_target: Var(x*).
        n_images: images the variances are computed on.
        share_orders: the additive share of each order, or ``None`` when the report has none.
        share_residual: x^Δ's additive share, or ``None``.
        gates: the gate p_k of each order k = 1 … K.
        linear_r2: R² of the linear baseline.
        best_epoch: the epoch whose weights were kept.
        epochs_run: the epochs the fit ran.
        config: the :class:`kcore.FitConfig` of the fit.
        reported_on: which images the variances are of (e.g. ``"test images"``), or ``None`` when not stated.
    """

    heldout_error: float
    instability: float
    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    n_images: int
    share_orders: tuple[float, ...] | None
    share_residual: float | None
    gates: tuple[float, ...]
    linear_r2: float
    best_epoch: int
    epochs_run: int
    config: FitConfig
    reported_on: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form kept in a study's result.json (``reported_on`` only when stated)."""
        out = {
            "heldout_error": self.heldout_error, "instability": self.instability, "var_orders": list(self.var_orders),
            "var_residual": self.var_residual, "var_target": self.var_target, "n_images": self.n_images,
            "share_orders": None if self.share_orders is None else list(self.share_orders),
            "share_residual": self.share_residual,
            "gates": list(self.gates), "linear_r2": self.linear_r2, "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run, "config": dataclasses.asdict(self.config),
        }
        if self.reported_on is not None:
            out["reported_on"] = self.reported_on
        return out


def fit_summary(res: Any, report: Any = None, *, reported_on: str | None = None) -> FitSummary:
    """The numbers of one fitted g_θ worth keeping in a study result.

    Args:
        res: the :class:`kcore.FitResult`.
        report: the :class:`kcore.metrics.VarianceReport` to keep (default: the fit's held-out report).
        reported_on: which images ``report`` is of, kept in the summary (default: not stated).

    Returns:
        A :class:`FitSummary`.
    """
    rep = report if report is not None else res.heldout_report
    return FitSummary(
        heldout_error=res.heldout_error, instability=rep.instability, var_orders=tuple(rep.var_orders),
        var_residual=rep.var_residual, var_target=rep.var_target, n_images=rep.n_images,
        share_orders=None if rep.share_orders is None else tuple(rep.share_orders),
        share_residual=rep.share_residual, gates=tuple(res.gates), linear_r2=res.baseline.linear_r2,
        best_epoch=res.best_epoch, epochs_run=len(res.history), config=res.config, reported_on=reported_on,
    )


def map_selection(res: Any, n_images: int) -> tuple[list[int], int]:
    """Held-out image positions (the first ``n_images``) and the x* channel with the largest Var(x^Δ)."""
    held = list(res.heldout_indices)[:n_images]
    per = res.heldout_report.per_channel.var_residual
    return held, int(np.argmax(per))


def fit_settings_from(args: argparse.Namespace) -> FitSettings:
    """The :class:`FitSettings` that the options of :func:`add_fit_args` describe."""
    return FitSettings(orders=args.orders, lam=args.lam, epochs=args.fit_epochs, seed=args.seed)
