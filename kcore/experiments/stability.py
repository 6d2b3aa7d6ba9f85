"""Stability of learning (Sec. 4.2, Tables 1–2): how consistent are networks trained with different seeds?

For a family of N networks of one architecture (different seeds: case 1; disjoint halves of the training
data: case 2) and a layer, every pair (A, B) gets g_θ fitted both ways on the same images:
x_A^Δ = x_A − g(x_B) and x_B^Δ = x_B − g(x_A). The instability of the pair is

    [Var(x_A^Δ)/Var(x_A) + Var(x_B^Δ)/Var(x_B)] / 2

(the paper's case-2 formula; for case 1 the paper averages Var(x^Δ)/Var(x*) over all pairs, which this
equals when every pair is taken in both orders). Var is the paper's: every element around the one mean over
images and units, in **raw feature units** (the fit is done in standardised units and x^Δ, x^(k) are mapped
back with the per-channel σ of the target; the standardised-unit ratio is reported too). Table 2's
Var(x^(k)) and Var(x^Δ) are averaged over the ordered pairs. All numbers are on the fits' held-out images.

Families are trained by :mod:`kcore.experiments.families` (``kcore train-family``), or by ``kcore
stability`` itself when no checkpoints are given.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import statistics
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from kcore.checkpoints import LoadedModel
from kcore.conventions import CONVENTIONS
from kcore.distributed import map_over_ranks
from kcore.experiments import families
from kcore.experiments._arguments import add_nested_argument
from kcore.experiments._features import layer_of, load_checkpoint, single_features
from kcore.experiments._fits import GAINS_LABEL, GainsRow, fit_gains, nested_fit_args
from kcore.experiments._study import Progress, StudyRun, StudySettings, say, study_command
from kcore.imagesets import labelled_images
from kcore.metrics import VarianceAccumulator, VarianceReport
from kcore.provenance import as_jsonable

Case = Literal["seeds", "halves"]
CASES: dict[str, str] = {
    "seeds": "case 1: same data, different initialisations (mean over all pairs)",
    "halves": "case 2: disjoint halves of the training data",
}
#: layers compared by default for the sample architectures: every stage, shallow to deep (Table 1's question)
STAGES: dict[str, tuple[str, ...]] = {
    "kc_resnet": ("layer1", "layer2", "layer3"),
    "kc_tinynet": ("block1", "block2", "block3"),
}


def default_layers(model: LoadedModel) -> list[str]:
    """Every stage of a sample architecture, else the card's default layer."""
    arch = model.card.architecture if model.card is not None else None
    if arch in STAGES:
        return list(STAGES[arch])
    return [layer_of(model, None, "layers")]


@dataclass(frozen=True)
class PairDirection:
    """g_θ fitted from one member's feature to another's, at one layer.

    Attributes:
        layer: the layer.
        source, target: member names (x = source's feature, x* = target's).
        instability: Var(x^Δ)/Var(x*) in raw feature units (the paper's Var).
        instability_std_units: the same ratio in the fit's target units: standardised per channel in the paper
            convention (every channel weighs the same); equal to ``instability`` in the authors' convention.
        var_orders: Var(x^(k)) for k = 0..K, raw units.
        var_residual, var_target: Var(x^Δ), Var(x*), raw units.
        heldout_error: 1 − R² of g_θ on the held-out images.
        linear_r2: R² of the 0-order (least-squares) baseline on the same images.
        gates: fitted p^(1..K).
        n_images: held-out images the numbers are computed on.
        instability_ci: 95 % bootstrap interval of ``instability`` over the held-out images (no refit).
        gains: with nested fits, the order-wise gains on the held-out images in the fit's units (like
            ``instability_std_units``; :class:`GainsRow`); ``None`` for a plain fit.
    """

    layer: str
    source: str
    target: str
    instability: float
    instability_std_units: float
    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    heldout_error: float
    linear_r2: float
    gates: tuple[float, ...]
    n_images: int
    instability_ci: tuple[float, float] | None = None
    gains: GainsRow | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``gains`` only for a nested fit, so a plain study's is unchanged)."""
        out = dataclasses.asdict(self)
        del out["gains"]
        if self.gains is not None:
            out["gains"] = self.gains.as_dict()
        return out


