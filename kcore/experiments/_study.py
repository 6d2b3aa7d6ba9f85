"""The study template: one ``kcore <study>`` command from its options, its computation and its report.

A study module supplies only its own arguments, its computation and its report::

    def add_cli(sub):
        p = sub.add_parser("my-study", help=..., description=...)
        p.add_argument(...)                               # the study's own options
        add_fit_args(p, ...)                              # shared options (_arguments.py)
        study_command(p, "my_study", compute, report)     # --device --threads --overwrite --out, the handler

    def compute(args, run, progress) -> StudyRun: ...     # args: the options; run: a StudySettings
    def report(result) -> None: ...                       # the summary lines printed after writing

:func:`run_study` (the handler) checks the out folder first, sets the torch threads, joins the job (torchrun or
one process), hands ``compute`` a frozen :class:`StudySettings` (the parsed options are never changed), completes
the provenance, writes the study folder atomically and prints the summary.
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch

from kcore._io import check_out_dir
from kcore.devices import DEVICE_CHOICES
from kcore.experiments._arguments import add_output_arguments
from kcore.experiments._folder import write_study
from kcore.provenance import command_line, source_revision
from kcore.training import Progress

if TYPE_CHECKING:
    from kcore.distributed import Context


def say(progress: Progress | None, message: str) -> None:
    """Send one progress line, if anyone listens."""
    if progress is not None:
        progress(message)


def stderr_progress(prefix: str) -> Progress:
    """A progress callback printing ``[prefix  seconds] message`` lines to stderr."""
    t0 = time.perf_counter()

    def out(message: str) -> None:
        print(f"[{prefix} {time.perf_counter() - t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    return out


@dataclass(frozen=True)
class StudySettings:
    """Where one study runs, as :func:`run_study` set it up (handed to the study's ``compute``).

    Attributes:
        device: where to compute: ``--device``, or this rank's own device under torchrun.
        job: this process's place in the job (:class:`kcore.distributed.Context`; one rank of one when alone).
    """

    device: str
    job: Context


@dataclass(frozen=True, eq=False)
class StudyRun:
    """What a study's ``compute`` hands to :func:`run_study`.

    Attributes:
        result: the study's result (``as_dict()``, ``tables()``, ``figures()``).
        provenance: the study's own provenance (checkpoints, layers, seeds, data); the command line, the
            source revision, the versions, the device and the threads are added by :func:`run_study`.
        extra: writes more files into the study folder before it is moved into place (optional).
    """

    result: Any
    provenance: dict
    extra: Callable[[Path], None] | None = None


Compute = Callable[[argparse.Namespace, StudySettings, Progress], StudyRun]
Report = Callable[[Any], None]


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Inside the block torch uses ``n`` threads (unchanged when ``n`` is None or 0); restored afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study_command(p: argparse.ArgumentParser, study: str, compute: Compute, report: Report, *,
                  device: str = "auto") -> None:
    """Add the options every study shares (``--device --threads --overwrite --out``) and make
    :func:`run_study` with ``compute`` and ``report`` the handler of ``p``.

    Args:
        p: the study's subcommand parser, with its own options already added.
        study: the study's name in the study folder (e.g. ``"cross_task"``).
        compute: ``(args, settings, progress) -> StudyRun``: the study's computation.
        report: ``(result) -> None``: prints the summary lines.
        device: the default of ``--device``.
    """
    p.add_argument("--device", default=device, choices=list(DEVICE_CHOICES),
                   help=f"where to run (default {device}; auto = CUDA when present)")
    add_output_arguments(p)
    p.set_defaults(handler=partial(run_study, study=study, compute=compute, report=report))


def run_study(args: argparse.Namespace, *, study: str, compute: Compute, report: Report) -> int:
    """Run one study from its parsed options: the handler that :func:`study_command` installs.

    Refuses an existing ``--out`` (without ``--overwrite``) before any work, runs ``compute`` on
    ``--threads`` torch threads (restored afterwards), writes the study folder atomically with the
    provenance completed, then prints ``report``'s summary and the folder written. ``args`` is not changed.

    Returns:
        0 (errors are raised).
    """
    from kcore import distributed as kd

    check_out_dir(args.out, overwrite=args.overwrite, flag="--out")
    # under torchrun every rank runs the study; studies that spread their fits read ``settings.job`` (the others
    # compute everything on every rank); rank 0 alone writes the folder and prints the summary
    with kd.job(args.device) as ctx, torch_threads(args.threads):
        settings = StudySettings(device=str(ctx.device) if ctx.distributed else args.device, job=ctx)
        run = compute(args, settings, stderr_progress(study.replace("_", "-")))
        prov = {"command": command_line(), "source": source_revision(), **run.provenance,
                "device": settings.device, "threads": torch.get_num_threads(), "world_size": ctx.world_size,
                "hosts": kd.hosts(ctx)}
        res = run.result
        out = kd.main_first(lambda: write_study(args.out, study, res.as_dict(), res.tables(), res.figures(), prov,
                                                overwrite=args.overwrite, extra=run.extra), ctx)
        if not ctx.is_main:
            return 0
    report(res)
    print(f"wrote {out}")
    return 0
