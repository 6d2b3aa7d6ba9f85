"""Capture the outputs of named layers during forward passes, inside a ``with`` block.

Captured outputs are cloned (an in-place ReLU after the hooked layer would overwrite them); the hooks are removed
in ``finally`` (:func:`kcore.layers._hooked`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from kcore.layers import _check_hookable, _hooked, fixed_batch_size, validate_layer


class _ForwardDone(Exception):
    """Raised from a capture hook to end a forward pass once every wanted layer has run (:func:`run_capture`)."""


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[str], *, after_each: Callable[[str], None] | None = None
) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs of named layers during the forward passes run inside the block.

    Example::

        with torch.no_grad(), capture(model, ["layer3"]) as feats:
            model(x)
        feats["layer3"]  # (N, C, H, W)

    The outputs are detached and cloned when the layer finishes, so an in-place operation that runs later
    (``ReLU(inplace=True)``) cannot change them. A layer that runs several times in one forward keeps its
    last output. The hooks are removed when the block ends, also on an exception; the model's training
    mode is not touched.

    Args:
        model: the network (not TorchScript).
        layers: module names (see :func:`list_layers`).
        after_each: called with the layer's name each time one of them has produced (and stored) its output.

    Yields:
        A dict filled during the block: layer name -> its output tensor (on the model's device).

    Raises:
        ValueError: an unknown layer (before any hook is registered), a TorchScript model, or a layer whose
            output is not a single tensor (raised from the forward pass).
    """
    _check_hookable(model)
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of names, e.g. [{layers!r}]; got the string {layers!r}.")
    for name in layers:
        validate_layer(model, name)
    outputs: dict[str, Tensor] = {}

    def on_output(name: str, out: object) -> None:
        if not isinstance(out, Tensor):
            raise ValueError(
                f"layer {name!r} outputs a {type(out).__name__}, not a tensor, so it cannot be used as a "
                "feature map. Fix: pick one of its sub-modules (see kcore.features.list_layers(model))."
            )
        outputs[name] = out.detach().clone()
        if after_each is not None:
            after_each(name)

    with _hooked(model, list(dict.fromkeys(layers)), on_output):
        yield outputs


def run_capture(
    model: nn.Module,
    x: Tensor,
    layers: Sequence[str],
    *,
    require_spatial: bool = False,
    stop_early: bool = False,
    calls: dict[str, int] | None = None,
) -> dict[str, Tensor]:
    """Run ``model(x)`` without gradients and return the named layers' outputs.

    Args:
        model: the network; runs in its current mode on its current device.
        x: the input batch (N, C, H, W), on the model's device.
        layers: module names.
        require_spatial: demand 4-D outputs (N, C, H, W).
        stop_early: end the forward pass as soon as every layer has produced an output, so the layers above
            them never run (e.g. a ResNet's ``layer4`` and ``fc`` when ``layer3`` is captured). Only for layers
            known to run once per forward pass: a layer that would run again later would keep its first
            output, not its last. :func:`extract_features` turns it on after a full first batch showed that.
        calls: when given, filled with how many times each layer ran in this forward pass.

    An exported program with a fixed batch size (:func:`kcore.layers.fixed_batch_size`) is run on chunks of
    exactly that size, the last one padded by repeating its last image; the padded outputs are dropped.

    Returns:
        Layer name -> output tensor (detached clone).

    Raises:
        ValueError: a layer did not run, or (with ``require_spatial``) its output is not 4-D.
    """
    fixed = fixed_batch_size(model)
    if fixed is not None and 0 < x.shape[0] != fixed:
        return _run_fixed_batches(model, x, layers, fixed, require_spatial=require_spatial, stop_early=stop_early,
                                  calls=calls)
    wanted = set(layers)
    ran: dict[str, int] = {} if calls is None else calls

    def after_each(name: str) -> None:
        ran[name] = ran.get(name, 0) + 1
        if stop_early and wanted.issubset(ran):
            raise _ForwardDone

    try:
        with torch.no_grad(), capture(model, layers, after_each=after_each) as outputs:
            model(x)
    except _ForwardDone:
        pass
    for name in layers:
        if name not in outputs:
            raise ValueError(
                f"layer {name!r} did not run during the forward pass of {type(model).__name__}: its forward() is "
                "never called (e.g. a ModuleList container, or a branch the model skips). Fix: pick a module "
                "that runs; kcore.features.list_layers(model) lists only those."
            )
        out = outputs[name]
        if require_spatial and out.dim() != 4:
            raise ValueError(
                f"layer {name!r} outputs shape {tuple(out.shape)}, a feature map (N, C, H, W) is needed. "
                "Fix: pick a convolutional layer or block; kcore.features.list_layers(model, spatial_only=True) "
                "lists them."
            )
    return outputs


def _run_fixed_batches(
    model: nn.Module, x: Tensor, layers: Sequence[str], fixed: int, *, require_spatial: bool, stop_early: bool,
    calls: dict[str, int] | None,
) -> dict[str, Tensor]:
    """:func:`run_capture` for a model that accepts batches of exactly ``fixed`` images only.

    Args:
        model, layers, require_spatial, stop_early: as for :func:`run_capture`.
        x: the input batch (N, C, H, W), any N ≥ 1.
        fixed: the batch size the model accepts.
        calls: filled from the first chunk's forward pass (how often each layer runs per pass).

    Returns:
        Layer name -> the outputs of the N real images, in order.
    """
    n = int(x.shape[0])
    parts: dict[str, list[Tensor]] = {name: [] for name in dict.fromkeys(layers)}
    for start in range(0, n, fixed):
        chunk = x[start : start + fixed]
        real = int(chunk.shape[0])
        if real < fixed:
            chunk = torch.cat([chunk, chunk[-1:].expand(fixed - real, *chunk.shape[1:])])
        outs = run_capture(model, chunk, layers, require_spatial=require_spatial, stop_early=stop_early,
                           calls=calls if start == 0 else None)
        for name in parts:
            parts[name].append(outs[name][:real])
    return {name: torch.cat(chunks) for name, chunks in parts.items()}
