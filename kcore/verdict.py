"""A verdict against chance: is a direction's instability below what a network that learned nothing gives?

The held-out instability's 95 % bootstrap interval is compared with the intervals of the chance baselines
(:mod:`kcore.baselines`) of the same direction. Intervals, not point values: two numbers whose intervals overlap
cannot be told apart on these images.

- ``beyond_chance``: the interval lies strictly below the ``random_b`` and the ``shuffled`` intervals.
- ``like_random_b``: it overlaps the random-init B's interval (checked first: the stronger reference).
- ``like_shuffled``: it overlaps the shuffled-pairing interval.
- ``worse_than_chance``: it lies entirely above a baseline's interval.
- ``unknown``: no baseline, a baseline missing, or no intervals; the text says how to get a verdict.

Separately, ``overfit`` is True when the shuffled baseline's interval lies entirely above 1: with mismatched
images g_θ should predict no more than the per-channel statistics (instability about 1 or a little below), so an
interval above 1 means g_θ learned the training images by heart; the verdict then carries that warning and its fix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

VerdictCode = Literal["beyond_chance", "like_random_b", "like_shuffled", "worse_than_chance", "unknown"]
VERDICT_CODES: tuple[str, ...] = ("beyond_chance", "like_random_b", "like_shuffled", "worse_than_chance", "unknown")
#: the baselines a "beyond chance" verdict needs, in the order they are checked
REQUIRED_BASELINES: tuple[str, ...] = ("random_b", "shuffled")
_NAMES = {"random_b": "a random-init B", "shuffled": "shuffled image pairing"}
_SHORT = {"random_b": "random-init B", "shuffled": "shuffled pairing"}
_HEADLINES = {"beyond_chance": "consistent beyond chance", "like_random_b": "indistinguishable from chance",
              "like_shuffled": "indistinguishable from chance", "worse_than_chance": "worse than chance",
              "unknown": "no verdict against chance"}
OVERFIT_FIX = ("Fix: give the fit more images, fewer orders (--orders), or a smaller kernel "
               "(FitConfig.kernel_size in the API).")
BASELINES_FIX = "Fix: re-run the fit with --baselines (CLI) or the 'chance baselines' box (dashboard)."


@dataclass(frozen=True)
class ChanceVerdict:
    """A direction's instability judged against its chance baselines.

    Attributes:
        code: one of :data:`VERDICT_CODES`.
        text: one sentence for people, with the intervals it rests on.
        fix: what to do to reach or trust a verdict, or ``None`` when nothing is needed.
        overfit: whether the shuffled baseline's interval lies entirely above 1 (g_θ over-fits).
        warnings: further findings in sentences (the over-fit warning with its fix).
    """

    code: VerdictCode
    text: str
    fix: str | None = None
    overfit: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def headline(self) -> str:
        """A few words for figure titles and captions, e.g. "indistinguishable from chance (random-init B)"."""
        head = _HEADLINES[self.code] + (f" ({_SHORT[self.kind]})" if self.kind in _SHORT else "")
        return head + ("; too few images: g over-fits (shuffled baseline > 1)" if self.overfit else "")

    @property
    def kind(self) -> str | None:
        """The baseline the instability cannot be told from (``random_b`` or ``shuffled``), else None."""
        return {"like_random_b": "random_b", "like_shuffled": "shuffled"}.get(self.code)

    @property
    def beyond_chance(self) -> bool:
        """Whether the instability is below both chance baselines."""
        return self.code == "beyond_chance"

    def as_dict(self) -> dict[str, Any]:
        """The metrics.json form: code, text, fix, overfit and warnings (a list)."""
        return {"code": self.code, "text": self.text, "fix": self.fix, "overfit": self.overfit,
                "warnings": list(self.warnings)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "ChanceVerdict":
        """The verdict from its :meth:`as_dict` form.

        Raises:
            ValueError: ``d['code']`` is not one of :data:`VERDICT_CODES`.
        """
        code = d.get("code")
        if code not in VERDICT_CODES:
            raise ValueError(f"verdict code must be one of {list(VERDICT_CODES)}; got {code!r}. "
                             "Fix: re-open the run folder as written by kcore, or delete the 'verdict' block "
                             "(it is recomputed from the baselines).")
        return ChanceVerdict(code=code, text=str(d.get("text", "")), fix=d.get("fix"),
                             overfit=bool(d.get("overfit", False)), warnings=tuple(d.get("warnings") or ()))


Interval = tuple[float, float]


def _fmt(iv: Interval) -> str:
    return f"[{iv[0]:.4f}, {iv[1]:.4f}]"


def _check_interval(name: str, iv: Any) -> Interval | None:
    if iv is None:
        return None
    try:
        lo, hi = (float(v) for v in iv)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (low, high) pair of numbers or None; got {iv!r}. "
                        "Fix: pass report.interval('instability').") from None
    if not lo <= hi:
        raise ValueError(f"{name} must have low <= high (and no NaN); got ({lo}, {hi}). "
                         "Fix: pass the bootstrap interval as (low, high).")
    return lo, hi


def verdict_from_intervals(instability: Any, baselines: Mapping[str, Any]) -> ChanceVerdict:
    """The verdict from the instability's interval and each baseline's interval (the pure core).

    Args:
        instability: the direction's held-out instability interval (low, high), or None without intervals.
        baselines: baseline kind (``random_b``, ``shuffled``, or another) → its instability interval or None.

    Returns:
        The :class:`ChanceVerdict`.

    Raises:
        TypeError: an interval is not a pair of numbers. ValueError: an interval has low > high or NaN.
    """
    iv = _check_interval("instability", instability)
    refs = {k: _check_interval(f"baselines[{k!r}]", v) for k, v in baselines.items()}
    warnings: tuple[str, ...] = ()
    sh = refs.get("shuffled")
    overfit = sh is not None and sh[0] > 1.0
    if overfit:
        warnings = (f"Too few images: g over-fits (shuffled pairing > 1): the shuffled baseline's interval {_fmt(sh)} "
                    "lies above 1, "
                    f"so g_θ learned the training images rather than a relation. {OVERFIT_FIX}",)

    def done(code: VerdictCode, text: str, fix: str | None = None) -> ChanceVerdict:
        return ChanceVerdict(code, text, fix, overfit, warnings)

    if not refs:
        return done("unknown", "No chance baseline was run: the instability cannot be judged against chance.",
                    BASELINES_FIX)
    if iv is None:
        return done("unknown", "The instability has no bootstrap interval: it cannot be judged against chance.",
                    "Fix: re-run the fit with bootstrap intervals on (the default presets compute them).")
    without = [k for k, v in refs.items() if v is None]
    if without:
        return done("unknown", f"The {', '.join(without)} baseline has no bootstrap interval: the instability "
                               "cannot be judged against it.", BASELINES_FIX)
    for kind in REQUIRED_BASELINES + tuple(k for k in refs if k not in REQUIRED_BASELINES):
        ref = refs.get(kind)
        if ref is not None and iv[0] <= ref[1] and ref[0] <= iv[1]:
            code: VerdictCode = "like_random_b" if kind == "random_b" else "like_shuffled"
            fix = OVERFIT_FIX if overfit and kind == "shuffled" else None
            return done(code, f"Indistinguishable from chance ({_NAMES.get(kind, kind)}): the instability's "
                              f"interval {_fmt(iv)} overlaps the baseline's {_fmt(ref)}.", fix)
    above = [k for k, v in refs.items() if iv[0] > v[1]]
    if above:
        return done("worse_than_chance", f"Worse than chance: the instability's interval {_fmt(iv)} lies above "
                    + ", ".join(f"{_NAMES.get(k, k)}'s {_fmt(refs[k])}" for k in above) + ".",
                    "Fix: check the layers and the images (is this the intended pair?).")
    missing = [k for k in REQUIRED_BASELINES if k not in refs]
    if missing:
        return done("unknown", f"Below the {', '.join(refs)} baseline, but the {', '.join(missing)} baseline "
                               "was not run: 'beyond chance' needs both.", BASELINES_FIX)
    return done("beyond_chance", f"Consistent beyond chance: the instability's interval {_fmt(iv)} lies below "
                + " and ".join(f"{_NAMES.get(k, k)}'s {_fmt(refs[k])}" for k in refs) + ".")


def chance_verdict(report: Any, baselines: Mapping[str, Any], direction: str) -> ChanceVerdict:
    """The verdict of one direction from its held-out report and the comparison's chance baselines.

    Args:
        report: the direction's held-out :class:`~kcore.metrics.VarianceReport`.
        baselines: kind → :class:`~kcore.baselines.ChanceBaseline` (``Comparison.baselines``).
        direction: ``"A_to_B"`` or ``"B_to_A"``; baselines without a report for it are left out.

    Returns:
        The :class:`ChanceVerdict` (``code="unknown"`` when no baseline covers the direction).
    """
    refs = {kind: ref.reports[direction].interval("instability")
            for kind, ref in baselines.items() if direction in ref.reports}
    return verdict_from_intervals(report.interval("instability"), refs)
