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
import dataclasses
import datetime as _dt
import math
import os
import secrets
import sys
from collections.abc import Mapping, Sequence
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
        shown_default: for an option whose parser default is None, the value the study then uses (None when it
            follows another option, or is unknown).
        follows: the option whose value this one takes when left out (``teacher_epochs`` follows ``epochs``).
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
    shown_default: Any = None
    follows: str | None = None

    @property
    def effective_default(self) -> Any:
        """The value the study uses when the option is left out: ``default``, or for an option whose parser
        default is None the value the study then takes (λ: the fit preset's; lr: the architecture's recipe)."""
        return self.default if self.default is not None else self.shown_default


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
            shown, follows = _none_default(a.dest) if a.default is None else (None, None)
            found.append(StudyOption(a.dest, flag, "int" if a.type is int else "float", a.default, (), help_,
                                     getattr(caps, cap), cap, ENV_VARS[cap], shown, follows))
        # anything else (a path, a checkpoint, a free string, a list, a number without a cap) is not offered
    return tuple(found)


FOLLOWS: dict[str, str] = {"teacher_epochs": "epochs"}
"""Options whose value, when left out, is another option's (distillation's teacher trains for the students' epochs)."""


def _none_default(name: str) -> tuple[Any, str | None]:
    """For an option whose parser default is None: the value the study then uses, and the option it follows."""
    if name in FOLLOWS:
        return None, FOLLOWS[name]
    if name == "lam":  # the fit's own default (the studies' fit settings leave λ to kcore.fit)
        from kcore.fit import FitConfig

        return FitConfig().lam, None
    if name == "lr":  # the family's recipe for its architecture (the page cannot change the architecture)
        from kcore.experiments.families import DEFAULT_RECIPE, RECIPES

        return RECIPES.get("kc_resnet", DEFAULT_RECIPE)[1], None
    return None, None


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


# ------------------------------------------------------------------------------------- expected run time
PROBE_IMAGES = 64
"""Images of the timed probe (:func:`probe_unit_costs`): training steps of a classifier and of g_θ on this many."""
PROBE_RANGE = (0.4, 2.5)
"""Without a finished run of the study on this server, the estimate's range is this factor around the probe's: the
measured time over the probe's estimate was 0.49–1.9 for four quick studies on a loaded 2-core machine
(docs/dashboard.md, "Paper studies")."""
HISTORY_SPREAD = (0.8, 1.25)
"""With finished runs, the range spans their seconds-per-planned-second ratios, widened by this factor."""


@dataclass(frozen=True)
class StudyPlan:
    """The work a study does at given settings, counted from its options (no constant time per study).

    Attributes:
        study: the study's name.
        trainings: networks or classifier arms trained.
        train_units: image-epochs of those trainings, in 32 × 32-pixel images through a whole kc_resnet (a 64-px
            image counts 4; an arm that trains only the layers above a feature map counts 1 per image).
        fits: g_θ fits.
        fit_units: image-epochs of those fits.
    """

    study: str
    trainings: int
    train_units: float
    fits: int
    fit_units: float

    def describe(self) -> str:
        """One line, e.g. ``'3 networks trained (30,000 image-epochs) and 18 g_θ fits (135,000 image-epochs)'``."""
        return (f"{self.trainings} network(s) or classifier(s) trained ({self.train_units:,.0f} image-epochs) and "
                f"{self.fits} g_θ fit(s) ({self.fit_units:,.0f} image-epochs)")


def _effective(study: str, values: Mapping[str, object]) -> dict[str, Any]:
    """``values`` over the study's defaults (a ``None`` value keeps the default)."""
    out: dict[str, Any] = {o.name: o.default for o in study_options(study)}
    out.update({k: v for k, v in values.items() if v is not None})
    return out


NESTED_FIT_COST = 1.5
"""With ``--nested``, each g_θ fit counts this many times its image-epochs: nested fits g₀ … g_K cost 1.3–1.8× the
training FLOPs of one fit on the sample pair (docs/nested_fits.md, ``python -m bench.nested``)."""


def study_plan(study: str, values: Mapping[str, object] | None = None) -> StudyPlan:
    """What ``kcore <study>`` will train and fit with ``values`` (option name → value; missing: the defaults).

    The counts follow each study's design: diagnosis trains 4 classifier arms per repeat and fits g_θ both ways on
    its training images (an arm trains the layers above the feature only); stability trains a family of 3 networks (2 with ``halves``) and fits every pair at the 3
    stages of kc_resnet, both ways unless ``one_direction``; refinement trains K + 3 arms after one fit;
    compression prunes at 6 ratios (fine-tuning and one fit each); distillation trains a teacher and
    ``generations`` students, then fits each earlier generation to the newest; cross-task trains two networks and
    fits both ways.
    With ``nested`` (a study's ``--nested``), the fits' image-epochs count :data:`NESTED_FIT_COST` times.

    Raises:
        ValueError: an unknown study.
    """
    v = _effective(study, values or {})
    plan = _plan(study, v)
    if v.get("nested") is True:
        plan = dataclasses.replace(plan, fit_units=plan.fit_units * NESTED_FIT_COST)
    return plan


