"""Train the sample models on kshapes, reproducibly, on a CPU in a few minutes (the recipes; the generic
training loop is :mod:`kcore.training`).

Command line::

    python -m kcore.samples train --out sample_models [--quick] [--threads 1] [--only NAME ...]

writes, for each model of ``SAMPLE_RECIPES``, ``<name>.safetensors`` (the ``state_dict``) and
``<name>.card.json`` (the model card: architecture, preprocessing, class names, dataset,
measured test accuracy, default layer), plus a ``README.md`` describing the run.

``kshapes_resnet_s0`` and ``kshapes_resnet_s1`` share the architecture and the data and differ
only in the seed (initialisation and data order): the pair for stability studies (paper
Sec. 4, "stability of learning"). ``kshapes_tinynet_s0`` is a weak network of another
architecture: the pair (strong, weak) for diagnosing representations (paper Sec. 4).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from kcore._io import write_file_atomic
from kcore.cards import CARD_FORMAT, ModelCard, card_path_for
from kcore.synthetic import MEAN, STD, KShapesDataset, KShapesSpec
from kcore.training import (  # noqa: F401  (the generic trainer, re-exported for older imports)
    OPTIMIZERS,
    EpochLog,
    Optimizer,
    Progress,
    TrainResult,
    _say,
    evaluate,
    predict,
    train_classifier,
)
from kcore.zoo import DEFAULT_LAYERS

SAMPLE_MODELS_DIR = Path(__file__).resolve().parent.parent / "sample_models"
"""Where the committed sample models live in a source checkout."""

@dataclass(frozen=True)
class Recipe:
    """How one sample model is trained.

    Attributes:
        name: file stem, e.g. ``"kshapes_resnet_s0"``.
        architecture: key of ``SAMPLE_ARCHITECTURES``.
        seed: seed of initialisation and data order.
        epochs: training epochs.
        lr: peak learning rate.
        optimizer: one of ``OPTIMIZERS``.
        weight_decay: weight decay.
        batch_size: images per step.
        description: one line for the README.
    """

    name: str
    architecture: str
    seed: int
    epochs: int
    lr: float
    optimizer: Optimizer = "adamw"
    weight_decay: float = 1e-4
    batch_size: int = 64
    description: str = ""


SAMPLE_RECIPES: tuple[Recipe, ...] = (
    Recipe("kshapes_resnet_s0", "kc_resnet", 0, 8, 3e-3,
           description="strong model (small ResNet), seed 0"),
    Recipe("kshapes_resnet_s1", "kc_resnet", 1, 8, 3e-3,
           description="same architecture and data as kshapes_resnet_s0, seed 1 (stability studies)"),
    Recipe("kshapes_tinynet_s0", "kc_tinynet", 0, 12, 3e-3,
           description="weak model (3 plain convs, no BatchNorm), seed 0 (diagnosis studies)"),
)
"""The committed sample models and how each was trained."""

SAMPLE_CHECKPOINTS: dict[str, str] = {r.name: f"sample_models/{r.name}.safetensors" for r in SAMPLE_RECIPES}
"""Each sample model's checkpoint as the commands' defaults name it (relative to a source checkout)."""

SAMPLE_SPEC = KShapesSpec(seed=0, image_size=64, n_train=8000, n_test=1000)
"""The kshapes data of the sample models: trained on "train", evaluated on all of "test"."""
CHECK_N = 300
"""Cards also store the accuracy on the first ``CHECK_N`` test images: a quick reproduction check."""
QUICK_SPEC = KShapesSpec(seed=0, image_size=64, n_train=200, n_test=100)
QUICK_EPOCHS = 1


# ------------------------------------------------------------------- sample models
@dataclass(frozen=True)
class SampleModel:
    """One written sample model: its files and card."""

    name: str
    weights: Path
    card_path: Path
    card: ModelCard = field(hash=False)


@dataclass(frozen=True)
class CheckAccuracy:
    """A card's quick reproduction check: the accuracy (float64) on the first ``n`` images of a split.

    Attributes:
        split: the kshapes split (``"test"``).
        n: the images evaluated (the first ``n`` of the split).
        accuracy: the share of them classified correctly.
    """

    split: str
    n: int
    accuracy: float

    def as_dict(self) -> dict[str, Any]:
        """The card's ``check_accuracy`` entry: ``{"split", "n", "accuracy"}``."""
        return {"split": self.split, "n": self.n, "accuracy": self.accuracy}


