"""Reading run and study folders back like uploads: capped reads below the folder, typed JSON fields.

A run or study folder may have been edited, truncated or planted by someone else on a shared server, so each
file is read through :mod:`kcore.safe_files` (a regular file inside the folder, no symlink followed, under a size
cap) and every JSON field is checked against the type it was written with before it is used. Errors are
:class:`FolderFileError` (a ``ValueError``) naming the file, the field, what was expected, what was found and the
fix; they never quote more than a short value.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import types
import typing
from collections.abc import Mapping
from typing import Any

from kcore.safe_files import UnsafePathError, read_under

MiB = 1 << 20
GiB = 1 << 30
JSON_MAX_BYTES = 64 * MiB
"""Largest JSON file of a run or study folder (a fit's history of 1000 epochs and a 2048-channel report take
well under 2 MiB)."""
TENSORS_MAX_BYTES = 4 * GiB
"""Largest safetensors file of a run folder (the held-out features of 1000 images at 256×14×14 take 0.4 GiB)."""
SAFETENSORS_HEADER_MAX_BYTES = 1 * MiB
"""Largest safetensors header of a run folder: its files hold a handful of named tensors, so a header listing
millions of them is refused before it is parsed."""

_FIX = ("Fix: write the folder again (`kcore fit --out NEW_DIR` for a run folder, the study's command for a study "
        "folder), or restore it from a copy")


class FolderFileError(ValueError):
    """A file of a run or study folder is unsafe, too large, corrupt, or has a field of the wrong type or value."""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def folder_error(folder: str | os.PathLike, name: str, problem: str) -> FolderFileError:
    """The error for one file of a folder: names the folder, the file and the problem, and says how to fix it."""
    return FolderFileError(f"{name} in {os.fspath(folder)!r} {problem}. Nothing was changed. {_FIX}.")


def read_bytes(folder: str | os.PathLike, name: str, max_bytes: int) -> bytes:
    """The bytes of ``folder/name``: a regular file inside ``folder`` (no symlink followed) of at most ``max_bytes``.

    Raises:
        FolderFileError: a symlink, FIFO, device or folder, or a file above ``max_bytes``.
        FileNotFoundError: no such file.
    """
    try:
        return read_under(folder, name, max_bytes=max_bytes, what=f"file {name!r} of the folder")
    except UnsafePathError as exc:
        raise FolderFileError(f"{name} in {os.fspath(folder)!r} cannot be read safely: {exc}") from None


def read_json(folder: str | os.PathLike, name: str, max_bytes: int = JSON_MAX_BYTES) -> Any:
    """A JSON file of a folder, read with :func:`read_bytes`.

    Raises:
        FolderFileError: unsafe, above ``max_bytes``, not UTF-8 or not JSON; the message names the file.
        FileNotFoundError: no such file.
    """
    data = read_bytes(folder, name, max_bytes)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise folder_error(folder, name, f"is not valid JSON ({type(exc).__name__}: {str(exc)[:120]})") from None


def read_safetensors(folder: str | os.PathLike, name: str, max_bytes: int = TENSORS_MAX_BYTES) -> dict:
    """The tensors of a safetensors file of a folder (name → CPU tensor), its header size checked first.

    The bytes are read into memory and the tensors built from them, never memory-mapped
    (``safetensors.torch.load_file``/``safe_open`` map the file, and a file truncated by someone else afterwards
    would then kill the whole server with SIGBUS when a tensor is touched).

    Raises:
        FolderFileError: unsafe, above ``max_bytes``, a header above :data:`SAFETENSORS_HEADER_MAX_BYTES`, or not a
            readable safetensors file.
        FileNotFoundError: no such file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_bytes(folder, name, max_bytes)
    if len(data) < 8:
        raise folder_error(folder, name, f"is truncated ({len(data)} bytes, not a safetensors file)")
    (header,) = struct.unpack("<Q", data[:8])
    if header > min(SAFETENSORS_HEADER_MAX_BYTES, len(data) - 8):
        raise folder_error(folder, name, f"has a header of {header} bytes (at most "
                                         f"{SAFETENSORS_HEADER_MAX_BYTES} and the file's size are accepted)")
    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise folder_error(folder, name, f"is truncated, corrupt or was edited ({type(exc).__name__}: "
                                         f"{str(exc)[:160]})") from None


