"""Model cards: what a checkpoint cannot say about itself (architecture, classes, preprocessing, provenance).

A card is a JSON file beside the checkpoint (``m.safetensors`` -> ``m.card.json``, see :func:`card_path_for`)
whose ``"format"`` is :data:`CARD_FORMAT`. :func:`kcore.checkpoints.load_model` reads it automatically.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kcore._io import write_file_atomic
from kcore.architectures import TIMM_NAME_PATTERN, TIMM_PREFIX

CARD_FORMAT = "kcore-model-card/1"
"""Value of the ``"format"`` key of a model card JSON file."""


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint cannot say about itself: architecture, classes, preprocessing, provenance.

    Stored as JSON beside the checkpoint (see :func:`card_path_for`) with ``"format":
    "kcore-model-card/1"``; read automatically by :func:`kcore.checkpoints.load_model`.

    Attributes:
        architecture: a name accepted by :func:`kcore.architectures.build_model`, e.g. ``"resnet18"`` or, for timm's
            (an optional dependency), ``"timm:tf_efficientnet_lite0"``.
        num_classes: number of outputs of the classifier.
        input_size: ``(H, W)`` of the images the model was trained on.
        mean: per-channel mean used to normalise the input images.
        std: per-channel standard deviation used to normalise the input images.
        class_names: one name per class, in output order.
        dataset: name of the training data set.
        test_accuracy: reported test accuracy (a fraction in [0, 1] by convention).
        default_layer: the layer to preselect when comparing this model.
        extra: any other JSON-serialisable information (kept; only ``resize_size``, the shorter side before the
            centre crop to ``input_size``, and ``interpolation`` (``"bilinear"`` or ``"bicubic"``) are read, by
            :mod:`kcore.preprocessing`).
    """

    architecture: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None
    dataset: str | None = None
    test_accuracy: float | None = None
    default_layer: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dictionary of this card, with the ``"format"`` key first."""
        out: dict[str, Any] = {"format": CARD_FORMAT}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                out[f.name] = dict(value)
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "model card") -> ModelCard:
        """Build a card from a parsed JSON object, checking every field's type.

        Args:
            data: the JSON object. Unknown keys are kept in ``extra``.
            source: how to name the card in error messages (e.g. its path).

        Raises:
            ValueError: wrong ``"format"`` value, or a field of the wrong type.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        fmt = data.get("format", CARD_FORMAT)
        if fmt != CARD_FORMAT:
            raise ValueError(
                f"{source}: 'format' must be {CARD_FORMAT!r}; got {fmt!r}. "
                "Fix: write the card with kcore.cards.write_card."
            )
        known = {f.name for f in fields(cls)}
        if not isinstance(data.get("extra") or {}, Mapping):
            raise ValueError(f"{source}: 'extra' must be a JSON object; got {data['extra']!r}.")
        extra = dict(data.get("extra") or {})
        for key, value in data.items():
            if key not in known and key != "format":
                extra[key] = value

        def opt_str(key: str) -> str | None:
            value = data.get(key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{source}: {key!r} must be a string or null; got {value!r}.")
            return value

        def opt_floats(key: str) -> tuple[float, ...] | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"{source}: {key!r} must be a list of numbers, e.g. [0.5, 0.5, 0.5]; got {value!r}.")
            return tuple(float(v) for v in value)

        from kcore.limits import limits

        caps = limits()
        num_classes = data.get("num_classes")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
        ):
            raise ValueError(f"{source}: 'num_classes' must be a positive integer; got {num_classes!r}. "
                             "Fix: give the number of outputs of the model's classifier, e.g. 10.")
        if num_classes is not None:
            caps.check("max_classes", num_classes, what=f"{source}: 'num_classes'",
                       fix="give the number of outputs of the model's classifier (e.g. 10 or 1000)")
        input_size = data.get("input_size")
        if input_size is not None:
            if (
                not isinstance(input_size, (list, tuple))
                or len(input_size) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
            ):
                raise ValueError(f"{source}: 'input_size' must be [H, W] (two positive integers); got {input_size!r}.")
            input_size = (int(input_size[0]), int(input_size[1]))
            caps.check("max_input_side", max(input_size), shown=str(list(input_size)),
                       what=f"{source}: 'input_size' (one float32 RGB image alone would take "
                            f"{12 * input_size[0] * input_size[1] / 2**30:.1f} GiB)",
                       fix="set the size the model was trained at, e.g. [224, 224]")
        resize_size = extra.get("resize_size")
        if resize_size is not None:
            if isinstance(resize_size, bool) or not isinstance(resize_size, int) or resize_size < 1:
                raise ValueError(f"{source}: 'extra.resize_size' (the shorter side before the centre crop) must be a "
                                 f"positive integer or absent; got {resize_size!r}. Fix: give e.g. 256 for a "
                                 "224 × 224 input, or remove the key.")
            caps.check("max_input_side", resize_size,
                       what=f"{source}: 'extra.resize_size' (the shorter side images are resized to before the "
                            "centre crop)",
                       fix="give the resize the model was evaluated with, e.g. 256 for a 224 × 224 input")
        interpolation = extra.get("interpolation")
        if interpolation is not None and interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"{source}: 'extra.interpolation' must be 'bilinear' or 'bicubic' or absent; got "
                             f"{interpolation!r}. Fix: give the resampling the model was evaluated with, or remove "
                             "the key (bilinear).")
        architecture = opt_str("architecture")
        if architecture is not None and architecture.startswith(TIMM_PREFIX) and not TIMM_NAME_PATTERN.fullmatch(
                architecture[len(TIMM_PREFIX):]):
            raise ValueError(f"{source}: 'architecture' {architecture!r} is not a timm model name: after "
                             f"{TIMM_PREFIX!r} comes a name from timm.list_models() such as 'resnet18' (optionally "
                             "'.TAG'); Hub ids, paths and URLs are not accepted. Fix: e.g. 'timm:resnet18'.")
        std = opt_floats("std")
        if std is not None and any(v <= 0 for v in std):
            raise ValueError(f"{source}: 'std' must hold positive numbers; got {list(std)}.")
        class_names = data.get("class_names")
        if class_names is not None:
            if not isinstance(class_names, (list, tuple)) or not all(isinstance(v, str) for v in class_names):
                raise ValueError(f"{source}: 'class_names' must be a list of strings; got {class_names!r}.")
            caps.check("max_classes", len(class_names), what=f"{source}: the number of 'class_names'",
                       fix="give one name per classifier output")
            class_names = tuple(class_names)
            if num_classes is not None and len(class_names) != num_classes:
                raise ValueError(
                    f"{source}: 'class_names' has {len(class_names)} names but 'num_classes' is {num_classes}. "
                    "Fix: give one name per class."
                )
        accuracy = data.get("test_accuracy")
        if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
            raise ValueError(f"{source}: 'test_accuracy' must be a number or null; got {accuracy!r}.")
        return cls(
            architecture=architecture,
            num_classes=num_classes,
            input_size=input_size,
            mean=opt_floats("mean"),
            std=std,
            class_names=class_names,
            dataset=opt_str("dataset"),
            test_accuracy=None if accuracy is None else float(accuracy),
            default_layer=opt_str("default_layer"),
            extra=extra,
        )


