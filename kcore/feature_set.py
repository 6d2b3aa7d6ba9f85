"""The feature set both the extractor and the disk cache hand out: A's and B's feature maps for the same images.

It lives in its own module so that :mod:`kcore.features` (which makes feature sets) and
:mod:`kcore.feature_cache` (which stores and reopens them) can both import it without importing each other.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor


@dataclass(frozen=True, eq=False)
class FeaturePair:
    """Feature maps of networks A and B for the same images, in the same order.

    Without a cache the tensors are float32 in memory. From the cache (``cache_dir`` given, or
    :func:`kcore.feature_cache.load_cached_features`) they are float16, memory-mapped from disk: slice them
    in batches (:meth:`iter_batches`) rather than converting them whole.

    Attributes:
        x_a: (N, C_a, H_a, W_a) features of ``layer_a`` of network A, on the CPU.
        x_b: (N, C_b, H_b, W_b) features of ``layer_b`` of network B, on the CPU.
        layer_a: layer name in A.
        layer_b: layer name in B.
        image_ids: one id per image.
        labels: (N,) int64 class labels, or None when the images came without labels.
        entry: the cache entry folder the tensors are memory-mapped from, or None for in-memory features.
    """

    x_a: Tensor
    x_b: Tensor
    layer_a: str
    layer_b: str
    image_ids: tuple[str, ...]
    labels: Tensor | None = None
    entry: Path | None = None

    @property
    def n_images(self) -> int:
        """Number of images N."""
        return int(self.x_a.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of both feature tensors (on disk when memory-mapped)."""
        return self.x_a.numel() * self.x_a.element_size() + self.x_b.numel() * self.x_b.element_size()

    def iter_batches(self, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield float32 copies of consecutive slices ``(x_a[i:j], x_b[i:j])``; memory stays at one batch."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
        for start in range(0, self.n_images, batch_size):
            stop = start + batch_size
            yield self.x_a[start:stop].float(), self.x_b[start:stop].float()
