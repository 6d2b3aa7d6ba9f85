"""The architecture registry: every model kcore can build by name (the project's samples, then torchvision's)."""
from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

from kcore.limits import limits


def sample_architectures() -> Mapping[str, Any]:
    """The project's sample architectures (name → constructor taking ``num_classes``)."""
    from kcore import zoo  # lazy: the zoo may import torchvision models

    return zoo.SAMPLE_ARCHITECTURES


def _torchvision_architectures() -> list[str]:
    import torchvision  # lazy: importing torchvision takes seconds

    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_architectures() -> list[str]:
    """Return every name :func:`build_model` accepts: the project's samples first, then torchvision's."""
    samples = sorted(sample_architectures())
    return samples + [name for name in _torchvision_architectures() if name not in samples]


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Build an untrained model by name (the project's sample architectures, then torchvision's).

    Args:
        arch: a name from :func:`available_architectures`, e.g. ``"resnet18"`` or ``"vgg16_bn"``.
        num_classes: number of classifier outputs.

    Returns:
        A freshly initialised model (training mode, on the CPU). No weights are downloaded.

    Raises:
        ValueError: unknown ``arch`` (with the closest names), or ``num_classes`` not a positive int.
        LimitExceeded: ``num_classes`` is over the server's cap (``KCORE_MAX_CLASSES``; a ``ValueError``).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"num_classes must be a positive integer; got {num_classes!r} ({type(num_classes).__name__}). "
            "Fix: pass the number of outputs of the model's classifier (e.g. 10 for CIFAR-10)."
        )
    # checked before anything is allocated: 30 M classes would take GBs in the classifier alone
    limits().check("max_classes", num_classes, what="num_classes",
                   fix="pass the number of outputs of the model's classifier (e.g. 10 for CIFAR-10, 1000 for ImageNet)")
    if not isinstance(arch, str) or not arch:
        raise ValueError(f"arch must be a non-empty architecture name such as 'resnet18'; got {arch!r}.")
    samples = sample_architectures()
    if arch in samples:
        return samples[arch](num_classes)
    tv_names = _torchvision_architectures()
    if arch in tv_names:
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"torchvision could not build arch={arch!r} with num_classes={num_classes}: {exc}") from exc
    names = sorted(samples) + tv_names
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"arch={arch!r} is not a known architecture.{hint} "
        "See kcore.architectures.available_architectures() for the full list "
        f"({len(names)} names: the project's samples and torchvision's classification models)."
    )

