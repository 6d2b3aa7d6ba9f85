"""Map a bare state dict onto a named architecture (by name, or by order and shape), check it, and save it.

A state dict from another codebase (another training script, a pip package that ships weights without their
model class) holds the right tensors under other names. :func:`convert_state_dict` matches them to the tensors
of an architecture that :func:`kcore.architectures.build_model` builds, and checks the result with one forward
pass; :func:`write_converted` saves it as safetensors with a model card beside it, so that
:func:`kcore.checkpoints.load_model` (and ``kcore layers``/``kcore fit``) load it with nothing else to say.

How tensors are matched (``match=``, :data:`MATCH_MODES`):

* ``"name"``: each tensor of the architecture takes the file's tensor of the same name, after removing the
  prefixes ``module.`` / ``model.`` (DataParallel, Lightning: :data:`kcore.checkpoints.STRIPPED_PREFIXES`) when that
  makes more names match. Shapes must be equal.
* ``"order"``: the i-th tensor of the file takes the place of the i-th tensor of the architecture, both in
  state-dict order (the order ``state_dict()`` lists them, which is the order the modules are defined in), and
  shapes must be equal at every position. It refuses on any ambiguity:

  - a count mismatch: the file and the architecture hold different numbers of tensors (an EMA copy, an auxiliary
    head, a missing buffer) — which tensor is extra cannot be told from the order;
  - a shape mismatch at some position: everything after it is shifted or the architecture is another;
  - a conflict between name and position: a file tensor whose name (after prefix removal) is the name of an
    architecture tensor at another position (two equal-shape tensors that the file lists in another order, e.g.
    the two convolutions of a block swapped): the names and the order disagree, and neither is trusted;
  - a file whose order is not the saved order: safetensors files store their tensors sorted, not in the order
    they were saved, so order matching needs a ``torch.save`` state dict (or a mapping in memory).

  Where names and positions agree, the report says "name"; only the positions whose names differ are
  matched by "order+shape". Two equal-shape tensors whose names both differ from the architecture's cannot be
  told apart by any rule: order matching trusts the file's order there (the forward pass then only checks that
  the outputs are finite and of the classifier's size).
* ``"auto"`` (default): by name when every tensor of the architecture is found by name with its shape;
  otherwise by order, when order matching succeeds; otherwise an error that says what each rule found.

``num_batches_tracked`` (BatchNorm's step counter, which evaluation never reads) is bookkeeping: it is loaded by
name when the file has it and is otherwise left as built; it takes no part in counts or order.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from kcore.arguments import ArgumentError, spell
from kcore.cards import ModelCard, card_path_for, write_card
from kcore.checkpoint_formats import listing
from kcore.checkpoints import StateDictFile, _infer_num_classes, read_state_dict, stripped_names

MatchMode = Literal["auto", "name", "order"]
MATCH_MODES: dict[str, str] = {
    "auto": "by name when every tensor of the architecture is found by name, else by order and shape",
    "name": "by name, after removing the prefixes 'module.'/'model.' when that makes more names match",
    "order": "the i-th tensor of the file with the i-th of the architecture (state-dict order), shapes equal",
}
"""The ``match=`` values of :func:`convert_state_dict` and what each does."""

MatchKind = Literal["name", "name after prefix strip", "order+shape"]
MATCH_KINDS: dict[str, str] = {
    "name": "the file's tensor has the architecture's name",
    "name after prefix strip": "the same name once a prefix such as 'module.' or 'model.' is removed",
    "order+shape": "the names differ; matched by position in state-dict order, with equal shapes",
}
"""How one tensor was matched (:attr:`MatchedTensor.how`), in the order the report lists them."""

BOOKKEEPING_SUFFIX = "num_batches_tracked"
"""Tensors whose name ends with this are BatchNorm's step counters: never required, never counted."""

REPORT_FIRST = 3
"""How many names of each kind :meth:`ConversionResult.report_lines` shows."""

_CLASSIFIER_HINT_POSITIONS = 2  # a classifier is a weight and a bias: the last two positions in order matching


