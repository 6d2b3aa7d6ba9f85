"""Reproduce a result: the exact ``kcore fit`` command and the Python snippet that recompute a run from its files.

:func:`kcore.pipeline.compare` records what it was asked for under ``provenance["request"]``
(:func:`fit_request`: where each checkpoint and the images came from, the architecture and class count each model
was built with, its default preprocessing, both directions, the chance baselines, the extra fit seeds, the device,
the extraction batch and the feature cache). :func:`reproduce` turns that record, with the fit's config, preset,
layers and preprocessing, into a :class:`Reproduction`: a command line (every value shell-quoted, so it runs as
is), a Python snippet through the public API (``kcore.load_model``, ``kcore.compare``, ``kcore.write_run``), and
notes for what a command cannot say by itself (an uploaded file has no path on the server: the command names it
by its original name, and the note gives its SHA-256).

:func:`kcore.run_folder.write_run` writes the result into every run folder's ``provenance.json`` under
``reproduce``, and :mod:`kcore.export` into every export's provenance and manifest.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPRODUCE_KEY = "reproduce"
"""The key of a run's provenance that holds :meth:`Reproduction.as_dict`."""
REQUEST_KEY = "request"
"""The key of a run's provenance that holds :func:`fit_request`'s record."""
DEFAULT_OUT = "runs/reproduced"
"""The output folder the command and the snippet name when no other is asked for."""
CLI_BATCH_SIZE = 64
"""``kcore fit --batch-size``'s default (images per extraction batch)."""
CLI_ORDERS = 2
"""``kcore fit --orders``'s default."""
CLI_N_BUNDLED = 400
"""Images ``kcore fit --data kshapes`` takes without ``--n-images``."""
PICKLE_KINDS = frozenset({"torchscript", "pickle", "module"})
"""Checkpoint kinds that load only with ``--trust-pickle``."""
UPLOADED_IMAGES = "./uploaded_images"
"""Where the command expects the images of an upload (a browser upload has no path on the server)."""


