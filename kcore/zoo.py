"""Small sample architectures of the project (filled in by the samples work)."""
from __future__ import annotations

from typing import Callable

from torch import nn

SAMPLE_ARCHITECTURES: dict[str, Callable[[int], nn.Module]] = {}
