"""The options of a study that a hosted app may set: typed numbers, choices and switches, checked here.

A browser never passes raw command-line flags. :func:`study_options` lists, from the study's own ``kcore
<study>`` parser, the options that take a number, a choice or nothing (a switch) — never ``--out``,
``--overwrite``, a path, a checkpoint or a free string. :func:`study_command` checks each value against its
option (type, choices, bounds) and builds the command with an output folder that the caller generates
(:func:`new_study_folder`), so a request carrying ``--out`` or a path is refused.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

NEVER_FROM_A_BROWSER = frozenset({"out", "overwrite", "threads", "help", "cache_dir"})
"""Options a hosted app never sets, whatever their type."""

MAX_INT = 1_000_000
MAX_FLOAT = 1e6


@dataclass(frozen=True)
class StudyOption:
    """One settable option of a study.

    Attributes:
        name: the argparse destination (``n_train``); the key in :func:`study_command`'s ``values``.
        flag: the command-line flag (``--n-train``).
        kind: ``"int"``, ``"float"``, ``"choice"`` or ``"switch"``.
        default: the study's default (None: the study decides).
        choices: the allowed values of a ``"choice"``.
        help: the option's help text.
    """

    name: str
    flag: str
    kind: Literal["int", "float", "choice", "switch"]
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""


def _study_parser(study: str) -> argparse.ArgumentParser:
    from kcore.cli import build_parser
    from kcore.experiments import STUDIES

    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}; got {study!r}.")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[study.replace("_", "-")]


def study_options(study: str) -> tuple[StudyOption, ...]:
    """The options of ``kcore <study>`` a hosted app may set (numbers, choices, switches; no paths).

    Raises:
        ValueError: unknown study.
    """
    found = []
    for a in _study_parser(study)._actions:
        if a.dest in NEVER_FROM_A_BROWSER or not a.option_strings:
            continue
        flag = next((s for s in a.option_strings if s.startswith("--")), a.option_strings[0])
        help_ = (a.help or "").replace("%(default)s", str(a.default))
        if isinstance(a, argparse._StoreTrueAction):
            found.append(StudyOption(a.dest, flag, "switch", False, (), help_))
        elif type(a) is not argparse._StoreAction or a.nargs is not None:
            continue
        elif a.choices is not None:
            found.append(StudyOption(a.dest, flag, "choice", a.default, tuple(str(c) for c in a.choices), help_))
        elif a.type is int:
            found.append(StudyOption(a.dest, flag, "int", a.default, (), help_))
        elif a.type is float:
            found.append(StudyOption(a.dest, flag, "float", a.default, (), help_))
        # anything else (a path, a checkpoint, a free string, a list) is not offered
    return tuple(found)


def _check(opt: StudyOption, value: object) -> str | None:
    """The command-line text of ``value`` for ``opt`` (None: leave the flag out)."""
    bad = f"study option {opt.name!r} ({opt.flag})"
    if opt.kind == "switch":
        if not isinstance(value, bool):
            raise ValueError(f"{bad} is a switch: expected true or false; got {value!r}.")
        return "" if value else None
    if value is None:
        return None
    if opt.kind == "choice":
        if str(value) not in opt.choices or not isinstance(value, str):
            raise ValueError(f"{bad} must be one of {list(opt.choices)}; got {value!r}. Fix: pick one of those.")
        return str(value)
    if opt.kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{bad} must be an integer; got {value!r} ({type(value).__name__}).")
        if not 0 <= value <= MAX_INT:
            raise ValueError(f"{bad} must be in [0, {MAX_INT}]; got {value}. Fix: use a value in that range.")
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{bad} must be a finite number; got {value!r}.")
    if not 0 <= value <= MAX_FLOAT:
        raise ValueError(f"{bad} must be in [0, {MAX_FLOAT:g}]; got {value}. Fix: use a value in that range.")
    return repr(float(value))


def study_arguments(study: str, values: Mapping[str, object]) -> list[str]:
    """The command-line arguments for ``values`` (option name → value), each checked against its option.

    Raises:
        ValueError: a name that is not a settable option of the study (``out``, ``overwrite``, a path, a raw
            flag ...), or a value of the wrong type, outside the choices or the bounds.
    """
    options = {o.name: o for o in study_options(study)}
    args: list[str] = []
    for name, value in values.items():
        opt = options.get(str(name).lstrip("-").replace("-", "_"))
        if opt is None or str(name).startswith("-") and str(name) != opt.flag:
            raise ValueError(
                f"study option {name!r} cannot be set here: only these typed options of "
                f"`kcore {study.replace('_', '-')}` are accepted: {sorted(options)} (never --out, --overwrite, "
                "a path or a raw flag). Fix: run the study from a terminal for other options.")
        text = _check(opt, value)
        if text is None:
            continue
        args += [opt.flag] if opt.kind == "switch" else [opt.flag, text]
    return args


def new_study_folder(parent: str | os.PathLike, study: str) -> Path:
    """A new, unused folder name ``<study>-<UTC time>-<random>`` directly inside ``parent`` (not created)."""
    from kcore.experiments import STUDIES

    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}; got {study!r}.")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(parent).resolve() / f"{study}-{stamp}-{secrets.token_hex(3)}"


def study_command(study: str, values: Mapping[str, object], out_dir: str | os.PathLike) -> list[str]:
    """The full command that runs ``kcore <study>`` with checked ``values`` into ``out_dir``.

    Raises:
        ValueError: see :func:`study_arguments`.
    """
    return [sys.executable, "-m", "kcore.cli", study.replace("_", "-"), *study_arguments(study, values),
            "--out", str(out_dir)]
