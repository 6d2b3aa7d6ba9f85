"""The checkpoints, layers, images and features a study starts from.

Checkpoints given on the command line are loaded with errors that name the option (:func:`load_checkpoint`); a
missing layer falls back on the model card's (:func:`layer_of`); features are extracted from [0, 1] images, each
model's card normalising them (:func:`pair_features`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kcore.checkpoints import LoadedModel
from kcore.imagesets import labelled_images


def load_checkpoint(path: str, argument: str) -> LoadedModel:
    """Load a checkpoint given on the command line (:func:`kcore.checkpoints.load_model`), with errors that name
    the option.

    A study takes no architecture options (``--arch``, ``--num-classes``, ``--non-strict``): a file that needs one
    (a bare state dict without a model card, or one that does not fit its card) gets an error whose fix is to
    convert it first with ``kcore convert``, which writes a model card beside the converted file.

    Args:
        path: the checkpoint as typed.
        argument: the study's option that named it (e.g. ``"--a"``), for the messages.

    Returns:
        The loaded model.

    Raises:
        ValueError: the file does not exist, or cannot be loaded without an option the studies lack (the message
            gives the ``kcore convert`` command and what to pass to ``argument`` afterwards).
    """
    from kcore.arguments import ArgumentError
    from kcore.checkpoints import load_model

    if not Path(path).is_file():
        hint = (" The sample models are made by `python -m kcore.samples train --out sample_models`."
                if "sample_models" in str(path) else "")
        raise ValueError(f"{argument} {path!r} does not exist.{hint} Fix: pass an existing checkpoint.")
    try:
        return load_model(path)
    except ArgumentError as exc:
        raise ValueError(convert_first_message(exc, path, argument)) from exc


def convert_first_message(exc: Exception, path: str, argument: str) -> str:
    """The message for a study checkpoint that needs an architecture option: what is wrong, and the
    ``kcore convert`` command that makes a file the study can read.

    Args:
        exc: the loader's error (a :class:`kcore.arguments.ArgumentError` has its mentions re-spelled as
            ``kcore convert``'s flags).
        path: the checkpoint as typed.
        argument: the study's option that named it.

    Returns:
        ``"<option> <path> cannot be loaded as it is: <the problem>. ... Fix: convert the file first with `kcore
        convert <path> --arch ARCH --out <out>` ... pass `<option> <out>`."``
    """
    from kcore.arguments import ArgumentError
    from kcore.convert_cli import SPELLINGS

    text = exc.respelled(SPELLINGS) if isinstance(exc, ArgumentError) else exc
    problem = str(text).split(" Fix: ", 1)[0].rstrip(".")
    src = Path(path)
    out = src.with_suffix(".safetensors") if src.suffix != ".safetensors" else src.with_name(f"{src.stem}_kcore.safetensors")
    return (f"{argument} {path!r} cannot be loaded as it is: {problem}. The study commands take no --arch, "
            f"--num-classes or --non-strict. Fix: convert the file first with `kcore convert {path} --arch ARCH "
            f"--out {out}` (ARCH: the architecture it was trained with, e.g. resnet18 or timm:NAME; `kcore convert "
            f"--help` says when --match order, --non-strict or --num-classes is needed); it writes a model card "
            f"beside {out}, which the study reads: then pass `{argument} {out}`.")


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


def display_image(dataset: Dataset, i: int) -> np.ndarray:
    """Item ``i`` of a study dataset as an (H, W, 3) uint8 image (for figures)."""
    if hasattr(dataset, "raw"):
        return dataset.raw(i)
    x = dataset[i][0]
    mean = torch.tensor(getattr(dataset, "mean", (0.0, 0.0, 0.0))).view(-1, 1, 1)
    std = torch.tensor(getattr(dataset, "std", (1.0, 1.0, 1.0))).view(-1, 1, 1)
    return ((x * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def pair_features(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, images: Dataset, *,
                  device: str | torch.device = "cpu", batch_size: int = 64):
    """A's and B's features at one layer each for [0, 1] ``images``, each model's card normalising them
    (a :class:`kcore.features.FeaturePair` with labels)."""
    from kcore.features import extract_features
    from kcore.pipeline import model_transform

    ta = model_transform(a.card)
    tb = ta if a is b else model_transform(b.card)
    return extract_features(a.model, layer_a, b.model, layer_b, images, batch_size=batch_size, device=device,
                            transform_a=ta, transform_b=tb)


def train_test_features(a: LoadedModel, layer_a: str, b: LoadedModel, layer_b: str, train_images: Dataset,
                        test_images: Dataset, *, device: str | torch.device = "cpu", needed_by: str = "the study"):
    """:func:`pair_features` of the training and of the test images: ``(train pair, test pair)``.

    Raises:
        ValueError: the images came without labels (``needed_by`` names what needs them).
    """
    tr = pair_features(a, layer_a, b, layer_b, train_images, device=device)
    te = pair_features(a, layer_a, b, layer_b, test_images, device=device)
    if tr.labels is None or te.labels is None:
        raise ValueError(f"the images came without labels; {needed_by} needs (image, label) pairs.")
    return tr, te


def train_test_images(args: argparse.Namespace, size: int) -> tuple[Dataset, Dataset]:
    """``--n-train`` training and ``--n-test`` test images of ``--data``, in [0, 1], at ``size`` px."""
    return (labelled_images(args.data, "train", args.n_train, size),
            labelled_images(args.data, "test", args.n_test, size))


def single_features(m: LoadedModel, layer: str, images: Dataset, *, device: str | torch.device = "cpu",
                    batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """One model's features (N, C, H, W) at ``layer`` and the labels (N,) for ``images``."""
    fp = pair_features(m, layer, m, layer, images, device=device, batch_size=batch_size)
    if fp.labels is None:
        raise ValueError("images came without labels; the studies need (image, label) pairs.")
    return fp.x_a.float(), fp.labels
