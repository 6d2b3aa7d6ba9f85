"""Shared pieces of the studies: running a network from an intermediate layer, and study folders."""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from kcore._io import atomic_folder

STUDY_FORMAT = "kcore-study/1"


@contextmanager
def replaced_output(model: nn.Module, layer: str, value: dict[str, Tensor]) -> Iterator[None]:
    """Inside the block, ``layer``'s output is replaced by ``value["x"]`` (set before each forward).

    The hook is removed when the block ends, also after an error.
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        raise ValueError(f"layer {layer!r} not found in {type(model).__name__}; see kcore.features.list_layers(model).")

    def hook(_module, _inputs, _output):
        return value["x"]

    handle = modules[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class FromLayer(nn.Module):
    """The part of a network above ``layer``, as a module that takes that layer's feature map.

    It runs the whole (copied) network on a constant dummy image and replaces ``layer``'s output with the
    given features through a forward hook, so it works for any architecture whose later layers only see
    ``layer`` through its output. Only the layers above ``layer`` affect the result (and get gradients).

    Args:
        model: the network (deep-copied; the original is not changed).
        layer: module name whose output the features replace.
        input_shape: (3, H, W) of the network's input.
    """

    def __init__(self, model: nn.Module, layer: str, input_shape: tuple[int, int, int]):
        super().__init__()
        self.net = copy.deepcopy(model)
        self.layer = layer
        self.input_shape = tuple(input_shape)
        self._value: dict[str, Tensor] = {}
        self._handle = None

    def forward(self, feats: Tensor) -> Tensor:
        self._value["x"] = feats
        dummy = feats.new_zeros((feats.shape[0], *self.input_shape))
        with replaced_output(self.net, self.layer, self._value):
            out = self.net(dummy)
        self._value.clear()
        return out

    def upper_parameters(self, example: Tensor) -> list[nn.Parameter]:
        """Parameters that receive a gradient from the output given features ``example`` (the upper layers)."""
        self.net.zero_grad(set_to_none=True)
        self(example.detach()).sum().backward()
        params = [p for p in self.net.parameters() if p.grad is not None]
        self.net.zero_grad(set_to_none=True)
        return params


def state_fingerprint(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (to prove later that nothing changed)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module: nn.Module, before: Mapping[str, Tensor]) -> bool:
    """True when every parameter and buffer of ``module`` equals the fingerprint ``before`` exactly."""
    now = module.state_dict()
    return set(now) == set(before) and all(torch.equal(now[k], before[k]) for k in before)


@dataclass(frozen=True)
class StudyFolder:
    """What a study folder holds once read back (:func:`read_study`)."""

    path: Path
    study: str
    result: dict
    tables: dict[str, Any]
    figures: dict[str, Path]
    provenance: dict = field(default_factory=dict)


def write_study(
    out_dir: str | os.PathLike,
    study: str,
    result: dict,
    tables: Mapping[str, Any],
    figures: Mapping[str, Any],
    provenance: Mapping[str, Any],
    *,
    overwrite: bool = False,
    formats: tuple[str, ...] = ("png", "svg", "pdf"),
) -> Path:
    """Write a study folder atomically: ``result.json``, ``provenance.json``, ``<table>.csv``, ``<figure>.<fmt>``.

    Args:
        out_dir: the folder to create.
        study: the study's name (e.g. ``"stability"``).
        result: JSON-serialisable numbers of the study.
        tables: name → pandas DataFrame.
        figures: name → matplotlib Figure.
        provenance: checkpoints, layers, seeds, versions, command.
    """
    from kcore.pipeline import versions

    with atomic_folder(out_dir, overwrite=overwrite, kind="study") as tmp:
        (tmp / "result.json").write_text(json.dumps({"format": STUDY_FORMAT, "study": study, **result}, indent=1, default=_json))
        prov = {"study": study, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), **dict(provenance)}
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=1, default=_json))
        for name, df in tables.items():
            df.to_csv(tmp / f"{name}.csv", index=False)
        for name, fig in figures.items():
            for fmt in formats:
                fig.savefig(tmp / f"{name}.{fmt}", format=fmt, dpi=200, bbox_inches="tight", metadata=_fig_meta(fmt))
    return Path(out_dir)


def read_study(path: str | os.PathLike) -> StudyFolder:
    """Re-open a study folder written by :func:`write_study`."""
    import pandas as pd

    d = Path(path)
    if not (d / "result.json").is_file():
        raise ValueError(f"{str(d)!r} is not a kcore study folder (no result.json). Fix: pick a folder written by a `kcore <study>` command.")
    result = json.loads((d / "result.json").read_text())
    prov = json.loads((d / "provenance.json").read_text()) if (d / "provenance.json").is_file() else {}
    tables = {p.stem: pd.read_csv(p) for p in sorted(d.glob("*.csv"))}
    figures = {p.stem: p for p in sorted(d.glob("*.png"))}
    return StudyFolder(d, result.get("study", ""), result, tables, figures, prov)


def _fig_meta(fmt: str) -> dict | None:
    # fixed metadata keeps SVG/PDF bytes deterministic across runs
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return None


def _json(o: Any) -> Any:
    if isinstance(o, Tensor):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
