"""Progress of a comparison in stages, and the time left measured from the steps already run (a range, not a promise).

A comparison runs in stages (:func:`kcore.pipeline.pipeline_stages`): the extraction, the fit of each direction, the
extra seeds, then each chance baseline in each direction. Each report is a :class:`PipelineProgress`: the stage's
own fraction (a fit at step 110 of 800 is at 14 %), which stage of how many, and two :class:`Eta` ranges: the time
left in this stage and in the whole run.

:func:`eta_range` measures a fit's speed over its last few monitor measurements (the first steps, slower, and the
set-up are not counted) and gives a range: the slowest and fastest recent rate, and at the low end the earliest
step at which early stopping may end the fit. :class:`StageClock` keeps the durations of finished fits to bound the
stages still to come.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Eta", "PipelineProgress", "StageClock", "eta_range", "format_span"]

ETA_WINDOW = 8
"""How many of the last intervals between a fit's reports its step rate is measured on."""


def _fmt(seconds: float, unit: str) -> str:
    value = seconds / {"s": 1, "min": 60, "h": 3600}[unit]
    return f"{value:.0f}" if unit == "s" or value >= 10 or value == round(value) else f"{value:.1f}"


def format_span(low: float, high: float) -> str:
    """A range of seconds for people: ``"40–55 s"``, ``"2–3 min"``, ``"1.5–2 h"`` (one unit, the high end's).

    Raises:
        ValueError: ``low`` or ``high`` negative or not finite, or ``low > high``.
    """
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or low > high:
        raise ValueError(f"format_span needs 0 <= low <= high, both finite; got low={low!r}, high={high!r}. "
                         "Fix: pass the range of an Eta.")
    unit = "s" if high < 90 else "min" if high < 5400 else "h"
    if unit == "min":  # whole minutes, rounded outwards: a range that contains the estimate
        lo, hi = math.floor(low / 60), max(1, math.ceil(high / 60))
        return f"{hi} min" if lo == hi else f"{lo}–{hi} min"
    a, b = _fmt(low, unit), _fmt(high, unit)
    return f"{b} {unit}" if a == b else f"{a}–{b} {unit}"


@dataclass(frozen=True)
class Eta:
    """Seconds left, as a range measured from the work already done.

    Attributes:
        low: the fewest seconds left (the fastest recent rate; a fit that stops early at its first chance).
        high: the most seconds left (the slowest recent rate; the full schedule).
    """

    low: float
    high: float

    def __add__(self, other: "Eta") -> "Eta":
        return Eta(self.low + other.low, self.high + other.high)

    def span(self) -> str:
        """The range for people, e.g. ``"2–3 min"`` (:func:`format_span`)."""
        return format_span(self.low, self.high)

    def text(self) -> str:
        """One phrase: ``"about 2–3 min left"``."""
        return f"about {self.span()} left"


@dataclass(frozen=True)
class PipelineProgress:
    """What a pipeline progress callback receives.

    Attributes:
        stage: ``"extract"``, ``"fit A_to_B"``, ``"seed 1 A_to_B"``, ``"baseline random_b A_to_B"``, ``"done"``
            (the names of :func:`kcore.pipeline.pipeline_stages`).
        fraction: of this stage, in [0, 1]: a fit's steps done over steps planned, the images extracted over all.
        message: one line for people; it starts with "stage i of n" when there is more than one stage.
        index, count: this is stage ``index`` (from 1) of ``count`` (0: not said).
        eta: the time left in this stage (None until it is measured).
        eta_total: the time left in the whole run (None until every stage left can be bounded).
    """

    stage: str
    fraction: float
    message: str = ""
    index: int = 0
    count: int = 0
    eta: Eta | None = None
    eta_total: Eta | None = None


def eta_range(reports: Sequence[tuple[float, int]], total_steps: int, *, stop_step: int = 0,
              tail: tuple[float, float] = (0.0, 0.0), window: int = ETA_WINDOW) -> Eta | None:
    """The time left in a fit, as a range, from its reports so far.

    The rate (seconds per step) is measured on each of the last ``window`` intervals between two reports (a report
    follows each monitor measurement, so its cost is in the rate); the range runs from the fastest to the slowest.

    Args:
        reports: ``(elapsed seconds, steps done)`` of each report so far, in order.
        total_steps: the steps planned (the most that run).
        stop_step: the earliest step at which early stopping may end the fit (0: none known); the low end assumes
            it stops there.
        tail: ``(low, high)`` seconds of the work after training (calibration, held-out evaluation).
        window: how many of the last intervals the rate is measured on.

    Returns:
        An :class:`Eta`, or None before two reports with different step counts (no rate measured yet).

    Raises:
        ValueError: ``window`` below 1.
    """
    if window < 1:
        raise ValueError(f"eta_range: window must be >= 1; got {window!r}. Fix: measure on at least one interval.")
    rates = [(e1 - e0) / (s1 - s0) for (e0, s0), (e1, s1) in zip(reports, reports[1:]) if s1 > s0][-window:]
    if not rates:
        return None
    step = reports[-1][1]
    left = max(0, total_steps - step)
    left_low = min(left, max(0, stop_step - step)) if stop_step > 0 else left
    return Eta(left_low * max(0.0, min(rates)) + tail[0], left * max(0.0, max(rates)) + tail[1])


