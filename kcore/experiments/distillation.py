"""Sec. 4.5: born-again networks, and the blind spots of each generation with respect to the newest one.

Generation 0 is the teacher: a given checkpoint (e.g. the sample model), or, by default on the command
line, a network trained here with cross-entropy alone and the students' recipe, so that every generation has
the same training budget, as in born-again networks. Each later generation g is a new network of the same
architecture trained from scratch (seed + 10·g, as the authors' ``BornAgain.py``) with ``CE + λ · KD``
against the previous generation, which then becomes the teacher. KD is Hinton's soft-target cross-entropy at temperature τ with
the τ² factor of ``BornAgain.py``: ``KD = −τ² Σ softmax(t/τ) · log_softmax(s/τ) / batch`` (the paper's
recipe: τ = 1, λ = 0.5; λ is held constant, the authors' optional geometric λ schedule is not used).

Then, for every earlier generation i, g_θ is fitted from generation i's features to the newest generation's
features at the same layer (the paper's Fig. 4 right): x^Δ = what the newest net encodes that generation i
cannot reconstruct, i.e. the blind spots of generation i. The paper found that they shrink over generations.
All fits share the target (the newest net's features), the images and the held-out split, so Var(x^Δ) is in
the same standardised units for every i.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_fit_args, add_nested_argument, add_recipe_args
from kcore.experiments._features import display_image, load_checkpoint
from kcore.experiments._fits import (
    ConsistencyRow,
    FitSettings,
    consistency_row,
    fit_consistency,
    fit_settings_from,
    map_selection,
)
from kcore.experiments._study import Progress, StudyRun, StudySettings, say, study_command
from kcore.imagesets import StudyData, study_data
from kcore.provenance import checkpoint_provenance, model_summary
from kcore.samples import SAMPLE_CHECKPOINTS

SAMPLE_TEACHER = SAMPLE_CHECKPOINTS["kshapes_resnet_s0"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 1.0) -> Tensor:
    """Hinton's distillation loss as in the authors' ``BornAgain.py``.

    ``KD = −τ² Σ_{n,c} softmax(t_n/τ)_c · log_softmax(s_n/τ)_c / N``: the soft-target cross-entropy (not the
    KL divergence, so at s = t it equals τ² times the mean entropy of the teacher's soft targets, and its
    gradient is zero there). The teacher's logits are detached.

    Args:
        student_logits: (N, C).
        teacher_logits: (N, C).
        tau: temperature τ > 0.

    Returns:
        A scalar tensor.

    Raises:
        ValueError: shapes differ, are not (N, C), or τ <= 0.
    """
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must both be (N, C) of the same shape; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}.")
    if not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau}.")
    soft = torch.softmax(teacher_logits.detach() / tau, dim=1)
    return -(tau ** 2) * (soft * torch.log_softmax(student_logits / tau, dim=1)).sum() / student_logits.shape[0]


def born_again_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, lambd: float = 0.5,
                    tau: float = 1.0) -> Tensor:
    """``cross_entropy(s, y) + λ · kd_loss(s, t, τ)`` (the authors' ``BornAgain.py`` with a constant λ)."""
    return nn.functional.cross_entropy(student_logits, labels) + lambd * kd_loss(student_logits, teacher_logits, tau)


@dataclass(frozen=True)
class StudentSettings:
    """How each born-again generation is trained (linear warm-up over the first epoch, then cosine decay per
    step, as :func:`kcore.training.train_classifier`, whose optimisers it also offers).

    Attributes:
        epochs: epochs per generation.
        lambd: λ, weight of the KD term.
        tau: temperature τ.
        lr: peak learning rate.
        weight_decay: weight decay.
        batch_size: images per step.
        optimizer: ``"sgd"`` (Nesterov momentum 0.9) or ``"adamw"`` (:data:`kcore.training.OPTIMIZERS`).
    """

    epochs: int = 2
    lambd: float = 0.5
    tau: float = 1.0
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 64
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer; got {self.epochs!r}.")
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw'; got {self.optimizer!r}.")
        if self.lambd < 0 or not self.tau > 0:
            raise ValueError(f"lambd must be >= 0 and tau > 0; got lambd={self.lambd}, tau={self.tau}.")


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0)