@dataclass(frozen=True)
class Reproduction:
    """How to recompute a run.

    Attributes:
        cli: one ``kcore fit …`` command line, every value shell-quoted (``shlex.split`` gives its arguments).
        python: a Python snippet through kcore's public API that recomputes it and writes a run folder.
        notes: what to do first or what the command cannot say (uploaded files, settings only Python can set).
        exact: whether the command alone recomputes the run (False when a note says the command differs).
    """

    cli: str
    python: str
    notes: tuple[str, ...] = ()
    exact: bool = True

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``cli``, ``python``, ``notes`` and ``exact``."""
        return {"cli": self.cli, "python": self.python, "notes": list(self.notes), "exact": self.exact}

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Reproduction:
        """The reproduction stored by :meth:`as_dict` (e.g. in a run folder's ``provenance.json``).

        Raises:
            ValueError: ``data`` lacks a string ``cli`` or ``python``.
        """
        cli, python = data.get("cli"), data.get("python")
        if not isinstance(cli, str) or not isinstance(python, str):
            raise ValueError(f"reproduce must hold the strings 'cli' and 'python'; got {sorted(data)!r}. "
                             "Fix: recompute it with kcore.reproduce.reproduce(provenance).")
        notes = data.get("notes") or ()
        return Reproduction(cli, python, tuple(str(n) for n in notes if isinstance(n, str)),
                            bool(data.get("exact", True)))


# ------------------------------------------------------------------------------------------ the record
def _card_beside(path: str | None) -> bool:
    if not path:
        return False
    from kcore.cards import card_path_for

    try:
        return card_path_for(path).is_file()
    except (OSError, ValueError):
        return False


def model_request(m: Any, path: str | None) -> dict[str, Any]:
    """What identifies one loaded model for a rerun: its file, how it was built, its default preprocessing.

    Args:
        m: a :class:`kcore.checkpoints.LoadedModel`.
        path: the file it was read from (None for an upload).

    Returns:
        ``path`` (absolute, or None), ``name``, ``sha256``, ``kind``, ``arch``, ``num_classes``, ``card``
        (``"beside"`` the file, ``"given"`` without a file next to it, or None), ``card_arch``,
        ``card_num_classes`` and ``default_preprocessing`` (what loading the file alone gives, without overrides).
    """
    from kcore.preprocessing import resolve_preprocessing

    card = getattr(m, "card", None)
    beside = _card_beside(path)
    arch = getattr(m, "architecture", None)
    default = resolve_preprocessing(card if beside else None, arch)
    return {
        "path": str(Path(path).resolve()) if path else None, "name": m.name, "sha256": m.sha256, "kind": m.kind,
        "arch": arch, "num_classes": getattr(m, "num_classes", None),
        "card": None if card is None else ("beside" if beside else "given"),
        "card_arch": getattr(card, "architecture", None) if beside else None,
        "card_num_classes": getattr(card, "num_classes", None) if beside else None,
        "default_preprocessing": default.as_dict(),
    }


_KSHAPES = re.compile(r"(?P<version>kshapes-v\d+) seed=(?P<seed>\d+)(?: size=(?P<size>\d+))? (?P<split>train|test|val)")


def image_origin(images: Any) -> dict[str, Any]:
    """Where an image set came from, for a rerun: the bundled kshapes images, a folder, an upload or other.

    Args:
        images: the image set given to :func:`kcore.pipeline.compare` (a :class:`kcore.data.ImageSet` tells its
            source; any other dataset is ``"other"``).

    Returns:
        ``kind`` (``"kshapes"``, ``"folder"``, ``"upload"`` or ``"other"``), ``n``, ``load_size`` (H, W the images
        were loaded at, or None), ``source`` (in words) and, by kind, ``seed``/``split``/``image_size``, the
        absolute ``path`` of the folder, or the ``content_sha256`` of the uploaded images.
    """
    source = str(getattr(images, "source", "") or "")
    size = getattr(images, "size", None)
    out: dict[str, Any] = {"kind": "other", "n": len(images), "source": source,
                           "load_size": [int(size[0]), int(size[1])] if size is not None else None}
    m = _KSHAPES.fullmatch(source)
    if m:
        out.update(kind="kshapes", seed=int(m["seed"]), split=m["split"], image_size=int(m["size"] or 64))
    elif source.startswith("folder "):
        try:
            folder = ast.literal_eval(source[len("folder "):])
        except (ValueError, SyntaxError):
            folder = None
        if isinstance(folder, str):
            out.update(kind="folder", path=str(Path(folder).resolve()))
    elif source == "uploads":
        out["kind"] = "upload"
        digest = getattr(images, "content_hash", None)
        if callable(digest):
            out["content_sha256"] = digest()
    return out


def fit_request(a: Any, b: Any, images: Any, *, paths: Sequence[str | None] = (None, None), device: Any = "cpu",
                both_directions: bool = False, baselines: Sequence[str] = (), fit_seeds: int = 1,
                batch_size: int = CLI_BATCH_SIZE, cache_dir: Any = None, world_size: int = 1) -> dict[str, Any]:
    """The record :func:`kcore.pipeline.compare` keeps in ``provenance["request"]`` (see :func:`reproduce`).

    Args:
        a, b: the loaded models (:class:`kcore.checkpoints.LoadedModel`, with the preprocessing used).
        images: the image set (:func:`image_origin`).
        paths: the checkpoints' files (None for an upload).
        device: the device the run used.
        both_directions, baselines, fit_seeds, batch_size, cache_dir: as given to ``compare`` (``baselines``: the
            kinds asked for).
        world_size: processes of a torchrun job (1 for one process).

    Returns:
        A JSON-ready dict.
    """
    dev = str(device)
    return {
        "A": model_request(a, paths[0]), "B": model_request(b, paths[1]), "images": image_origin(images),
        "both_directions": bool(both_directions), "baselines": list(baselines), "fit_seeds": int(fit_seeds),
        "batch_size": int(batch_size), "device": dev.split(":")[0],
        "cache_dir": str(Path(cache_dir).resolve()) if cache_dir else None, "world_size": int(world_size),
    }


# ----------------------------------------------------------------------------------- the commands
def _q(value: Any) -> str:
    return shlex.quote(str(value))


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v)) if abs(v) < 1e15 else repr(float(v))


def _fit_flags(config: Mapping[str, Any], preset: str) -> tuple[list[str], dict[str, Any], dict[str, Any], list[str]]:
    """The ``kcore fit`` flags for ``config``, the ``make_config`` overrides they mean, the fields that differ from
    the preset, and notes (a field the command cannot set)."""
    from kcore.fit import PRESETS, FitConfig, make_config

    base = PRESETS[preset]
    known = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(config) - known)
    cfg = dataclasses.replace(base, **{k: v for k, v in config.items() if k in known})
    diff = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(FitConfig)
            if getattr(cfg, f.name) != getattr(base, f.name)}
    over: dict[str, Any] = {"orders": cfg.orders}
    flags: list[str] = []
    if cfg.orders != CLI_ORDERS:
        flags += ["--orders", str(cfg.orders)]
    if cfg.lam != base.lam:
        flags += ["--lambda", _num(cfg.lam)]
        over["lam"] = cfg.lam
    if cfg.convention != base.convention:
        flags += ["--convention", str(cfg.convention)]
        over["convention"] = cfg.convention
    if cfg.budget is not None:
        flags += ["--budget", _num(cfg.budget)]
        over["budget"] = cfg.budget
    if cfg.seed != 0:
        flags += ["--seed", str(cfg.seed)]
    over["seed"] = cfg.seed
    def misses(o: Mapping[str, Any]) -> int:
        made = make_config(preset, **o)
        return sum(getattr(made, f.name) != getattr(cfg, f.name) for f in dataclasses.fields(FitConfig))

    if cfg.epochs != make_config(preset, **over).epochs or misses({**over, "epochs": cfg.epochs}) < misses(over):
        flags += ["--epochs", str(cfg.epochs)]
        over["epochs"] = cfg.epochs
    for name, value in diff.items():  # any other fit setting the `kcore fit` parser takes under its own name
        action = _fit_parser_actions().get(name)
        if name in over or action is None or name in ("seed", "orders", "lam", "epochs", "budget", "convention"):
            continue
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag is None:
            continue
        if action.nargs == 0:  # a switch: only True can be said
            if value is True:
                flags.append(flag)
                over[name] = True
        elif action.nargs is None and not isinstance(value, (list, tuple, dict)):
            flags += [flag, _num(value) if isinstance(value, float) else str(value)]
            over[name] = value
    notes = []
    made = make_config(preset, **over)
    if made != cfg:
        missing = sorted(f.name for f in dataclasses.fields(FitConfig) if getattr(made, f.name) != getattr(cfg, f.name))
        notes.append(f"the fit settings {missing} have no `kcore fit` flag: the command runs the {preset!r} "
                     "preset's values; the Python snippet sets them exactly.")
    if unknown:
        notes.append(f"the run's config has fields this kcore does not know ({unknown}): it was made by another "
                     "version; neither the command nor the snippet sets them.")
    return flags, over, diff, notes


@functools.lru_cache(maxsize=1)
def _fit_parser_actions() -> dict[str, Any]:
    """The options of ``kcore fit``'s parser by their destination name (empty if the parser cannot be built)."""
    import argparse

    try:
        from kcore.cli import build_parser

        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return {a.dest: a for a in sub.choices["fit"]._actions if a.option_strings}
    except (ImportError, AttributeError, StopIteration, KeyError):  # then only the flags named here are used
        return {}


def _prep_flags(which: str, actual: Mapping[str, Any] | None, default: Mapping[str, Any] | None
                ) -> tuple[list[str], bool, list[str]]:
    """Flags ``--input-size-x/--mean-x/--std-x`` for the fields of ``actual`` that differ from ``default``; whether
    the preprocessing differs at all; notes."""
    if not actual or default is None:
        return [], False, []
    w = which.lower()
    flags: list[str] = []
    for key, flag in (("input_size", f"--input-size-{w}"), ("mean", f"--mean-{w}"), ("std", f"--std-{w}")):
        if actual.get(key) is not None and list(actual.get(key)) != list(default.get(key) or []):
            flags += [flag, *(_num(v) for v in actual[key])]
    fields = ("input_size", "mean", "std", "resize_size")
    differs = any(actual.get(k) != default.get(k) for k in fields)
    notes = []
    if differs:
        from kcore.preprocessing import Preprocessing

        def prep(d: Mapping[str, Any]) -> Preprocessing:
            return Preprocessing(tuple(d["input_size"]) if d.get("input_size") else None,
                                 tuple(d["mean"]) if d.get("mean") else None, tuple(d["std"]) if d.get("std") else None,
                                 d.get("resize_size"))

        try:
            given = {k: tuple(actual[k]) for k in ("input_size", "mean", "std")
                     if actual.get(k) is not None and list(actual[k]) != list(default.get(k) or [])}
            via_flags = prep(default).with_overrides(**given)
            ok = all(getattr(via_flags, k) == getattr(prep(actual), k) for k in fields)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            notes.append(f"{which}'s preprocessing ({_prep_words(actual)}) cannot be given exactly by "
                         f"--input-size-{w}/--mean-{w}/--std-{w} (the resize before the centre crop has no flag): "
                         "the Python snippet sets it exactly.")
    return flags, differs, notes


def _prep_words(p: Mapping[str, Any]) -> str:
    size = "x".join(str(v) for v in p.get("input_size") or []) or "as loaded"
    return f"input {size}, resize {p.get('resize_size')}, mean {p.get('mean')}, std {p.get('std')}"


def _model_flags(which: str, req: Mapping[str, Any], layer: str, notes: list[str]) -> tuple[list[str], str]:
    """The checkpoint flags of model ``which`` and the file name the command uses for it."""
    w = which.lower()
    path = req.get("path")
    if path:
        where = path
    else:
        name = Path(str(req.get("name") or f"model_{w}")).name or f"model_{w}"
        where = f"./{name}"
        notes.append(f"{which}: {where} stands for the uploaded file {name!r} (sha256 {req.get('sha256')}), which has "
                     "no path on the server (an upload, or a model loaded from bytes in Python): save it there first "
                     f"(`sha256sum {_q(where)}` must print that hash)"
                     + (" with its model card beside it." if req.get("card") else "."))
    flags = [f"--{w}", where, f"--layer-{w}", layer]
    kind = req.get("kind")
    arch = req.get("arch")
    if arch and kind in ("state_dict", "safetensors") and req.get("card_arch") != arch:
        flags += [f"--arch-{w}", str(arch)]
        if req.get("num_classes") and req.get("card_num_classes") != req.get("num_classes"):
            flags += [f"--num-classes-{w}", str(req["num_classes"])]
    return flags, where


def reproduce(provenance: Mapping[str, Any], *, out: str | Path = DEFAULT_OUT,
              directions: Sequence[str] | None = None, baselines: Sequence[str] | None = None,
              fit_seeds: int | None = None) -> Reproduction:
    """The ``kcore fit`` command and the Python snippet that recompute the run of ``provenance``.

    Args:
        provenance: a run's provenance (``Comparison.provenance`` or a run folder's ``provenance.json``) with the
            ``request`` record of :func:`fit_request`; without it (a folder written before kcore kept it) the
            command is rebuilt from the checkpoints' paths and the image source, and a note says what is guessed.
        out: the output folder the command and the snippet write.
        directions: the run's directions (``["A_to_B", "B_to_A"]`` adds ``--both-directions``); default: the
            record's.
        baselines: chance baselines to include besides the record's (e.g. those added to the run later).
        fit_seeds: fits per direction; default: the record's.

    Returns:
        A :class:`Reproduction`.

    Raises:
        ValueError: the provenance has no layers, config or preset to rebuild a command from.
    """
    try:
        return _reproduce(provenance, out, directions, baselines, fit_seeds)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # a hand-edited or foreign provenance
        raise ValueError(f"provenance could not be read as a kcore run's ({type(exc).__name__}: {str(exc)[:200]}). "
                         "Fix: pass a run's provenance (kcore.read_run(DIR).provenance).") from None


def _reproduce(provenance: Mapping[str, Any], out: str | Path, directions: Sequence[str] | None,
               baselines: Sequence[str] | None, fit_seeds: int | None,
               sweep: Mapping[str, Any] | None = None) -> Reproduction:
    from kcore.baselines import BASELINE_KINDS
    from kcore.fit import PRESETS

    prov = dict(provenance)
    layers, config, preset = prov.get("layers"), prov.get("config"), prov.get("preset") or "fast"
    if not isinstance(layers, Mapping) or not isinstance(config, Mapping) or preset not in PRESETS:
        raise ValueError(f"provenance must hold 'layers', 'config' and a known 'preset' to rebuild a command; got "
                         f"layers={layers!r}, config {'present' if isinstance(config, Mapping) else 'missing'}, "
                         f"preset={preset!r}. Fix: pass a run's provenance (kcore.read_run(DIR).provenance).")
    notes: list[str] = []
    exact = True
    req = prov.get(REQUEST_KEY)
    if not isinstance(req, Mapping):
        req = _guess_request(prov)
        notes.append("this run was written before kcore recorded how it was asked for: the checkpoints' and images' "
                     "origin is read from its provenance, and the extraction batch and device are kcore's defaults.")
        exact = False
    preps = prov.get("preprocessing") or {}
    both = bool(req.get("both_directions")) if directions is None else "B_to_A" in directions
    kinds = list(dict.fromkeys([*(req.get("baselines") or []), *(baselines or [])]))
    seeds = int(fit_seeds if fit_seeds is not None else req.get("fit_seeds") or 1)
    world = int(req.get("world_size") or 1)

    args: list[str] = []
    where: dict[str, str] = {}
    for which in ("A", "B"):
        mreq = req.get(which) or {}
        flags, where[which] = _model_flags(which, mreq, str(layers[which]), notes)
        if sweep is not None:  # `kcore sweep` takes every layer of the sweep after one flag
            at = flags.index(f"--layer-{which.lower()}")
            flags[at:at + 2] = [f"--layers-{which.lower()}", *(str(n) for n in sweep["layers"][which])]
        args += flags
        if mreq.get("kind") in PICKLE_KINDS and "--trust-pickle" not in args:
            args.append("--trust-pickle")
            notes.append("--trust-pickle: a checkpoint is a full pickle or TorchScript archive, which runs code "
                         "from the file when loaded; only for files you trust.")
        pflags, _, pnotes = _prep_flags(which, preps.get(which), mreq.get("default_preprocessing"))
        args += pflags
        notes += pnotes
        exact = exact and not pnotes

    img = req.get("images") or {}
    data, img_notes, img_exact = _data_args(img, preps)
    args += data
    notes += img_notes
    exact = exact and img_exact
    group_flags, group_code, group_notes = _groups(prov.get("groups"))
    args += group_flags
    notes += group_notes
    exact = exact and not group_notes

    flags, over, diff, fnotes = _fit_flags(config, preset)
    notes += fnotes
    exact = exact and not fnotes
    if preset != "fast":
        args += ["--preset", preset]
    args += flags
    device = str(req.get("device") or "cpu")
    args += ["--device", device if device in ("cpu", "cuda", "mps") else "auto"]
    if int(req.get("batch_size") or CLI_BATCH_SIZE) != CLI_BATCH_SIZE:
        args += ["--batch-size", str(int(req["batch_size"]))]
    if both:
        args.append("--both-directions")
    if kinds:
        args.append("--baselines")
        if set(kinds) != set(BASELINE_KINDS):
            notes.append(f"--baselines fits every chance baseline ({sorted(BASELINE_KINDS)}); this run asked only for "
                         f"{kinds}: the Python snippet fits those alone.")
    if seeds > 1:
        args += ["--fit-seeds", str(seeds)]
    if req.get("cache_dir"):
        args += ["--cache-dir", str(req["cache_dir"])]
    command = "fit"
    if sweep is not None:
        command = "sweep"
        if sweep.get("pairs", "diagonal") != "diagonal":
            args += ["--pairs", str(sweep["pairs"])]
        for flag in ("--fit-seeds", "--cache-dir"):  # what `kcore sweep` does not take
            if flag in args:
                at = args.index(flag)
                del args[at:at + 2]
                notes.append(f"`kcore sweep` has no {flag}: the command runs without it.")
                exact = False
    args += ["--out", str(out)]
    head = ["kcore", command] if world == 1 else ["torchrun", "--standalone", "--nproc-per-node", str(world), "-m",
                                                   "kcore", command]
    cli = " ".join([*head, *(_q(a) for a in args)])
    python = _python(req, layers, preps, img, preset, over, diff, fnotes, both, kinds, seeds, device, where, out,
                     group_code, sweep)
    return Reproduction(cli, python, tuple(notes), exact)


def _data_args(img: Mapping[str, Any], preps: Mapping[str, Any]) -> tuple[list[str], list[str], bool]:
    """``--data``/``--n-images`` for the images, notes, and whether the command loads them as the run did."""
    from kcore.data import BUNDLED_DATA
    from kcore.preprocessing import Preprocessing, load_size

    kind, n = img.get("kind"), int(img.get("n") or 0)
    notes: list[str] = []
    exact = True
    if kind == "kshapes":
        args = ["--data", BUNDLED_DATA] + (["--n-images", str(n)] if n != CLI_N_BUNDLED else [])
        if img.get("seed") != 0 or img.get("split") != "test" or img.get("image_size") != 64:
            notes.append(f"the images are kshapes {img.get('split')} images of dataset seed {img.get('seed')} at "
                         f"{img.get('image_size')} px; `--data {BUNDLED_DATA}` means the test split of seed 0 at "
                         "64 px: the Python snippet draws the run's.")
            exact = False
    elif kind == "folder":
        args = ["--data", str(img.get("path")), "--n-images", str(n)]
    elif kind == "upload":
        args = ["--data", UPLOADED_IMAGES, "--n-images", str(n)]
        notes.append(f"the images were uploaded (content sha256 {img.get('content_sha256')}): put the same files in "
                     f"{UPLOADED_IMAGES} first (a zip extracted); the held-out split follows the images' order, so "
                     "the numbers are the same only if the folder lists them in the upload's order.")
        exact = False
    else:
        args = ["--data", "IMAGES", "--n-images", str(n)]
        notes.append(f"the images came from {img.get('source') or 'a dataset given in Python'!r}, which no "
                     "`--data` names: replace IMAGES with a folder of the same images.")
        exact = False
    loaded = img.get("load_size")
    try:
        cli_size = list(load_size(*(Preprocessing(tuple(p["input_size"]) if p.get("input_size") else None,
                                                  resize_size=p.get("resize_size"))
                                    for p in (preps.get("A"), preps.get("B")) if p)))
    except (ValueError, TypeError, KeyError):
        cli_size = loaded
    if loaded and kind in ("kshapes", "folder", "upload") and list(loaded) != cli_size:
        notes.append(f"the run loaded its images at {loaded[0]}x{loaded[1]}; `kcore fit` loads them at "
                     f"{cli_size[0]}x{cli_size[1]} (the largest input either model needs), which changes the "
                     "features a little: the Python snippet loads them as the run did.")
        exact = False
    return args, notes, exact


def _groups(groups: Any) -> tuple[list[str], str, list[str]]:
    """``--groups`` for the run's grouping (:mod:`kcore.groups`), the Python line that applies it, and notes."""
    if not isinstance(groups, Mapping) or groups.get("source") in (None, "none"):
        return [], "", []
    source, detail = groups.get("source"), str(groups.get("detail") or "")
    if source == "folder":
        return ["--groups", "folder"], "images = images.with_groups(groups.folder_groups(images.ids))", []
    if source == "csv" and Path(detail).is_absolute():  # the CSV's absolute path: the command runs from any folder
        return ["--groups", detail], f"images = images.with_groups(groups.csv_groups({detail!r}, images.ids))", []
    if source == "csv" and detail and detail != "upload":  # a run recorded before the path was kept: its name
        where = f"./{Path(detail).name}"
        return (["--groups", where], f"images = images.with_groups(groups.csv_groups({where!r}, images.ids))",
                [f"the groups came from the CSV file {detail!r} (its folder is not recorded): put it at {where}."])
    if source == "pattern":
        return ([], f"images = images.with_groups(groups.pattern_groups({detail!r}, images.ids))",
                [f"the images were grouped by the file-name pattern {detail!r}, which `kcore fit` cannot take: write "
                 "a CSV image,group for --groups, or run the Python snippet."])
    return [], "", [f"the images were grouped ({source}, {detail or 'no detail'}) in a way no command records: "
                    "without the same groups the split and the intervals differ."]


def _python(req: Mapping[str, Any], layers: Mapping[str, Any], preps: Mapping[str, Any], img: Mapping[str, Any],
            preset: str, over: Mapping[str, Any], diff: Mapping[str, Any], fit_notes: Sequence[str], both: bool,
            kinds: Sequence[str], seeds: int, device: str, where: Mapping[str, str], out: str | Path,
            group_code: str = "", sweep: Mapping[str, Any] | None = None) -> str:
    """The Python snippet (every literal through ``repr``); with ``sweep``, one that calls :func:`kcore.sweep.sweep`."""
    lines: list[str] = []
    for which in ("A", "B"):
        m = req.get(which) or {}
        kw = ""
        if m.get("kind") in ("state_dict", "safetensors") and m.get("arch") and m.get("card_arch") != m.get("arch"):
            kw += f", arch={m['arch']!r}"
            if m.get("num_classes") and m.get("card_num_classes") != m.get("num_classes"):
                kw += f", num_classes={int(m['num_classes'])}"
        if m.get("kind") in PICKLE_KINDS:
            kw += ", trust_pickle=True"
        var = which.lower()
        lines.append(f"{var} = kcore.load_model({where[which]!r}{kw})")
        p, d = preps.get(which), m.get("default_preprocessing")
        if p and d is not None and any(p.get(k) != d.get(k) for k in ("input_size", "mean", "std", "resize_size")):
            args = ", ".join(f"{k}={tuple(p[k]) if isinstance(p.get(k), list) else p.get(k)!r}"
                             for k in ("input_size", "mean", "std", "resize_size"))
            lines.append(f"{var} = dataclasses.replace({var}, preprocessing=Preprocessing({args}))")
    kind, n = img.get("kind"), int(img.get("n") or 0)
    size = tuple(img.get("load_size") or ()) or None
    if kind == "kshapes":
        extra = "" if img.get("split") == "test" else f", split={img.get('split')!r}"
        extra += "" if img.get("seed") == 0 else f", seed={int(img.get('seed'))}"
        lines.append(f"images = data.sample_images({n}{extra}, preprocess={size!r})")
    else:
        folder = img.get("path") if kind == "folder" else UPLOADED_IMAGES if kind == "upload" else "IMAGES"
        lines.append(f"images = data.ImageSet.from_folder({folder!r}, {size!r}, limit={n})")
    if group_code:
        lines.append(group_code)
    if fit_notes:
        lines.append(f"config = dataclasses.replace(PRESETS[{preset!r}], **{dict(diff)!r})")
    else:
        args = ", ".join(f"{k}={v!r}" for k, v in over.items())
        lines.append(f"config = make_config({preset!r}, {args})")
    extra = ""
    if both:
        extra += ", both_directions=True"
    if kinds:
        extra += f", baselines={list(kinds)!r}"
    if seeds > 1:
        extra += f", fit_seeds={seeds}"
    if int(req.get("batch_size") or CLI_BATCH_SIZE) != CLI_BATCH_SIZE:
        extra += f", batch_size={int(req['batch_size'])}"
    if req.get("cache_dir"):
        extra += f", cache_dir={str(req['cache_dir'])!r}"
    if sweep is not None:
        la, lb = ([str(n) for n in sweep["layers"][w]] for w in ("A", "B"))
        extra += "" if sweep.get("pairs", "diagonal") == "diagonal" else f", pairs={str(sweep['pairs'])!r}"
        lines += [f"result = sweep.sweep(a, {la!r}, b, {lb!r}, images, config, preset={preset!r}, "
                  f"device={device!r}{extra})",
                  f"sweep.write_sweep(result, {str(out)!r}, images=images)"]
    else:
        lines += [f"comparison = kcore.compare(a, {str(layers['A'])!r}, b, {str(layers['B'])!r}, images, config, "
                  f"preset={preset!r}, device={device!r}{extra})",
                  f"kcore.write_run(comparison, {str(out)!r}, images=images)"]
    body = "\n".join(lines)
    head = ["import dataclasses", ""] if "dataclasses." in body else []
    mods = ["data", *(["groups"] if "groups." in body else []), *(["sweep"] if sweep is not None else [])]
    head += ["import kcore", f"from kcore import {', '.join(mods)}"]
    head.append("from kcore.fit import PRESETS" if "PRESETS[" in body else "from kcore.fit import make_config")
    if "Preprocessing(" in body:
        head.append("from kcore.preprocessing import Preprocessing")
    return "\n".join(head) + "\n\n" + body + "\n"


def _guess_request(prov: Mapping[str, Any]) -> dict[str, Any]:
    """A request record rebuilt from an older provenance (checkpoint paths and the image source in words)."""
    out: dict[str, Any] = {}
    for which, key in (("A", "checkpoint_a"), ("B", "checkpoint_b")):
        c = prov.get(key) or {}
        out[which] = {"path": c.get("path"), "name": c.get("name"), "sha256": c.get("sha256"), "kind": c.get("kind"),
                      "arch": c.get("architecture"), "card_arch": c.get("architecture"), "num_classes": None,
                      "default_preprocessing": None}
    images = prov.get("images") or {}
    source = str(images.get("source") or "")
    img: dict[str, Any] = {"kind": "other", "n": images.get("n"), "source": source, "load_size": None}
    if "kshapes" in source and "bundled" in source:
        img.update(kind="kshapes", seed=0, split="test", image_size=64)
    elif source.startswith("folder "):
        img.update(kind="folder", path=source[len("folder "):].split(" (")[0].strip("'\""))
    out["images"] = img
    out.update(both_directions=False, baselines=[], fit_seeds=1, batch_size=CLI_BATCH_SIZE,
               device=str(prov.get("device") or "cpu"), cache_dir=None, world_size=int(prov.get("world_size") or 1))
    return out


def reproduce_sweep(sweep_provenance: Mapping[str, Any], pair_provenance: Mapping[str, Any], *,
                    out: str | Path = DEFAULT_OUT) -> Reproduction:
    """The ``kcore sweep`` command and the Python snippet (``kcore.sweep.sweep``) that recompute a layer sweep.

    The models, images, preprocessing and fit options come from one pair's run (:func:`reproduce`'s logic); the
    layers and the pair mode from the sweep's own provenance.

    Args:
        sweep_provenance: :attr:`kcore.sweep.SweepResult.provenance` (or ``sweep.json``'s ``provenance``), with
            ``layers`` ``{"A": [...], "B": [...]}`` and ``pairs``.
        pair_provenance: the provenance of any pair's comparison of that sweep (with its ``request`` record).
        out: the sweep folder the command and the snippet write.

    Returns:
        A :class:`Reproduction` whose ``cli`` starts with ``kcore sweep``.

    Raises:
        ValueError: either provenance cannot be read as a kcore sweep's or run's.
    """
    layers = sweep_provenance.get("layers")
    if not isinstance(layers, Mapping) or not all(isinstance(layers.get(w), (list, tuple)) and layers.get(w)
                                                  for w in ("A", "B")):
        raise ValueError(f"sweep_provenance must hold 'layers' as {{'A': [...], 'B': [...]}}; got {layers!r}. "
                         "Fix: pass a sweep's provenance (kcore.sweep.read_sweep(DIR)[1]).")
    spec = {"layers": {w: list(layers[w]) for w in ("A", "B")}, "pairs": sweep_provenance.get("pairs") or "diagonal"}
    both = bool(sweep_provenance.get("both_directions"))
    try:
        return _reproduce(pair_provenance, out, ["A_to_B", "B_to_A"] if both else ["A_to_B"], None, None, spec)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"pair_provenance could not be read as a kcore run's ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). Fix: pass a pair's provenance (SweepResult.pairs[0].comparison"
                         ".provenance).") from None