@dataclass
class _FitRun:
    """What a stage clock knows of one finished fit: its seconds, the training's share and its steps."""

    seconds: float
    tail: float
    steps_run: int
    steps_planned: int
    tail_exact: bool = True

    @property
    def full(self) -> float:
        """Its seconds had it run every planned step (the training part scaled)."""
        train = self.seconds - self.tail
        return self.tail + train * (self.steps_planned / self.steps_run if self.steps_run else 1.0)


class StageClock:
    """Reports a run's stages as :class:`PipelineProgress`: stage i of n, the stage's fraction and ETA, the run's ETA.

    Args:
        stages: every stage of the run, in order (:func:`kcore.pipeline.pipeline_stages`).
        report: the caller's callback.
        extract_seconds: how long the first extraction took, when this clock starts after it (bounds the random
            network's extraction).
    """

    def __init__(self, stages: Sequence[str], report: Callable[[PipelineProgress], None] | None, *,
                 extract_seconds: float | None = None) -> None:
        self.stages, self._report = tuple(stages), report or (lambda p: None)
        self.fits: list[_FitRun] = []
        self.extract_seconds = extract_seconds

    def add_fit(self, seconds: float, tail: float, steps_run: int | None, steps_planned: int | None, *,
                tail_exact: bool = True) -> None:
        """Record a finished fit (its duration bounds the fit stages still to come).

        Args:
            seconds: how long it took in all.
            tail: the seconds after its training (``tail_exact=False``: an upper bound of them, e.g. all but the
                training rounds).
            steps_run, steps_planned: its optimiser steps (None: not known).
        """
        run = steps_run or 0
        self.fits.append(_FitRun(float(seconds), max(0.0, float(tail)), run, steps_planned or run, tail_exact))

    def _later(self, stage: str) -> Eta | None:
        """The range of the stages after ``stage``; None when one of them cannot be bounded yet."""
        rest = self.stages[self.stages.index(stage) + 1:] if stage in self.stages else ()
        if not rest:
            return Eta(0.0, 0.0)
        if not self.fits:
            return None
        low, high = min(f.seconds for f in self.fits), max(f.full for f in self.fits)
        total = Eta(low * len(rest), high * len(rest))
        if any(s.startswith("baseline random_b") for s in rest) and not stage.startswith("baseline random_b"):
            if self.extract_seconds is None:
                return None
            total = total + Eta(0.0, 2.0 * self.extract_seconds)  # B's features, twice: as A and as B
        return total

    def tell(self, stage: str, fraction: float, message: str, eta: Eta | None = None) -> None:
        """Report ``stage`` at ``fraction`` of itself with ``message`` (and its own ETA, if measured)."""
        if stage == "done":
            self._report(PipelineProgress("done", 1.0, message, len(self.stages), len(self.stages), Eta(0, 0),
                                          Eta(0, 0)))
            return
        i = self.stages.index(stage) + 1 if stage in self.stages else 0
        later = self._later(stage)
        total = eta + later if eta is not None and later is not None else None
        head = f"stage {i} of {len(self.stages)} · " if len(self.stages) > 1 and i else ""
        self._report(PipelineProgress(stage, max(0.0, min(1.0, float(fraction))), head + message, i,
                                      len(self.stages), eta, total))

    def fit_progress(self, stage: str, describe: Callable[[Any, Eta | None], str]) -> Callable[[Any], None]:
        """A :func:`kcore.fit` progress callback for ``stage``: measures the fit's rate, reports each step, and
        records the fit when it is done.

        Args:
            stage: the stage the fit is.
            describe: ``(FitProgress, Eta or None) -> message``.
        """
        seen: list[tuple[float, int]] = []
        marks: dict[str, float] = {}
        planned = [0]

        def on_fit(p: Any) -> None:
            marks.setdefault(p.phase, float(p.elapsed))
            eta = None
            planned[0] = int(getattr(p, "steps", 0) or planned[0])
            if p.phase == "train":
                seen.append((float(p.elapsed), int(p.step)))
                eta = eta_range(seen, int(p.steps), stop_step=int(getattr(p, "stop_step", 0) or 0),
                                tail=self._tail(seen, marks))
            elif p.phase in ("calibrate", "evaluate"):
                tail = self._tail(seen, marks)
                spent = float(p.elapsed) - marks.get("calibrate", float(p.elapsed))
                eta = Eta(max(0.0, tail[0] - spent), max(0.0, tail[1] - spent))
            elif p.phase == "done":
                train_end = marks.get("calibrate", float(p.elapsed))
                self.add_fit(p.elapsed, float(p.elapsed) - train_end, seen[-1][1] if seen else 0, planned[0])
                eta = Eta(0.0, 0.0)
            self.tell(stage, p.fraction, describe(p, eta), eta)

        return on_fit

    def _tail(self, seen: Sequence[tuple[float, int]], marks: dict[str, float]) -> tuple[float, float]:
        """The range of a fit's work after training: as measured on finished fits, else up to twice its set-up."""
        if self.fits:
            low = min(f.tail for f in self.fits) if all(f.tail_exact for f in self.fits) else 0.0
            return low, max(f.tail for f in self.fits)
        if len(seen) >= 2:  # set-up = the first report's time less its steps at the measured rate
            rate = (seen[-1][0] - seen[0][0]) / max(seen[-1][1] - seen[0][1], 1)
            setup = max(0.0, seen[0][0] - marks.get("init", 0.0) - seen[0][1] * rate)
            return 0.0, 2.0 * setup
        return 0.0, 0.0
