"""Families of networks for the studies: train N networks that differ only in seed (or training half).

A tool of the stability study (not a study itself): it imports only the shared modules of the studies and
the core. The labelled images are RGB in [0, 1] (:func:`kcore.data.labelled_images`); they are normalised
for training with the family's mean and std, which every member's model card records.

Command line (registered by :mod:`kcore.experiments.stability`)::

    kcore train-family --arch kc_resnet --seeds 0 1 2 --out families/resnet          # Sec. 4.2, case 1
    kcore train-family --arch kc_resnet --seeds 0 1 --halves --out families/halves   # Sec. 4.2, case 2

Paper: Sec. 4.2 ("stability of learning"): case 1, networks of one architecture trained from different
initialisations on the same data; case 2, two networks trained on disjoint halves of the training data.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from kcore._io import MARKER, check_out_dir, write_file_atomic
from kcore.architectures import build_model
from kcore.cards import ModelCard, card_path_for, write_card
from kcore.checkpoints import LoadedModel, load_model
from kcore.data import BUNDLED_DATA, is_bundled, labelled_images
from kcore.distributed import map_over_ranks
from kcore.experiments._arguments import add_output_arguments
from kcore.experiments._study import Progress, say, stderr_progress, torch_threads
from kcore.imagesets import Normalized, Subset
from kcore.training import Optimizer

FAMILY_FORMAT = "kcore-family/1"

#: training recipe per sample architecture: (optimizer, lr, weight decay), as in kcore.samples.SAMPLE_RECIPES
RECIPES: dict[str, tuple[Optimizer, float, float]] = {
    "kc_resnet": ("sgd", 0.1, 5e-4),
    "kc_tinynet": ("adamw", 0.01, 1e-4),
}
#: recipe for any other architecture (torchvision's, trained from scratch)
DEFAULT_RECIPE: tuple[Optimizer, float, float] = ("sgd", 0.01, 1e-4)

def dataset_labels(images: Dataset) -> list[int]:
    """Every label of a dataset (without rendering kshapes images)."""
    if hasattr(images, "label"):
        return [int(images.label(i)) for i in range(len(images))]  # type: ignore[arg-type]
    if isinstance(images, Subset):
        base = dataset_labels(images.base)
        return [base[i] for i in images.indices]
    return [int(images[i][1]) for i in range(len(images))]  # type: ignore[arg-type]


def disjoint_halves(labels: Sequence[int], seed: int = 0) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the indices, split class by class (seeded), as for the paper's case 2."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    gen = torch.Generator().manual_seed(seed)
    first: list[int] = []
    second: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = torch.randperm(len(idx), generator=gen).tolist()
        half = len(idx) // 2
        first += [idx[j] for j in perm[:half]]
        second += [idx[j] for j in perm[half:]]
    return sorted(first), sorted(second)


# ---------------------------------------------------------------------------------------------- families
@dataclass(frozen=True, eq=False)
class FamilyMember:
    """One trained network of a family.

    Attributes:
        name: file stem, e.g. ``"kc_resnet_s1"`` or ``"kc_resnet_s0_half1"``.
        seed: seed of initialisation and data order.
        half: index (0 or 1) of the training half, or None (whole training set).
        model: the trained model (eval mode, CPU).
        card: its model card.
        sha256: SHA-256 of its safetensors bytes (what :func:`load_model` reports for the saved file).
        test_accuracy: accuracy on the family's test images.
        train_seconds: wall time of its training.
    """

    name: str
    seed: int
    half: int | None
    model: nn.Module
    card: ModelCard
    sha256: str
    test_accuracy: float
    train_seconds: float
    _bytes: bytes = field(repr=False, default=b"")

    def loaded(self) -> LoadedModel:
        """As a :class:`LoadedModel` (what the studies take)."""
        return LoadedModel(self.model, f"{self.name}.safetensors", self.sha256, "safetensors", self.card,
                           sum(p.numel() for p in self.model.parameters()))


@dataclass(frozen=True, eq=False)
class Family:
    """Networks of one architecture that differ only in seed (case 1) or training half (case 2)."""

    architecture: str
    members: tuple[FamilyMember, ...]
    halves: bool
    data: dict
    epochs: int
    recipe: dict

    @property
    def case(self) -> str:
        """``"halves"`` (case 2) or ``"seeds"`` (case 1)."""
        return "halves" if self.halves else "seeds"

    def loaded(self) -> list[LoadedModel]:
        """Every member's network, loaded."""
        return [m.loaded() for m in self.members]

    def manifest(self) -> dict:
        """The ``family.json`` content."""
        return {
            "format": FAMILY_FORMAT, "architecture": self.architecture, "case": self.case, "halves": self.halves,
            "epochs": self.epochs, "data": self.data, "recipe": self.recipe,
            "members": [{"name": m.name, "file": f"{m.name}.safetensors", "seed": m.seed, "half": m.half,
                         "sha256": m.sha256, "test_accuracy": m.test_accuracy,
                         "train_seconds": round(m.train_seconds, 1)} for m in self.members],
        }

    def save(self, directory: str | Path) -> Path:
        """Write ``<name>.safetensors`` + ``<name>.card.json`` per member and ``family.json`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        for m in self.members:
            path = out / f"{m.name}.safetensors"
            write_file_atomic(path, m._bytes)
            write_card(m.card, card_path_for(path))
        write_file_atomic(out / "family.json", json.dumps(self.manifest(), indent=1) + "\n")
        # kcore's marker: `train-family --overwrite` may write into this folder again (kcore._io.check_out_dir)
        write_file_atomic(out / MARKER, json.dumps({"kcore": "family", "format": 1}))
        return out


def train_family(
    arch: str = "kc_resnet",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    halves: bool = False,
    epochs: int = 10,
    n_train: int = 4000,
    n_test: int = 200,
    image_size: int = 32,
    data: str = BUNDLED_DATA,
    data_seed: int = 0,
    split_seed: int = 0,
    optimizer: Optimizer | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
    ctx: Any = None,
) -> Family:
    """Train networks of one architecture that differ only in their seed, or in their training half.

    Args:
        arch: an architecture of :func:`kcore.architectures.build_model` (e.g. ``"kc_resnet"``).
        seeds: one seed per network (initialisation and data order). With ``halves``: exactly two.
        halves: case 2 of Sec. 4.2: network i is trained on half i of the training images (disjoint halves,
            split class by class with ``split_seed``); otherwise every network sees all of them (case 1).
        epochs: training epochs of every network.
        n_train, n_test: training images, and test images for the accuracy on each card.
        image_size: side of the square images.
        data: ``"kshapes"`` (embedded) or a folder ``DIR/{train,test}/<class>/*``.
        data_seed: kshapes' dataset seed (or a folder subset's seed).
        split_seed: seed of the split into halves.
        optimizer, lr, weight_decay: default: :data:`RECIPES` for the architecture.
        batch_size: images per step.
        progress: called with one line per network (and per epoch).
        ctx: a torchrun job (:func:`kcore.distributed.init`): the networks are dealt out to the ranks (each
            trained whole on one rank; every rank gets all); ``None``: one process.

    Returns:
        A :class:`Family` (in memory; :meth:`Family.save` writes it).

    Raises:
        ValueError: bad seeds (repeated, or not two with ``halves``), epochs or sizes.
    """
    from safetensors.torch import save as st_save

    from kcore.synthetic import MEAN, STD
    from kcore.training import train_classifier

    seeds = [int(s) for s in seeds]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must hold at least two different seeds; got {seeds}. Fix: e.g. --seeds 0 1 2.")
    if halves and len(seeds) != 2:
        raise ValueError(f"with halves=True (--halves) give exactly two seeds, one per half; got {seeds}.")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}.")
    opt0, lr0, wd0 = RECIPES.get(arch, DEFAULT_RECIPE)
    optimizer, lr, weight_decay = optimizer or opt0, lr if lr is not None else lr0, (
        weight_decay if weight_decay is not None else wd0)
    train_raw = labelled_images(data, "train", n_train, image_size, seed=data_seed)
    test_raw = labelled_images(data, "test", n_test, image_size, seed=data_seed)
    bundled = is_bundled(data)
    mean, std = (MEAN, STD) if bundled else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_set, test_set = Normalized(train_raw, mean, std), Normalized(test_raw, mean, std)
    class_names = tuple(train_raw.class_names)  # type: ignore[attr-defined]
    parts: list[tuple[int | None, Dataset]] = [(None, train_set)] * len(seeds)
    if halves:
        h0, h1 = disjoint_halves(dataset_labels(train_raw), split_seed)
        parts = [(0, Subset(train_set, h0)), (1, Subset(train_set, h1))]
    from kcore.zoo import DEFAULT_LAYERS

    default_layer = DEFAULT_LAYERS[arch].name if arch in DEFAULT_LAYERS else None
    dataset_name = (train_raw.spec.name if bundled else f"folder {data}")  # type: ignore[attr-defined]

    def one_member(i: int) -> FamilyMember:
        seed, (half, subset) = seeds[i], parts[i]
        name = f"{arch}_s{seed}" + (f"_half{half}" if half is not None else "")
        say(progress, f"training {name} ({len(subset)} images, {epochs} epochs)")
        torch.manual_seed(seed)
        model = build_model(arch, len(class_names))
        res = train_classifier(model, subset, test_set, epochs=epochs, seed=seed, lr=lr, optimizer=optimizer,
                               weight_decay=weight_decay, batch_size=batch_size, progress=progress)
        state = {k: v.detach().contiguous() for k, v in res.model.state_dict().items()}
        # one metadata entry: safetensors writes a metadata map in no fixed order, so two entries made the same
        # weights hash differently from run to run
        blob = st_save(state, metadata={"kcore": json.dumps({"format": "kcore-family-member/1", "name": name},
                                                            sort_keys=True)})
        card = ModelCard(
            architecture=arch, num_classes=len(class_names), input_size=(image_size, image_size), mean=tuple(mean),
            std=tuple(std), class_names=class_names, dataset=dataset_name, test_accuracy=res.test_accuracy,
            default_layer=default_layer,
            extra={"seed": seed, "half": half, "epochs": epochs, "n_train": len(subset), "optimizer": optimizer,
                   "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "family": FAMILY_FORMAT},
        )
        say(progress, f"{name}: test accuracy {res.test_accuracy:.3f} ({res.train_seconds:.0f} s)")
        return FamilyMember(name, seed, half, res.model.eval(), card, hashlib.sha256(blob).hexdigest(),
                            res.test_accuracy, res.train_seconds, blob)

    # every network has its own seed and data: they are independent of each other
    members = tuple(map_over_ranks(one_member, list(range(len(seeds))), ctx))
    data_desc = {"data": data, "dataset": dataset_name, "image_size": image_size, "n_train": len(train_raw),
                 "n_test": len(test_raw), "data_seed": data_seed, "split_seed": split_seed if halves else None}
    recipe = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
              "schedule": "linear warm-up 1 epoch, cosine to 0 (kcore.training.train_classifier)"}
    return Family(arch, members, halves, data_desc, epochs, recipe)


def load_family(directory: str | Path) -> tuple[list[LoadedModel], dict]:
    """Read a family folder written by :meth:`Family.save`: its models and its ``family.json``.

    Raises:
        ValueError: no ``family.json`` in ``directory``, or a member file is missing.
    """
    d = Path(directory)
    if not (d / "family.json").is_file():
        raise ValueError(f"{str(d)!r} holds no family.json. Fix: pass a folder written by `kcore train-family`.")
    manifest = json.loads((d / "family.json").read_text())
    models = []
    for m in manifest["members"]:
        path = d / m["file"]
        if not path.is_file():
            raise ValueError(f"family member {str(path)!r} is missing. Fix: retrain with `kcore train-family`.")
        models.append(load_model(path))
    return models, manifest


# -------------------------------------------------------------------------------------------------- CLI
def add_family_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a family to train (shared by ``kcore train-family`` and ``kcore stability``)."""
    p.add_argument("--arch", default="kc_resnet", help="architecture (default kc_resnet)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="S",
                   help="one seed per network (default 0 1 2; 0 1 with --halves)")
    p.add_argument("--halves", action="store_true",
                   help="case 2 of Sec. 4.2: two networks trained on disjoint halves of the training images")
    p.add_argument("--epochs", type=int, default=10, metavar="E", help="training epochs per network (default 10)")
    p.add_argument("--n-train", type=int, default=4000, metavar="N", help="training images (default 4000)")
    p.add_argument("--n-test", type=int, default=200, metavar="N",
                   help="test images for each network's accuracy (default 200)")
    p.add_argument("--image-size", type=int, default=32, metavar="S", help="image side in pixels (default 32)")
    p.add_argument("--data", default=BUNDLED_DATA, metavar=f"{BUNDLED_DATA}|DIR",
                   help=f"'{BUNDLED_DATA}' (the bundled images, default) or a folder DIR/{{train,test}}/<class>/*")
    p.add_argument("--data-seed", type=int, default=0, help="kshapes' dataset seed, or a folder subset's seed")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per architecture)")


def family_from_args(args: argparse.Namespace, progress: Progress | None, ctx: Any = None) -> Family:
    """Train the family that the options of :func:`add_family_arguments` describe (``ctx``: a torchrun job)."""
    seeds = args.seeds or ([0, 1] if args.halves else [0, 1, 2])
    return train_family(args.arch, seeds, halves=args.halves, epochs=args.epochs, n_train=args.n_train,
                        n_test=args.n_test, image_size=args.image_size, data=args.data, data_seed=args.data_seed,
                        lr=args.lr, progress=progress, ctx=ctx)


def add_cli(sub: Any) -> None:
    """Register ``kcore train-family`` (called from :func:`kcore.experiments.stability.add_cli`)."""
    p = sub.add_parser("train-family", help="train networks that differ only in seed or training half (Sec. 4.2)",
                       description="Train N networks of one architecture on the same images with different seeds "
                       "(case 1 of Sec. 4.2), or two on disjoint halves (--halves, case 2); write weights, model "
                       "cards and family.json into OUT.")
    add_family_arguments(p)
    add_output_arguments(p, metavar="DIR", help="output folder", overwrite_help="write into DIR even if it exists")
    p.set_defaults(handler=_cmd_train_family)


def _cmd_train_family(args: argparse.Namespace) -> int:
    from kcore import distributed as kd

    out = Path(args.out)
    check_out_dir(out, overwrite=args.overwrite, flag="--out")
    # under torchrun the networks are dealt out to the ranks; rank 0 alone writes the family folder
    with kd.job("cpu") as ctx, torch_threads(args.threads):  # the networks train on the CPU (gloo)
        fam = family_from_args(args, stderr_progress("train-family"), ctx)
        kd.main_first(lambda: fam.save(out), ctx)
        if not ctx.is_main:
            return 0
    for m in fam.members:
        print(f"{m.name}: test accuracy {m.test_accuracy:.4f}  sha256 {m.sha256[:12]}")
    print(f"wrote {out}/family.json")
    return 0
