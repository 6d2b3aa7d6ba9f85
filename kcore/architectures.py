"""The architecture registry: every model kcore can build by name (the project's samples, torchvision's, timm's).

Names are plain for the project's samples and torchvision (``"resnet18"``) and prefixed for timm
(``"timm:tf_efficientnet_lite0"``, optionally with a pretrained tag: ``"timm:resnet18.a1_in1k"``). timm is an optional
dependency (``pip install -e '.[timm]'``); everything else works without it, and a ``timm:`` name then gets an error
that says how to install it. A timm name is checked against ``timm.list_models()`` before anything is built, so a
name can never be a module path, a Hub id or a local folder (timm's ``hf-hub:`` and ``local-dir:`` forms).
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from torch import nn

from kcore.arguments import ArgumentError, spell
from kcore.limits import limits

TIMM_PREFIX = "timm:"
"""How an architecture name says it is one of timm's: ``"timm:" + a name from timm.list_models()``."""

TIMM_INSTALL = "pip install -e '.[timm]'"
"""The command that installs the optional timm dependency (from a checkout of kcore)."""

TIMM_FAMILIES: tuple[str, ...] = (
    # convolutional
    "resnet", "resnext", "seresnet", "seresnext", "wide_resnet", "regnet", "densenet", "vgg", "inception", "xception",
    "efficientnet", "tf_efficientnet", "mobilenetv2", "mobilenetv3", "tf_mobilenetv3", "mobilenetv4", "mnasnet",
    "mixnet", "tf_mixnet", "ghostnet", "lcnet", "convnext", "dla", "dpn", "repvgg", "hrnet_w",
    # transformers and hybrids
    "vit_tiny_", "vit_small_", "vit_base_", "deit_", "deit3_small", "deit3_base", "swin_tiny", "swin_small",
    "swin_base", "levit", "mobilevit", "efficientformer", "maxvit_tiny", "maxvit_small", "coatnet_0", "coatnet_1",
)
"""Name prefixes of the timm models the dashboard offers (common CNN and ViT families; see
:func:`curated_timm_architectures`). The command line and the API accept every name of ``timm.list_models()``."""

_TIMM_TOO_BIG = re.compile(r"(huge|giant|gigantic|enormous|xxlarge|xlarge)")
"""Size words of timm names left out of the dashboard's list: those models take GBs to build."""

TIMM_NAME_PATTERN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
"""What a timm model name looks like: ``name`` or ``name.tag`` (no ``/``, ``:`` or path)."""


class TimmNotInstalled(ValueError):
    """A ``timm:`` architecture was asked for, but the optional timm package is not installed."""


def sample_architectures() -> Mapping[str, Any]:
    """The project's sample architectures (name → constructor taking ``num_classes``)."""
    from kcore import zoo  # lazy: the zoo may import torchvision models

    return zoo.SAMPLE_ARCHITECTURES


def _torchvision_architectures() -> list[str]:
    import torchvision  # lazy: importing torchvision takes seconds

    return sorted(torchvision.models.list_models(module=torchvision.models))


