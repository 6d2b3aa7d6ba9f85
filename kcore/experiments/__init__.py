"""The paper's studies (Sec. 4) as reproducible experiments: one module per study.

Each study is a function returning a frozen result dataclass with ``tables()`` (pandas DataFrames) and
``figures()`` (matplotlib Figures); :func:`kcore.experiments._common.write_study` writes a study folder
(CSV tables, PNG/SVG/PDF figures, JSON result and provenance) that the dashboard re-opens.

Every study module also defines ``add_cli(subparsers)``, which registers its ``kcore <study>``
subcommand through the one study template, :func:`kcore.experiments._common.study_command` (shared
options, out-folder check, threads, provenance, the study folder and the summary print).

A study module imports only :mod:`kcore.experiments._common` and the core, never another study. Two
modules here are tools of the studies, not studies: :mod:`~kcore.experiments.pruning` (magnitude pruning,
used by the compression study) and :mod:`~kcore.experiments.families` (families of networks that differ
only in seed, used by the stability study; ``kcore train-family``); they import no study either.
"""
from __future__ import annotations

import importlib
from types import ModuleType

#: study modules, in the paper's order (Sec. 4.1 – 4.6)
STUDIES: tuple[str, ...] = ("diagnosis", "stability", "refinement", "compression", "distillation", "cross_task")


def study_modules() -> list[ModuleType]:
    """The study modules that exist, imported."""
    mods = []
    for name in STUDIES:
        try:
            mods.append(importlib.import_module(f"kcore.experiments.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"kcore.experiments.{name}":
                raise
    return mods