@dataclass(frozen=True)
class MatchedTensor:
    """One tensor of the architecture and where it came from.

    Attributes:
        target: its name in the architecture's state dict.
        source: its name in the file.
        how: one of :data:`MATCH_KINDS`.
        shape: its shape.
    """

    target: str
    source: str
    how: MatchKind
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ConversionResult:
    """A state dict mapped onto an architecture and checked with a forward pass (:func:`convert_state_dict`).

    Attributes:
        state_dict: every tensor of the architecture, in its order: from the file where matched, as built
            (random initialisation) where :attr:`missing` says so.
        architecture: the architecture name.
        num_classes: classifier outputs.
        match: the rule that matched the tensors (``"name"`` or ``"order"``).
        matched: one entry per tensor taken from the file, in the architecture's order.
        missing: tensors of the architecture the file did not provide (only with ``strict=False``).
        unexpected: tensors of the file that were not used (only with ``strict=False``).
        ignored: non-tensor entries of the file (e.g. an epoch counter), never used.
        source_name: the file's name (or ``"state dict"`` for a mapping).
        source_sha256: SHA-256 of the file's bytes (``None`` for a mapping).
        input_size: ``(H, W)`` of the forward pass that checked the result.
        output_shape: the shape of its output for a batch of 2.
    """

    state_dict: dict[str, Tensor]
    architecture: str
    num_classes: int
    match: Literal["name", "order"]
    matched: tuple[MatchedTensor, ...]
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: tuple[str, ...]
    source_name: str
    source_sha256: str | None
    input_size: tuple[int, int]
    output_shape: tuple[int, ...]

    def counts(self) -> dict[str, int]:
        """How many tensors were matched each way (every key of :data:`MATCH_KINDS`), missing and unexpected."""
        out = {kind: sum(m.how == kind for m in self.matched) for kind in MATCH_KINDS}
        return {**out, "missing": len(self.missing), "unexpected": len(self.unexpected)}

    def report_lines(self, first: int = REPORT_FIRST) -> list[str]:
        """The report as text lines: the rule, then per kind its count and the first ``first`` pairs."""
        lines = [f"{self.source_name} → {self.architecture} ({self.num_classes} classes), matched by {self.match}; "
                 f"forward pass on 2×3×{self.input_size[0]}×{self.input_size[1]} gives {tuple(self.output_shape)}"]
        for kind in MATCH_KINDS:
            pairs = [m for m in self.matched if m.how == kind]
            if pairs:
                shown = ", ".join(m.target if m.source == m.target else f"{m.source} → {m.target}"
                                  for m in pairs[:first])
                more = f", … ({len(pairs)} in all)" if len(pairs) > first else ""
                lines.append(f"  {kind}: {len(pairs)}  ({shown}{more})")
        for what, keys in (("missing (left as built)", self.missing), ("unexpected (not used)", self.unexpected),
                           ("ignored (not tensors)", self.ignored)):
            if keys:
                lines.append(f"  {what}: {len(keys)}  ({listing(list(keys))})")
        return lines

    def card(self, input_size: tuple[int, int] | None = None) -> ModelCard:
        """The model card to save beside the converted weights.

        Args:
            input_size: ``(H, W)`` to record (default none: the architecture's standard preprocessing applies).

        Returns:
            A card naming the architecture and classes, with how the file was converted under ``extra``.
        """
        return ModelCard(
            architecture=self.architecture,
            num_classes=self.num_classes,
            input_size=input_size,
            extra={"converted": {"source": self.source_name, "source_sha256": self.source_sha256,
                                 "match": self.match, "counts": self.counts()}},
        )


def _bookkeeping(key: str) -> bool:
    return key.endswith(BOOKKEEPING_SUFFIX)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(int(v) for v in t.shape)