def train_born_again(student: nn.Module, teacher: nn.Module, train_set: Dataset, settings: StudentSettings, *,
                     seed: int) -> tuple[nn.Module, tuple[float, ...]]:
    """Train ``student`` in place with ``CE + λ · KD`` against the frozen ``teacher`` (eval mode).

    The teacher's logits are computed once over the training images (there is no augmentation, so they do
    not change between epochs). The batch order is seeded with ``seed``.

    Returns:
        ``(student in eval mode, mean training loss per epoch)``.
    """
    device = next(student.parameters()).device
    xs, ys = zip(*(train_set[i] for i in range(len(train_set))))
    x = torch.stack(xs).to(device)
    y = torch.as_tensor(ys, dtype=torch.long, device=device)
    was = teacher.training
    teacher.eval()
    try:
        t_logits = _logits(teacher, x)
    finally:
        teacher.train(was)
    loader = DataLoader(TensorDataset(x, y, t_logits), batch_size=settings.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    if settings.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr,
                                                       weight_decay=settings.weight_decay)
    else:
        opt = torch.optim.SGD(student.parameters(), lr=settings.lr, momentum=0.9, nesterov=True,
                              weight_decay=settings.weight_decay)
    total, warmup = settings.epochs * len(loader), max(1, len(loader))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    losses = []
    student.train()
    for _ in range(settings.epochs):
        loss_sum = 0.0
        for xb, yb, tb in loader:
            loss = born_again_loss(student(xb), tb, yb, settings.lambd, settings.tau)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(yb)
        losses.append(loss_sum / len(y))
    student.eval()
    return student, tuple(losses)


@dataclass(frozen=True)
class Generation:
    """One generation: its accuracy and (for i < newest) its blind spots w.r.t. the newest generation.

    Attributes:
        generation: 0 = the teacher.
        seed: seed it was trained with (None for a loaded teacher).
        accuracy: test accuracy.
        train_loss: mean training loss per epoch (empty for a loaded teacher).
        row: :func:`consistency_row` of the fit generation → newest (None for the newest itself).
    """

    generation: int
    seed: int | None
    accuracy: float
    train_loss: tuple[float, ...]
    row: ConsistencyRow | None = field(hash=False)

    def as_dict(self) -> dict[str, Any]:
        """One table row: generation, seed, accuracy, final training loss and the consistency row."""
        return {"generation": self.generation, "seed": self.seed, "accuracy": self.accuracy,
                "final_train_loss": self.train_loss[-1] if self.train_loss else float("nan"),
                **(self.row.as_row() if self.row is not None else {})}


@dataclass(frozen=True, eq=False)
class DistillationResult:
    """Born-again generations and Var(x^Δ) of the newest network against each earlier one.

    Attributes:
        layer: the compared layer.
        generations: one :class:`Generation` per generation, 0 (teacher) … newest.
        maps: per earlier generation i, x^Δ (n_maps, C, H, W) at the drawn images (standardised units).
        map_target: the newest net's x* at those images, (n_maps, C, H, W).
        map_images: the drawn images (H, W, 3) uint8; map_ids: their ids; map_channel: the drawn channel.
        settings: everything else that defines the run.
    """

    layer: str
    generations: tuple[Generation, ...]
    maps: tuple[Tensor, ...]
    map_target: Tensor | None
    map_images: tuple[np.ndarray, ...]
    map_ids: tuple[str, ...]
    map_channel: int
    settings: dict = field(default_factory=dict)

    @property
    def newest(self) -> int:
        """The number of the newest generation (the target of every fit)."""
        return self.generations[-1].generation

    def tables(self) -> dict[str, Any]:
        """``generations``: one row per generation (blind-spot numbers empty for the newest)."""
        import pandas as pd

        return {"generations": pd.DataFrame([g.as_dict() for g in self.generations])}

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the result (study.json)."""
        return {"layer": self.layer, "newest_generation": self.newest,
                "generations": [g.as_dict() for g in self.generations], "map_ids": list(self.map_ids),
                "map_channel": self.map_channel, "settings": self.settings,
                "direction": "generation i -> newest (x = generation i's features, x* = the newest's): "
                             "x^Delta = blind spots of generation i"}

    def figures(self) -> dict[str, Any]:
        """``blind_spots`` (Var(x^Δ) and accuracy per generation) and ``blind_spot_maps``."""
        figs = {"blind_spots": distillation_figure(self)}
        if self.maps:
            figs["blind_spot_maps"] = blind_spot_maps_figure(self)
        return figs


def distillation_figure(result: DistillationResult):
    """Var(x^Δ) of generation i w.r.t. the newest, and every generation's accuracy (paper Fig. 4 right)."""
    from matplotlib.figure import Figure

    from kcore.viz.figure1 import GRID_IN
    from kcore.viz.style import TEXT_PT, TITLE_PT

    older = [g for g in result.generations if g.row is not None]
    fig = Figure(figsize=(GRID_IN, 6.4), layout="constrained")  # stacked: text stays readable at 1024 px
    ax1, ax2 = fig.subplots(2, 1)
    gens = [g.generation for g in older]
    vals = [g.row.var_residual for g in older]
    bars = ax1.bar([str(i) for i in gens], vals, color="#c0392b", edgecolor="black", linewidth=0.4)
    ax1.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=TEXT_PT, padding=1)
    ax1.set_xlabel("generation i (0 = teacher)", fontsize=TITLE_PT)
    ax1.set_ylabel("Var(x^Δ), held out", fontsize=TITLE_PT)
    ax1.set_title(f"blind spots of generation i w.r.t. generation {result.newest}\nlayer {result.layer}", fontsize=TITLE_PT)
    ax2.plot([g.generation for g in result.generations], [g.accuracy for g in result.generations], "o-", color="#2c3e50")
    ax2.set_xlabel("generation", fontsize=TITLE_PT)
    ax2.set_ylabel("test accuracy", fontsize=TITLE_PT)
    ax2.set_xticks([g.generation for g in result.generations])
    ax2.set_title("accuracy per generation", fontsize=TITLE_PT)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=TEXT_PT)
    return fig


