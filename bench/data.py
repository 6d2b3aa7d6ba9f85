"""Feature sets the benchmark fits on: deterministic synthetic pairs, and the sample-model pair.

The synthetic pair imitates two conv layers' raw feature maps: x is a spatially smooth, channel-correlated
field with per-channel offsets; x* is a linear convolution of x plus a two-layer ReLU network of x plus
noise (20 % of its std) plus an offset. So a 0-order (linear) map explains part of x*, higher orders
explain more, and the noise sets a floor that no fit goes below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MODELS_DIR = ROOT / "sample_models"
#: The dashboard's embedded default: a weak network (A) against a strong one (B) at their default layers.
DEFAULT_PAIR = ("kshapes_tinynet_s0", "kshapes_resnet_s0")
DEFAULT_N_IMAGES = 400


def synthetic_pair(n: int, channels: int, size: int, seed: int = 0, noise: float = 0.2) -> tuple[Tensor, Tensor]:
    """A deterministic (x, x*) pair of raw feature maps, each (n, channels, size, size) float32."""
    g = torch.Generator().manual_seed(seed)
    c = channels
    z = torch.randn(n, c, size + 2, size + 2, generator=g)
    x = F.avg_pool2d(z, 3, 1) * 3.0  # spatially correlated, unit-ish variance
    mix = torch.randn(c, c, 1, 1, generator=g) / c**0.5
    x = F.conv2d(x, mix) + 0.5 * torch.randn(c, generator=g).view(1, -1, 1, 1)
    w1, w2, w3 = (torch.randn(c, c, 3, 3, generator=g) / (c * 9) ** 0.5 for _ in range(3))
    y = F.conv2d(x, w1, padding=1) + 2.0 * F.conv2d(F.relu(F.conv2d(x, w2, padding=1)), w3, padding=1)
    y = y + noise * y.std() * torch.randn(n, c, size, size, generator=g) + 1.0
    return x.contiguous(), y.contiguous()


def sample_model_paths(directory: Path | None = None) -> dict[str, Path]:
    """The sample checkpoints in ``directory`` (default: the repository's sample_models/), name → path."""
    d = SAMPLE_MODELS_DIR if directory is None else Path(directory)
    return {p.name[: -len(".safetensors")]: p for p in sorted(d.glob("*.safetensors"))}


def sample_images(n: int) -> Any:
    """The first ``n`` bundled kshapes test images as the dashboard loads them: (3, 64, 64) in [0, 1], with ids."""
    from kcore.data import Preprocess
    from kcore.data import sample_images as bundled

    return bundled(n, preprocess=Preprocess((64, 64), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))


def load_default_pair(directory: Path | None = None) -> tuple[Any, str, Any, str] | None:
    """(model A, layer A, model B, layer B) of the embedded default pair, or None without sample models."""
    from kcore.checkpoints import load_model

    paths = sample_model_paths(directory)
    if not all(name in paths for name in DEFAULT_PAIR):
        return None
    a, b = (load_model(paths[name]) for name in DEFAULT_PAIR)
    return a, a.card.default_layer, b, b.card.default_layer


def sample_pair_features(n: int, directory: Path | None = None) -> tuple[Tensor, Tensor] | None:
    """A's and B's features (float32) of the default pair for ``n`` bundled images, or None without models."""
    from kcore.features import extract_features
    from kcore.pipeline import model_transform

    loaded = load_default_pair(directory)
    if loaded is None:
        return None
    a, la, b, lb = loaded
    feats = extract_features(
        a.model, la, b.model, lb, sample_images(n), device="cpu",
        transform_a=model_transform(a.card), transform_b=model_transform(b.card),
    )
    return feats.x_a.float(), feats.x_b.float()
