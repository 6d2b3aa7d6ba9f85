"""How each model sees the images: input size, normalisation, and where those came from.

A model is fed what it was trained on. The preprocessing of a checkpoint is resolved in this order:

1. what the user gives (``--input-size-a``, ``--mean-a``, ``--std-a``; the dashboard's fields),
2. the model card beside the checkpoint (:class:`kcore.cards.ModelCard`),
3. for a torchvision architecture without a card: that architecture's standard evaluation transform
   (resize the shorter side, centre-crop to the input size, ImageNet mean and std), read from torchvision's
   weight metadata; for a timm architecture (``timm:NAME``): timm's ``pretrained_cfg`` of that name (input size,
   interpolation, ``crop_pct``, mean and std); no weights are downloaded,
4. otherwise none: images are used at the size they were loaded at, without normalisation (and the user is told).

The transform works on batches of [0, 1] RGB images (N, 3, H, W), so one loaded image set can feed two models
with different preprocessing.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from kcore.limits import limits

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Interpolation = Literal["bilinear", "bicubic"]
INTERPOLATIONS: dict[str, str] = {
    "bilinear": "bilinear (antialiased)",
    "bicubic": "bicubic (antialiased; clamped to [0, 1])",
}
"""The resampling filters a :class:`Preprocessing` resizes with, and what each does (the valid values)."""


@dataclass(frozen=True)
class Preprocessing:
    """The input of one model: [0, 1] RGB → (resize, centre crop) → normalise.

    Attributes:
        input_size: ``(H, W)`` the model receives; ``None`` = the images' own size.
        mean, std: per-channel normalisation (``(x − mean) / std``); ``None`` = none.
        resize_size: the shorter side is resized to this before the centre crop to ``input_size``
            (torchvision's evaluation transform); ``None`` = resize straight to ``input_size``.
        source: where these values come from, in words (shown to the user and written to provenance).
        interpolation: the filter of the resize in :meth:`transform` (one of :data:`INTERPOLATIONS`; timm models
            often use ``"bicubic"``). Images are first loaded at :attr:`load_size` by the image loader, so this
            filter applies when the transform itself resizes (e.g. two models that need different sizes).
    """

    input_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_size: int | None = None
    source: str = "none"
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}; got {self.interpolation!r}. "
                             "Fix: use 'bilinear' (the default) or 'bicubic'.")
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 2 or not all(_positive_int(v) for v in size):
                raise ValueError(
                    f"input_size must be (H, W), two positive integers such as (224, 224); got {self.input_size!r}. "
                    "Fix: give the height and width the model was trained on."
                )
            object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
            h, w = self.input_size
            limits().check("max_input_side", max(h, w), shown=f"{h}×{w}",
                           what=f"input_size (one float32 RGB image alone would take {12 * h * w / 2**30:.1f} GiB)",
                           fix="give the size the model was trained at, e.g. (224, 224)")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            value = tuple(value)
            if len(value) not in (1, 3) or not all(_finite(v) for v in value):
                raise ValueError(
                    f"{name} must be 3 numbers (R, G, B), e.g. {IMAGENET_MEAN if name == 'mean' else IMAGENET_STD}; "
                    f"got {getattr(self, name)!r}. Fix: give one value per colour channel."
                )
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be > 0 for every channel; got {self.std}. Fix: use e.g. {IMAGENET_STD}.")
        if (self.mean is None) != (self.std is None):
            raise ValueError(
                f"mean and std are given together or not at all; got mean={self.mean}, std={self.std}. "
                "Fix: give both (e.g. ImageNet's) or neither."
            )
        if self.resize_size is not None and not _positive_int(self.resize_size):
            raise ValueError(f"resize_size must be a positive integer or None; got {self.resize_size!r}. "
                             "Fix: give the shorter side before the centre crop, e.g. 256 for a 224 × 224 input.")
        if self.resize_size is not None:
            # images are loaded at resize_size × resize_size (load_size): the same cap as the input size
            limits().check("max_input_side", self.resize_size,
                           what="resize_size (the shorter side images are resized to before the centre crop)",
                           fix="give the resize the model was evaluated with, e.g. 256 for a 224 × 224 input")

    @property
    def load_size(self) -> tuple[int, int] | None:
        """The size at which images should be loaded so that this transform loses nothing."""
        if self.resize_size is not None:
            return (self.resize_size, self.resize_size)
        return self.input_size

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, for provenance and feature-cache keys."""
        return {
            "input_size": list(self.input_size) if self.input_size else None,
            "resize_size": self.resize_size,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "interpolation": self.interpolation,
            "source": self.source,
        }

    def describe(self) -> str:
        """One line for people, e.g. ``224×224 (shorter side 256, centre crop), mean (…), std (…) — model card``."""
        if self.input_size is None:
            size = "images at their loaded size"
        else:
            size = f"{self.input_size[0]}×{self.input_size[1]}"
            if self.resize_size is not None:
                size += f" (shorter side {self.resize_size}, centre crop)"
            if self.interpolation != "bilinear":
                size += f", {self.interpolation}"
        if self.mean is None:
            norm = "no normalisation"
        else:
            fmt = lambda v: "(" + ", ".join(f"{x:.3g}" for x in v) + ")"  # noqa: E731
            norm = f"mean {fmt(self.mean)}, std {fmt(self.std)}"
        return f"{size}, {norm} — {self.source}"

    def transform(self) -> Callable[[Tensor], Tensor]:
        """The batch transform: [0, 1] RGB (N, 3, H, W) → the model's input."""
        size, resize, mode = self.input_size, self.resize_size, self.interpolation
        mean = None if self.mean is None else torch.tensor(self.mean).view(1, -1, 1, 1)
        std = None if self.std is None else torch.tensor(self.std).view(1, -1, 1, 1)

        def apply(x: Tensor) -> Tensor:
            if size is not None and tuple(x.shape[-2:]) != tuple(size):
                x = _resize_crop(x, size, resize, mode)
            if mean is not None:
                x = (x - mean.to(x)) / std.to(x)
            return x

        return apply

    def with_overrides(
        self,
        input_size: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        *,
        what: str = "given",
    ) -> Preprocessing:
        """These settings with some replaced (``None`` keeps a value); ``source`` says which were overridden.

        A new input size keeps the resize/crop ratio of a torchvision transform (256/224 for most models).
        """
        changed = [n for n, v in (("input size", input_size), ("mean", mean), ("std", std)) if v is not None]
        if not changed:
            return self
        resize = self.resize_size
        if input_size is not None and resize is not None and self.input_size is not None:
            resize = int(round(min(input_size) * resize / min(self.input_size)))
        mean_, std_ = (mean if mean is not None else self.mean), (std if std is not None else self.std)
        if (mean_ is None) != (std_ is None):  # only one given and nothing to complete it: the other is ImageNet's
            mean_ = mean_ if mean_ is not None else IMAGENET_MEAN
            std_ = std_ if std_ is not None else IMAGENET_STD
        return Preprocessing(
            tuple(input_size) if input_size is not None else self.input_size,  # type: ignore[arg-type]
            mean_,
            std_,
            resize,
            f"{' and '.join(changed)} {what}; otherwise {self.source}",
            self.interpolation,
        )

    @staticmethod
    def from_card(card: Any, source: str = "model card") -> Preprocessing:
        """The preprocessing a model card states (missing fields stay ``None``)."""
        if card is None:
            return Preprocessing()
        extra = getattr(card, "extra", None) or {}
        get = extra.get if isinstance(extra, dict) or hasattr(extra, "get") else (lambda _k: None)
        resize, interpolation = get("resize_size"), get("interpolation")
        return Preprocessing(
            tuple(card.input_size) if card.input_size else None,
            tuple(card.mean) if card.mean else None,
            tuple(card.std) if card.std else None,
            resize if _positive_int(resize) and card.input_size else None,
            source,
            interpolation if interpolation in INTERPOLATIONS else "bilinear",
        )


def standard_preprocessing(arch: str | None) -> Preprocessing | None:
    """The standard evaluation transform of ``arch``: torchvision's (its default weights' metadata) or timm's
    (:func:`timm_preprocessing`), else ``None``.

    Only the transform's parameters are read (crop size, resize size, mean, std); nothing is downloaded.
    """
    if not arch:
        return None
    if isinstance(arch, str) and arch.startswith("timm:"):
        return timm_preprocessing(arch)
    try:
        import torchvision
        from torchvision.models import get_model_weights

        from kcore.architectures import sample_architectures

        if arch in sample_architectures() or arch not in torchvision.models.list_models(module=torchvision.models):
            return None  # the project's samples come first in build_model
        weights = get_model_weights(arch).DEFAULT
        t = weights.transforms()
    except (ValueError, KeyError, AttributeError, TypeError):
        return None
    crop = int(t.crop_size[0])
    resize = int(t.resize_size[0]) if t.resize_size else None
    return Preprocessing(
        (crop, crop),
        tuple(float(v) for v in t.mean),
        tuple(float(v) for v in t.std),
        resize,
        f"torchvision's standard evaluation transform for {arch} ({weights}; no model card)",
    )


def preprocessing_from_timm_cfg(cfg: Mapping[str, Any], arch: str) -> Preprocessing:
    """kcore's preprocessing for a timm ``pretrained_cfg`` (timm's evaluation transform).

    timm resizes the shorter side to ``floor(size / crop_pct)`` and centre-crops ``size``; that is kcore's
    ``resize_size`` and ``input_size``. timm's other crop modes (``"squash"``, ``"border"``) stretch or pad the
    image, which kcore never does: they become the centre crop, and :attr:`Preprocessing.source` says so.

    Args:
        cfg: the configuration (``input_size`` ``(3, H, W)``, ``crop_pct``, ``crop_mode``, ``interpolation``,
            ``mean``, ``std``; missing keys take timm's defaults: 224 × 224, 0.875, ``"center"``, bilinear, ImageNet).
        arch: the architecture's name, for the ``source`` text.

    Returns:
        The preprocessing, with ``source`` naming timm's ``pretrained_cfg`` of ``arch``.

    Raises:
        ValueError: a value of ``cfg`` that is not what timm writes there (e.g. ``crop_pct`` outside (0, 1]).
    """
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if len(size) != 3 or not all(_positive_int(v) for v in size):
        raise ValueError(f"timm's pretrained_cfg of {arch!r}: input_size must be (C, H, W); got {size!r}. "
                         "Fix: pass --input-size (or a model card's input_size) for this model.")
    crop_pct = cfg.get("crop_pct")
    crop_pct = 0.875 if crop_pct is None else crop_pct
    if not _finite(crop_pct) or not 0 < crop_pct <= 1:
        raise ValueError(f"timm's pretrained_cfg of {arch!r}: crop_pct must be in (0, 1]; got {crop_pct!r}. "
                         "Fix: give the preprocessing in a model card (input_size, mean, std, extra.resize_size).")
    h, w = int(size[1]), int(size[2])
    notes = []
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        notes.append(f"its crop_mode {mode!r} taken as a centre crop")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        notes.append(f"its interpolation {interpolation!r} taken as bilinear")
        interpolation = "bilinear"
    mean, std = cfg.get("mean") or IMAGENET_MEAN, cfg.get("std") or IMAGENET_STD
    note = f"; {', '.join(notes)}" if notes else ""
    return Preprocessing(
        (h, w),
        tuple(float(v) for v in mean),
        tuple(float(v) for v in std),
        int(math.floor(min(h, w) / crop_pct)),
        f"timm's pretrained_cfg for {arch} (crop_pct {crop_pct:g}, {interpolation}; no model card{note})",
        interpolation,
    )


def timm_preprocessing(arch: str) -> Preprocessing | None:
    """timm's evaluation transform of ``arch`` (``"timm:NAME"``) from its ``pretrained_cfg``; ``None`` without timm
    or for a name timm does not know (building the model says why)."""
    from kcore.architectures import timm_pretrained_cfg

    try:
        cfg = timm_pretrained_cfg(arch)
    except ValueError:  # not installed or unknown name: load_model's build_model has said so already
        return None
    return preprocessing_from_timm_cfg(cfg, arch)


def resolve_preprocessing(card: Any, arch: str | None) -> Preprocessing:
    """The preprocessing of a loaded checkpoint without user overrides: card, else the architecture's standard
    (torchvision's or timm's, :func:`standard_preprocessing`), else none.

    A card that states only some fields (e.g. the input size) is completed from the standard of its architecture
    when there is one.
    """
    arch = arch or (getattr(card, "architecture", None) if card is not None else None)
    from_card = Preprocessing.from_card(card)
    if card is not None and from_card.input_size is not None and from_card.mean is not None:
        return from_card  # complete: no need to import torchvision
    standard = standard_preprocessing(arch)
    if card is None or (from_card.input_size is None and from_card.mean is None):
        if standard is not None:
            return standard
        return Preprocessing(
            source="none: no model card and not a torchvision or timm architecture, so images are used as loaded, "
            "without normalisation (give --input-size/--mean/--std or a model card)"
        )
    if standard is None:
        return from_card
    origin = f"timm's pretrained_cfg for {arch}" if arch.startswith("timm:") else f"torchvision's standard for {arch}"
    filled = from_card.with_overrides(
        None if from_card.input_size is not None else standard.input_size,
        None if from_card.mean is not None else standard.mean,
        None if from_card.std is not None else standard.std,
        what=f"from {origin}",
    )
    return Preprocessing(filled.input_size, filled.mean, filled.std, filled.resize_size,
                         f"model card, completed from {origin}", filled.interpolation)


def preprocessing_of(loaded: Any) -> Preprocessing:
    """The preprocessing of a :class:`kcore.checkpoints.LoadedModel` (its resolved one, else from its card)."""
    prep = getattr(loaded, "preprocessing", None)
    if prep is not None:
        return prep
    return resolve_preprocessing(getattr(loaded, "card", None), getattr(loaded, "architecture", None))


def load_size(*preps: Preprocessing, default: tuple[int, int] = (224, 224)) -> tuple[int, int]:
    """One size to load images at for several models: the largest any of them needs (``default`` if none says)."""
    sizes = [p.load_size for p in preps if p.load_size is not None]
    if not sizes:
        return default
    return (max(s[0] for s in sizes), max(s[1] for s in sizes))


def _resize_crop(x: Tensor, size: tuple[int, int], resize: int | None, mode: str = "bilinear") -> Tensor:
    def interp(t: Tensor, hw: tuple[int, int]) -> Tensor:
        out = torch.nn.functional.interpolate(t, size=hw, mode=mode, align_corners=False, antialias=True)
        return out.clamp(0.0, 1.0) if mode == "bicubic" else out  # bicubic overshoots the [0, 1] range

    if resize is None:
        return interp(x, tuple(size))
    h, w = x.shape[-2:]
    scale = resize / min(h, w)
    new = (max(size[0], int(round(h * scale))), max(size[1], int(round(w * scale))))
    if new != (h, w):
        x = interp(x, new)
    top, left = (new[0] - size[0]) // 2, (new[1] - size[1]) // 2
    return x[..., top : top + size[0], left : left + size[1]]


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def card_for(loaded: Any, prep: Preprocessing | None = None) -> Any:
    """A model card for a loaded checkpoint that records its architecture, class count and preprocessing.

    Fields of the checkpoint's own card (class names, dataset, accuracy, default layer, extra) are kept; the
    preprocessing (``prep``, default: the model's own) replaces the card's. Write it beside the checkpoint
    with ``kcore.cards.write_card(card, kcore.cards.card_path_for(path))``; loading then reads it back.
    """
    import dataclasses

    from kcore.cards import ModelCard

    prep = prep if prep is not None else preprocessing_of(loaded)
    card = getattr(loaded, "card", None) or ModelCard()
    extra = {k: v for k, v in dict(card.extra).items() if k not in ("resize_size", "interpolation")}
    if prep.resize_size is not None:
        extra["resize_size"] = prep.resize_size
    if prep.interpolation != "bilinear":
        extra["interpolation"] = prep.interpolation
    return dataclasses.replace(
        card,
        architecture=card.architecture or getattr(loaded, "architecture", None),
        num_classes=card.num_classes or getattr(loaded, "num_classes", None),
        input_size=prep.input_size,
        mean=prep.mean,
        std=prep.std,
        extra=extra,
    )