def reproduce_of(comparison: Any, out: str | Path | None = None) -> Reproduction:
    """The :class:`Reproduction` of a :class:`kcore.comparison.Comparison` (its directions, chance baselines and
    seed spread included).

    Args:
        comparison: a comparison from :func:`kcore.pipeline.compare` or :func:`kcore.run_folder.read_run`.
        out: the output folder to name (default: the one stored with the run, else :data:`DEFAULT_OUT`).

    Returns:
        The stored reproduction when the run folder holds one and no ``out`` is asked for; else one computed from
        the comparison's provenance (:func:`reproduce`).

    Raises:
        ValueError: the provenance has nothing to rebuild a command from (:func:`reproduce`).
    """
    prov = dict(getattr(comparison, "provenance", {}) or {})
    stored = prov.get(REPRODUCE_KEY)
    if out is None and isinstance(stored, Mapping):
        try:
            return Reproduction.from_dict(stored)
        except ValueError:
            pass
    kinds = [*getattr(comparison, "baselines", {}), *(prov.get("baselines_skipped") or {}),
             *(prov.get("baselines_failed") or {})]
    spread = getattr(comparison, "seed_spread", {}) or {}
    seeds = max((len(s.get("seeds") or ()) for s in spread.values() if isinstance(s, Mapping)), default=None)
    return reproduce(prov, out=DEFAULT_OUT if out is None else out, directions=list(comparison.directions),
                     baselines=kinds, fit_seeds=seeds)