def check_accuracy(model: nn.Module, spec: KShapesSpec, n: int = CHECK_N) -> CheckAccuracy:
    """Accuracy (float64) on the first ``n`` test images of ``spec``, as stored in cards.

    Args:
        model: the trained classifier.
        spec: the kshapes set whose test split is evaluated.
        n: images to evaluate, capped at the split size.

    Returns:
        A :class:`CheckAccuracy` on the ``"test"`` split (:meth:`CheckAccuracy.as_dict` is the card's entry).
    """
    n = min(n, spec.n_test)
    return CheckAccuracy(split="test", n=n, accuracy=evaluate(model, KShapesDataset(spec, "test", n=n)))


def make_card(recipe: Recipe, result: TrainResult, spec: KShapesSpec, *, command: str,
              num_threads: int) -> ModelCard:
    """The model card of a trained sample model; its training details are the card's ``extra``.

    Args:
        recipe: the recipe the model was trained with.
        result: the training's result (the model, its history and test accuracy).
        spec: the kshapes set it was trained and tested on.
        command: the command line recorded in the card.
        num_threads: torch's intra-op threads during training.

    Returns:
        The :class:`ModelCard`; :func:`card_json` gives the file's content.
    """
    model = result.model
    test = KShapesDataset(spec, "test")
    return ModelCard(
        architecture=recipe.architecture, num_classes=len(test.class_names),
        input_size=(spec.image_size, spec.image_size), mean=tuple(MEAN), std=tuple(STD),
        class_names=tuple(test.class_names), dataset=spec.name, test_accuracy=result.test_accuracy,
        default_layer=DEFAULT_LAYERS[recipe.architecture].name,
        extra={
            "description": recipe.description,
            "labels": "fine",
            "train_split": {"split": "train", "n": spec.n_train},
            "test_split": {"split": "test", "n": spec.n_test, "eval_dtype": "float64"},
            "check_accuracy": check_accuracy(model, spec).as_dict(),
            "seed": recipe.seed,
            "epochs": len(result.history),
            "optimizer": recipe.optimizer,
            "lr": recipe.lr,
            "weight_decay": recipe.weight_decay,
            "batch_size": recipe.batch_size,
            "final_train_loss": result.history[-1].loss,
            "train_seconds": round(result.train_seconds, 1),
            "num_threads": num_threads,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "command": command,
        },
    )


def card_json(card: ModelCard) -> dict[str, Any]:
    """A sample model's card file content: :meth:`ModelCard.to_dict` with ``extra``'s keys at the top level.

    :meth:`ModelCard.from_dict` reads such a file back into the same card (unknown keys go to ``extra``).
    """
    out = {k: v for k, v in card.to_dict().items() if k != "extra"}
    clash = sorted(set(out) & set(card.extra))
    if clash:
        raise ValueError(f"card.extra holds {clash}, which are card fields; expected only other keys. "
                         "Fix: set them as the ModelCard's own fields.")
    return {**out, **card.extra}


def _readme(models: Sequence[SampleModel], command: str, total_seconds: float, quick: bool) -> str:
    rows = "\n".join(
        f"| `{m.name}` | `{m.card.architecture}` | {m.card.extra['seed']} | {m.card.extra['epochs']} "
        f"| {m.card.test_accuracy:.4f} | `{m.card.default_layer}` "
        f"| {m.card.extra['num_parameters']:,} | {m.card.extra['train_seconds']:.0f} s |"
        for m in models
    )
    card = card_json(models[0].card)
    note = "\n**Quick run (smoke test): these models are barely trained.**\n" if quick else ""
    return f"""# Sample models

Small classifiers trained on **kshapes** (`kcore.synthetic`, {card['dataset']}: 10 shape classes,
64x64 RGB, procedurally generated, nothing downloaded), for trying kcore offline.
{note}
| file stem | architecture | seed | epochs | test accuracy | default layer | parameters | train time |
|---|---|---|---|---|---|---|---|
{rows}

- Each model is `<stem>.safetensors` (the `state_dict`, load with `safetensors.torch.load_file` into
  `kcore.zoo.SAMPLE_ARCHITECTURES[card["architecture"]](card["num_classes"])`) and `<stem>.card.json`
  (format `{CARD_FORMAT}`: preprocessing, class names, dataset, accuracy, default layer, training details).
- Training: {card['train_split']['n']} images of the train split. Test accuracy: all {card['test_split']['n']}
  images of the test split, evaluated in float64 so that it reproduces exactly on any machine.
- Train times are wall-clock on the machine that made the files (it may have been shared).
- `kshapes_resnet_s0` / `kshapes_resnet_s1`: same architecture and data, different seeds (stability).
  `kshapes_tinynet_s0`: weak network of another architecture (diagnosis).

Made with (CPU, {card['num_threads']} thread(s), torch {card['torch_version']}, {total_seconds:.0f} s in total):

```
{command}
```
"""