@dataclass(frozen=True)
class _Attempt:
    """What one rule found: its matches (bookkeeping left out), or why it cannot be used."""

    matched: tuple[MatchedTensor, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    problem: str | None = None
    classifier_only: bool = False  # every shape mismatch is in the classifier (the last two positions/tensors)
    counts_differ: bool = False  # order matching: the file and the architecture hold different numbers of tensors


def _by_name(src: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> _Attempt:
    """Match every tensor of the architecture by name (prefixes stripped where that helps)."""
    names = stripped_names(list(src), set(target))  # name after stripping → file key
    matched, missing, mismatched, used = [], [], [], set()
    weights = [k for k in target if not _bookkeeping(k)]
    for key in weights:
        orig = names.get(key)
        if orig is None:
            missing.append(key)
            continue
        used.add(orig)
        if _shape(src[orig]) != _shape(target[key]):
            mismatched.append(key)
        else:
            matched.append(MatchedTensor(key, orig, "name" if orig == key else "name after prefix strip",
                                         _shape(target[key])))
    described = tuple(f"{k!r}: file {_shape(src[names[k]])} vs architecture {_shape(target[k])}" for k in mismatched)
    return _Attempt(
        matched=tuple(matched), missing=tuple(missing),
        unexpected=tuple(k for k in src if k not in used and not _bookkeeping(k)), mismatched=described,
        classifier_only=bool(mismatched) and set(mismatched) <= set(weights[-_CLASSIFIER_HINT_POSITIONS:]),
    )


def _by_order(src: Mapping[str, Tensor], target: Mapping[str, Tensor], keeps_order: bool) -> _Attempt:
    """Match the i-th tensor of the file with the i-th of the architecture, refusing on any ambiguity."""
    s_keys = [k for k in src if not _bookkeeping(k)]
    t_keys = [k for k in target if not _bookkeeping(k)]
    if not keeps_order:
        return _Attempt(problem="a safetensors file stores its tensors sorted, not in the order they were saved, "
                                "so their order says nothing")
    if len(s_keys) != len(t_keys):
        return _Attempt(problem=f"the file holds {len(s_keys)} tensors and the architecture {len(t_keys)} (which "
                                "ones are extra or missing cannot be told from their order)", counts_differ=True)
    bad = [i for i, (s, t) in enumerate(zip(s_keys, t_keys)) if _shape(src[s]) != _shape(target[t])]
    if bad:
        shown = "; ".join(f"position {i}: file {s_keys[i]!r} {_shape(src[s_keys[i]])} vs architecture "
                          f"{t_keys[i]!r} {_shape(target[t_keys[i]])}" for i in bad[:REPORT_FIRST])
        return _Attempt(problem=f"the shapes differ at {len(bad)} position(s): {shown}",
                        classifier_only=min(bad) >= len(t_keys) - _CLASSIFIER_HINT_POSITIONS)
    name_of = {orig: new for new, orig in stripped_names(s_keys, set(t_keys)).items()}  # file key → its name
    position = {t: i for i, t in enumerate(t_keys)}
    conflicts = [
        f"{s!r} is at position {i} (the architecture's {t!r}) but is named as the architecture's "
        f"{name_of[s]!r} (position {position[name_of[s]]})"
        for i, (s, t) in enumerate(zip(s_keys, t_keys))
        if name_of.get(s) in position and name_of[s] != t
    ]
    if conflicts:
        return _Attempt(problem=f"names and order disagree for {len(conflicts)} tensor(s), so neither can be "
                                f"trusted: {'; '.join(conflicts[:REPORT_FIRST])}")
    matched = tuple(
        MatchedTensor(t, s, ("name" if s == t else "name after prefix strip") if name_of.get(s) == t else "order+shape",
                      _shape(target[t]))
        for s, t in zip(s_keys, t_keys)
    )
    return _Attempt(matched=matched)


def _fixes(attempt: _Attempt, inferred: int | None, num_classes: int) -> str:
    """The num_classes fix when the classifier's shape is what differs ('' otherwise)."""
    if attempt.classifier_only and inferred not in (None, num_classes):
        return (f" Fix: the classifier's shape differs, so pass "
                f"{spell('num_classes', f'num_classes={inferred}', inferred)} (the file's number of classes).")
    return ""


def _choose(
    mode: str, src: Mapping[str, Tensor], target: Mapping[str, Tensor], *, keeps_order: bool, strict: bool,
    where: str, arch: str, num_classes: int,
) -> tuple[Literal["name", "order"], _Attempt]:
    """The rule to use and its matches; an :class:`ArgumentError` naming the options that fix a refusal."""
    inferred = _infer_num_classes(src)
    head = f"{where} does not fit architecture {arch!r} with {num_classes} classes"
    name = _by_name(src, target)
    n_weights = sum(not _bookkeeping(k) for k in target)
    order = _by_order(src, target, keeps_order) if mode == "order" or (mode == "auto" and name.missing) else None
    if name.mismatched and (mode == "name" or (mode == "auto" and (order is None or order.problem))):
        raise ArgumentError(
            f"{head}: {len(name.mismatched)} tensor(s) found by name have other shapes: "
            f"{'; '.join(name.mismatched[:REPORT_FIRST])}."
            + (_fixes(name, inferred, num_classes) or " Fix: choose the architecture the file was trained with.")
        )
    if mode == "name" or (mode == "auto" and not name.missing):
        if not name.matched:
            raise ArgumentError(
                f"{head}: none of its {len(src)} tensors has the name of one of the architecture's {n_weights} "
                f"(e.g. file {listing(list(src)[:2])} vs architecture {listing(list(target)[:2])}). Fix: pass "
                f"{spell('match', MATCH_ORDER, 'order')} to match them by order and shape."
            )
        if strict and name.missing:
            raise ArgumentError(
                f"{head}: {len(name.missing)} of the architecture's {n_weights} tensors are not in the file by "
                f"name: {listing(list(name.missing))}; the file's unused tensors: {listing(list(name.unexpected))}. "
                f"Fix: if the file names its tensors differently, pass {spell('match', MATCH_ORDER, 'order')} "
                "(match by order and shape); to load only the tensors whose names match and leave the rest as "
                f"built (random), pass {spell('strict', 'strict=False')}."
            )
        if strict and name.unexpected:
            raise ArgumentError(
                f"{head}: the file holds {len(name.unexpected)} tensor(s) the architecture has no place for: "
                f"{listing(list(name.unexpected))} (e.g. an EMA copy of the weights or an auxiliary head). Fix: pass "
                f"{spell('strict', 'strict=False')} to leave them out (the report lists them)."
            )
        return "name", name
    order = order or _by_order(src, target, keeps_order)
    if order.problem is None:
        return "order", order
    fixes = _fixes(order, inferred, num_classes)
    if mode == "order":
        raise ArgumentError(
            f"{head}: matching by order is refused: {order.problem}.{fixes} {'Otherwise' if fixes else 'Fix'}: "
            + ("convert from the torch.save state dict the safetensors file was made from, or "
               if not keeps_order else "")
            + f"pass {spell('match', MATCH_NAME, 'name')} to match by name"
            + (f" (with {spell('strict', 'strict=False')}, the {len(name.matched)} tensor(s) whose names match)"
               if name.matched else "")
            + ", or choose the architecture the file was trained with."
        )
    partial = (f" Fix: to load only the {len(name.matched)} tensor(s) whose names match and leave the rest as "
               f"built (random), pass {spell('match', MATCH_NAME, 'name')} with {spell('strict', 'strict=False')}."
               if name.matched else "")
    raise ArgumentError(
        f"{head}: by name, {len(name.missing)} of its {n_weights} tensors are not in the file "
        f"({listing(list(name.missing))}); by order: {order.problem}.{fixes or partial} "
        f"{'Otherwise' if fixes or partial else 'Fix'}: choose the architecture the file was trained with"
        + (", or convert from the torch.save state dict the safetensors file was made from (its order is kept)"
           if not keeps_order else "")
        + ("; if the file holds extra tensors (an EMA copy, an auxiliary head), save only the model's own, in "
           f"order, and pass {spell('match', MATCH_ORDER, 'order')}" if order.counts_differ else "") + "."
    )


MATCH_ORDER = "match='order'"
MATCH_NAME = "match='name'"


def _source(state_dict_or_path: Any) -> StateDictFile:
    """The tensors to convert: a file read weights-only (:func:`kcore.checkpoints.read_state_dict`) or a mapping."""
    if isinstance(state_dict_or_path, StateDictFile):
        return state_dict_or_path
    if isinstance(state_dict_or_path, Mapping):
        from kcore.checkpoint_formats import Source
        from kcore.checkpoints import _find_state_dict

        tensors, others = _find_state_dict(state_dict_or_path, Source(path=None, data=b"", display="state dict"))
        return StateDictFile(tensors=tensors, others=others, name="state dict", sha256="", kind="state_dict")
    if isinstance(state_dict_or_path, (str, os.PathLike, bytes)):
        return read_state_dict(state_dict_or_path)
    raise TypeError(
        f"state_dict_or_path must be a path, a file's bytes or a mapping of names to tensors; got "
        f"{type(state_dict_or_path).__name__}. Fix: pass the checkpoint's path, or model.state_dict()."
    )


def _check_input_size(input_size: Any) -> tuple[int, int] | None:
    if input_size is None:
        return None
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)):
        raise ArgumentError(f"input_size must be (H, W), two positive integers; got {input_size!r}. Fix: pass "
                            f"{spell('input_size', 'input_size=(224, 224)', '224 224')} (the model's input size).")
    from kcore.limits import limits

    limits().check("max_input_side", max(input_size), what=f"input_size {tuple(input_size)}",
                   fix="give the size the model was trained at, e.g. 224 224")
    return (int(input_size[0]), int(input_size[1]))


