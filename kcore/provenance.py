"""What every saved result records about how it was made, and how kcore writes JSON.

One owner for the versions written into run folders, study folders and exports (:func:`versions`) and for
the JSON encoding of the values kcore stores (:func:`json_default`, :func:`dumps`): tensors and arrays as
lists, numpy scalars as numbers, tuples and sets as lists, paths as strings, typed results through their
``as_dict()``.
"""
from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

#: packages whose version can change a result or a figure (reported when installed)
VERSIONED_PACKAGES: tuple[str, ...] = ("torch", "torchvision", "numpy", "matplotlib", "streamlit")


def versions() -> dict[str, str]:
    """Versions of kcore, Python and every installed package of :data:`VERSIONED_PACKAGES`."""
    import kcore

    out = {"kcore": kcore.__version__, "python": platform.python_version()}
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
