"""Diagnosis of a weak network with a strong one: blind spots and unreliable features (Sec. 4.1, App. B).

With x_A the weak network's feature and x_B the strong network's (one layer each):

- **blind spots** of A: fit g_θ A → B; x^Δ_B = x_B − g(x_A) is what B encodes and A cannot reconstruct;
- **unreliable features** of A: fit g_θ B → A; x^Δ_A = x_A − g(x_B) is what A encodes and B does not.

Both g_θ are fitted on the training images' features without labels, then frozen. Maps: the per-image
channel energy mean_c (x^Δ)² (standardised target units) overlaid on test images.

The two accuracy checks of Sec. 4.1 train classifiers with **the weak network's upper-layer architecture**
(the layers of A above its layer) on fixed features, all arms with the same initialisation seed, optimiser,
epochs and batch order; A's lower layers and both g_θ are frozen:

1. blind spots: on x_A vs on g(x_A) + x^Δ_B ("adding blind spots back to g_θ(x_A)", which is x_B itself), plus
   the arm g(x_A) alone (what A knows of B's feature, without the blind spots);
2. unreliable features: on x_A vs on x_A − x^Δ_A = g(x_B) (x_A with its unreliable components removed).

When x_B has another number of channels than x_A, the first layer(s) of A's upper part that read the
feature get B's channel count as input width (:func:`adapt_input_width`); the rest is unchanged. All
features are fed in raw feature units (σ_c·y + μ_c of the fit's normalisation).

Paper: Sec. 4.1 (Fig. 3; 16.1 % gain for blind spots; 60.3 % → 65.6 % for unreliable features), App. B.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from kcore.checkpoints import LoadedModel
from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_nested_argument, add_pair_arguments, add_training_arguments
from kcore.experiments._arms import ArmResult, TrainConfig, accuracy_figure, arms_table, train_config_from, train_upper
from kcore.experiments._features import input_shape, layer_of, load_checkpoint, train_test_features, train_test_images
from kcore.experiments._fits import FitSummary, fit_summary, gains_on, nested_fit_args
from kcore.experiments._study import Progress, StudyRun, StudySettings, say, study_command
from kcore.pipeline import ModelInfo
from kcore.provenance import as_jsonable
from kcore.samples import SAMPLE_CHECKPOINTS

ClassifierInit = Literal["fresh", "trained"]
CLASSIFIER_INITS: dict[str, str] = {
    "fresh": "A's upper layers re-initialised (reset_parameters, seeded) for every arm: the fair default",
    "trained": "A's upper layers start from the trained weak network (favours raw x_A, which they were trained on)",
}
WEAK = SAMPLE_CHECKPOINTS["kshapes_tinynet_s0"]
STRONG = SAMPLE_CHECKPOINTS["kshapes_resnet_s0"]


def reinitialised(net: nn.Module, seed: int) -> nn.Module:
    """A copy of ``net`` with every module's ``reset_parameters()`` called after ``torch.manual_seed(seed)``."""
    fresh = copy.deepcopy(net)
    torch.manual_seed(seed)
    for m in fresh.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return fresh


