"""Helpers several test modules share: tiny seeded networks and their :class:`kcore.checkpoints.LoadedModel`.

Import them as ``from helpers import tiny_net, loaded`` (pytest puts ``tests/`` on ``sys.path``); fixtures
live in ``tests/conftest.py``. A test module never imports another test module.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from torch import nn

from kcore.checkpoints import LoadedModel

SAMPLE_MODELS = Path(__file__).resolve().parents[1] / "sample_models"


def tiny_net(seed: int, width: int = 6) -> nn.Module:
    """A seeded conv → ReLU → conv → ReLU → pool → linear classifier of 3 classes, in eval mode.

    Args:
        seed: torch's global seed for the initial weights (the same seed gives the same network).
        width: channels of both convolutions; module ``"2"`` is the second convolution.

    Returns:
        The network, with in-place ReLUs (to check that captured features are cloned).
    """
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def plain_net(seed: int, width: int) -> nn.Module:
    """Conv-ReLU-conv-ReLU-pool-linear with plain (not in-place) ReLUs, seeded, in eval mode."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def loaded(model: nn.Module, name: str) -> LoadedModel:
    """``model`` as a state-dict checkpoint called ``name``, with a sha256 made from the name (no file).

    Args:
        model: the network.
        name: the checkpoint's file name.

    Returns:
        A :class:`LoadedModel` without a card; two names give two different hashes.
    """
    return LoadedModel(model, name, hashlib.sha256(name.encode()).hexdigest(), "state_dict", None,
                       sum(p.numel() for p in model.parameters()))


def copy_sample(name: str, folder: Path) -> Path:
    """The bundled sample checkpoint ``name`` (e.g. ``"kshapes_tinynet_s0"``) and its model card, copied into
    ``folder`` (made if missing); returns the checkpoint's new path."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".card.json"):
        shutil.copy(SAMPLE_MODELS / f"{name}{suffix}", folder / f"{name}{suffix}")
    return folder / f"{name}.safetensors"
