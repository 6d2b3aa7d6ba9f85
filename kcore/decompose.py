"""Exact order-wise decomposition of g_θ's output (Eq. 3–4).

For fixed ReLU gates A^(k) and normalisers Σ_(k), g is linear in x along each branch:

    x^(k) = W^(0) ( Π_{k'=1..k} p^(k') A^(k') Σ_(k')^(-1/2) W^(k') ) x,     g(x) = Σ_k x^(k)

The batched method runs all branches together, top-down, in one pass: at level j it stacks the signals of
the branches k ≥ j along the batch axis and applies W^(j) once. The sum of the stack is h^(j), from which
the gates and normalisers are taken on the fly, so no separate recording pass is needed. It costs
(K+1)(K+2)/2 convolutions, i.e. (K+2)/2 forward passes of g. The branch-by-branch method (Eq. 4 read
literally: one recording forward pass, then each branch on its own) is kept as a reference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch
from torch import Tensor

from kcore.gtheta import GTheta

if TYPE_CHECKING:
    from kcore.metrics import VarianceReport

Method = Literal["batched", "branchwise"]
METHODS: dict[str, str] = {
    "batched": "all orders in one top-down pass, (K+2)/2 forward passes of work",
    "branchwise": "one recording pass, then every branch separately (reference; slower)",
}


Parts = Literal["split", "nested"]
PARTS: dict[str, str] = {
    "split": "the Eq. 3–4 split of the fitted g_θ (of a nested fit: of g_K) into x⁽⁰⁾ … x⁽ᴷ⁾",
    "nested": "the nested components x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x) of nested fits (x⁽⁰⁾ₙ = g₀(x)), which sum to g_K(x)",
}
"""The two ways to split g(x) into orders (:func:`decompose_comparison`)."""


def decompose_comparison(comparison: Any, direction: str, positions: Sequence[int] | None = None,
                         parts: Parts = "split") -> "Decomposition":
    """A comparison's decomposition in ``direction`` for the images at ``positions`` (default: held out).

    Args:
        comparison: a :class:`kcore.pipeline.Comparison`.
        direction: one of its directions (``"A_to_B"``, ``"B_to_A"``).
        positions: image positions in the comparison's features (default: its held-out images).
        parts: ``"split"``: the Eq. 3–4 components of the fitted g_θ (``comparison.decompose``);
            ``"nested"``: the nested components of a nested fit (:func:`kcore.fit.nested_decompose`), whose
            ``meta["kind"]`` is ``"nested"``. Both have the same x* and x^Δ = x* − g_K(x).

    Returns:
        A :class:`Decomposition`.

    Raises:
        ValueError: ``parts`` is unknown, ``direction`` is not one of the comparison's, or ``parts="nested"``
            for a fit that is not nested (each message names the fix).

    Examples::

        dec = decompose_comparison(comparison, "A_to_B", parts="nested")
        torch.allclose(dec.output, comparison.directions["A_to_B"].fit.predict(x_src))   # Σₖ x⁽ᵏ⁾ₙ = g_K(x)
    """
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {sorted(PARTS)}; got {parts!r}. Fix: 'split' for the Eq. 3–4 "
                         "components, 'nested' for the nested components of a nested fit.")
    if direction not in comparison.directions:
        raise ValueError(f"direction must be one of {sorted(comparison.directions)}; got {direction!r}.")
    if parts == "split":
        return comparison.decompose(direction, positions)
    fit = comparison.directions[direction].fit
    if getattr(fit, "nested", None) is None:
        raise ValueError(f"parts='nested' needs a nested fit; direction {direction!r} of this comparison is a plain "
                         "fit. Fix: use parts='split', or fit with nested=True (kcore fit --nested).")
    from kcore.fit.nested import nested_decompose

    x_src, x_tgt = comparison.pair(direction, positions)
    return nested_decompose(fit, x_src, x_tgt)


@torch.no_grad()
def components(g: GTheta, x: Tensor, method: Method = "batched") -> list[Tensor]:
    """Order-wise components [x^(0), …, x^(K)] of g(x) for prepared input ``x`` (N, C_a, H, W).

    g must be in eval mode for the paper convention (fixed Σ). Returns K+1 tensors (N, C_b, H, W).
    """
    if method == "batched":
        return _batched_in_chunks(g, x)
    if method == "branchwise":
        return _branchwise(g, x)
    raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}.")


@torch.no_grad()
def nested_components(models: Sequence[GTheta], x: Tensor) -> list[Tensor]:
    """Nested components [x⁽⁰⁾ₙ, …, x⁽ᴷ⁾ₙ] of nested fits g₀ … g_K (:mod:`kcore.fit.nested`) for prepared ``x``.

    x⁽⁰⁾ₙ = g₀(x) and x⁽ᵏ⁾ₙ = gₖ(x) − gₖ₋₁(x), so they sum to g_K(x) (to the rounding of the subtractions).

    Args:
        models: g₀ … g_K, ``models[k]`` of K = k with the same channels, in eval mode for the paper convention.
        x: (N, C_a, H, W) source maps prepared as for the fit.

    Returns:
        K+1 tensors (N, C_b, H, W).

    Raises:
        ValueError: ``models`` is empty or ``models[k]`` does not have K = k, or their channels differ.
    """
    orders = [getattr(getattr(m, "spec", None), "orders", None) for m in models]
    if not models or orders != list(range(len(models))):
        raise ValueError(f"models must be nested fits g_0 … g_K with K = 0, 1, …, K in order; got orders {orders}. "
                         "Fix: pass FitResult.nested.models of kcore.fit(..., nested=True).")
    chans = {(m.spec.in_channels, m.spec.out_channels) for m in models}
    if len(chans) != 1:
        raise ValueError(f"models must share (C_a, C_b); got {sorted(chans)}. Fix: pass the models of one nested fit.")
    outs = [m(x) for m in models]
    return [outs[0]] + [outs[k] - outs[k - 1] for k in range(1, len(outs))]


def _conv_stack(conv: torch.nn.Module, stack: Tensor) -> Tensor:
    b, n = stack.shape[:2]
    out = conv(stack.reshape(b * n, *stack.shape[2:]))
    return out.reshape(b, n, *out.shape[1:])


#: On the CPU the batched method runs over chunks of images whose stacked input holds about this many
#: floats (4 MB): the stack is (K+1)× larger than a forward pass's input, and a convolution over a batch
#: that overflows the CPU caches costs more per image (bench/README.md, "decomposition", has the timings).
CHUNK_FLOATS = 2**20


def _batched_in_chunks(g: GTheta, x: Tensor) -> list[Tensor]:
    per_image = (g.orders + 1) * x[0].numel()
    m = max(1, CHUNK_FLOATS // max(per_image, 1))
    # Chunks change nothing in eval mode (fixed Σ) or in the authors' convention (per-image Σ); in training
    # mode the paper convention takes Σ from the batch, so the batch stays whole there (and on GPUs).
    if x.device.type != "cpu" or x.shape[0] <= m or (g.training and g.spec.convention == "paper"):
        return _batched(g, x)
    first = _batched(g, x[:m])
    out = first[0].new_empty((len(first), x.shape[0], *first[0].shape[1:]))
    for k, c in enumerate(first):
        out[k, :m] = c
    for i in range(m, x.shape[0], m):
        for k, c in enumerate(_batched(g, x[i : i + m])):
            out[k, i : i + m] = c
    return list(out.unbind(0))


def _batched(g: GTheta, x: Tensor) -> list[Tensor]:
    K = g.orders
    p = g.gates().to(x.dtype)
    u = _conv_stack(g.convs[K], x.unsqueeze(0))  # branches [K]
    # One buffer for every level's input stack: slot K holds x (copied once); level k writes its gated
    # branches into slots k-1 … K-1 and convolves slots k-1 … K, so no level concatenates.
    stack = x.new_empty((K + 1, *x.shape)) if K else x.unsqueeze(0)
    if K:
        stack[K] = x
    gate = x.new_empty(x.shape) if K > 1 else None  # h^(k), then its gate, for the levels with several branches
    for k in range(K, 0, -1):
        if u.shape[0] == 1:  # the top branch alone: its gated signal is p^(k) ReLU(Σ^(-1/2) h)
            h = u[0]
            scale = p[k - 1] / g.normaliser(k, h)  # p^(k) Σ_(k)^(-1/2), (1 or N, C_a, 1, 1)
            torch.mul(h.relu_(), scale, out=stack[k - 1])  # u is not needed after this level
        else:
            h = torch.sum(u, 0, out=gate)  # h^(k), by linearity
            scale = p[k - 1] / g.normaliser(k, h)
            h.gt_(0).mul_(scale)  # in place, no new maps: p^(k) A^(k) Σ_(k)^(-1/2)
            torch.mul(u, h.unsqueeze(0), out=stack[k - 1 : K])
        u = _conv_stack(g.convs[k - 1], stack[k - 1 :])  # branches [K, …, k-1]
    return [u[K - k] for k in range(K + 1)]  # x^(0) … x^(K)


def _branchwise(g: GTheta, x: Tensor) -> list[Tensor]:
    K = g.orders
    p = g.gates().to(x.dtype)
    hidden = g.hidden(x)  # [h^(K), …, h^(0)]
    gates = {}
    for k in range(K, 0, -1):
        h = hidden[K - k]
        gates[k] = (h > 0).to(x.dtype) * (p[k - 1] / g.normaliser(k, h))
    out = []
    for k in range(K + 1):
        v = g.convs[k](x)
        for j in range(k, 0, -1):
            v = g.convs[j - 1](v * gates[j])
        out.append(v)
    return out


@dataclass(frozen=True)
class Decomposition:
    """x* = x^(0) + … + x^(K) + x^Δ for a set of images, in the fit's target units.

    Attributes:
        components: K+1 tensors (N, C_b, H, W); ``components[k]`` is x^(k) (0 = linear).
        residual: x^Δ = x* − g(x), (N, C_b, H, W): what A's feature cannot reconstruct.
        target: x* as g_θ sees it (standardised per channel in the paper convention, raw otherwise).
        convention: the fit's convention.

    Examples::

        dec = fit_result.decompose(x_src, x_tgt)
        torch.allclose(sum(dec.components) + dec.residual, dec.target)   # exact split (Eq. 3–4)
        dec.report().instability
    """

    components: list[Tensor]
    residual: Tensor
    target: Tensor
    convention: str = "paper"
    meta: dict = field(default_factory=dict)

    @property
    def orders(self) -> int:
        """K."""
        return len(self.components) - 1

    @property
    def output(self) -> Tensor:
        """g(x) = Σ_k x^(k)."""
        return torch.stack(self.components).sum(0)

    def select(self, indices: Sequence[int]) -> "Decomposition":
        """The decomposition of some of the images (``indices`` into the first axis), without recomputing.

        Examples::

            dec = comparison.decompose("A_to_B")
            first_two = dec.select([0, 1])   # first_two.target.shape[0] == 2
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        n = self.target.shape[0]
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise ValueError(f"indices must lie in [0, {n}) (the decomposition has {n} images), got "
                             f"{list(indices)[:8]}. Fix: pick image positions of this decomposition.")
        return Decomposition([c[idx] for c in self.components], self.residual[idx], self.target[idx],
                             self.convention, dict(self.meta))

    def report(self, batch_size: int = 256) -> "VarianceReport":
        """Variances and additive shares of every part (Sec. 4.2), overall and per channel (:class:`VarianceReport`)."""
        from kcore.metrics import VarianceAccumulator

        acc = VarianceAccumulator(self.orders, self.target.shape[1])
        for i in range(0, self.target.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            acc.update([c[sl] for c in self.components], self.residual[sl], self.target[sl])
        return acc.report()