def blind_spot_maps_figure(result: DistillationResult):
    """Columns: images; rows: the image, the newest net's x*, then x^Δ of each earlier generation (one channel,
    one symmetric colour scale for all maps)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from kcore.viz import DIVERGING_CMAP
    from kcore.viz.figure1 import GRID_IN
    from kcore.viz.style import TEXT_PT, TITLE_PT

    c = result.map_channel
    older = [g for g in result.generations if g.row is not None]
    rows = [(f"x* (gen {result.newest})", result.map_target)]
    rows += [(f"x^Δ of gen {g.generation}", m) for g, m in zip(older, result.maps)]
    n = len(result.map_ids)
    lim = max(float(m[:, c].abs().max()) for _, m in rows) or 1.0
    norm = Normalize(-lim, lim)
    cell = min(1.6, (GRID_IN - 1.6) / max(n, 1))  # at most GRID_IN wide: text stays readable at 1024 px
    fig = Figure(figsize=(cell * n + 1.6, (cell + 0.35) * (len(rows) + 1) + 0.8), layout="constrained")
    axes = fig.subplots(len(rows) + 1, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(result.map_images[j])
        axes[0, j].set_title(result.map_ids[j], fontsize=TEXT_PT)
        for r, (_, maps) in enumerate(rows, start=1):
            axes[r, j].imshow(maps[j, c].numpy(), cmap=DIVERGING_CMAP, norm=norm, interpolation="nearest")
    for r, label in enumerate(["image"] + [label for label, _ in rows]):
        axes[r, 0].set_ylabel(label, fontsize=TEXT_PT)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=DIVERGING_CMAP), ax=list(axes[1:].ravel()), shrink=0.8)
    cb.set_label(f"channel {c}, standardised units", fontsize=TEXT_PT)
    cb.ax.tick_params(labelsize=TEXT_PT)
    fig.suptitle(f"blind spots w.r.t. generation {result.newest} (layer {result.layer})", fontsize=TITLE_PT)
    return fig


def distillation_study(
    teacher: nn.Module,
    layer: str,
    data: StudyData,
    make_student: Callable[[], nn.Module],
    *,
    generations: int = 3,
    student: StudentSettings = StudentSettings(),
    fit: FitSettings = FitSettings(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    n_maps: int = 3,
    teacher_seed: int | None = None,
    progress: Progress | None = None,
    ctx: Any = None,
) -> DistillationResult:
    """Train born-again generations from ``teacher`` and measure each one's blind spots w.r.t. the newest.

    Args:
        teacher: generation 0 (not modified).
        layer: layer compared in every generation (the same architecture throughout).
        data: ``train`` trains the students, ``test`` gives accuracies, ``images`` the fits.
        make_student: builds an untrained network of the teacher's architecture (called after seeding).
        generations: number of students (≥ 1); the newest is generation ``generations``.
        student: how each student is trained (:class:`StudentSettings`).
        fit: how each g_θ is fitted.
        seed: generation g is initialised and shuffled with ``seed + 10·g``.
        device: where everything runs.
        n_maps: held-out images drawn in ``blind_spot_maps``.
        teacher_seed: the teacher's seed, for the table (None for a loaded teacher).
        progress: called with one line per step.
        ctx: a torchrun job (:func:`kcore.distributed.init`): the generations are trained in turn (each learns
            from the one before, on every rank alike), then the fits are dealt out to the ranks (each run whole on
            one rank; every rank gets all); ``None``: one process.

    Returns:
        A :class:`DistillationResult`.

    Raises:
        ValueError: generations < 1 or an unknown layer.

    Paper: Sec. 4.5 and Fig. 4 (right); the authors' ``BornAgain.py``.
    """
    import copy

    from kcore.devices import resolve_device
    from kcore.features import validate_layer
    from kcore.training import evaluate

    if isinstance(generations, bool) or not isinstance(generations, int) or generations < 1:
        raise ValueError(f"generations must be a positive integer; got {generations!r}.")
    validate_layer(teacher, layer)
    dev = resolve_device(device)
    nets = [copy.deepcopy(teacher).to(dev).eval()]
    info = [(teacher_seed, ())]
    accs = [evaluate(nets[0], data.test)]
    say(progress, f"generation 0 (teacher): test accuracy {accs[0]:.4f}")
    for g in range(1, generations + 1):
        s = seed + 10 * g
        torch.manual_seed(s)
        net = make_student().to(dev)
        net, losses = train_born_again(net, nets[-1], data.train, student, seed=s)
        nets.append(net)
        info.append((s, losses))
        accs.append(evaluate(net, data.test))
        say(progress, f"generation {g} (seed {s}): final loss {losses[-1]:.4f}, test accuracy {accs[-1]:.4f}")

    def one_fit(i: int) -> tuple[dict, Any, list[int], int, tuple[str, ...]]:
        res, feats = fit_consistency(nets[i], layer, nets[-1], layer, data.images, fit, device=dev)
        row = consistency_row(res)
        dec, held, channel = None, [], 0
        if n_maps > 0:
            held, channel = map_selection(res, n_maps)  # the same held-out split in every fit (same images, seed)
            dec = res.decompose(feats.x_a[torch.as_tensor(held)].float(), feats.x_b[torch.as_tensor(held)].float())
        say(progress, f"generation {i} -> {generations}: Var(x^D) {row.var_residual:.4g}, "
                       f"instability {row.instability:.4f}")
        return row, dec, held, channel, tuple(feats.image_ids[j] for j in held)

    done = map_over_ranks(one_fit, list(range(generations)), ctx)
    rows: list[ConsistencyRow | None] = [d[0] for d in done]
    maps, target, images, ids, channel = [], None, (), (), 0
    if n_maps > 0:
        held, channel, ids = done[0][2], done[0][3], done[0][4]  # images and channel of generation 0's fit
        images = tuple(display_image(data.images, j) for j in held)
        maps = [d[1].residual for d in done]
        target = done[-1][1].target
    rows.append(None)
    gens = tuple(Generation(g, info[g][0], accs[g], tuple(info[g][1]), rows[g]) for g in range(generations + 1))
    settings = {"generations": generations, "student": dataclasses.asdict(student), "fit": fit.as_dict(),
                "seed": seed, "seeds": [info[g][0] for g in range(generations + 1)], "device": str(dev),
                "n_train": len(data.train), "n_test": len(data.test), "n_images": len(data.images),
                "data": data.source, "fit_preset": "fast",
                "models": [model_summary(n) for n in nets],
                "convention": "paper (x* standardised per channel with the fit's training-split statistics)"}
    return DistillationResult(layer, gens, tuple(maps), target, images, ids, channel, settings)


# --------------------------------------------------------------------------------------------------- CLI
def add_cli(sub: Any) -> None:
    """Register ``kcore distillation``."""
    p = sub.add_parser(
        "distillation", help="Sec. 4.5: born-again generations and their blind spots w.r.t. the newest one",
        description="Train born-again networks (CE + lambda * KD at temperature tau, each a new network from "
        "scratch with seed + 10*generation, the student becoming the next teacher) and fit g_theta from each "
        "earlier generation's features to the newest generation's: Var(x^Delta) = blind spots of generation i.")
    p.add_argument("--teacher", default="scratch", metavar="scratch|sample|CKPT",
                   help="generation 0: 'scratch' (default: trained here with cross-entropy only and the students' "
                   f"recipe, seed --seed), 'sample' ({SAMPLE_TEACHER}) or a checkpoint with a model card")
    p.add_argument("--teacher-epochs", type=int, default=None,
                   help="epochs of a --teacher scratch (default: --epochs, the born-again setting of equal budgets)")
    p.add_argument("--generations", type=int, default=3, help="born-again generations after the teacher (default 3)")
    p.add_argument("--lambd", type=float, default=0.5, help="weight lambda of the KD term (default 0.5)")
    p.add_argument("--tau", type=float, default=1.0, help="temperature tau (default 1)")
    add_recipe_args(p, epochs=4, nets="every generation (arch, image size: with --teacher scratch)")
    add_fit_args(p, n_train=2000, train_help="of every generation")
    add_nested_argument(p)
    study_command(p, "distillation", _compute, _report)


def _compute(args: argparse.Namespace, run: StudySettings, progress: Progress) -> StudyRun:
    from kcore.architectures import build_model
    from kcore.training import train_classifier

    student = StudentSettings(epochs=args.epochs, lambd=args.lambd, tau=args.tau, lr=args.lr,
                              weight_decay=args.weight_decay, optimizer=args.optimizer)
    teacher_epochs = args.teacher_epochs or args.epochs
    if args.teacher == "scratch":
        arch, size, card = args.arch, args.image_size, None
        prov_teacher: dict[str, Any] = {"trained": "here, cross-entropy only", "architecture": arch,
                                        "epochs": teacher_epochs, "seed": args.seed, "lr": args.lr,
                                        "optimizer": args.optimizer, "weight_decay": args.weight_decay}
    else:
        path = SAMPLE_TEACHER if args.teacher == "sample" else args.teacher
        m = load_checkpoint(path, "--teacher")
        card = m.card
        if card is None or not card.architecture or not card.num_classes:
            raise ValueError(f"--teacher {path!r} needs a model card with architecture and num_classes, to build "
                             "students of the same architecture. Fix: write a card (kcore.cards.write_card).")
        arch, size = card.architecture, (card.input_size[0] if card.input_size else 64)
    data = study_data(args.data, image_size=size, n_train=args.n_train, n_test=args.n_test, n_images=args.n_images,
                      mean=card.mean if card else None, std=card.std if card else None)
    num_classes = len(data.class_names) if card is None else card.num_classes
    if args.teacher == "scratch":
        progress(f"training the teacher ({arch}, {teacher_epochs} epochs, seed {args.seed}) on {data.source}")
        teacher = train_classifier(arch, data.train, None, epochs=teacher_epochs, seed=args.seed,
                                   num_classes=num_classes, lr=args.lr, optimizer=args.optimizer,
                                   weight_decay=args.weight_decay).model
        layer = args.layer or "layer2"
    else:
        teacher = m.model
        layer = args.layer or card.default_layer
        prov_teacher = checkpoint_provenance(m, path, layer)
        if not layer:
            raise ValueError("--layer is required: the teacher's card has no default_layer.")
    progress(f"teacher: {arch}, layer {layer}; {data.source}")
    res = distillation_study(teacher, layer, data, lambda: build_model(arch, num_classes), generations=args.generations,
                             student=student, fit=fit_settings_from(args), seed=args.seed, device=run.device,
                             teacher_seed=args.seed if args.teacher == "scratch" else None, progress=progress,
                             ctx=run.job)
    prov = {"teacher": prov_teacher, "architecture": arch, "layers": {"all generations": layer},
            "seeds": {"generations": res.settings["seeds"], "fit": args.seed}, "data": data.source}
    return StudyRun(res, prov)


def _report(res: DistillationResult) -> None:
    cols = ["generation", "accuracy", "var_residual", "instability"]
    print(res.tables()["generations"].reindex(columns=cols).to_string(index=False))
    rows = [(g.generation, g.row) for g in res.generations if g.row is not None and g.row.gains is not None]
    if rows:
        print("order split of g_K (Var(x^(k))/Var(x*)) and order-wise gains of the nested fits (held-out images), "
              "generation -> newest:")
        for gen, row in rows:
            split = ", ".join(f"x{k} {100 * v / row.var_target:.1f} %" for k, v in enumerate(row.var_orders))
            print(f"  generation {gen}: split {split}; gains {row.gains.line()}")