@dataclass(frozen=True)
class StabilityRow:
    """One layer's numbers over the pairs of a family (one row of Tables 1–2; :meth:`StabilityResult.summary`).

    Attributes:
        layer: the layer.
        case: ``"seeds"`` or ``"halves"`` (:data:`CASES`).
        n_pairs: pairs of members compared at the layer.
        instability_mean, instability_std, instability_min, instability_max: the pairs' instability (raw units):
            mean, standard deviation (0 for one pair), minimum and maximum.
        instability_std_units_mean: the mean over the fitted directions of the instability in the fit's units.
        instability_ci_halfwidth_mean: the mean half-width of the directions' 95 % bootstrap intervals (the
            noise of one fit's number); NaN when none was computed.
        random_init_instability: the first member against a randomly initialised network (chance level); NaN
            when there is no such reference.
        random_init_ci: that reference's 95 % interval, ``(NaN, NaN)`` when there is none.
        var_orders: Var(x^(k)) for k = 0..K, averaged over the directions (raw units).
        var_residual, var_target: Var(x^Δ) and Var(x*), averaged over the directions (raw units).
        heldout_error_mean: the directions' mean held-out error (1 − R²).
        linear_r2_mean: the directions' mean R² of the linear baseline.
        gain_orders: with nested fits, the order-wise gains Δ₀ … Δ_K averaged over the directions (the fit's
            units, beside ``var_orders``' split of g_K); ``None`` without.
        gain_instability: the mean of the directions' 1 − ΣΔₖ (``None`` without nested fits).
        gain_ci_halfwidth: the mean half-width of each Δₖ's 95 % interval over the directions (``None`` without).
    """

    layer: str
    case: str
    n_pairs: int
    instability_mean: float
    instability_std: float
    instability_min: float
    instability_max: float
    instability_std_units_mean: float
    instability_ci_halfwidth_mean: float
    random_init_instability: float
    random_init_ci: tuple[float, float]
    var_orders: tuple[float, ...]
    var_residual: float
    var_target: float
    heldout_error_mean: float
    linear_r2_mean: float
    gain_orders: tuple[float, ...] | None = None
    gain_instability: float | None = None
    gain_ci_halfwidth: tuple[float, ...] | None = None

    def as_row(self) -> dict[str, Any]:
        """The numbers as a flat table row: ``layer``, …, ``random_init_ci_lo/hi``, ``var_x0 … var_xK``, …."""
        row = {"layer": self.layer, "case": self.case, "n_pairs": self.n_pairs,
               "instability_mean": self.instability_mean, "instability_std": self.instability_std,
               "instability_min": self.instability_min, "instability_max": self.instability_max,
               "instability_std_units_mean": self.instability_std_units_mean,
               "instability_ci_halfwidth_mean": self.instability_ci_halfwidth_mean,
               "random_init_instability": self.random_init_instability,
               "random_init_ci_lo": self.random_init_ci[0], "random_init_ci_hi": self.random_init_ci[1]}
        row.update({f"var_x{k}": v for k, v in enumerate(self.var_orders)})
        row.update({"var_residual": self.var_residual, "var_target": self.var_target,
                    "heldout_error_mean": self.heldout_error_mean, "linear_r2_mean": self.linear_r2_mean})
        if self.gain_orders is not None:
            row.update({f"gain_d{k}": g for k, g in enumerate(self.gain_orders)})
            row["gain_instability"] = self.gain_instability
            row.update({f"gain_d{k}_ci_halfwidth_mean": h for k, h in enumerate(self.gain_ci_halfwidth or ())})
        return row