def _consumers(net: nn.Module, layer: str, in_shape: tuple[int, int, int]) -> tuple[list[str], int]:
    """Leaf modules that read ``layer``'s output directly, and that output's channel count."""
    modules = dict(net.named_modules())
    seen: dict[str, Any] = {}
    readers: list[str] = []
    handles = [modules[layer].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o))]

    def pre(name):
        def hook(_m, inputs):
            if "out" in seen and inputs and inputs[0] is seen["out"] and name not in readers:
                readers.append(name)
        return hook

    for name, m in modules.items():
        if name and not list(m.children()):
            handles.append(m.register_forward_pre_hook(pre(name)))
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            net(torch.zeros(1, *in_shape, device=next(net.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        net.train(was)
    return readers, int(seen["out"].shape[1])


def adapt_input_width(net: nn.Module, layer: str, in_shape: tuple[int, int, int], channels: int,
                      seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of ``net`` whose layers reading ``layer``'s output take ``channels`` input channels.

    Every ``Conv2d`` that reads the layer's output directly is replaced by one with the same hyperparameters
    and ``channels`` input channels, freshly initialised (seeded). Nothing changes when the widths agree.

    Returns:
        (the network, the names of the replaced modules).

    Raises:
        ValueError: a module other than a (non-grouped) Conv2d reads the feature.
    """
    out = copy.deepcopy(net)
    readers, width = _consumers(out, layer, in_shape)
    if width == channels:
        return out, []
    torch.manual_seed(seed)
    modules = dict(out.named_modules())
    for name in readers:
        m = modules[name]
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            raise ValueError(
                f"cannot feed {channels}-channel features into the layers above {layer!r}: {name!r} "
                f"({type(m).__name__}) reads its {width}-channel output and only plain Conv2d layers can be widened. "
                "Fix: choose layers with the same number of channels in both networks."
            )
        new = nn.Conv2d(channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, 1,
                        m.bias is not None, m.padding_mode).to(m.weight.device, m.weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else out, attr, new)
    return out, readers


@dataclass(frozen=True)
class DiagnosisResult:
    """Blind spots and unreliable features of a weak network, with the two accuracy checks of Sec. 4.1.

    Attributes:
        weak, strong: checkpoint provenance (name, sha256, layer, accuracy, …).
        layer_weak, layer_strong: the layers (x_A and x_B).
        orders: K of both g_θ.
        blind_spots: g_θ weak → strong (x^Δ_B): held-out error, Var per order, Var(x^Δ)/Var(x*) on test images.
        unreliable: g_θ strong → weak (x^Δ_A), the same numbers.
        arms: the classifier arms (:class:`ArmResult`): ``"x_A"``, ``"g(x_A)"``, ``"g(x_A)+blind spots"``,
            ``"x_A-unreliable"``, for each seed.
        experiments: the two checks (:class:`DiagnosisChecks`, :func:`checks`): mean accuracies and gains
            (fractions) over the seeds.
        classifier_init: ``"fresh"`` or ``"trained"`` (:data:`CLASSIFIER_INITS`).
        adapted_layers: modules of A's upper part widened to B's channel count (for the B-space arms).
        train: the :class:`TrainConfig` of every arm.
        map_ids, map_labels: the test images shown in the maps.
        blind_energy, unreliable_energy: (n, H, W) channel energy mean_c (x^Δ)² of those images, in the fit's
            target units (:attr:`energy_units`).
        images: (n, S, S, 3) float RGB in [0, 1] of those images (for the figure; not in ``as_dict``).
        n_train, n_test, data, seed, seconds: sizes, image source, seed, wall time.
        convention: g_θ's normalisation convention.
        class_names: names of the labels (for the maps figure), if the images have them.
    """

    weak: ModelInfo
    strong: ModelInfo
    layer_weak: str
    layer_strong: str
    orders: int
    blind_spots: FitSummary
    unreliable: FitSummary
    arms: tuple[ArmResult, ...]
    experiments: DiagnosisChecks
    classifier_init: str
    adapted_layers: tuple[str, ...]
    train: TrainConfig
    map_ids: tuple[str, ...]
    map_labels: tuple[int, ...]
    blind_energy: np.ndarray = field(repr=False)
    unreliable_energy: np.ndarray = field(repr=False)
    images: np.ndarray = field(repr=False)
    n_train: int = 0
    n_test: int = 0
    data: str = ""
    seed: int = 0
    seconds: float = 0.0
    convention: str = "authors"
    class_names: tuple[str, ...] = ()

    @property
    def energy_units(self) -> str:
        """Units of the energy maps: raw feature units² (authors' convention) or standardised units² (paper)."""
        return "raw feature units²" if self.convention == "authors" else "standardised units²"

    def arm(self, name: str, seed: int | None = None) -> ArmResult:
        """The arm ``name`` trained with ``seed`` (default: the first seed)."""
        for a in self.arms:
            if a.name == name and (seed is None or a.seed == seed):
                return a
        raise ValueError(f"no arm {name!r} with seed {seed}; arms are {sorted({(a.name, a.seed) for a in self.arms})}.")

    def tables(self) -> dict:
        """``accuracy``, ``checks``, ``variances`` (per component) and ``maps`` (mean energy per test image)."""
        import pandas as pd

        rows = []
        for key, d, meaning in (("blind_spots", self.blind_spots, "x_B - g(x_A): what the strong net encodes "
                                 "and the weak cannot reconstruct"),
                                ("unreliable", self.unreliable, "x_A - g(x_B): what the weak net encodes and the "
                                 "strong does not")):
            row = {"component": key, "meaning": meaning, "heldout_error": d.heldout_error,
                   "var_delta_over_var_target": d.instability, "var_residual": d.var_residual,
                   "var_target": d.var_target, "linear_r2": d.linear_r2}
            row.update({f"var_x{k}": v for k, v in enumerate(d.var_orders)})
            if d.gains is not None:  # nested fits: the order-wise gains on the same test images, beside the split
                row.update(d.gains.as_row())
            rows.append(row)
        exp_rows = []
        for key, check in (("blind_spots", self.experiments.blind_spots), ("unreliable", self.experiments.unreliable)):
            for k, v in check.as_dict().items():
                exp_rows.append({"experiment": key, "quantity": k, "value": v})
        maps = pd.DataFrame({"image_id": list(self.map_ids), "label": list(self.map_labels),
                             "blind_spot_energy_mean": self.blind_energy.mean(axis=(1, 2)),
                             "unreliable_energy_mean": self.unreliable_energy.mean(axis=(1, 2))})
        return {"accuracy": arms_table(self.arms), "checks": pd.DataFrame(exp_rows),
                "variances": pd.DataFrame(rows), "maps": maps}

    def figures(self) -> dict:
        """``maps`` (:meth:`maps_figure`) and ``accuracy`` (the classifier arms)."""
        title = (f"Classifiers with the weak net's upper layers above {self.layer_weak} "
                 f"({self.classifier_init} init)")
        return {"maps": self.maps_figure(), "accuracy": accuracy_figure(self.arms, title, before=False)}

    def maps_figure(self):
        """Rows: test images; columns: the image, blind-spot energy, unreliable-feature energy (overlays)."""
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator

        from kcore.viz import SEQUENTIAL_CMAP, upsample
        from kcore.viz.figure1 import GRID_IN
        from kcore.viz.style import TEXT_PT

        n = len(self.map_ids)
        fig = Figure(figsize=(GRID_IN, 2.0 * max(n, 1) + 1.2), layout="constrained")  # readable at 1024 px
        if n == 0:
            fig.add_subplot().text(0.5, 0.5, "no images", ha="center")
            return fig
        axes = fig.subplots(n, 3, squeeze=False)
        cols = [("blind spots of A:\nmean_c (x_B − g(x_A))²", self.blind_energy),
                ("unreliable features of A:\nmean_c (x_A − g(x_B))²", self.unreliable_energy)]
        norms = [Normalize(0.0, max(float(e.max()), 1e-12)) for _, e in cols]
        for i in range(n):
            img = self.images[i]
            grey = np.repeat((img @ np.array([0.299, 0.587, 0.114]))[..., None], 3, axis=2)
            axes[i, 0].imshow(img)
            lab = self.map_labels[i]
            name = f" ({self.class_names[lab]})" if 0 <= lab < len(self.class_names) else ""
            axes[i, 0].set_ylabel(f"{self.map_ids[i]}\nlabel {lab}{name}", fontsize=TEXT_PT)
            for j, ((title, energy), norm) in enumerate(zip(cols, norms), start=1):
                ax = axes[i, j]
                ax.imshow(grey)
                ax.imshow(upsample(energy[i], img.shape[:2]), cmap=SEQUENTIAL_CMAP, norm=norm, alpha=0.65)
                if i == 0:
                    ax.set_title(title, fontsize=TEXT_PT)
            for ax in axes[i]:
                ax.set_xticks([])
                ax.set_yticks([])
        for j, norm in enumerate(norms, start=1):
            # under its own column (a bar at the side would sit between two columns of maps)
            cb = fig.colorbar(ScalarMappable(norm=norm, cmap=SEQUENTIAL_CMAP), ax=axes[:, j], location="bottom",
                              shrink=0.8, aspect=16)
            cb.set_label(self.energy_units, fontsize=TEXT_PT)
            cb.ax.tick_params(labelsize=TEXT_PT)
            cb.ax.xaxis.set_major_locator(MaxNLocator(4))
        fig.suptitle(f"weak {self.weak.name}:{self.layer_weak} vs strong {self.strong.name}:"
                     f"{self.layer_strong}\n(test images; shared colour scale per column)", fontsize=TEXT_PT)
        return fig

    def as_dict(self) -> dict:
        """The JSON form of the result (study.json)."""
        return as_jsonable({
            "weak": self.weak, "strong": self.strong, "layer_weak": self.layer_weak,
            "layer_strong": self.layer_strong, "orders": self.orders, "blind_spots": self.blind_spots.as_dict(),
            "unreliable": self.unreliable.as_dict(), "arms": [dataclasses.asdict(a) for a in self.arms],
            "experiments": self.experiments.as_dict(), "classifier_init": self.classifier_init,
            "adapted_layers": list(self.adapted_layers), "train": dataclasses.asdict(self.train),
            "maps": {"image_ids": list(self.map_ids), "labels": list(self.map_labels),
                     "blind_spot_energy": self.blind_energy.tolist(),
                     "unreliable_energy": self.unreliable_energy.tolist(),
                     "units": f"mean over channels of (x^Delta)^2 in {self.energy_units}"},
            "convention": self.convention,
            "n_train": self.n_train, "n_test": self.n_test, "data": self.data, "seed": self.seed,
            "seconds": self.seconds, "class_names": list(self.class_names),
        })


@dataclass(frozen=True)
class BlindSpotCheck:
    """Check 1 of Sec. 4.1: classifiers on x_A, on g(x_A) and on g(x_A) + blind spots (means over the seeds).

    Attributes:
        x_a: mean test accuracy of the arm ``"x_A"``.
        g_x_a: mean test accuracy of the arm ``"g(x_A)"``.
        g_x_a_blind_spots: mean test accuracy of the arm ``"g(x_A)+blind spots"``.
        gain_over_x_a, gain_over_x_a_std: mean and standard deviation over the seeds of
            ``"g(x_A)+blind spots"`` − ``"x_A"``.
        gain_over_g_x_a, gain_over_g_x_a_std: the same for ``"g(x_A)+blind spots"`` − ``"g(x_A)"``.
    """

    x_a: float
    g_x_a: float
    g_x_a_blind_spots: float
    gain_over_x_a: float
    gain_over_x_a_std: float
    gain_over_g_x_a: float
    gain_over_g_x_a_std: float

    def as_dict(self) -> dict[str, float]:
        """The JSON form, keyed by the arms' names: ``x_A``, ``g(x_A)``, ``g(x_A)+blind spots``, gains."""
        return {"x_A": self.x_a, "g(x_A)": self.g_x_a, "g(x_A)+blind spots": self.g_x_a_blind_spots,
                "gain_over_x_A": self.gain_over_x_a, "gain_over_x_A_std": self.gain_over_x_a_std,
                "gain_over_g(x_A)": self.gain_over_g_x_a, "gain_over_g(x_A)_std": self.gain_over_g_x_a_std}


@dataclass(frozen=True)
class UnreliableCheck:
    """Check 2 of Sec. 4.1: classifiers on x_A and on x_A with its unreliable features removed (means over seeds).

    Attributes:
        x_a: mean test accuracy of the arm ``"x_A"``.
        x_a_unreliable: mean test accuracy of the arm ``"x_A-unreliable"``.
        gain_over_x_a, gain_over_x_a_std: mean and standard deviation over the seeds of
            ``"x_A-unreliable"`` − ``"x_A"``.
    """

    x_a: float
    x_a_unreliable: float
    gain_over_x_a: float
    gain_over_x_a_std: float

    def as_dict(self) -> dict[str, float]:
        """The JSON form, keyed by the arms' names: ``x_A``, ``x_A-unreliable``, ``gain_over_x_A(_std)``."""
        return {"x_A": self.x_a, "x_A-unreliable": self.x_a_unreliable, "gain_over_x_A": self.gain_over_x_a,
                "gain_over_x_A_std": self.gain_over_x_a_std}


@dataclass(frozen=True)
class DiagnosisChecks:
    """The two accuracy checks of Sec. 4.1 over the seeds of the arms.

    Attributes:
        blind_spots: check 1 (:class:`BlindSpotCheck`).
        unreliable: check 2 (:class:`UnreliableCheck`).
        seeds: the seeds the arms were trained with, ascending.
    """

    blind_spots: BlindSpotCheck
    unreliable: UnreliableCheck
    seeds: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        """The JSON form kept in result.json: ``blind_spots``, ``unreliable`` and ``seeds``."""
        return {"blind_spots": self.blind_spots.as_dict(), "unreliable": self.unreliable.as_dict(),
                "seeds": list(self.seeds)}


def checks(arms: list[ArmResult] | tuple[ArmResult, ...]) -> DiagnosisChecks:
    """The two checks of Sec. 4.1 from the arms: mean accuracy per arm, gains, their spread over seeds.

    Args:
        arms: the arms ``"x_A"``, ``"g(x_A)"``, ``"g(x_A)+blind spots"`` and ``"x_A-unreliable"`` of every seed.

    Returns:
        A :class:`DiagnosisChecks`.
    """
    import statistics

    seeds = sorted({a.seed for a in arms})
    acc = {(a.name, a.seed): a.test_accuracy for a in arms}

    def mean(name: str) -> float:
        return statistics.fmean(acc[name, s] for s in seeds)

    def gain(new: str, old: str) -> tuple[float, float]:
        per_seed = [acc[new, s] - acc[old, s] for s in seeds]
        return statistics.fmean(per_seed), statistics.stdev(per_seed) if len(seeds) > 1 else 0.0

    g1, g2 = gain("g(x_A)+blind spots", "x_A"), gain("g(x_A)+blind spots", "g(x_A)")
    blind = BlindSpotCheck(x_a=mean("x_A"), g_x_a=mean("g(x_A)"), g_x_a_blind_spots=mean("g(x_A)+blind spots"),
                           gain_over_x_a=g1[0], gain_over_x_a_std=g1[1], gain_over_g_x_a=g2[0],
                           gain_over_g_x_a_std=g2[1])
    g3 = gain("x_A-unreliable", "x_A")
    unrel = UnreliableCheck(x_a=mean("x_A"), x_a_unreliable=mean("x_A-unreliable"), gain_over_x_a=g3[0],
                            gain_over_x_a_std=g3[1])
    return DiagnosisChecks(blind_spots=blind, unreliable=unrel, seeds=tuple(seeds))


def _raw_output_and_residual(res: Any, x_src: Tensor, x_tgt: Tensor, batch_size: int = 256):
    """g(x) in raw target units (with the channel mean), x^Δ in raw units, and mean_c (x^Δ)² in the fit's units."""
    outs, deltas, energy = [], [], []
    for comps, resid, _ in res.iter_decompose(x_src, x_tgt, batch_size):
        out = torch.stack(comps).sum(0)
        outs.append(res.norm.target_to_raw(out, add_mean=True).cpu())
        deltas.append(res.norm.target_to_raw(resid, add_mean=False).cpu())
        energy.append((resid.double() ** 2).mean(1).cpu())
    return torch.cat(outs), torch.cat(deltas), torch.cat(energy)


def _image_rgb(images: Any, i: int) -> np.ndarray:
    x = images[i][0]
    return np.clip(x.permute(1, 2, 0).numpy().astype(np.float64), 0.0, 1.0)


def diagnose(
    weak: LoadedModel,
    strong: LoadedModel,
    train_images: Any,
    test_images: Any,
    *,
    layer_weak: str | None = None,
    layer_strong: str | None = None,
    orders: int = 2,
    lam: float | None = None,
    fit_epochs: int | None = None,
    convention: str = "authors",
    train: TrainConfig = TrainConfig(epochs=60, lr=3e-3, lr_final=3e-5),
    classifier_init: ClassifierInit = "fresh",
    repeats: int = 3,
    n_maps: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    data: str = "",
    progress: Progress | None = None,
    ctx: Any = None,
    nested: bool = False,
) -> DiagnosisResult:
    """Find the weak network's blind spots and unreliable features, and test both with classifiers (Sec. 4.1).

    Args:
        weak, strong: the weak (A) and the strong (B) network.
        train_images, test_images: Datasets of ``(image (3, H, W) in [0, 1], label)`` (each card resizes and
            normalises); g_θ and the classifiers are trained on the first, evaluated on the second.
        layer_weak, layer_strong: layers (default: the cards' default layers).
        orders, lam, fit_epochs: K, λ and epochs of both g_θ (:func:`kcore.fit`).
        convention: g_θ's normalisation; default ``"authors"`` (per-image spatial std, raw target), because a
            weak network without BatchNorm can have rarely firing channels whose dataset-wide std is tiny: the
            paper convention's per-channel standardisation multiplies them by up to 10^4, and one test image
            then dominates Var(x^Δ). ``"paper"`` is available.
        train: the :class:`TrainConfig` of every classifier arm.
        classifier_init: ``"fresh"`` (default) or ``"trained"``; see :data:`CLASSIFIER_INITS`.
        repeats: train every arm with this many seeds (``train.seed``, ``train.seed + 1``, …: initialisation
            and batch order); the checks report the mean and standard deviation over them.
        n_maps: test images shown in the maps figure.
        seed: seed of the fits and of the classifiers' initialisation.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
        data: description of the images.
        progress: one line per step.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the two fits, then the classifier arms, are dealt
            out to the ranks (each run whole on one rank; every rank gets all); ``None``: one process.
        nested: fit both g_θ as nested models g₀ … g_K (``kcore.fit(..., nested=True)``, linear gates): the arms
            use g_K, and the summaries keep the order-wise gains on the test images beside the split of g_K.

    Returns:
        A :class:`DiagnosisResult`.
    """
    import kcore

    if classifier_init not in CLASSIFIER_INITS:
        raise ValueError(f"classifier_init must be one of {sorted(CLASSIFIER_INITS)}; got {classifier_init!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer; got {repeats!r}.")
    t0 = time.perf_counter()
    la, lb = layer_of(weak, layer_weak, "layer_weak"), layer_of(strong, layer_strong, "layer_strong")
    say(progress, f"features: weak {weak.name}:{la}, strong {strong.name}:{lb}; {len(train_images)} train + "
                  f"{len(test_images)} test images")
    tr, te = train_test_features(weak, la, strong, lb, train_images, test_images, device=device,
                                 needed_by="the accuracy checks")
    xa_tr, xb_tr, xa_te, xb_te = tr.x_a.float(), tr.x_b.float(), te.x_a.float(), te.x_b.float()
    fit_pairs = {"blind_spots": (xa_tr, xb_tr), "unreliable": (xb_tr, xa_tr)}

    def one_fit(key: str) -> Any:
        say(progress, f"fitting g_θ for {key} ({'weak → strong' if key == 'blind_spots' else 'strong → weak'}, "
                      f"K={orders}), no labels")
        src_tr, tgt_tr = fit_pairs[key]
        return kcore.fit(src_tr, tgt_tr, orders=orders, lam=lam, epochs=fit_epochs, seed=seed, device=device,
                         convention=convention, **nested_fit_args(nested))

    g_ab, g_ba = map_over_ranks(one_fit, list(fit_pairs), ctx)
    gxa_tr, db_tr, _ = _raw_output_and_residual(g_ab, xa_tr, xb_tr)
    gxa_te, db_te, e_blind = _raw_output_and_residual(g_ab, xa_te, xb_te)
    gxb_tr, _, _ = _raw_output_and_residual(g_ba, xb_tr, xa_tr)
    gxb_te, _, e_unrel = _raw_output_and_residual(g_ba, xb_te, xa_te)
    blind = fit_summary(g_ab, g_ab.report(xa_te, xb_te), gains=gains_on(g_ab, xa_te, xb_te))
    unrel = fit_summary(g_ba, g_ba.report(xb_te, xa_te), gains=gains_on(g_ba, xb_te, xa_te))
    say(progress, f"Var(x^Δ)/Var(x*) on test images: blind spots {blind.instability:.3f}, "
                  f"unreliable {unrel.instability:.3f}")

    shape = input_shape(weak)
    init = "re-initialised (seeded)" if classifier_init == "fresh" else "from the trained weak net"
    upper = f"weak net's layers above {la}, {init}"
    y_tr, y_te = tr.labels, te.labels

    arm_specs = (  # (on the widened net, training features, test features, name, what the features are)
        (False, xa_tr, xa_te, "x_A", "raw x_A (weak)"),
        (True, gxa_tr, gxa_te, "g(x_A)", "g(x_A), weak → strong reconstruction (raw strong units)"),
        (True, gxa_tr + db_tr, gxa_te + db_te, "g(x_A)+blind spots", "g(x_A) + x^Δ_B (= x_B)"),
        (False, gxb_tr, gxb_te, "x_A-unreliable",
         "x_A − x^Δ_A = g(x_B), strong → weak reconstruction (raw weak units)"),
    )

    def one_arm(item: tuple[int, int]) -> tuple[ArmResult, list[str]]:
        r, arm = item
        s = train.seed + r  # one seed per repeat: the same initialisation and batch order for all four arms
        base = reinitialised(weak.model, s) if classifier_init == "fresh" else copy.deepcopy(weak.model)
        wide, adapted = adapt_input_width(base, la, shape, xb_tr.shape[1], s)
        widened, x_tr, x_te, name, what = arm_specs[arm]
        layers = upper
        if widened and adapted:
            layers += f"; {', '.join(adapted)} widened to {xb_tr.shape[1]} input channels"
        out = train_upper(wide if widened else base, la, shape, x_tr, y_tr, x_te, y_te, name=name, features=what,
                          upper_layers=layers, config=dataclasses.replace(train, seed=s), device=device,
                          progress=progress)
        return out, list(adapted)

    # every arm of every repeat is independent of the others (its own copy of the net, its own seed)
    done = map_over_ranks(one_arm, [(r, arm) for r in range(repeats) for arm in range(4)], ctx)
    arms: list[ArmResult] = [arm for arm, _ in done]
    adapted = done[-1][1]
    experiments = checks(arms)
    n_maps = max(0, min(int(n_maps), len(test_images)))
    ids = tuple(te.image_ids[:n_maps])
    imgs = np.stack([_image_rgb(test_images, i) for i in range(n_maps)]) if n_maps else np.zeros((0, 1, 1, 3))
    return DiagnosisResult(
        weak=ModelInfo.from_loaded(weak, la), strong=ModelInfo.from_loaded(strong, lb), layer_weak=la, layer_strong=lb,
        orders=g_ab.model.orders, blind_spots=blind, unreliable=unrel, arms=tuple(arms), experiments=experiments,
        classifier_init=classifier_init, adapted_layers=tuple(adapted), train=train, map_ids=ids,
        map_labels=tuple(int(v) for v in y_te[:n_maps]), blind_energy=e_blind[:n_maps].numpy(),
        unreliable_energy=e_unrel[:n_maps].numpy(), images=imgs, n_train=len(xa_tr), n_test=len(xa_te),
        data=data, seed=seed, seconds=time.perf_counter() - t0, convention=convention,
        class_names=tuple(getattr(test_images, "class_names", ()) or ()),
    )


# -------------------------------------------------------------------------------------------------- CLI
def add_cli(sub: Any) -> None:
    """Register ``kcore diagnosis``."""
    p = sub.add_parser(
        "diagnosis", help="Sec. 4.1: blind spots and unreliable features of a weak net, with accuracy checks",
        description="Fit g_theta weak -> strong (blind spots x_B - g(x_A)) and strong -> weak (unreliable features "
        "x_A - g(x_B)) without labels; draw their energy maps; train classifiers with the weak net's upper "
        "layers on x_A, g(x_A), g(x_A) + blind spots and x_A - unreliable features (same init seed, optimiser, "
        "epochs and batch order). Writes accuracy.csv, checks.csv, variances.csv, maps.csv, maps.png, "
        "accuracy.png, result.json and provenance.json into RUN_DIR.")
    add_pair_arguments(p, ("weak", "strong"), (WEAK, STRONG), ("the weak network A", "the strong network B"))
    p.add_argument("--classifier-init", default="fresh", choices=sorted(CLASSIFIER_INITS),
                   help="fresh (default): re-initialised upper layers; trained: the weak net's own")
    p.add_argument("--repeats", type=int, default=3, metavar="R",
                   help="train every arm with R seeds (--seed, --seed+1, ...) and report mean and std (default 3)")
    p.add_argument("--n-maps", type=int, default=4, help="test images in the maps figure (default 4)")
    add_training_arguments(p, epochs=60, lr=3e-3, lr_final=3e-5, n_train=2000, convention="authors")
    add_nested_argument(p)
    study_command(p, "diagnosis", _compute, _report, device="cpu")


def _compute(args: argparse.Namespace, run: StudySettings, log: Progress) -> StudyRun:
    weak, strong = load_checkpoint(args.weak, "--weak"), load_checkpoint(args.strong, "--strong")
    train_images, test_images = train_test_images(args, max(input_shape(weak)[1], input_shape(strong)[1]))
    res = diagnose(weak, strong, train_images, test_images, layer_weak=args.layer_weak,
                   layer_strong=args.layer_strong, orders=args.orders, lam=args.lam, fit_epochs=args.fit_epochs,
                   convention=args.convention,
                   train=train_config_from(args), classifier_init=args.classifier_init, repeats=args.repeats,
                   n_maps=args.n_maps,
                   seed=args.seed, device=run.device, data=args.data, progress=log, ctx=run.job, nested=args.nested)
    prov = {"checkpoint_weak": res.weak, "checkpoint_strong": res.strong,
            "layers": {"weak": res.layer_weak, "strong": res.layer_strong}, "seed": args.seed, "data": args.data,
            "n_train": res.n_train, "n_test": res.n_test}
    return StudyRun(res, prov)


def _report(res: DiagnosisResult) -> None:
    for key, check in (("blind_spots", res.experiments.blind_spots), ("unreliable", res.experiments.unreliable)):
        print(key + ": " + ", ".join(f"{k} {v:+.4f}" if k.startswith("gain") else f"{k} {v:.4f}"
                                     for k, v in check.as_dict().items()))
    print(f"Var(x^Δ)/Var(x*) on test images: blind spots {res.blind_spots.instability:.4f}, "
          f"unreliable {res.unreliable.instability:.4f}")
    for key, d in (("blind spots", res.blind_spots), ("unreliable", res.unreliable)):
        if d.gains is not None:
            split = ", ".join(f"x{k} {100 * v / d.var_target:.1f} %" for k, v in enumerate(d.var_orders))
            print(f"{key} on test images: split of g_K {split}; order-wise gains of the nested fits {d.gains.line()}")
