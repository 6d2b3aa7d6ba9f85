"""The options of a study that a hosted app may set: typed numbers, choices and switches, checked here.

A browser never passes raw command-line flags. :func:`study_options` lists, from the study's own ``kcore
<study>`` parser, the options that take a number, a choice or nothing (a switch) — never ``--out``,
``--overwrite``, a path, a checkpoint or a free string. :func:`study_command` checks each value against its
option (type, choices, bounds) and builds the command with an output folder that the caller generates
(:func:`new_study_folder`), so a request carrying ``--out`` or a path is refused.

Every number has a cap on this server: :data:`STUDY_CAPS` maps each option name to a field of
:class:`kcore.limits.Limits` (image size, counts of images, epochs, repeats, seeds, rates ...), which the server's
operator sets with its environment variable. A number option without a row there is not offered at all.
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

from kcore.limits import ENV_VARS, Limits, input_tensor_bytes, limits

NEVER_FROM_A_BROWSER = frozenset({"out", "overwrite", "threads", "help", "cache_dir"})
"""Options a hosted app never sets, whatever their type."""

STUDY_CAPS: dict[str, str] = {
    # images: how many, and how large (kshapes images are drawn at --image-size)
    "n_train": "max_study_images", "n_test": "max_study_images", "n_images": "max_study_images",
    "image_size": "max_study_image_size",
    # training length
    "epochs": "max_study_epochs", "teacher_epochs": "max_study_epochs", "finetune_epochs": "max_study_epochs",
    "fit_epochs": "max_fit_epochs",
    "repeats": "max_study_repeats", "generations": "max_study_repeats", "n_maps": "max_study_repeats",
    "batch_size": "max_study_batch",
    "orders": "max_orders",
    "seed": "max_seed", "data_seed": "max_seed",
    # numbers that cost nothing but are still bounded (a value far out is a typo or an attack, never a study)
    "lr": "max_study_lr", "lr_final": "max_study_lr", "finetune_lr": "max_study_lr",
    "lam": "max_coefficient", "lambd": "max_coefficient", "tau": "max_coefficient", "weight_decay": "max_coefficient",
}
"""Each number option of a study → the :class:`kcore.limits.Limits` field that caps it (one table for all
studies; a number option missing here is not offered to a browser)."""

IMAGE_COUNTS = ("n_train", "n_test", "n_images")
"""The options whose sum, at ``image_size``, makes a study's image tensor (checked against ``max_input_bytes``)."""


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
        maximum: the largest value a number may take on this server (None for a choice or a switch).
        cap: the :class:`kcore.limits.Limits` field behind ``maximum`` (see :data:`STUDY_CAPS`).
        env: the environment variable that sets ``maximum``.
    """

    name: str
    flag: str
    kind: Literal["int", "float", "choice", "switch"]
    default: Any
    choices: tuple[str, ...] = ()
    help: str = ""
    maximum: int | None = None
    cap: str | None = None
    env: str | None = None


def _study_parser(study: str) -> argparse.ArgumentParser:
    from kcore.cli import build_parser
    from kcore.experiments import STUDIES

    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}; got {study!r}.")
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[study.replace("_", "-")]


def study_options(study: str, caps: Limits | None = None) -> tuple[StudyOption, ...]:
    """The options of ``kcore <study>`` a hosted app may set (numbers, choices, switches; no paths).

    Args:
        study: a key of :data:`kcore.experiments.STUDIES`.
        caps: the caps in force (default :func:`kcore.limits.limits`, read from the environment).

    Returns:
        The options, in the parser's order; each number carries its ``maximum`` and the ``env`` that sets it.

    Raises:
        ValueError: unknown study, or a ``KCORE_MAX_*`` variable that is not a whole number.
    """
    caps = limits() if caps is None else caps
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
        elif a.type in (int, float) and a.dest in STUDY_CAPS:
            cap = STUDY_CAPS[a.dest]
            found.append(StudyOption(a.dest, flag, "int" if a.type is int else "float", a.default, (), help_,
                                     getattr(caps, cap), cap, ENV_VARS[cap]))
        # anything else (a path, a checkpoint, a free string, a list, a number without a cap) is not offered
    return tuple(found)


def _check(opt: StudyOption, value: object, caps: Limits) -> str | None:
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
            raise ValueError(f"{bad} must be an integer; got {value!r} ({type(value).__name__}). "
                             "Fix: give a whole number.")
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{bad} must be a finite number; got {value!r}. Fix: give a number such as 0.1.")
    if value < 0:
        raise ValueError(f"{bad} must be 0 or more; got {value}. Fix: use a value between 0 and {opt.maximum}.")
    caps.check(opt.cap, value, what=bad, fix=f"use a value between 0 and {opt.maximum}, or run the study from a "
               "terminal")
    return str(value) if opt.kind == "int" else repr(float(value))


def study_arguments(study: str, values: Mapping[str, object], caps: Limits | None = None) -> list[str]:
    """The command-line arguments for ``values`` (option name → value), each checked against its option.

    Args:
        study: a key of :data:`kcore.experiments.STUDIES`.
        values: option name (or its ``--flag``) → value; an option left out keeps the study's default.
        caps: the caps in force (default :func:`kcore.limits.limits`).

    Returns:
        The arguments after ``kcore <study>``.

    Raises:
        ValueError: a name that is not a settable option of the study (``out``, ``overwrite``, a path, a raw
            flag ...), or a value of the wrong type or outside the choices.
        kcore.limits.LimitExceeded: a number over its cap (:data:`STUDY_CAPS`), or images × 3 × size² × 4 bytes
            over ``max_input_bytes``; the message names the option, the cap and its environment variable.
    """
    caps = limits() if caps is None else caps
    options = {o.name: o for o in study_options(study, caps)}
    args: list[str] = []
    chosen: dict[str, object] = {}
    for name, value in values.items():
        opt = options.get(str(name).lstrip("-").replace("-", "_"))
        if opt is None or str(name).startswith("-") and str(name) != opt.flag:
            raise ValueError(
                f"study option {name!r} cannot be set here: only these typed options of "
                f"`kcore {study.replace('_', '-')}` are accepted: {sorted(options)} (never --out, --overwrite, "
                "a path or a raw flag). Fix: run the study from a terminal for other options.")
        text = _check(opt, value, caps)
        chosen[opt.name] = value
        if text is None:
            continue
        args += [opt.flag] if opt.kind == "switch" else [opt.flag, text]
    _check_image_tensor(study, options, chosen, caps)
    return args


def _check_image_tensor(study: str, options: Mapping[str, StudyOption], chosen: Mapping[str, object],
                        caps: Limits) -> None:
    """Refuse a study whose images (all splits, float32 at ``image_size``) would pass ``max_input_bytes``."""
    if "image_size" not in options:
        return  # the study draws its images at a fixed, small size

    def value(name: str) -> int:
        v = chosen.get(name, options[name].default if name in options else None)
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    n = sum(value(k) for k in IMAGE_COUNTS)
    size = value("image_size")
    caps.check("max_input_bytes", input_tensor_bytes(n, (size, size)),
               what=f"study {study!r}: {n} images ({' + '.join(k for k in IMAGE_COUNTS if k in options)}) at "
                    f"image_size {size} need a float32 image tensor that",
               fix="use fewer or smaller images")


def new_study_folder(parent: str | os.PathLike, study: str) -> Path:
    """A new, unused folder name ``<study>-<UTC time>-<random>`` directly inside ``parent`` (not created)."""
    from kcore.experiments import STUDIES

    if study not in STUDIES:
        raise ValueError(f"study must be one of {list(STUDIES)}; got {study!r}.")
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(parent).resolve() / f"{study}-{stamp}-{secrets.token_hex(3)}"


def study_command(study: str, values: Mapping[str, object], out_dir: str | os.PathLike,
                  caps: Limits | None = None) -> list[str]:
    """The full command that runs ``kcore <study>`` with checked ``values`` into ``out_dir``.

    Raises:
        ValueError: see :func:`study_arguments`.
    """
    return [sys.executable, "-m", "kcore.cli", study.replace("_", "-"), *study_arguments(study, values, caps),
            "--out", str(out_dir)]