# ----------------------------------------------------------------------------------------------- typed fields
@dataclasses.dataclass(frozen=True)
class Maybe:
    """A schema that may also be null (or missing, as a key of an object): ``Maybe({"mean": float})``."""

    schema: Any


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is Any:
        return "any value"
    if isinstance(tp, Maybe):
        return f"{_describe(tp.schema)} or null"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return f"an object ({tp.__name__})"
    if isinstance(tp, Mapping):
        return "an object"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            item = args[0]
            if dataclasses.is_dataclass(item):
                return f"a list of {item.__name__} objects"
            return f"a list of {_describe(item).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} values"
    if origin in (dict, Mapping) or tp is dict:
        return "an object"
    if origin is list or tp is list:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def check_fields(value: Any, schema: Any, folder: str | os.PathLike, name: str, where: str = "") -> None:
    """Check a JSON value against the type it was written with; raise naming the file and the field.

    ``schema`` is a type hint: ``int`` (not a bool), ``float`` (an int or float, not a bool; NaN and ±inf
    allowed: :func:`check_finite` checks the numbers that must be finite), ``str``, ``bool``, ``None``,
    ``Literal[...]``, ``X | None`` (or ``Maybe(X)`` for any schema), ``tuple[X, ...]`` / ``tuple[X, Y]`` (JSON lists), ``dict[str, X]``, ``Any``,
    a dataclass (a JSON object with its fields; fields with a default may be missing) or a plain ``dict`` of
    key → type hint (every key required; a key whose hint allows ``None`` may be missing).

    Raises:
        FolderFileError: the first field found of the wrong type, e.g. ``field 'heldout_report.instability' must
            be a number; got '0.4' (str)``.
    """
    def fail(expected: str) -> FolderFileError:
        got = f"{_short(value)} ({type(value).__name__})"
        return folder_error(folder, name, f"has field {where or '(top level)'!r} of the wrong type: expected "
                                          f"{expected}; got {got}")

    origin = typing.get_origin(schema)
    if schema is Any or (isinstance(schema, Maybe) and value is None):
        return
    if isinstance(schema, Maybe):
        check_fields(value, schema.schema, folder, name, where)
        return
    if schema is type(None) or schema is None:
        if value is not None:
            raise fail("null")
        return
    if schema is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return
    if schema is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return
    if schema is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return
    if schema is str:
        if not isinstance(value, str):
            raise fail("a string")
        return
    if origin is typing.Literal:
        if value not in typing.get_args(schema) or isinstance(value, bool):
            raise fail(_describe(schema))
        return
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(schema):
            try:
                check_fields(value, option, folder, name, where)
                return
            except FolderFileError:
                continue
        raise fail(_describe(schema))
    if origin is tuple or origin is list or schema in (list, tuple):
        if not isinstance(value, list):
            raise fail(_describe(schema))
        args = typing.get_args(schema)
        if not args:
            return
        if len(args) == 2 and args[1] is Ellipsis:
            items = [args[0]] * len(value)
        else:
            if len(value) != len(args):
                raise fail(f"a list of {len(args)} values")
            items = list(args)
        for i, (v, tp) in enumerate(zip(value, items)):
            check_fields(v, tp, folder, name, f"{where}[{i}]")
        return
    if origin in (dict, Mapping) or schema is dict:
        if not isinstance(value, dict):
            raise fail("an object")
        args = typing.get_args(schema)
        if args:
            for k, v in value.items():
                check_fields(v, args[1], folder, name, f"{where}.{k}" if where else str(k))
        return
    if dataclasses.is_dataclass(schema) or isinstance(schema, Mapping):
        if not isinstance(value, dict):
            raise fail(_describe(schema))
        if isinstance(schema, Mapping):
            fields = {k: (tp, _allows_none(tp)) for k, tp in schema.items()}
        else:
            hints = typing.get_type_hints(schema)
            fields = {f.name: (hints[f.name], f.default is not dataclasses.MISSING
                               or f.default_factory is not dataclasses.MISSING)
                      for f in dataclasses.fields(schema) if f.init}
        for key, (tp, optional) in fields.items():
            at = f"{where}.{key}" if where else key
            if key not in value:
                if optional:
                    continue
                raise folder_error(folder, name, f"has no field {at!r} (expected {_describe(tp)})")
            check_fields(value[key], tp, folder, name, at)
        return
    raise TypeError(f"check_fields: unsupported schema {schema!r}")  # a bug in kcore, not in the folder


def _allows_none(tp: Any) -> bool:
    return tp is Any or tp is None or tp is type(None) or isinstance(tp, Maybe) or (
        typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp))


def check_finite(values: Mapping[str, Any], folder: str | os.PathLike, name: str) -> None:
    """Check that each named number (or every number of a nested list) is finite.

    Args:
        values: field name (as the message shows it) → number or nested lists of numbers.

    Raises:
        FolderFileError: a NaN or ±inf; the message names the field.
    """
    def walk(v: Any, at: str) -> None:
        if isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{at}[{i}]")
        elif isinstance(v, float) and not math.isfinite(v):
            raise folder_error(folder, name, f"has field {at!r} = {v}: expected a finite number")

    for key, v in values.items():
        walk(v, key)


def check_length(value: Any, expected: int, folder: str | os.PathLike, name: str, where: str, why: str) -> None:
    """Check that a list (or tuple) field has ``expected`` entries; ``why`` says where that number comes from.

    Raises:
        FolderFileError: another length; the message names the field, both lengths and ``why``.
    """
    if value is not None and len(value) != expected:
        raise folder_error(folder, name, f"has field {where!r} with {len(value)} entries; expected {expected} "
                                         f"({why})")

