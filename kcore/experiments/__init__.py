"""The paper's studies (Sec. 4) as reproducible experiments: one module per study.

Each study is a function returning a frozen result dataclass with ``tables()`` (pandas DataFrames) and
``figures()`` (matplotlib Figures); :func:`kcore.experiments._common.write_study` writes a study folder
(CSV tables, PNG/SVG/PDF figures, JSON result and provenance) that the dashboard re-opens.

Every study module also defines ``add_cli(subparsers)``, which registers its ``kcore <study>``
subcommand (``parser.set_defaults(handler=...)``; the handler takes the parsed args and returns an exit
status).
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
