"""Magnitude pruning of convolution and linear weights, and training that keeps pruned weights at zero.

The authors never published their compression script (only a loader for masked VGG-16 checkpoints, see
``reference/original_implementation.md`` §4.3; the paper cites Han et al., 2016). This module is our own
implementation of the pruning step of Han et al.: the weights of smallest magnitude are set to zero.

- **Pruned set**: the ``weight`` of every convolution (``nn.Conv1d/2d/3d`` and transposed) and ``nn.Linear``
  module, the first and the last layer included. Biases, BatchNorm and other parameters are never pruned.
- **Scope** (:data:`PRUNE_SCOPES`): ``"layer"`` (default, as Han et al. prune each layer with its own
  threshold) zeroes ``round(r · n_l)`` weights in each layer l of n_l weights; ``"global"`` ranks all
  weights of the pruned set together and zeroes ``round(r · n)`` of them.
- **Ties** are broken deterministically: among weights of equal magnitude the one that comes first (module
  order of ``named_modules()``, then the flattened index) is pruned first. So exactly the stated number of
  weights is zeroed, also when many weights are equal (or already zero).
- ``round`` is Python's (half to even); ratio 0 zeroes nothing and leaves the network bit-identical.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

PruneScope = Literal["layer", "global"]
PRUNE_SCOPES: dict[str, str] = {
    "layer": "each conv/linear layer loses round(r · n_l) of its own n_l weights (Han et al.'s per-layer pruning)",
    "global": "round(r · n) weights of smallest magnitude over all conv/linear layers together",
}
"""Valid pruning scopes and what each means."""

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


@dataclass(frozen=True, eq=False)
class PrunedModel:
    """A pruned copy of a network.

    Attributes:
        model: the pruned network (a deep copy; the original is untouched), in the mode of the original.
        masks: module name → bool tensor shaped like that module's weight, False where the weight was pruned.
        ratio: the requested fraction r.
        scope: ``"layer"`` or ``"global"``.
        n_weights: size of the pruned set (all conv/linear weights).
        n_pruned: number of weights the masks remove (``round(r · n)`` for ``"global"``, Σ_l ``round(r · n_l)``
            for ``"layer"``).
    """

    model: nn.Module
    masks: dict[str, Tensor]
    ratio: float
    scope: str
    n_weights: int
    n_pruned: int

    @property
    def sparsity(self) -> float:
        """Fraction of the pruned set that is masked out."""
        return self.n_pruned / self.n_weights if self.n_weights else 0.0


def prunable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose weights form the pruned set, as ``(name, module)`` in ``named_modules()`` order.

    Raises:
        ValueError: the model has no convolution or linear layer.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _PRUNABLE) and m.weight is not None]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Conv*/nn.Linear layer with a weight: nothing to prune.")
    return layers


def _check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be a fraction in [0, 1]; got {ratio!r}. Fix: e.g. ratio=0.5 prunes half the weights.")
    return float(ratio)


def _smallest(values: Tensor, k: int) -> Tensor:
    """Bool mask (same shape) that is True at the k entries of smallest |value|, earlier index first on ties."""
    flat = values.detach().abs().flatten()
    order = torch.sort(flat, stable=True).indices  # stable: ties keep index order
    out = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    out[order[:k]] = True
    return out.view_as(values)


def magnitude_masks(model: nn.Module, ratio: float, scope: PruneScope = "layer") -> dict[str, Tensor]:
    """Keep-masks of magnitude pruning at ``ratio`` (True = keep), one per conv/linear layer.

    Args:
        model: the network (not modified).
        ratio: fraction r in [0, 1] of weights to remove.
        scope: see :data:`PRUNE_SCOPES`.

    Returns:
        Module name → bool tensor shaped like its weight.

    Raises:
        ValueError: ratio outside [0, 1], unknown scope, or no conv/linear layer.
    """
    ratio = _check_ratio(ratio)
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"scope must be one of {sorted(PRUNE_SCOPES)}; got {scope!r}.")
    layers = prunable_layers(model)
    if scope == "layer":
        return {name: ~_smallest(m.weight, round(ratio * m.weight.numel())) for name, m in layers}
    weights = [m.weight.detach().flatten() for _, m in layers]
    # all layers' weights ranked together, in module order (the tie-break order)
    pruned = _smallest(torch.cat([w.to(weights[0].device, torch.float64) for w in weights]),
                       round(ratio * sum(w.numel() for w in weights)))
    masks, start = {}, 0
    for (name, m), w in zip(layers, weights):
        masks[name] = ~pruned[start:start + w.numel()].view_as(m.weight).to(m.weight.device)
        start += w.numel()
    return masks


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Set the masked-out weights of ``model`` to zero, in place (weights that are kept are not touched)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, keep in masks.items():
            w = modules[name].weight
            w.masked_fill_(~keep.to(w.device), 0.0)


def prune_magnitude(model: nn.Module, ratio: float, scope: PruneScope = "layer") -> PrunedModel:
    """A copy of ``model`` with the conv/linear weights of smallest magnitude set to zero.

    Args:
        model: the network (deep-copied; the caller's model is not changed).
        ratio: fraction r in [0, 1] of the pruned set to zero (see the module docstring for ``round``).
        scope: ``"layer"`` (each layer separately) or ``"global"`` (all layers ranked together).

    Returns:
        A :class:`PrunedModel`.

    Raises:
        ValueError: ratio outside [0, 1], unknown scope, or no conv/linear layer.

    Paper: Sec. 4.4 (network compression, pruning in the manner of Han et al., 2016).
    """
    masks = magnitude_masks(model, ratio, scope)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, masks)
    n_weights = sum(int(k.numel()) for k in masks.values())
    n_pruned = sum(int((~k).sum()) for k in masks.values())
    return PrunedModel(pruned, masks, float(ratio), scope, n_weights, n_pruned)


class _Masked(nn.Module):
    """Parametrisation weight → where(mask, weight, 0): pruned entries are exactly 0 and get no gradient."""

    def __init__(self, keep: Tensor):
        super().__init__()
        self.register_buffer("keep", keep.clone())

    def forward(self, w: Tensor) -> Tensor:
        return torch.where(self.keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


@contextmanager
def kept_pruned(model: nn.Module, masks: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Inside the block, every masked weight of ``model`` reads as exactly 0, whatever an optimiser does.

    A parametrisation (``torch.nn.utils.parametrize``) replaces each pruned ``weight`` by
    ``where(mask, weight, 0)``, so any training loop can run unchanged (momentum and weight decay move the
    hidden original, never the effective weight). When the block ends, also after an error, the
    parametrisations are removed and the masked weights are written back as plain parameters (pruned
    entries exactly 0).
    """
    modules = dict(model.named_modules())
    added = []
    try:
        for name, keep in masks.items():
            m = modules[name]
            parametrize.register_parametrization(m, "weight", _Masked(keep.to(m.weight.device)))
            added.append(m)
        yield model
    finally:
        for m in added:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
