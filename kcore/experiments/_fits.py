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
        nested: fit the orders as nested models g₀ … g_K (``kcore.fit(..., nested=True)`` with linear gates, as
            ``kcore fit --nested`` does) and keep their order-wise gains beside the split of g_K.
    """

    orders: int = 2
    lam: float = 0.1
    epochs: int = 10
    seed: int = 0
    nested: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON form kept in a study's settings (``nested`` only when set, so a plain study's is unchanged)."""
        out = dataclasses.asdict(self)
        if not self.nested:
            del out["nested"]
        return out


def nested_fit_args(nested: bool) -> dict[str, Any]:
    """The keyword arguments of :func:`kcore.fit` for a nested fit: ``nested=True`` and linear gates (a sigmoid gate
    cannot start at 0; ``kcore fit --nested`` switches the gate the same way); nothing for a plain fit."""
    return {"nested": True, "gate": "linear"} if nested else {}


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
                    seed=settings.seed, device=device, **nested_fit_args(settings.nested))
    return res, feats


GAINS_LABEL = ("gain_d0 … gain_dK, gain_instability: order-wise gains of nested fits, Δₖ = R²(gₖ) − R²(gₖ₋₁) in the "
               "fit's units (one global mean), with 95 % bootstrap intervals (_lo, _hi); they and gain_instability add "
               "up to 1. var_x0 … var_xK, var_residual: the Eq. 3–4 split of the nested fit's g_K, for comparison.")
"""What the gain columns of a study run with ``--nested`` are, beside the split (printed and kept in result.json)."""


@dataclass(frozen=True)
class GainsRow:
    """The order-wise gains of one nested fit that a study keeps (:class:`kcore.fit.nested.NestedGains`).

    Attributes:
        gain_orders: Δ₀ … Δ_K, Δₖ = R²(gₖ) − R²(gₖ₋₁) (Δ₀ = R²(g₀)), in the fit's units.
        instability: Var(x* − g_K(x))/Var(x*) = 1 − ΣΔₖ.
        gain_ci: the 95 % bootstrap interval (lo, hi) of each Δₖ, or ``None`` (fewer than 2 images).
        instability_ci: the interval of ``instability``, or ``None``.
        accepted: for each order k = 1 … K, whether the guard kept the trained gₖ (False: Δₖ = 0 exactly).
        n_images: the images the gains are computed on.
    """

    gain_orders: tuple[float, ...]
    instability: float
    gain_ci: tuple[tuple[float, float], ...] | None
    instability_ci: tuple[float, float] | None
    accepted: tuple[bool, ...]
    n_images: int

    def as_row(self) -> dict[str, float]:
        """Flat columns: ``gain_d0 … gain_dK``, ``gain_instability``, then ``gain_dk_lo/hi`` and
        ``gain_instability_lo/hi`` (NaN without intervals)."""
        nan = (float("nan"), float("nan"))
        row: dict[str, float] = {f"gain_d{k}": g for k, g in enumerate(self.gain_orders)}
        row["gain_instability"] = self.instability
        for k in range(len(self.gain_orders)):
            lo, hi = self.gain_ci[k] if self.gain_ci is not None else nan
            row[f"gain_d{k}_lo"], row[f"gain_d{k}_hi"] = lo, hi
        lo, hi = self.instability_ci if self.instability_ci is not None else nan
        row["gain_instability_lo"], row["gain_instability_hi"] = lo, hi
        return row

    def as_dict(self) -> dict[str, Any]:
        """The JSON form: the fields, intervals as lists, and what the gains are."""
        return {"gain_orders": list(self.gain_orders), "instability": self.instability,
                "gain_ci": None if self.gain_ci is None else [list(iv) for iv in self.gain_ci],
                "instability_ci": None if self.instability_ci is None else list(self.instability_ci),
                "accepted": list(self.accepted), "n_images": self.n_images, "definition": GAINS_LABEL}

    def line(self) -> str:
        """``Δ0 58.1 [57.0, 59.2] %, Δ1 …, x^Δ …`` for a study's printed table."""
        def pct(v: float, iv: tuple[float, float] | None) -> str:
            return f"{100 * v:.1f}" + (f" [{100 * iv[0]:.1f}, {100 * iv[1]:.1f}]" if iv is not None else "") + " %"

        parts = [f"Δ{k} {pct(g, None if self.gain_ci is None else self.gain_ci[k])}"
                 for k, g in enumerate(self.gain_orders)]
        return ", ".join(parts + [f"x^Δ {pct(self.instability, self.instability_ci)}"])