def is_timm(arch: object) -> bool:
    """Whether ``arch`` names a timm architecture (``"timm:NAME"``)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def timm_installed() -> bool:
    """Whether the optional timm package can be imported (it is not imported here)."""
    import importlib.util
    import sys

    if "timm" in sys.modules:
        return sys.modules["timm"] is not None
    return importlib.util.find_spec("timm") is not None


def _import_timm(arch: str) -> ModuleType:
    try:
        import timm  # lazy and optional: importing timm takes seconds
    except ImportError as exc:
        raise TimmNotInstalled(
            f"arch={arch!r} is a timm architecture, but timm is not installed. "
            f"Fix: {TIMM_INSTALL} (or pip install 'timm>=1.0,<2'), or choose one of torchvision's architectures."
        ) from exc
    return timm


def timm_model_name(arch: str) -> str:
    """The timm model name of ``arch`` (``"timm:resnet18"`` → ``"resnet18"``), checked against timm's registry.

    Args:
        arch: ``"timm:NAME"`` or ``"timm:NAME.TAG"``, NAME one of ``timm.list_models()`` and TAG one of its
            pretrained tags (``timm.list_pretrained()``; the tag picks that weight's preprocessing).

    Returns:
        ``NAME`` or ``NAME.TAG``.

    Raises:
        TimmNotInstalled: timm is not installed (a ``ValueError``).
        ValueError: not a ``timm:`` name, or a name or tag timm does not know (with the closest names).
    """
    if not is_timm(arch):
        raise ValueError(f"arch must start with {TIMM_PREFIX!r} to name a timm architecture; got {arch!r}. "
                         f"Fix: write e.g. '{TIMM_PREFIX}resnet18'.")
    timm = _import_timm(arch)
    name = arch[len(TIMM_PREFIX):]
    names = timm.list_models()
    listing = f"({len(names)} names; kcore.architectures.timm_architectures() lists them with the prefix)"
    if not TIMM_NAME_PATTERN.fullmatch(name):
        raise ArgumentError(
            f"{_said(arch)} is not a timm model name: after {TIMM_PREFIX!r} comes a name such as 'resnet18' or "
            f"'resnet18.a1_in1k' (letters, digits and '_', at most one '.TAG'); Hub ids, paths and URLs are not "
            f"accepted. Fix: give a name from timm.list_models() {listing}."
        )
    base, _, tag = name.partition(".")
    if base not in names:
        close = difflib.get_close_matches(base, names, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(TIMM_PREFIX + c) for c in close)}?" if close else ""
        raise ArgumentError(f"{_said(arch)}: timm has no model called {base!r}.{hint} "
                         f"Fix: give a name from timm.list_models() {listing}.")
    if tag:
        tagged = timm.list_pretrained(base + ".*")
        if name not in tagged:
            raise ArgumentError(
                f"{_said(arch)}: timm has no pretrained tag {tag!r} for {base!r}; its tags are "
                f"{[t.partition('.')[2] for t in tagged][:10]}. Fix: use one of them, or give {TIMM_PREFIX + base!r} "
                "for its default."
            )
    return name


def _said(arch: str) -> str:
    """``arch='NAME'`` in the Python API; a front end re-spells it as its own flag (kcore.arguments)."""
    return spell("arch", f"arch={arch!r}", arch)


def timm_architectures() -> list[str]:
    """Every timm architecture as ``"timm:NAME"`` (``[]`` when timm is not installed)."""
    if not timm_installed():
        return []
    import timm

    return [TIMM_PREFIX + name for name in timm.list_models()]


def curated_timm_architectures() -> list[str]:
    """The timm architectures the dashboard offers: those of :data:`TIMM_FAMILIES`, without the giant sizes.

    A browser picks from a list of names and never types one; the list keeps to common CNN and ViT families so that
    it stays navigable and a click cannot build a model of billions of parameters. ``[]`` without timm.
    """
    return [arch for arch in timm_architectures()
            if arch[len(TIMM_PREFIX):].startswith(TIMM_FAMILIES) and not _TIMM_TOO_BIG.search(arch)]


def timm_pretrained_cfg(arch: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of ``arch`` (input size, interpolation, crop, mean, std, …), read without building it.

    Args:
        arch: ``"timm:NAME"`` or ``"timm:NAME.TAG"`` (the default tag when none is given).

    Returns:
        The configuration as a dict (empty when timm has none for this name).

    Raises:
        TimmNotInstalled, ValueError: as :func:`timm_model_name`.
    """
    name = timm_model_name(arch)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    return dict(cfg.to_dict()) if cfg is not None else {}


def available_architectures(*, with_timm: bool = True) -> list[str]:
    """Return every name :func:`build_model` accepts: the project's samples, torchvision's, then timm's.

    Args:
        with_timm: also list timm's (``"timm:NAME"``, when timm is installed; importing it takes seconds).
    """
    samples = sorted(sample_architectures())
    names = samples + [name for name in _torchvision_architectures() if name not in samples]
    return names + (timm_architectures() if with_timm else [])


def build_model(arch: str, num_classes: int) -> nn.Module:
    """Build an untrained model by name (the project's sample architectures, torchvision's, or timm's).

    Args:
        arch: a name from :func:`available_architectures`, e.g. ``"resnet18"``, ``"vgg16_bn"`` or
            ``"timm:tf_efficientnet_lite0"`` (timm's ``create_model(NAME, pretrained=False)``).
        num_classes: number of classifier outputs.

    Returns:
        A freshly initialised model (training mode, on the CPU). No weights are downloaded.

    Raises:
        ValueError: unknown ``arch`` (with the closest names), or ``num_classes`` not a positive int.
        TimmNotInstalled: a ``timm:`` name without timm installed (a ``ValueError`` that says how to install it).
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
    if is_timm(arch):
        name = timm_model_name(arch)
        timm = _import_timm(arch)
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ArgumentError(f"timm could not build {_said(arch)} with num_classes={num_classes}: {exc}") from exc
    samples = sample_architectures()
    if arch in samples:
        return samples[arch](num_classes)
    tv_names = _torchvision_architectures()
    if arch in tv_names:
        import torchvision

        try:
            return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as exc:
            raise ArgumentError(f"torchvision could not build {_said(arch)} with num_classes={num_classes}: {exc}") from exc
    names = sorted(samples) + tv_names
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    if timm_installed():
        import timm

        if arch.partition(".")[0] in timm.list_models():  # timm's own name without the prefix
            close = [TIMM_PREFIX + arch] + close[:2]
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    timm_note = (f"; timm's as '{TIMM_PREFIX}NAME'" if timm_installed()
                 else f"; timm's as '{TIMM_PREFIX}NAME' after {TIMM_INSTALL}")
    raise ArgumentError(
        f"{_said(arch)} is not a known architecture.{hint} "
        "Fix: give a name from kcore.architectures.available_architectures() "
        f"({len(names)} names: the project's samples and torchvision's classification models{timm_note})."
    )
