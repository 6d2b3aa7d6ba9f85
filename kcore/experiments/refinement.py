"""Feature refinement with knowledge consistency (Sec. 4.3, Table 3, App. A).

Two networks A and B trained for the same task. g_θ is fitted to reconstruct B's feature x_B from A's
feature x_A at one layer each, **without labels**, and then frozen. The upper layers of B (everything above
``layer_b``, initialised from the trained B) are fine-tuned on the consistent components
x⁽⁰⁾, x⁽⁰⁾+x⁽¹⁾, …, x⁽⁰⁾+…+x⁽ᴷ⁾ = g(x_A). Baselines (App. A): A's and B's own upper layers fine-tuned on their
own raw features x_A and x_B. Every arm has the same optimiser, schedule, epochs, batch order and seed; the
lower layers of A and B and g_θ are frozen (the features are computed once, under ``no_grad``) and the study
checks that their weights are unchanged afterwards.

Units: g_θ is fitted in the paper's convention (standardised x and x*); the components fed to B's upper
layers are mapped back to B's raw feature units, σ_c·(x⁽⁰⁾+…+x⁽ᵏ⁾) + μ_c (the channel mean μ_c of x_B, which
no component carries in this convention, is added once to every partial sum).

The trainer of the arms (:func:`kcore.experiments._arms.train_upper`) serves the diagnosis study (Sec. 4.1) too.

Paper: Sec. 4.3 "Exp. 1, removing unreliable features", "Fairness of comparisons", App. A; the authors'
``transClassifier.py`` (Adam, lr 1e-5 decayed log-linearly over two decades, weight decay 1e-4, batch 64,
100 epochs). The defaults here keep Adam, the two-decade log-linear decay, the weight decay and the batch
size, with a larger lr (1e-3) for fewer epochs (10).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kcore.checkpoints import LoadedModel
from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_pair_arguments, add_training_arguments
from kcore.experiments._arms import (
    ArmResult,
    TrainConfig,
    accuracy_figure,
    arms_table,
    state_fingerprint,
    train_config_from,
    train_upper,
    unchanged,
)
from kcore.experiments._features import input_shape, layer_of, load_checkpoint, train_test_features, train_test_images
from kcore.experiments._fits import FitSummary, fit_summary
from kcore.experiments._study import Progress, StudyRun, StudySettings, say, study_command
from kcore.pipeline import ModelInfo
from kcore.provenance import as_jsonable
from kcore.samples import SAMPLE_CHECKPOINTS


# -------------------------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class RefinementResult:
    """Table 3 for one pair of networks: accuracy of fine-tuned upper layers on raw and refined features.

    Attributes:
        a, b: checkpoint provenance of A and B (name, sha256, layer, …).
        layer_a, layer_b: the layers.
        orders: K of g_θ.
        fit: summary of g_θ (A → B) on the test images (:class:`FitSummary`): held-out error, instability, Var
            per order, gates.
        arms: "network A", "network B", then "x(0)", "x(0)+x(1)", … (:class:`ArmResult`).
        frozen: ``{"A lower layers", "B lower layers", "g_theta"}`` → True when unchanged after all arms.
        train: the :class:`TrainConfig` of every arm.
        n_train, n_test: images used to train (g_θ and the classifiers) and to test.
        data: where the images came from.
        seed: the study's seed.
        seconds: wall time.
    """

    a: ModelInfo
    b: ModelInfo
    layer_a: str
    layer_b: str
    orders: int
    fit: FitSummary
    arms: tuple[ArmResult, ...]
    frozen: dict
    train: TrainConfig
    n_train: int
    n_test: int
    data: str
    seed: int
    seconds: float

    def arm(self, name: str) -> ArmResult:
        """The arm called ``name``."""
        for a in self.arms:
            if a.name == name:
                return a
        raise ValueError(f"no arm {name!r}; arms are {[a.name for a in self.arms]}.")

    def tables(self) -> dict:
        """``accuracy`` (the arms) and ``fit_variances`` (the A → B fit's variances per order)."""
        import pandas as pd

        fit_rows = [{"direction": "A_to_B", "order": k, "var": v} for k, v in enumerate(self.fit.var_orders)]
        fit_rows.append({"direction": "A_to_B", "order": "delta", "var": self.fit.var_residual})
        fit_rows.append({"direction": "A_to_B", "order": "target", "var": self.fit.var_target})
        return {"accuracy": arms_table(self.arms), "fit_variances": pd.DataFrame(fit_rows)}

    def figures(self) -> dict:
        """``accuracy``: the arms' test accuracies."""
        title = (f"Refinement: B's upper layers above {self.layer_b} on raw vs consistent features "
                 f"(n_test={self.n_test})")
        return {"accuracy": accuracy_figure(self.arms, title)}

    def as_dict(self) -> dict:
        """The JSON form of the result (study.json)."""
        return as_jsonable({
            "a": self.a, "b": self.b, "layer_a": self.layer_a, "layer_b": self.layer_b, "orders": self.orders,
            "fit": self.fit.as_dict(), "arms": [dataclasses.asdict(a) for a in self.arms], "frozen": self.frozen,
            "train": dataclasses.asdict(self.train), "n_train": self.n_train, "n_test": self.n_test,
            "data": self.data, "seed": self.seed, "seconds": self.seconds,
            "accuracy": {a.name: a.test_accuracy for a in self.arms},
        })


def component_sums(res: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int = 256) -> list[Tensor]:
    """[x⁽⁰⁾, x⁽⁰⁾+x⁽¹⁾, …, g(x)] in raw target units (σ_c·sum + μ_c), each (N, C_b, H, W)."""
    sums: list[list[Tensor]] = [[] for _ in range(res.model.orders + 1)]
    for comps, _, _ in res.iter_decompose(x_src, x_tgt, batch_size):
        run = None
        for k, c in enumerate(comps):
            run = c if run is None else run + c
            sums[k].append(res.norm.target_to_raw(run, add_mean=True).cpu())
    return [torch.cat(s) for s in sums]


def refine(
    a: LoadedModel,
    b: LoadedModel,
    train_images: Any,
    test_images: Any,
    *,
    layer_a: str | None = None,
    layer_b: str | None = None,
    g: Any = None,
    orders: int = 2,
    lam: float | None = None,
    fit_epochs: int | None = None,
    convention: str = "paper",
    train: TrainConfig = TrainConfig(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    data: str = "",
    progress: Progress | None = None,
    ctx: Any = None,
) -> RefinementResult:
    """Fine-tune upper layers on raw features (A, B) and on B-consistent components of A (Table 3).

    Args:
        a, b: networks trained for the same task (:func:`kcore.checkpoints.load_model`).
        train_images, test_images: Datasets of ``(image (3, H, W) in [0, 1], label)``; each model's card
            resizes and normalises them.
        layer_a, layer_b: layers (default: the cards' default layers).
        g: an already fitted :class:`kcore.FitResult` A → B on these layers (default: fitted here on the
            training images' features, without labels).
        orders, lam, fit_epochs: g_θ's K, λ and epochs (:func:`kcore.fit`; ``None`` = its defaults).
        convention: g_θ's normalisation, ``"paper"`` (default) or ``"authors"`` (:mod:`kcore.conventions`).
        train: the :class:`TrainConfig` of every arm.
        seed: seed of g_θ's fit.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        data: description of the images (for the result).
        progress: one line per step.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the arms are dealt out to the ranks (each trained
            whole on one rank; every rank gets all); ``None``: one process.

    Returns:
        A :class:`RefinementResult`.

    Raises:
        ValueError: bad layers, too few images, or a g whose shapes do not match.
    """
    import kcore

    t0 = time.perf_counter()
    la, lb = layer_of(a, layer_a, "layer_a"), layer_of(b, layer_b, "layer_b")
    say(progress, f"features: {a.name}:{la} and {b.name}:{lb} of {len(train_images)} train + "
                  f"{len(test_images)} test images")
    tr, te = train_test_features(a, la, b, lb, train_images, test_images, device=device, needed_by="refinement")
    xa_tr, xb_tr, xa_te, xb_te = tr.x_a.float(), tr.x_b.float(), te.x_a.float(), te.x_b.float()
    if g is None:
        say(progress, f"fitting g_θ A → B (K={orders}) on {len(xa_tr)} training images' features, no labels")
        g = kcore.fit(xa_tr, xb_tr, orders=orders, lam=lam, epochs=fit_epochs, seed=seed, device=device,
                      convention=convention)
    frozen_before = {"A lower layers": state_fingerprint(a.model), "B lower layers": state_fingerprint(b.model),
                     "g_theta": state_fingerprint(g.model)}
    sums_tr = component_sums(g, xa_tr, xb_tr)
    sums_te = component_sums(g, xa_te, xb_te)
    fit_info = fit_summary(g, g.report(xa_te, xb_te), reported_on="test images")
    say(progress, f"g_θ: held-out 1−R² {g.heldout_error:.3f}, gates {tuple(round(p, 3) for p in g.gates)}")
    y_tr, y_te = tr.labels, te.labels
    sa, sb = input_shape(a), input_shape(b)
    common = dict(config=train, device=device, progress=progress)

    def one_arm(arm: int) -> ArmResult:
        if arm == 0:
            return train_upper(a.model, la, sa, xa_tr, y_tr, xa_te, y_te, name="network A", features="raw x_A",
                               upper_layers=f"A's layers above {la}, from trained A", **common)
        if arm == 1:
            return train_upper(b.model, lb, sb, xb_tr, y_tr, xb_te, y_te, name="network B", features="raw x_B",
                               upper_layers=f"B's layers above {lb}, from trained B", **common)
        k = arm - 2
        nm = "+".join(f"x({j})" for j in range(k + 1))
        return train_upper(b.model, lb, sb, sums_tr[k], y_tr, sums_te[k], y_te, name=nm,
                           features=f"{nm} of g(x_A) (A → B), raw B units",
                           upper_layers=f"B's layers above {lb}, from trained B", **common)

    # A, B, then x(0), x(0)+x(1), …: each arm trains its own copy of the upper layers
    arms: list[ArmResult] = map_over_ranks(one_arm, list(range(g.model.orders + 3)), ctx)
    frozen = {
        "A lower layers": unchanged(a.model, frozen_before["A lower layers"]),
        "B lower layers": unchanged(b.model, frozen_before["B lower layers"]),
        "g_theta": unchanged(g.model, frozen_before["g_theta"]),
        "classifier copies below the layer": all(arm.lower_unchanged for arm in arms),
    }
    return RefinementResult(
        a=ModelInfo.from_loaded(a, la), b=ModelInfo.from_loaded(b, lb), layer_a=la, layer_b=lb, orders=g.model.orders,
        fit=fit_info,
        arms=tuple(arms), frozen=frozen, train=train, n_train=len(xa_tr), n_test=len(xa_te), data=data, seed=seed,
        seconds=time.perf_counter() - t0,
    )


# -------------------------------------------------------------------------------------------------- CLI
SAMPLE_A = SAMPLE_CHECKPOINTS["kshapes_resnet_s0"]
SAMPLE_B = SAMPLE_CHECKPOINTS["kshapes_resnet_s1"]


def add_cli(sub: Any) -> None:
    """Register ``kcore refinement``."""
    p = sub.add_parser(
        "refinement", help="Sec. 4.3 / Table 3: fine-tune B's upper layers on A → B consistent components",
        description="Fit g_theta A -> B without labels and freeze it; fine-tune B's upper layers (from trained B) on "
        "x(0), x(0)+x(1), ..., and, as baselines, A's and B's upper layers on raw x_A and x_B (same optimiser, "
        "epochs and batch order for every arm). Writes accuracy.csv, fit_variances.csv, accuracy.png, "
        "result.json and provenance.json into RUN_DIR.")
    add_pair_arguments(p, ("a", "b"), (SAMPLE_A, SAMPLE_B), ("network A", "network B"))
    add_training_arguments(p, epochs=10, lr=1e-3, lr_final=1e-5, n_train=2000, convention="paper")
    study_command(p, "refinement", _compute, _report, device="cpu")


def _compute(args: argparse.Namespace, run: StudySettings, log: Progress) -> StudyRun:
    a, b = load_checkpoint(args.a, "--a"), load_checkpoint(args.b, "--b")
    train_images, test_images = train_test_images(args, input_shape(b)[1])
    res = refine(a, b, train_images, test_images, layer_a=args.layer_a, layer_b=args.layer_b, orders=args.orders,
                 lam=args.lam, fit_epochs=args.fit_epochs, convention=args.convention,
                 train=train_config_from(args), seed=args.seed,
                 device=run.device, data=args.data, progress=log, ctx=run.job)
    prov = {"checkpoint_a": res.a, "checkpoint_b": res.b, "layers": {"A": res.layer_a, "B": res.layer_b},
            "seed": args.seed, "data": args.data, "n_train": res.n_train, "n_test": res.n_test}
    return StudyRun(res, prov)


def _report(res: RefinementResult) -> None:
    for arm in res.arms:
        print(f"{arm.name:28s} test accuracy {arm.test_accuracy:.4f} (before {arm.test_accuracy_before:.4f})")
    print(f"frozen parts unchanged: {res.frozen}")
