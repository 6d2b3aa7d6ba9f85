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
from typing import Literal

import torch
from torch import Tensor

from kcore.gtheta import GTheta

Method = Literal["batched", "branchwise"]
METHODS: dict[str, str] = {
    "batched": "all orders in one top-down pass, (K+2)/2 forward passes of work",
    "branchwise": "one recording pass, then every branch separately (reference; slower)",
}


@torch.no_grad()
def components(g: GTheta, x: Tensor, method: Method = "batched") -> list[Tensor]:
    """Order-wise components [x^(0), …, x^(K)] of g(x) for prepared input ``x`` (N, C_a, H, W).

    g must be in eval mode for the paper convention (fixed Σ). Returns K+1 tensors (N, C_b, H, W).
    """
    if method == "batched":
        return _batched(g, x)
    if method == "branchwise":
        return _branchwise(g, x)
    raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}.")


def _conv_stack(conv: torch.nn.Module, stack: Tensor) -> Tensor:
    b, n = stack.shape[:2]
    out = conv(stack.reshape(b * n, *stack.shape[2:]))
    return out.reshape(b, n, *out.shape[1:])


def _batched(g: GTheta, x: Tensor) -> list[Tensor]:
    K = g.orders
    p = g.gates().to(x.dtype)
    u = _conv_stack(g.convs[K], x.unsqueeze(0))  # branches [K]
    for k in range(K, 0, -1):
        h = u.sum(0)  # h^(k), by linearity
        s = g.normaliser(k, h)
        gate = (h > 0).to(x.dtype) * (p[k - 1] / s)  # p^(k) A^(k) Σ_(k)^(-1/2)
        z = u * gate.unsqueeze(0)
        u = _conv_stack(g.convs[k - 1], torch.cat([z, x.unsqueeze(0)], 0))  # branches [K, …, k-1]
    return list(u.flip(0).unbind(0))


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

    def report(self, batch_size: int = 256) -> dict:
        """Variances of every part (Sec. 4.2), overall and per channel; see :func:`kcore.metrics.variance_report`."""
        from kcore.metrics import VarianceAccumulator

        acc = VarianceAccumulator(self.orders, self.target.shape[1])
        for i in range(0, self.target.shape[0], batch_size):
            sl = slice(i, i + batch_size)
            acc.update([c[sl] for c in self.components], self.residual[sl], self.target[sl])
        return acc.report()
