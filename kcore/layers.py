"""The layers of a network: list them from one dry run, check a name (with "did you mean"), hook them safely.

The discovery function of kcore: :func:`list_layers` fills every layer picker, and :func:`validate_layer` points to
it. Hooks exist only inside the ``with`` blocks of this module (:func:`_hooked`) and are removed in ``finally``;
the model's training flags, device and memory layout are given back (:func:`_eval_mode`, :func:`_on_device`,
:func:`_channels_last`). TorchScript models are refused (their forward ignores Python hooks).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kcore.arguments import ArgumentError, spell
from kcore.devices import resolve_device

_MAX_SUGGESTIONS = 3


# --------------------------------------------------------------------------------------------------
# Hooks and modes
# --------------------------------------------------------------------------------------------------


def _check_hookable(model: object, argument: str = "model") -> nn.Module:
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"{argument} is a TorchScript module; its layers cannot be captured, because TorchScript runs "
            "forward() without Python hooks. Fix: load the model from a state dict or safetensors file "
            "(with arch=...), or from a torch.export .pt2 archive (torch.export.save)."
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module; got {type(model).__name__}.")
    return model


def _module_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _module_dtype(model: nn.Module) -> torch.dtype:
    """Floating dtype of the first floating parameter or buffer (float32 when there is none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode and give every submodule back its own training flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``model`` to ``device`` for the block, then back to where it was."""
    original = _module_device(model)
    if original != device:
        model.to(device)
    try:
        yield
    finally:
        if original != device:
            model.to(original)


@contextmanager
def _channels_last(model: nn.Module, device: torch.device) -> Iterator[bool]:
    """On the CPU, run ``model`` with its 4-D weights in channels-last layout for the block (oneDNN's convolutions
    are about a third faster on it), then give them back in the standard layout. Yields whether it did; a model
    already in channels-last layout, or without 4-D weights, is left as it is."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    switch = (device.type == "cpu" and bool(weights)
              and not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights))
    if switch:
        model.to(memory_format=torch.channels_last)
    try:
        yield switch
    finally:
        if switch:
            model.to(memory_format=torch.contiguous_format)