def _plan(study: str, v: dict[str, Any]) -> StudyPlan:
    """:func:`study_plan` before the cost of nested fits."""

    def num(name: str, default: float = 0) -> float:
        x = v.get(name)
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float(default)

    n_train, epochs, fit_epochs, n_images = num("n_train"), num("epochs"), num("fit_epochs"), num("n_images")
    px = (num("image_size", 64) / 32.0) ** 2  # studies without image_size run the 64-px sample models
    if study == "diagnosis":
        arms = 4 * max(num("repeats", 1), 1)  # upper layers on fixed features: one unit per image-epoch
        return StudyPlan(study, int(arms), arms * epochs * n_train, 2, 2 * fit_epochs * n_train)
    if study == "stability":
        nets = 2 if v.get("halves") else 3
        per_net = n_train / 2 if v.get("halves") else n_train
        fits = nets * (nets - 1) // 2 * 3 * (1 if v.get("one_direction") else 2)
        return StudyPlan(study, nets, nets * epochs * per_net * px, fits, fits * fit_epochs * n_images)
    if study == "refinement":
        arms = int(num("orders", 2)) + 3  # upper layers on fixed features: one unit per image-epoch
        return StudyPlan(study, arms, arms * epochs * n_train, 1, fit_epochs * n_train)
    if study == "compression":
        ratios = 6
        return StudyPlan(study, ratios, ratios * num("finetune_epochs") * n_train * px, ratios,
                         ratios * fit_epochs * n_images)
    if study == "distillation":
        gens = max(int(num("generations", 1)), 1)
        teacher = num("teacher_epochs", epochs) or epochs
        return StudyPlan(study, gens + 1, (teacher + gens * epochs) * n_train * px, gens,
                         gens * fit_epochs * n_images)
    if study == "cross_task":
        return StudyPlan(study, 2, 2 * epochs * n_train * px, 2, 2 * fit_epochs * n_images)
    from kcore.experiments import STUDIES

    raise ValueError(f"study must be one of {list(STUDIES)}; got {study!r}.")


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per image-epoch on this machine, measured by :func:`probe_unit_costs`.

    Attributes:
        train: a training step of a kc_resnet classifier, per 32 × 32 image.
        fit: a training step of g_θ (K = 2, 32 → 32 channels of 16 × 16), per image.
    """

    train: float
    fit: float

    def seconds(self, plan: StudyPlan) -> float:
        """The plan's time at these costs (before any calibration against finished runs)."""
        return self.train * plan.train_units + self.fit * plan.fit_units


def probe_unit_costs(n: int = PROBE_IMAGES, batch: int = 32) -> UnitCosts:
    """Time training steps of a small classifier and of g_θ on ``n`` random images, on the CPU, now.

    One batch of each warms up first (not timed). A fraction of a second on an idle 2-core machine; a loaded
    machine gives higher costs, as a study started now would meet.

    Returns:
        :class:`UnitCosts` (every cost > 0).
    """
    import time

    import torch

    from kcore.gtheta import GTheta, GThetaSpec, gtheta_loss
    from kcore.zoo import kc_resnet

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net, g = kc_resnet(10), GTheta(GThetaSpec(32, 32, orders=2))
    x, y = torch.rand(batch, 3, 32, 32, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    xs, xt = torch.randn(batch, 32, 16, 16, generator=gen), torch.randn(batch, 32, 16, 16, generator=gen)

    def timed(step) -> float:
        step()  # warm-up
        t0 = time.perf_counter()
        for _ in range(max(n // batch, 1)):
            step()
        return (time.perf_counter() - t0) / (max(n // batch, 1) * batch)

    opt_net, opt_g = torch.optim.SGD(net.parameters(), lr=0.01), torch.optim.Adam(g.parameters(), lr=1e-3)

    def train_step() -> None:
        opt_net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt_net.step()

    def fit_step() -> None:
        opt_g.zero_grad()
        gtheta_loss(g(xs), xt, g.gates(), 0.1)[0].backward()
        opt_g.step()

    return UnitCosts(max(timed(train_step), 1e-9), max(timed(fit_step), 1e-9))


@dataclass(frozen=True)
class TimeEstimate:
    """How long a study is expected to take: ``seconds`` within ``[low, high]``, and what it rests on."""

    seconds: float
    low: float
    high: float
    basis: str


def estimate_time(plan: StudyPlan, costs: UnitCosts,
                  history: Sequence[tuple[StudyPlan, float]] = ()) -> TimeEstimate:
    """The expected run time of ``plan``: its work at the probe's ``costs``, scaled by how long finished runs of
    the same study took against their own plans.

    Args:
        plan: the study's plan at the chosen settings (:func:`study_plan`).
        costs: this machine's costs (:func:`probe_unit_costs`).
        history: finished runs on this server as (their plan, seconds taken); only those of ``plan.study`` count.

    Returns:
        A :class:`TimeEstimate` that grows with every image-epoch of the plan.
    """
    base = costs.seconds(plan)
    ratios = sorted(sec / costs.seconds(p) for p, sec in history
                    if p.study == plan.study and sec > 0 and costs.seconds(p) > 0)
    if not ratios:
        return TimeEstimate(base, base * PROBE_RANGE[0], base * PROBE_RANGE[1],
                            "a timed probe on this server (no finished run of this study here yet)")
    mid = ratios[len(ratios) // 2]
    return TimeEstimate(base * mid, base * ratios[0] * HISTORY_SPREAD[0], base * ratios[-1] * HISTORY_SPREAD[1],
                        f"a timed probe scaled by {len(ratios)} finished run(s) of this study on this server")
