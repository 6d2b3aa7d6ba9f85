"""The paper's studies (Sec. 4) as reproducible experiments: one module per study.

Each study is a function returning a frozen result dataclass with ``tables()`` (pandas DataFrames) and
``figures()`` (matplotlib Figures); :func:`write_study` writes a study folder (CSV tables, PNG/SVG/PDF figures,
JSON result and provenance) that the dashboard re-opens with :func:`read_study`.

Every study module also defines ``add_cli(subparsers)``, which registers its ``kcore <study>`` subcommand through
the one study template, :func:`kcore.experiments._study.study_command` (shared options, out-folder check,
threads, a frozen :class:`~kcore.experiments._study.StudySettings`, provenance, the study folder and the summary).

What the studies share lives in one module per concept: ``_study`` (the template), ``_folder`` (study folders),
``_arguments`` (shared command-line options), ``_features`` (checkpoints, layers, features), ``_fits`` (g_θ fits
and their numbers), ``_arms`` (classifier arms on fixed features, :class:`~kcore.experiments._arms.FromLayer`);
image sets are in :mod:`kcore.imagesets`, provenance in :mod:`kcore.provenance`. A study module imports only
those and the core, never another study. Two modules here are tools of the studies, not studies:
:mod:`~kcore.experiments.pruning` (magnitude pruning, used by the compression study) and
:mod:`~kcore.experiments.families` (families of networks that differ only in seed, used by the stability study;
``kcore train-family``); they import no study either.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from kcore.experiments._folder import StudyFolder, read_study, write_study, zip_study

__all__ = ["STUDIES", "StudyFolder", "read_study", "study_modules", "write_study", "zip_study"]

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