def card_path_for(checkpoint_path: str | os.PathLike[str]) -> Path:
    """Return where the model card of a checkpoint lives: same folder, ``<stem>.card.json``.

    Example: ``runs/m.safetensors`` -> ``runs/m.card.json``.
    """
    path = Path(checkpoint_path)
    return path.with_name(path.stem + ".card.json")


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    """Read a model card JSON file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not valid JSON or not a valid card.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"model card {str(path)!r} is not valid JSON ({exc}). "
            "Fix: correct the file or rewrite it with kcore.cards.write_card."
        ) from exc
    return ModelCard.from_dict(data, source=f"model card {str(path)!r}")


def write_card(card: ModelCard, path: str | os.PathLike[str]) -> Path:
    """Write ``card`` as JSON to ``path`` (use :func:`card_path_for` to place it beside a checkpoint).

    The file is written atomically and never through a symlink (:func:`kcore._io.write_file_atomic`: a fresh
    temporary file created with ``O_EXCL|O_NOFOLLOW`` in the same folder, then renamed over ``path``).

    Returns:
        The path written.

    Raises:
        TypeError: ``card.extra`` holds something JSON cannot store.
        ValueError: ``path`` is a symlink, a folder or a special file (kcore never writes through it).
    """
    text = json.dumps(card.to_dict(), indent=2)
    return write_file_atomic(path, text + "\n")