def _forward_check(model: torch.nn.Module, size: tuple[int, int], num_classes: int, arch: str, match: str) -> tuple[int, ...]:
    """Run a batch of 2 random images; refuse non-finite outputs or an output that is not (2, num_classes)."""
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ArgumentError(
            f"the converted {arch!r} failed on a batch of shape {tuple(x.shape)}: {exc}. Fix: pass "
            f"{spell('input_size', 'input_size=(H, W)', 'H W')} matching the images the model was trained on."
        ) from exc
    if not isinstance(out, Tensor):
        raise ValueError(f"the converted {arch!r} returned a {type(out).__name__}, not a tensor of class scores. "
                         "Fix: choose a classification architecture.")
    if _shape(out) != (2, num_classes):
        raise ArgumentError(
            f"the converted {arch!r} outputs shape {_shape(out)} for a batch of 2; expected (2, {num_classes}). "
            f"Fix: pass {spell('num_classes', 'num_classes=<classifier outputs>', 'N')} as the file was trained."
        )
    if not bool(torch.isfinite(out).all()):
        how = (" Matching by order may have put tensors in the wrong places; check the report, or match by name."
               if match == "order" else "")
        raise ValueError(f"the converted {arch!r} gives non-finite outputs (NaN or Inf) on random images.{how} Fix: "
                         "check that the file holds trained weights of this architecture.")
    return _shape(out)