def train_sample_models(out_dir: str | Path, *, quick: bool = False,
                        progress: Progress | None = None, num_threads: int | None = None,
                        only: Sequence[str] | None = None,
                        command: str = "python -m kcore.samples train --out sample_models",
                        ) -> tuple[SampleModel, ...]:
    """Train the sample models of ``SAMPLE_RECIPES`` and write weights, cards and a README.

    Args:
        out_dir: folder to write into (created if needed).
        quick: smoke-test mode: 1 epoch on 200 images, evaluated on 100 (seconds, not minutes).
        progress: called with one line of text per step.
        num_threads: torch intra-op threads during training (restored afterwards).
        only: names of the recipes to train (default: all).
        command: the command line recorded in the cards and the README.

    Returns:
        The written models, in ``SAMPLE_RECIPES`` order.

    Raises:
        ValueError: a name in ``only`` is not a recipe.
    """
    recipes = SAMPLE_RECIPES
    if only:
        known = {r.name for r in SAMPLE_RECIPES}
        unknown = sorted(set(only) - known)
        if unknown:
            raise ValueError(f"only: unknown sample model(s) {unknown}; choose from {sorted(known)}")
        recipes = tuple(r for r in SAMPLE_RECIPES if r.name in set(only))
    spec = QUICK_SPEC if quick else SAMPLE_SPEC
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    threads = torch.get_num_threads()
    written = []
    start = time.perf_counter()
    try:
        train = KShapesDataset(spec, "train", cache=True)  # rendered once, shared by all models
        test = KShapesDataset(spec, "test")
        for recipe in recipes:
            _say(progress, f"training {recipe.name} ({recipe.architecture}, seed {recipe.seed})")
            result = train_classifier(
                recipe.architecture, train, test, epochs=QUICK_EPOCHS if quick else recipe.epochs,
                seed=recipe.seed, lr=recipe.lr, optimizer=recipe.optimizer,
                weight_decay=recipe.weight_decay, batch_size=recipe.batch_size, cache=False,
                progress=progress)
            weights = out / f"{recipe.name}.safetensors"
            state = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
            # One metadata key only: safetensors writes a map in arbitrary order, and a
            # single key keeps the file byte-identical from run to run.
            write_file_atomic(weights, st_save(state, metadata={"kcore_sample_model": recipe.name}))
            card = make_card(recipe, result, spec, command=command, num_threads=threads)
            card_path = card_path_for(weights)
            write_file_atomic(card_path, json.dumps(card_json(card), indent=2) + "\n")
            written.append(SampleModel(recipe.name, weights, card_path, card))
            _say(progress, f"{recipe.name}: test accuracy {result.test_accuracy:.4f}, "
                           f"{result.train_seconds:.0f} s")
    finally:
        torch.set_num_threads(previous_threads)
    if not only:
        write_file_atomic(out / "README.md", _readme(written, command, time.perf_counter() - start, quick))
    return tuple(written)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kcore.samples``."""
    parser = argparse.ArgumentParser(prog="python -m kcore.samples",
                                     description="Train the kcore sample models on kshapes.")
    sub = parser.add_subparsers(dest="action", required=True)
    train = sub.add_parser("train", help="train the sample models and write weights + cards")
    train.add_argument("--out", default="sample_models", help="output folder (default: sample_models)")
    train.add_argument("--quick", action="store_true", help="1 epoch on 200 images (smoke test)")
    train.add_argument("--threads", type=int, default=1,
                       help="torch threads (default: 1; more rarely helps for these small models)")
    train.add_argument("--only", nargs="+", metavar="NAME", help="train only these models")
    args = parser.parse_args(argv)
    command = "python -m kcore.samples " + " ".join(sys.argv[1:] if argv is None else argv)
    train_sample_models(args.out, quick=args.quick, num_threads=args.threads, only=args.only,
                        command=command.strip(), progress=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