def gains_row(gains: Any, stages: Any = ()) -> GainsRow:
    """The :class:`GainsRow` of a :class:`kcore.fit.nested.NestedGains` (and the fit's stages, for ``accepted``)."""
    ci = gains.ci
    return GainsRow(
        gain_orders=tuple(float(g) for g in gains.gain_orders), instability=float(gains.instability),
        gain_ci=None if ci is None else tuple((float(lo), float(hi)) for lo, hi in ci.gain_orders),
        instability_ci=None if ci is None else (float(ci.instability[0]), float(ci.instability[1])),
        accepted=tuple(bool(s.accepted) for s in stages[1:]), n_images=int(gains.n_images))


def fit_gains(res: Any) -> GainsRow | None:
    """The held-out gains of a nested fit (``res.nested.gains``), or ``None`` for a plain fit."""
    nested = getattr(res, "nested", None)
    return None if nested is None else gains_row(nested.gains, nested.stages)


def gains_on(res: Any, x_src: torch.Tensor, x_tgt: torch.Tensor, batch_size: int = 256) -> GainsRow | None:
    """The gains of a nested fit's g₀ … g_K on other images (raw features, e.g. a study's test images)
    (:func:`kcore.fit.nested.gains_on_images`); ``None`` for a plain fit."""
    nested = getattr(res, "nested", None)
    if nested is None:
        return None
    from kcore.fit.nested import gains_on_images

    return gains_row(gains_on_images(res, x_src, x_tgt, batch_size), nested.stages)


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
        gains: the held-out order-wise gains of a nested fit (:class:`GainsRow`), ``None`` for a plain fit.
    """

    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    instability: float
    heldout_error: float
    linear_r2: float
    cka: float
    gates: tuple[float, ...]
    gains: GainsRow | None = None

    def as_row(self) -> dict[str, float]:
        """The numbers as a flat table row: ``var_x0 … var_xK``, ``var_residual`` … ``cka``, ``p1 … pK``, then for a
        nested fit the gain columns (:meth:`GainsRow.as_row`)."""
        row = {f"var_x{k}": v for k, v in enumerate(self.var_orders)}
        row.update({"var_residual": self.var_residual, "var_target": self.var_target, "instability": self.instability,
                    "heldout_error": self.heldout_error, "linear_r2": self.linear_r2, "cka": self.cka})
        row.update({f"p{k + 1}": p for k, p in enumerate(self.gates)})
        if self.gains is not None:
            row.update(self.gains.as_row())
        return row


def consistency_row(res: Any) -> ConsistencyRow:
    """The held-out numbers of a fit: Var per order, Var(x^Δ), Var(x*), instability, baselines, gates."""
    rep = res.heldout_report
    return ConsistencyRow(
        var_orders=tuple(float(v) for v in rep.var_orders), var_residual=float(rep.var_residual),
        var_target=float(rep.var_target), instability=float(rep.instability),
        heldout_error=float(res.heldout_error), linear_r2=float(res.baseline.linear_r2), cka=float(res.baseline.cka),
        gates=tuple(float(p) for p in res.gates), gains=fit_gains(res),
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
        gains: the order-wise gains of a nested fit on the same images (:class:`GainsRow`), ``None`` for a plain
            fit.
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
    gains: GainsRow | None = None

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
        if self.gains is not None:
            out["nested_gains"] = self.gains.as_dict()
        return out


def fit_summary(res: Any, report: Any = None, *, reported_on: str | None = None,
                gains: GainsRow | None = None) -> FitSummary:
    """The numbers of one fitted g_θ worth keeping in a study result.

    Args:
        res: the :class:`kcore.FitResult`.
        report: the :class:`kcore.metrics.VarianceReport` to keep (default: the fit's held-out report).
        reported_on: which images ``report`` is of, kept in the summary (default: not stated).
        gains: the nested fit's gains on the images of ``report`` (:func:`gains_on`); default: the fit's held-out
            gains when no ``report`` is given (``None`` for a plain fit).

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
        gains=gains if gains is not None or report is not None else fit_gains(res),
    )


def map_selection(res: Any, n_images: int) -> tuple[list[int], int]:
    """Held-out image positions (the first ``n_images``) and the x* channel with the largest Var(x^Δ)."""
    held = list(res.heldout_indices)[:n_images]
    per = res.heldout_report.per_channel.var_residual
    return held, int(np.argmax(per))


def fit_settings_from(args: argparse.Namespace) -> FitSettings:
    """The :class:`FitSettings` that the options of :func:`add_fit_args` describe."""
    return FitSettings(orders=args.orders, lam=args.lam, epochs=args.fit_epochs, seed=args.seed,
                       nested=bool(getattr(args, "nested", False)))