def convert_state_dict(
    state_dict_or_path: str | os.PathLike[str] | bytes | Mapping[str, Any] | StateDictFile,
    arch: str,
    *,
    num_classes: int | None = None,
    match: MatchMode = "auto",
    strict: bool = True,
    input_size: tuple[int, int] | None = None,
) -> ConversionResult:
    """Map a bare state dict onto the architecture ``arch`` and check it with a forward pass.

    Args:
        state_dict_or_path: a weights-only checkpoint (a path or its bytes: safetensors, or a ``torch.save``
            state dict read weights-only, possibly nested under ``"state_dict"`` etc.), or a mapping.
        arch: a name :func:`kcore.architectures.build_model` accepts (torchvision's, the project's, ``timm:NAME``).
        num_classes: classifier outputs (default: inferred from the last 2-D ``.weight`` of the file).
        match: ``"auto"``, ``"name"`` or ``"order"`` (:data:`MATCH_MODES`; the module docstring has the rules).
        strict: refuse tensors of the architecture that the file lacks and tensors of the file that are not used;
            with ``False`` (only by name) they are left as built / left out, and listed in the result.
        input_size: ``(H, W)`` of the checking forward pass (default: the architecture's standard input size,
            else 224 × 224).

    Returns:
        The new state dict with a report of how each tensor was matched.

    Raises:
        kcore.arguments.ArgumentError: (a ``ValueError``) the file does not fit: missing, unexpected or
            mismatched tensors, or an ambiguity of order matching; the message names the option that fixes it.
        ValueError: unknown ``match`` or ``arch``, a file that is not a bare state dict, a failing forward pass.
        kcore.checkpoints.UnsafeCheckpointError: the file is a full pickle.
        TypeError: ``state_dict_or_path`` is of another type.
    """
    if match not in MATCH_MODES:
        raise ArgumentError(f"match must be one of {sorted(MATCH_MODES)}; got {match!r}. Fix: pass "
                            f"{spell('match', MATCH_ORDER, 'order')} or one of the others ({MATCH_MODES}).")
    size = _check_input_size(input_size)
    src = _source(state_dict_or_path)
    where = f"checkpoint {src.name!r}" if src.sha256 else "the state dict"
    if num_classes is None:
        num_classes = _infer_num_classes(src.tensors)
        if num_classes is None:
            raise ArgumentError(
                f"{where}: the number of classes cannot be inferred (no 2-D '.weight' tensor). Fix: pass "
                f"{spell('num_classes', 'num_classes=<number of classifier outputs>', 'N')}."
            )
    from kcore.architectures import build_model
    from kcore.preprocessing import resolve_preprocessing

    model = build_model(arch, num_classes)
    target = model.state_dict()
    rule, attempt = _choose(match, src.tensors, target, keeps_order=src.keeps_order, strict=strict, where=where,
                            arch=arch, num_classes=num_classes)
    new = {k: v.detach().clone() for k, v in target.items()}
    for m in attempt.matched:
        new[m.target] = src.tensors[m.source].detach().to(dtype=target[m.target].dtype).clone().contiguous()
    names = stripped_names(list(src.tensors), set(target))
    for key in target:  # BatchNorm step counters: by name where the file has them
        if _bookkeeping(key) and key in names and _shape(src.tensors[names[key]]) == _shape(target[key]):
            new[key] = src.tensors[names[key]].detach().to(dtype=target[key].dtype).clone()
    model.load_state_dict(new, strict=True)
    size = size or resolve_preprocessing(None, arch).input_size or (224, 224)
    out_shape = _forward_check(model, tuple(size), num_classes, arch, rule)
    return ConversionResult(
        state_dict=new, architecture=arch, num_classes=num_classes, match=rule, matched=attempt.matched,
        missing=attempt.missing, unexpected=attempt.unexpected, ignored=src.others, source_name=src.name,
        source_sha256=src.sha256 or None, input_size=tuple(size), output_shape=out_shape,
    )