@dataclass(frozen=True)
class StabilityResult:
    """Instability of learning for a family of networks at one or more layers (Tables 1–2).

    Attributes:
        case: ``"seeds"`` or ``"halves"`` (:data:`CASES`).
        architecture: the family's architecture (or None when unknown).
        members: one dict per network (name, sha256, test accuracy, seed, half).
        layers: the layers compared.
        directions: every fitted direction (:class:`PairDirection`).
        orders: K.
        both_directions: whether each pair was fitted both ways.
        n_images: images per fit (before the held-out split).
        seed: seed of the fits.
        family: the family's manifest (training recipe, data), when known.
        seconds: wall time.
        random_reference: layer → the same fit from the first member to a randomly initialised network of the
            architecture (chance level: what a network that learned nothing gives), with its interval.
    """

    case: str
    architecture: str | None
    members: tuple[dict, ...]
    layers: tuple[str, ...]
    directions: tuple[PairDirection, ...]
    orders: int
    both_directions: bool
    n_images: int
    seed: int
    family: dict | None
    seconds: float
    random_reference: dict = dataclasses.field(default_factory=dict)

    def pair_instability(self, layer: str) -> dict[tuple[str, str], float]:
        """{(A, B): mean of Var(x^Δ)/Var(x*) over the pair's fitted directions} at ``layer``."""
        out: dict[tuple[str, str], list[float]] = {}
        for d in self.directions:
            if d.layer == layer:
                out.setdefault(tuple(sorted((d.source, d.target))), []).append(d.instability)
        return {k: sum(v) / len(v) for k, v in out.items()}

    def summary(self) -> list[StabilityRow]:
        """Per layer: instability mean / std / min / max over pairs, and Var per order averaged over directions."""
        rows = []
        for layer in self.layers:
            vals = list(self.pair_instability(layer).values())
            ds = [d for d in self.directions if d.layer == layer]
            cis = [d.instability_ci for d in ds if d.instability_ci is not None]
            ref = self.random_reference.get(layer)
            gains = [d.gains for d in ds if d.gains is not None]
            rows.append(StabilityRow(
                layer=layer, case=self.case, n_pairs=len(vals),
                instability_mean=statistics.fmean(vals),
                instability_std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                instability_min=min(vals), instability_max=max(vals),
                instability_std_units_mean=statistics.fmean(d.instability_std_units for d in ds),
                # the noise of one fit's number: the mean half-width of the 95 % bootstrap intervals over images
                instability_ci_halfwidth_mean=(statistics.fmean((hi - lo) / 2 for lo, hi in cis) if cis
                                               else float("nan")),
                random_init_instability=ref["instability"] if ref else float("nan"),
                random_init_ci=tuple(ref["ci"]) if ref and ref.get("ci") else (float("nan"), float("nan")),
                var_orders=tuple(statistics.fmean(d.var_orders[k] for d in ds) for k in range(self.orders + 1)),
                var_residual=statistics.fmean(d.var_residual for d in ds),
                var_target=statistics.fmean(d.var_target for d in ds),
                heldout_error_mean=statistics.fmean(d.heldout_error for d in ds),
                linear_r2_mean=statistics.fmean(d.linear_r2 for d in ds),
                **(_mean_gains(gains, self.orders) if gains else {}),
            ))
        return rows

    def tables(self) -> dict:
        """``summary`` (per layer), ``directions`` (per fitted pair direction) and ``members``."""
        import pandas as pd

        pairs = []
        for d in self.directions:
            row = {"layer": d.layer, "source": d.source, "target": d.target, "instability": d.instability,
                   "instability_std_units": d.instability_std_units}
            row.update({f"var_x{k}": v for k, v in enumerate(d.var_orders)})
            row.update({"var_residual": d.var_residual, "var_target": d.var_target, "heldout_error": d.heldout_error,
                        "linear_r2": d.linear_r2, "gates": " ".join(f"{g:.4f}" for g in d.gates),
                        "n_images": d.n_images,
                        "instability_ci_lo": d.instability_ci[0] if d.instability_ci else float("nan"),
                        "instability_ci_hi": d.instability_ci[1] if d.instability_ci else float("nan")})
            if d.gains is not None:
                row.update(d.gains.as_row())
            pairs.append(row)
        return {"summary": pd.DataFrame([r.as_row() for r in self.summary()]), "directions": pd.DataFrame(pairs),
                "members": pd.DataFrame(list(self.members))}

    def figures(self) -> dict:
        """``instability``: per layer, each pair's instability and the summary."""
        import numpy as np
        from matplotlib.figure import Figure

        from kcore.viz.figure1 import GRID_IN
        from kcore.viz.style import RESIDUAL_TEX, TEXT_PT, TITLE_PT, order_tex, tick_rotation

        # stacked, at most GRID_IN wide: the text stays readable at 1024 px
        fig = Figure(figsize=(GRID_IN, 7.6), layout="constrained")
        ax, ax2 = fig.subplots(2, 1)
        for i, layer in enumerate(self.layers):
            vals = list(self.pair_instability(layer).values())
            ax.scatter([i] * len(vals), vals, s=14, color="#6aa9d6", zorder=3, label="pairs" if i == 0 else None)
            m = statistics.fmean(vals)
            s = statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.errorbar([i + 0.15], [m], yerr=[s], fmt="o", color="#1f4e79", capsize=3,
                        label="mean ± std over pairs" if i == 0 else None)
            ds = [d for d in self.directions if d.layer == layer and d.instability_ci is not None]
            if ds:
                half = statistics.fmean((d.instability_ci[1] - d.instability_ci[0]) / 2 for d in ds)
                ax.errorbar([i - 0.15], [m], yerr=[half], fmt="none", ecolor="#e67e22", capsize=3,
                            label="mean 95 % CI of one fit (images)" if i == 0 else None)
            ref = self.random_reference.get(layer)
            if ref:
                ax.hlines(ref["instability"], i - 0.35, i + 0.35, colors="#7f8c8d", linestyles="--", lw=1.4,
                          label="random-init network (chance)" if i == 0 else None)
        slot_in = (GRID_IN - 3.6) / max(len(self.layers), 1)  # the width per layer of a panel beside its legend
        rot = tick_rotation(self.layers, slot_in)
        ax.set_xticks(range(len(self.layers)), self.layers, fontsize=TEXT_PT, rotation=rot)
        ax.set_ylabel("instability  Var(x^Δ)/Var(x*)", fontsize=TITLE_PT)
        ax.set_title(f"Table 1 analogue ({self.case})", fontsize=TITLE_PT)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        rows = self.summary()
        names = [order_tex(k) for k in range(self.orders + 1)] + [RESIDUAL_TEX]  # plain Unicode: one SVG <text> each
        width = 0.8 / len(names)
        for j, nm in enumerate(names):
            var = [r.var_orders[j] if j <= self.orders else r.var_residual for r in rows]
            ax2.bar(np.arange(len(rows)) + j * width, [v / r.var_target for v, r in zip(var, rows)], width, label=nm)
        ax2.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, [r.layer for r in rows], fontsize=TEXT_PT,
                       rotation=rot)
        ax2.set_ylabel("Var / Var(x*)  (raw units)", fontsize=TITLE_PT)
        ax2.set_title("Table 2 analogue", fontsize=TITLE_PT)
        ax2.legend(fontsize=TEXT_PT, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        for a in (ax, ax2):
            a.tick_params(labelsize=TEXT_PT)
        return {"instability": fig}

    def as_dict(self) -> dict:
        """The JSON form of the result (study.json)."""
        return as_jsonable({
            "case": self.case, "case_meaning": CASES[self.case], "architecture": self.architecture,
            "members": list(self.members), "layers": list(self.layers), "orders": self.orders,
            "both_directions": self.both_directions, "n_images": self.n_images, "seed": self.seed,
            "summary": [r.as_row() for r in self.summary()],
            "directions": [d.as_dict() for d in self.directions],
            "family": self.family, "seconds": self.seconds, "random_reference": self.random_reference,
            "definition": "instability of a pair = mean over its fitted directions of Var(x^Delta)/Var(x*), "
                          "Var = mean over images and units of (value - one global mean)^2 in raw feature units, "
                          "on the fits' held-out images",
            **({"gains_definition": GAINS_LABEL + " Here in the fit's units (as instability_std_units), while "
                "var_x0 ... var_residual are in raw feature units."}
               if any(d.gains is not None for d in self.directions) else {}),
        })


def _mean_gains(gains: Sequence[GainsRow], orders: int) -> dict[str, Any]:
    """A layer's mean gains over its directions, the mean 1 − ΣΔₖ and the mean half-width of each Δₖ's interval."""
    nan = float("nan")
    half = tuple(statistics.fmean((g.gain_ci[k][1] - g.gain_ci[k][0]) / 2 for g in gains if g.gain_ci is not None)
                 if any(g.gain_ci is not None for g in gains) else nan for k in range(orders + 1))
    return {"gain_orders": tuple(statistics.fmean(g.gain_orders[k] for g in gains) for k in range(orders + 1)),
            "gain_instability": statistics.fmean(g.instability for g in gains), "gain_ci_halfwidth": half}


def raw_report(res: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int = 256) -> VarianceReport:
    """The variance report with x^(k) and x^Δ mapped back to raw target units (σ_c · y) and raw x*."""
    acc = VarianceAccumulator(res.model.orders, x_tgt.shape[1])
    for comps, resid, target in res.iter_decompose(x_src, x_tgt, batch_size):
        raw = [res.norm.target_to_raw(c, add_mean=False) for c in comps]
        acc.update(raw, res.norm.target_to_raw(resid, add_mean=False), res.norm.target_to_raw(target, add_mean=True))
    return acc.report()


def stability(
    models: Sequence[LoadedModel],
    images: Any,
    *,
    layers: Sequence[str] | None = None,
    case: Case = "seeds",
    orders: int = 2,
    lam: float | None = None,
    fit_epochs: int | None = None,
    convention: str = "paper",
    both_directions: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    family: dict | None = None,
    progress: Progress | None = None,
    random_reference: bool = True,
    ctx: Any = None,
    nested: bool = False,
) -> StabilityResult:
    """Instability of learning over all pairs of ``models`` at each layer (Sec. 4.2).

    Args:
        models: N >= 2 networks of one architecture (:func:`kcore.checkpoints.load_model`, or
            :meth:`kcore.experiments.families.Family.loaded`).
        images: a Dataset of ``(image (3, H, W) in [0, 1], label)``; each card resizes and normalises it.
        layers: layers to compare (default: :func:`default_layers` of the first model).
        case: ``"seeds"`` or ``"halves"`` (only labels the result; the numbers are computed the same way).
        orders, lam, fit_epochs: K, λ and epochs of every g_θ (:func:`kcore.fit`).
        convention: g_θ's normalisation, ``"paper"`` (default) or ``"authors"``; the instability is in raw units
            either way.
        both_directions: fit every pair both ways (default); otherwise only earlier → later member.
        seed: seed of every fit (the same held-out split for every pair).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        family: the family's manifest, stored with the result.
        progress: one line per fit.
        random_reference: also fit the first member against a randomly initialised network of its
            architecture at each layer (one more fit per layer): the chance level.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the fits of every layer are dealt out to the
            ranks (each rank extracts the layer's features of every member, fits its pairs alone, and all
            ranks get every result). Default: this process does every fit.
        nested: fit every g_θ (the random reference too) as nested models g₀ … g_K (``kcore.fit(..., nested=True)``,
            linear gates) and keep their order-wise gains beside the split of g_K (:attr:`PairDirection.gains`).

    Returns:
        A :class:`StabilityResult`.

    Raises:
        ValueError: fewer than two models, repeated names, unknown case or layer.
    """
    import kcore

    t0 = time.perf_counter()
    if len(models) < 2:
        raise ValueError(f"stability needs at least two models; got {len(models)}. Fix: pass two or more checkpoints.")
    names = [m.name.rsplit(".", 1)[0] for m in models]
    if len(set(names)) != len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    if case not in CASES:
        raise ValueError(f"case must be one of {sorted(CASES)}; got {case!r}.")
    if case == "halves" and len(models) != 2:
        raise ValueError(f"case 'halves' compares exactly two networks (one per half); got {len(models)}.")
    layer_list = list(layers) if layers else default_layers(models[0])
    for m in models:
        for layer in layer_list:
            layer_of(m, layer, "layers")
    directions: list[PairDirection] = []
    refs: dict[str, dict] = {}
    for layer in layer_list:
        say(progress, f"features of {len(models)} networks at {layer} for {len(images)} images")
        feats = [single_features(m, layer, images, device=device)[0] for m in models]
        pairs = [(s, t) for i, j in itertools.combinations(range(len(models)), 2)
                 for s, t in ([(i, j), (j, i)] if both_directions else [(i, j)])]

        def pair_fit(st: tuple[int, int], layer: str = layer, feats: list[Tensor] = feats) -> PairDirection:
            s, t = st
            res = kcore.fit(feats[s], feats[t], orders=orders, lam=lam, epochs=fit_epochs, seed=seed,
                            device=device, convention=convention, **nested_fit_args(nested))
            held = torch.as_tensor(res.heldout_indices, dtype=torch.long)
            raw = raw_report(res, feats[s][held], feats[t][held])
            d = PairDirection(
                layer=layer, source=names[s], target=names[t], instability=raw.instability,
                instability_std_units=res.heldout_report.instability, var_orders=raw.var_orders,
                var_residual=raw.var_residual, var_target=raw.var_target, heldout_error=res.heldout_error,
                linear_r2=res.baseline.linear_r2, gates=res.gates, n_images=len(held),
                instability_ci=raw.ci.instability if raw.ci is not None else None, gains=fit_gains(res),
            )
            say(progress, f"{layer}: {names[s]} → {names[t]}: Var(x^Δ)/Var(x*) {d.instability:.4f} "
                          f"(standardised {d.instability_std_units:.4f})"
                          + (f"; gains {d.gains.line()}" if d.gains is not None else ""))
            return d

        directions.extend(map_over_ranks(pair_fit, pairs, ctx))
        if random_reference:
            ref = _random_reference(models[0], feats[0], layer, images, seed=seed, device=device, orders=orders,
                                    lam=lam, fit_epochs=fit_epochs, convention=convention, nested=nested)
            if ref is not None:
                refs[layer] = ref
                say(progress, f"{layer}: {names[0]} → random-init network: Var(x^Δ)/Var(x*) {ref['instability']:.4f}")
    members = []
    for name, m in zip(names, models):
        extra = dict(m.card.extra) if m.card is not None else {}
        members.append({"name": name, "sha256": m.sha256, "architecture": m.card.architecture if m.card else None,
                        "test_accuracy": m.card.test_accuracy if m.card else None, "seed": extra.get("seed"),
                        "half": extra.get("half")})
    archs = {mm["architecture"] for mm in members}
    return StabilityResult(
        case=case, architecture=archs.pop() if len(archs) == 1 else None, members=tuple(members),
        layers=tuple(layer_list), directions=tuple(directions), orders=orders, both_directions=both_directions,
        n_images=len(images), seed=seed, family=family, seconds=time.perf_counter() - t0, random_reference=refs,
    )


def _random_reference(model: LoadedModel, x_src: Tensor, layer: str, images: Any, *, seed: int, device: Any,
                      **fit_args: Any) -> dict | None:
    """Member → a randomly initialised network of its architecture at ``layer`` (raw-unit instability and CI)."""
    import kcore
    from kcore.baselines import random_init_like

    try:
        rand, how = random_init_like(model, seed)
    except ValueError:
        return None
    x_rand = single_features(rand, layer, images, device=device)[0]
    res = kcore.fit(x_src, x_rand, orders=fit_args["orders"], lam=fit_args["lam"], epochs=fit_args["fit_epochs"],
                    seed=seed, device=device, convention=fit_args["convention"],
                    **nested_fit_args(fit_args.get("nested", False)))
    held = torch.as_tensor(res.heldout_indices, dtype=torch.long)
    raw = raw_report(res, x_src[held], x_rand[held])
    out = {"instability": raw.instability, "ci": list(raw.ci.instability) if raw.ci is not None else None,
           "network": how, "seed": seed}
    gains = fit_gains(res)
    if gains is not None:
        out["gains"] = gains.as_dict()
    return out


# -------------------------------------------------------------------------------------------------- CLI
def add_cli(sub: Any) -> None:
    """Register ``kcore stability`` and ``kcore train-family``."""
    families.add_cli(sub)
    p = sub.add_parser(
        "stability", help="Sec. 4.2 / Tables 1-2: instability of learning over all pairs of a family",
        description="Compare every pair of a family of networks (different seeds, or disjoint halves with --halves) "
        "at one or more layers: g_theta both ways, instability [Var(x_A^D)/Var(x_A) + Var(x_B^D)/Var(x_B)]/2 "
        "(mean and spread over pairs) and Var per order. Without --family/--ckpts a small family is trained "
        "first (options as in `kcore train-family`) and saved into RUN_DIR/family.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--family", metavar="DIR", help="a folder written by `kcore train-family`")
    src.add_argument("--ckpts", nargs="+", metavar="CKPT", help="two or more checkpoints of one architecture")
    p.add_argument("--layers", nargs="+", default=None, metavar="LAYER",
                   help="layers to compare (default: every stage of kc_resnet / kc_tinynet, shallow to deep; else the "
                   "card's default layer)")
    families.add_family_arguments(p)
    p.add_argument("--n-images", type=int, default=500, metavar="N",
                   help="test-split images for every fit (20%% held out for the numbers; default 500)")
    p.add_argument("--orders", type=int, default=2, metavar="K", help="K of g_theta (default 2)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="lambda of g_theta (default 0.1)")
    p.add_argument("--fit-epochs", type=int, default=15, metavar="E", help="epochs of every g_theta (default 15)")
    p.add_argument("--convention", choices=list(CONVENTIONS), default="paper",
                   help="normalisation of g_theta's input and target (default paper; see kcore.conventions)")
    p.add_argument("--one-direction", action="store_true", help="fit each pair one way only (half the time)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fits")
    add_nested_argument(p)
    study_command(p, "stability", _compute, _report, device="cpu")


def _compute(args: argparse.Namespace, run: StudySettings, log: Progress) -> StudyRun:
    trained = None
    if args.family:
        models, manifest = families.load_family(args.family)
        case = manifest.get("case", "seeds")
    elif args.ckpts:
        models, manifest = [load_checkpoint(c, "--ckpts") for c in args.ckpts], None
        case = "halves" if args.halves else "seeds"
    else:
        trained = families.family_from_args(args, log, run.job)
        models, manifest, case = trained.loaded(), trained.manifest(), trained.case
    card = models[0].card
    size = int(card.input_size[0]) if card is not None and card.input_size else args.image_size
    images = labelled_images(args.data, "test", args.n_images, size, seed=args.data_seed)
    res = stability(models, images, layers=args.layers, case=case, orders=args.orders, lam=args.lam,
                    fit_epochs=args.fit_epochs, convention=args.convention, both_directions=not args.one_direction,
                    seed=args.seed, device=run.device, family=manifest, progress=log, ctx=run.job,
                    nested=args.nested)
    prov = {"checkpoints": list(res.members), "layers": list(res.layers), "seed": args.seed, "data": args.data,
            "n_images": res.n_images, "family_dir": args.family, "family_trained_here": trained is not None}
    return StudyRun(res, prov, extra=(lambda folder: trained.save(folder / "family")) if trained is not None else None)


def _report(res: StabilityResult) -> None:
    for row in res.summary():
        print(f"{row.layer}: instability {row.instability_mean:.4f} ± {row.instability_std:.4f} over "
              f"{row.n_pairs} pairs ({res.case}); in the fit's units {row.instability_std_units_mean:.4f}")
        if row.gain_orders is not None:
            split = ", ".join(f"x{k} {100 * v / row.var_target:.1f} %" for k, v in enumerate(row.var_orders))
            gains = ", ".join(f"Δ{k} {100 * g:.1f} ± {100 * h:.1f} %"
                              for k, (g, h) in enumerate(zip(row.gain_orders, row.gain_ci_halfwidth or ())))
            print(f"  split of g_K (raw units, Var(x^(k))/Var(x*)): {split}; order-wise gains of the nested fits "
                  f"(fit's units, mean 95 % half-width): {gains}, x^Δ {100 * row.gain_instability:.1f} %")
