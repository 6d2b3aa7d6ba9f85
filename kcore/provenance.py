"""What every saved result records about how it was made, and how kcore writes JSON.

One owner for the versions written into run folders, study folders and exports (:func:`versions`), for the
command and the source revision that made a result (:func:`command_line`, :func:`kcore_command`,
:func:`source_revision`), for what
identifies a model (:func:`checkpoint_provenance`, :func:`model_summary`) and for the JSON encoding of the
values kcore stores (:func:`json_default`, :func:`dumps`, :func:`as_jsonable`): tensors and arrays as lists,
numpy scalars as numbers, tuples and sets as lists, paths as strings, typed results through their ``as_dict()``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kcore._version import __version__

if TYPE_CHECKING:
    from torch import nn

    from kcore.checkpoints import LoadedModel

#: packages whose version can change a result or a figure (reported when installed)
VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "torchvision", "numpy", "matplotlib", "streamlit")


def versions() -> dict[str, str]:
    """Versions of kcore, Python and every installed package of :data:`VERSIONED_PACKAGES`."""
    out = {"kcore": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def json_default(o: Any) -> Any:
    """The ``default=`` of :func:`json.dumps` for kcore's values.

    Raises:
        TypeError: a value kcore does not know how to write (what :func:`json.dumps` expects).
    """
    import numpy as np

    if hasattr(o, "as_dict") and callable(o.as_dict):
        return o.as_dict()
    if hasattr(o, "tolist") and callable(o.tolist):  # torch tensors, numpy arrays and numpy scalars
        return o.tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic) or hasattr(o, "item"):
        return o.item()
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def dumps(obj: Any, *, indent: int | None = 1, lenient: bool = False) -> str:
    """``obj`` as JSON text with :func:`json_default`; ``lenient`` writes unknown values as ``str(value)``."""
    def default(o: Any) -> Any:
        try:
            return json_default(o)
        except TypeError:
            if lenient:
                return str(o)
            raise

    return json.dumps(obj, indent=indent, default=default, allow_nan=True)


def command_line() -> str:
    """The command that is running, as ``kcore <arguments>``."""
    return " ".join(["kcore", *sys.argv[1:]])


def kcore_command() -> str | None:
    """The ``kcore`` command this process runs (:func:`command_line`), or None when it runs something else: the
    dashboard, a notebook, a script or a test (a run's ``reproduce`` record then says how to recompute it)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is None:
        return None
    is_kcore = argv0.name == "kcore" or (argv0.parent.name == "kcore" and argv0.name in ("__main__.py", "cli.py"))
    return command_line() if is_kcore else None


def source_revision() -> dict:
    """The git commit of the kcore checkout and whether its kcore/ files differ from it (empty outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kcore"], cwd=root, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "kcore_modified": bool(dirty)}


def as_jsonable(obj: Any) -> Any:
    """Dataclasses and tuples as plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: as_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): as_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_jsonable(v) for v in obj]
    return obj


def model_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter count and a hash of the weights (for provenance of models trained in memory)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return {"num_parameters": sum(p.numel() for p in model.parameters()), "weights_sha256": h.hexdigest()}


def checkpoint_provenance(m: LoadedModel, path: str, layer: str) -> dict[str, Any]:
    """Name, path, hash, layer, architecture and accuracy of a loaded checkpoint."""
    card = m.card
    return {"name": m.name, "path": str(Path(path).resolve()), "sha256": m.sha256, "layer": layer,
            "architecture": card.architecture if card else None, "num_parameters": m.num_parameters,
            "card_test_accuracy": card.test_accuracy if card else None}
