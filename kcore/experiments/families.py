"""Families of networks for the studies: train N networks that differ only in seed (or training half).

Also the labelled image splits and per-layer features that the diagnosis, stability and refinement studies
share. Images handed to the networks are RGB in [0, 1]; each network's model card resizes and normalises
them (:func:`kcore.pipeline.model_transform`), as in the pipeline.

Command line (registered by :mod:`kcore.experiments.stability`)::

    kcore train-family --arch kc_resnet --seeds 0 1 2 --out families/resnet          # Sec. 4.2, case 1
    kcore train-family --arch kc_resnet --seeds 0 1 --halves --out families/halves   # Sec. 4.2, case 2

Paper: Sec. 4.2 ("stability of learning"): case 1, networks of one architecture trained from different
initialisations on the same data; case 2, two networks trained on disjoint halves of the training data.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from kcore.architectures import build_model
from kcore.cards import ModelCard, card_path_for, write_card
from kcore.checkpoints import LoadedModel, load_model

FAMILY_FORMAT = "kcore-family/1"
Optimizer = Literal["sgd", "adamw"]

#: training recipe per sample architecture: (optimizer, lr, weight decay), as in kcore.samples.SAMPLE_RECIPES
RECIPES: dict[str, tuple[Optimizer, float, float]] = {
    "kc_resnet": ("sgd", 0.1, 5e-4),
    "kc_tinynet": ("adamw", 0.01, 1e-4),
}
#: recipe for any other architecture (torchvision's, trained from scratch)
DEFAULT_RECIPE: tuple[Optimizer, float, float] = ("sgd", 0.01, 1e-4)

Progress = Callable[[str], None]


def say(progress: Progress | None, message: str) -> None:
    """Send one progress line, if anyone listens."""
    if progress is not None:
        progress(message)


def stderr_progress(prefix: str) -> Progress:
    """A progress callback printing ``[prefix] message`` lines to stderr."""
    t0 = time.perf_counter()

    def out(message: str) -> None:
        print(f"[{prefix} {time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    return out


# ------------------------------------------------------------------------------------------------ images
class FolderImages(Dataset):
    """``ROOT/<split>/<class>/<image>`` as ``(image (3, H, W) in [0, 1], label)`` with ``ids`` and ``class_names``.

    Args:
        root: the folder holding one subfolder per split.
        split: ``"train"`` or ``"test"`` (or any subfolder name).
        size: (H, W) every image is resized to.
        n: use ``n`` images (a seeded random subset, in folder order); default all.
        seed: seed of the subset.
    """

    def __init__(self, root: str | Path, split: str, size: tuple[int, int], n: int | None = None, seed: int = 0):
        from torchvision import datasets, transforms

        folder = Path(root) / split
        if not folder.is_dir():
            raise ValueError(
                f"data folder {str(folder)!r} does not exist. Fix: pass --data DIR with DIR/train/<class>/*.jpg "
                "and DIR/test/<class>/*.jpg, or --data kshapes for the embedded images."
            )
        self._set = datasets.ImageFolder(
            str(folder), transform=transforms.Compose([transforms.Resize(tuple(size)), transforms.ToTensor()])
        )
        total = len(self._set)
        if n is not None and n < total:
            perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
            self._idx = sorted(int(i) for i in perm)
        else:
            self._idx = list(range(total))
        self.class_names = tuple(self._set.classes)
        self.ids = tuple(str(Path(self._set.samples[i][0]).relative_to(root)) for i in self._idx)

    def __len__(self) -> int:
        return len(self._idx)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self._set[self._idx[i]]
        return x[:3] if x.shape[0] >= 3 else x.expand(3, -1, -1), int(y)


def labelled_images(data: str, split: str, n: int | None, image_size: int, *, seed: int = 0) -> Dataset:
    """A labelled split as images in [0, 1]: ``"kshapes"`` (embedded, procedural) or a folder.

    Args:
        data: ``"kshapes"`` or a folder ``DIR`` with ``DIR/<split>/<class>/*``.
        split: ``"train"`` or ``"test"``.
        n: number of images (kshapes: the first ``n`` of the split; a folder: a seeded subset).
        image_size: side of the square images (kshapes renders at it; a folder is resized to it).
        seed: kshapes' dataset seed, or the folder subset's seed.

    Returns:
        A Dataset of ``(image (3, S, S) float in [0, 1], label)`` with ``ids`` and ``class_names``.
    """
    if n is not None and n < 1:
        raise ValueError(f"the number of {split} images must be >= 1; got {n}.")
    if data == "kshapes":
        from kcore.synthetic import KShapesDataset, KShapesSpec

        count = n if n is not None else (2000 if split == "train" else 500)
        spec = KShapesSpec(seed=seed, image_size=image_size, n_train=count if split == "train" else 0,
                           n_test=count if split != "train" else 0)
        return KShapesDataset(spec, split, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return FolderImages(data, split, (image_size, image_size), n, seed)


class Normalized(Dataset):
    """A [0, 1] image dataset normalised with a per-channel mean and std (for training)."""

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]):
        self.base = base
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.class_names = getattr(base, "class_names", None)
        self.ids = getattr(base, "ids", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        return (x - self.mean) / self.std, y


class Subset(Dataset):
    """Items ``indices`` of a dataset, keeping ``ids`` and ``class_names``."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, [int(i) for i in indices]
        ids = getattr(base, "ids", None)
        self.ids = tuple(ids[i] for i in self.indices) if ids is not None else None
        self.class_names = getattr(base, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


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


# ---------------------------------------------------------------------------------------------- features
def input_shape(model: LoadedModel, default: int = 224) -> tuple[int, int, int]:
    """(3, H, W) of the model's input, from its card (else ``default`` square)."""
    if model.card is not None and model.card.input_size:
        return (3, int(model.card.input_size[0]), int(model.card.input_size[1]))
    return (3, default, default)


def layer_of(model: LoadedModel, layer: str | None, argument: str = "layer") -> str:
    """``layer``, or the card's default layer; a ValueError that names the fix when there is none."""
    from kcore.features import validate_layer

    if layer is None:
        layer = model.card.default_layer if model.card is not None else None
        if layer is None:
            raise ValueError(
                f"{argument} is required for {model.name!r}: its model card names no default_layer. "
                f"Fix: pass {argument} (see `kcore layers {model.name}`)."
            )
    validate_layer(model.model, layer)
    return layer


def pair_features(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, images: Dataset, *,
                  device: str | torch.device = "cpu", batch_size: int = 64):
    """A's and B's features at one layer each for ``images`` (a :class:`kcore.features.FeaturePair` with labels)."""
    from kcore.features import extract_features
    from kcore.pipeline import model_transform

    ta = model_transform(a.card)
    tb = ta if a is b else model_transform(b.card)
    return extract_features(a.model, layer_a, b.model, layer_b, images, batch_size=batch_size, device=device,
                            transform_a=ta, transform_b=tb)


def single_features(m: LoadedModel, layer: str, images: Dataset, *, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One model's features (N, C, H, W) at ``layer`` and the labels (N,) for ``images``."""
    fp = pair_features(m, layer, m, layer, images, device=device, batch_size=batch_size)
    if fp.labels is None:
        raise ValueError("images came without labels; the studies need (image, label) pairs.")
    return fp.x_a.float(), fp.labels


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
        return "halves" if self.halves else "seeds"

    def loaded(self) -> list[LoadedModel]:
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
            path.write_bytes(m._bytes)
            write_card(m.card, card_path_for(path))
        (out / "family.json").write_text(json.dumps(self.manifest(), indent=1) + "\n")
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
    data: str = "kshapes",
    data_seed: int = 0,
    split_seed: int = 0,
    optimizer: Optimizer | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    batch_size: int = 64,
    progress: Progress | None = None,
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

    Returns:
        A :class:`Family` (in memory; :meth:`Family.save` writes it).

    Raises:
        ValueError: bad seeds (repeated, or not two with ``halves``), epochs or sizes.
    """
    from safetensors.torch import save as st_save

    from kcore.samples import train_classifier
    from kcore.synthetic import MEAN, STD

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
    mean, std = (MEAN, STD) if data == "kshapes" else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_set, test_set = Normalized(train_raw, mean, std), Normalized(test_raw, mean, std)
    class_names = tuple(train_raw.class_names)  # type: ignore[attr-defined]
    parts: list[tuple[int | None, Dataset]] = [(None, train_set)] * len(seeds)
    if halves:
        h0, h1 = disjoint_halves(dataset_labels(train_raw), split_seed)
        parts = [(0, Subset(train_set, h0)), (1, Subset(train_set, h1))]
    from kcore.zoo import DEFAULT_LAYERS

    default_layer = DEFAULT_LAYERS[arch].name if arch in DEFAULT_LAYERS else None
    dataset_name = (train_raw.spec.name if data == "kshapes" else f"folder {data}")  # type: ignore[attr-defined]
    members = []
    for seed, (half, subset) in zip(seeds, parts):
        name = f"{arch}_s{seed}" + (f"_half{half}" if half is not None else "")
        say(progress, f"training {name} ({len(subset)} images, {epochs} epochs)")
        torch.manual_seed(seed)
        model = build_model(arch, len(class_names))
        res = train_classifier(model, subset, test_set, epochs=epochs, seed=seed, lr=lr, optimizer=optimizer,
                               weight_decay=weight_decay, batch_size=batch_size, progress=progress)
        state = {k: v.detach().contiguous() for k, v in res.model.state_dict().items()}
        blob = st_save(state, metadata={"format": "kcore-family-member/1", "name": name})
        card = ModelCard(
            architecture=arch, num_classes=len(class_names), input_size=(image_size, image_size), mean=tuple(mean),
            std=tuple(std), class_names=class_names, dataset=dataset_name, test_accuracy=res.test_accuracy,
            default_layer=default_layer,
            extra={"seed": seed, "half": half, "epochs": epochs, "n_train": len(subset), "optimizer": optimizer,
                   "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size, "family": FAMILY_FORMAT},
        )
        members.append(FamilyMember(name, seed, half, res.model.eval(), card, hashlib.sha256(blob).hexdigest(),
                                    res.test_accuracy, res.train_seconds, blob))
        say(progress, f"{name}: test accuracy {res.test_accuracy:.3f} ({res.train_seconds:.0f} s)")
    data_desc = {"data": data, "dataset": dataset_name, "image_size": image_size, "n_train": len(train_raw),
                 "n_test": len(test_raw), "data_seed": data_seed, "split_seed": split_seed if halves else None}
    recipe = {"optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "batch_size": batch_size,
              "schedule": "linear warm-up 1 epoch, cosine to 0 (kcore.samples.train_classifier)"}
    return Family(arch, tuple(members), halves, data_desc, epochs, recipe)


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
    p.add_argument("--data", default="kshapes", metavar="kshapes|DIR",
                   help="'kshapes' (embedded, default) or a folder DIR/{train,test}/<class>/*")
    p.add_argument("--data-seed", type=int, default=0, help="kshapes' dataset seed, or a folder subset's seed")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: per architecture)")


def family_from_args(args: argparse.Namespace, progress: Progress | None) -> Family:
    """Train the family that the options of :func:`add_family_arguments` describe."""
    seeds = args.seeds or ([0, 1] if args.halves else [0, 1, 2])
    return train_family(args.arch, seeds, halves=args.halves, epochs=args.epochs, n_train=args.n_train,
                        n_test=args.n_test, image_size=args.image_size, data=args.data, data_seed=args.data_seed,
                        lr=args.lr, progress=progress)


def add_cli(sub: Any) -> None:
    """Register ``kcore train-family`` (called from :func:`kcore.experiments.stability.add_cli`)."""
    p = sub.add_parser("train-family", help="train networks that differ only in seed or training half (Sec. 4.2)",
                       description="Train N networks of one architecture on the same images with different seeds "
                       "(case 1 of Sec. 4.2), or two on disjoint halves (--halves, case 2); write weights, model "
                       "cards and family.json into OUT.")
    add_family_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT even if it exists")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(handler=_cmd_train_family)


def _cmd_train_family(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already exists. Fix: choose a new folder or pass --overwrite.")
    if args.threads:
        torch.set_num_threads(args.threads)
    fam = family_from_args(args, stderr_progress("train-family"))
    fam.save(out)
    for m in fam.members:
        print(f"{m.name}: test accuracy {m.test_accuracy:.4f}  sha256 {m.sha256[:12]}")
    print(f"wrote {out}/family.json")
    return 0


def source_revision() -> dict:
    """The git commit of the kcore checkout and whether its kcore/ files differ from it (empty outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kcore"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "kcore_modified": bool(dirty)}


def as_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: as_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    return obj