@contextmanager
def _hooked(
    model: nn.Module,
    names: Sequence[str],
    on_output: Callable[[str, object], None],
    on_start: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Register forward (and optionally pre-forward) hooks on the named modules; always remove them."""
    modules = dict(model.named_modules())
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name in names:
            module = modules[name]
            handles.append(module.register_forward_hook(lambda _m, _i, out, n=name: on_output(n, out)))
            if on_start is not None:
                handles.append(module.register_forward_pre_hook(lambda _m, _i, n=name: on_start(n)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerInfo:
    """A module whose output can be captured, as seen in one forward pass.

    Attributes:
        name: the module's name in ``model.named_modules()``, e.g. ``"layer3.1"``.
        type: the module's class name, e.g. ``"BasicBlock"``.
        shape: output shape for one image without the batch dimension: ``(C, H, W)`` for a feature map.
        is_spatial: True when the output is 4-D ``(N, C, H, W)``, i.e. usable as a feature map.
    """

    name: str
    type: str
    shape: tuple[int, ...]
    is_spatial: bool


def fixed_batch_size(model: nn.Module) -> int | None:
    """The batch size a ``torch.export`` program was exported with, when it is fixed (not a dynamic dimension).

    ``torch.export`` fixes the batch size unless a dynamic batch was asked for; such a program accepts batches
    of exactly that size, so kcore feeds it batches of that size (padding the last one, see
    :func:`kcore.capture.run_capture`).

    Args:
        model: any network; only an unflattened exported program (``torch.export.unflatten``) can have one.

    Returns:
        The fixed batch size, or ``None`` for a dynamic batch or a model that is not an exported program.
    """
    placeholders = getattr(model, "input_placeholders", None)
    if not isinstance(getattr(model, "graph", None), torch.fx.Graph) or not placeholders:
        return None
    val = placeholders[0].meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) == 0:
        return None
    first = shape[0]
    return int(first) if isinstance(first, int) and not isinstance(first, bool) else None


def list_layers(
    model: nn.Module,
    input_size: tuple[int, int, int] = (3, 224, 224),
    *,
    spatial_only: bool = False,
    device: str | torch.device | None = None,
) -> list[LayerInfo]:
    """List the modules of ``model`` that run, with their output shapes, from one dry run.

    A zero batch of one image (of :func:`fixed_batch_size` images for an exported program with a fixed batch)
    goes through the model in eval mode without gradients (so BatchNorm
    statistics are untouched); every named module, leaf or container, is hooked inside a ``with`` block.
    The model's training flags and device are restored afterwards.

    Args:
        model: the network (not TorchScript; see the module docstring).
        input_size: ``(C, H, W)`` of one input image.
        spatial_only: keep only modules with a 4-D output (feature maps).
        device: where to run the dry run; default the model's own device.

    Returns:
        One :class:`LayerInfo` per module, in the order the modules start running. A module that runs
        several times (e.g. a ReLU shared inside a ResNet block) appears once, with its last output's
        shape. Modules that never run (``ModuleList`` containers, unused branches) and modules whose
        output is not a single tensor are left out.

    Raises:
        ValueError: TorchScript model, bad ``input_size``, or the dry run failed (wrong input size).

    Examples::

        layers = kcore.list_layers(m.model, (3, 64, 64), spatial_only=True)
        [(l.name, l.shape) for l in layers][:3]        # e.g. [("conv1", (16, 64, 64)), ...]
    """
    _check_hookable(model)
    if len(input_size) != 3 or not all(isinstance(v, int) and v > 0 for v in input_size):
        raise ValueError(
            f"input_size must be (C, H, W) with three positive integers, e.g. (3, 224, 224); got {input_size!r}."
        )
    dev = _module_device(model) if device is None else resolve_device(device)
    names = [name for name, _ in model.named_modules() if name]
    order: dict[str, None] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def on_output(name: str, out: object) -> None:
        if isinstance(out, Tensor):
            shapes[name] = tuple(out.shape[1:])

    x = torch.zeros((fixed_batch_size(model) or 1, *input_size), device=dev, dtype=_module_dtype(model))
    with _on_device(model, dev), _eval_mode(model), torch.no_grad():
        with _hooked(model, names, on_output, on_start=lambda n: order.setdefault(n, None)):
            try:
                model(x)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                raise ArgumentError(
                    f"{type(model).__name__} failed on a dummy batch of shape {tuple(x.shape)}: {exc}. "
                    f"Fix: pass {spell('input_size', 'input_size=(C, H, W)', 'H W')} matching the images the model "
                    "was trained on (see the model card's input_size)."
                ) from exc
    types = module_types(model)
    layers = [LayerInfo(n, types[n], shapes[n], len(shapes[n]) == 3) for n in order if n in shapes]
    return [layer for layer in layers if layer.is_spatial] if spatial_only else layers


def module_types(model: nn.Module) -> dict[str, str]:
    """The class name of every named module, as the network's author defined it.

    An unflattened ``torch.export`` program (a ``.pt2``) is made of ``InterpreterModule``s; the original class of each
    (``Conv2d``, ``BasicBlock``) survives in the ``nn_module_stack`` metadata of its graph's nodes, and is used instead.

    Args:
        model: any network.

    Returns:
        Module name (as in ``model.named_modules()``) → class name, e.g. ``{"layer1.0.conv1": "Conv2d", ...}``.
    """
    types = {name: type(module).__name__ for name, module in model.named_modules()}
    original: dict[str, str] = {}
    for module in model.modules():
        graph = getattr(module, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            for entry in stack.values():
                if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], str):
                    path = str(entry[0]).split("@")[0]  # "relu@1": the second call of a shared module
                    name = entry[1].rsplit(".", 1)[-1]
                    if name.isidentifier() and len(name) <= 100:  # a file's metadata: shown only if it is a class name
                        original.setdefault(path, name)
    return {name: original.get(name, kind) if kind == "InterpreterModule" else kind for name, kind in types.items()}


def validate_layer(
    model: nn.Module,
    name: str,
    layers: Sequence[LayerInfo] | Sequence[str] | None = None,
) -> nn.Module:
    """Check that ``name`` names a module of ``model`` (and, if given, one of ``layers``).

    Args:
        model: the network.
        name: a module name such as ``"layer3.1"``.
        layers: the allowed names (e.g. ``list_layers(model, spatial_only=True)``); default: all modules.

    Returns:
        The module called ``name``.

    Raises:
        ValueError: unknown name, with the closest valid names and how to list them; a parameter name
            (``"layer1.0.conv1.weight"``) gets the module name to use instead.
    """
    modules = dict(model.named_modules())
    valid = [n for n in modules if n] if layers is None else [getattr(l, "name", l) for l in layers]  # noqa: E741
    if isinstance(name, str) and name in valid and name in modules:
        return modules[name]
    model_name = type(model).__name__
    listing = "Use kcore.features.list_layers(model) (or `kcore layers CKPT`) to see valid names."
    if not isinstance(name, str) or not name:
        raise ValueError(f"layer must be a non-empty module name such as 'layer3.1'; got {name!r}. {listing}")
    tensors = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    if name in tensors:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        raise ValueError(
            f"layer {name!r} is a parameter or buffer of {model_name}, not a layer: hooks attach to modules. "
            f"Fix: use the module name {owner!r}. {listing}"
        )
    close = difflib.get_close_matches(name, valid, n=_MAX_SUGGESTIONS, cutoff=0.5)
    if not close and name.replace("_", ".") in valid:
        close = [name.replace("_", ".")]
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
    where = "" if layers is None or name not in modules else " (it exists but is not among the allowed layers)"
    raise ValueError(f"layer {name!r} not found in {model_name}{where}{hint} {listing}")