def write_converted(
    result: ConversionResult,
    out: str | os.PathLike[str],
    *,
    card: ModelCard | None = None,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write the converted weights as safetensors and a model card beside them, each atomically.

    Args:
        result: from :func:`convert_state_dict`.
        out: the ``.safetensors`` file to write; its folder must exist. The card goes to
            :func:`kcore.cards.card_path_for` (``NAME.card.json``).
        card: the card to write (default: :meth:`ConversionResult.card`).
        overwrite: replace existing files (never a symlink, a folder or a special file).

    Returns:
        The paths of the weights and of the card.

    Raises:
        kcore.arguments.ArgumentError: ``out`` does not end in ``.safetensors``, or a file would be replaced
            without ``overwrite``.
        ValueError: ``out`` or the card path is a symlink, a folder or a special file.
        FileNotFoundError: the folder of ``out`` does not exist.
    """
    from safetensors.torch import save

    from kcore._io import write_file_atomic

    path = Path(out)
    if path.suffix != ".safetensors":
        raise ArgumentError(f"out must be a .safetensors file; got {str(path)!r}. Fix: pass "
                            f"{spell('out', 'out=' + repr(str(path.with_suffix('.safetensors'))), path.with_suffix('.safetensors'))}.")
    card_path = card_path_for(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"out={str(path)!r}: the folder {str(path.parent)!r} does not exist. Fix: create "
                                "it first, or write into an existing folder.")
    taken = [str(p) for p in (path, card_path) if os.path.lexists(p)]
    if taken and not overwrite:
        raise ArgumentError(f"{' and '.join(repr(t) for t in taken)} already exist(s); kcore does not replace files "
                            f"unless asked. Fix: choose another output name, or pass {spell('overwrite', 'overwrite=True')}.")
    meta = {"format": "pt", "kcore_architecture": result.architecture, "kcore_match": result.match}
    write_file_atomic(path, save({k: v.contiguous() for k, v in result.state_dict.items()}, metadata=meta))
    write_card(card if card is not None else result.card(), card_path)
    return path, card_path
