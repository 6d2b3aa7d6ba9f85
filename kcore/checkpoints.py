"""Load trained models from checkpoint files or uploaded bytes, refusing untrusted pickles by default.

The loading contract (what :func:`load_model` accepts, in order of preference):

1. Weights only: a ``.safetensors`` file, or a ``torch.save`` state dict (``.pt``/``.pth``/``.bin``) read with
   ``torch.load(weights_only=True)``. The state dict may sit at the top level or under one of
   :data:`STATE_DICT_KEYS`; the prefixes in :data:`STRIPPED_PREFIXES` (DataParallel, Lightning) are
   removed. These files hold no graph, so they need an architecture name and a number of classes, taken
   from the arguments, else from the model card beside the file (:class:`ModelCard`), else (classes only)
   from the shape of the last 2-D ``.weight`` in the file.
2. A TorchScript archive (``torch.jit.save``): recognised from its zip entries (``code/``, ``constants.pkl``)
   without loading it, and refused unless ``trust_pickle=True``: ``torch.jit.load`` runs the archive's own
   code (e.g. a ``__setstate__`` that writes files with ``torch.from_file``) while loading.
3. A ``torch.export`` archive (``.pt2``, ``torch.export.save``): needs no architecture. It is unflattened
   (:func:`torch.export.unflatten`) so that its layers keep their names and can be hooked.
   ``torch.export.load`` may unpickle parts of an archive with ``weights_only=False``; kcore therefore
   inspects the archive first and refuses one with pickled payloads, compiled code, unsafe pickle
   globals or Python in its shape expressions unless ``trust_pickle=True``. The loaded graph is then checked
   node by node before anything runs it (:mod:`kcore.graph_check`): only pure tensor operations are accepted.
4. A whole pickled ``nn.Module`` (``torch.save(model)``): only with ``trust_pickle=True``, because
   unpickling can run any code. Without the flag, :class:`UnsafeCheckpointError` lists the globals the
   file would import.

The format is detected from the bytes (zip member names, the safetensors header), never by unpickling
(:mod:`kcore.checkpoint_formats`).

A checkpoint given as a path is read once, from one open file (:mod:`kcore.safe_files`: ``O_NOFOLLOW``, checked
with ``fstat`` after opening, at most :data:`kcore.server_paths.MAX_CHECKPOINT_BYTES`), and everything after that
works on those bytes: the SHA-256 in :attr:`LoadedModel.sha256` is computed from the very bytes the weights are
loaded from, so a file replaced while it loads can never give one file's hash to another file's weights. With
``root=`` (a server root) the path is opened below the root without following any symlink, so a component swapped
for a symlink after a path check cannot lead outside. The bytes are dropped when :func:`load_model` returns.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from kcore.architectures import build_model
from kcore.arguments import ArgumentError, spell
from kcore.cards import ModelCard, card_path_for, read_card
from kcore.checkpoint_formats import (  # noqa: F401  (CHECKPOINT_KINDS, SAFETENSORS_MAX_TENSORS: re-exported)
    CHECKPOINT_KINDS,
    MAX_LISTED,
    SAFETENSORS_MAX_TENSORS,
    CheckpointKind,
    Format,
    Source,
    check_safetensors_header,
    corrupt,
    listing,
    pickle_risks,
    pt2_risks,
    sniff,
)
from kcore.graph_check import describe_findings, unsafe_operations
from kcore.preprocessing import Preprocessing, resolve_preprocessing
from kcore.safe_files import read_nofollow, read_under
from kcore.server_paths import MAX_CHECKPOINT_BYTES

STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "net")
"""Keys under which a training checkpoint commonly nests its state dict, tried in this order."""

STRIPPED_PREFIXES: tuple[str, ...] = ("module.", "model.")
"""Key prefixes removed when that makes more keys match the model (DataParallel, Lightning)."""

ARCH_EXAMPLE = "arch='resnet18'"
"""How the Python API names the architecture argument in a fix (front ends re-spell it, :mod:`kcore.arguments`)."""

_CHUNK_BYTES = 1 << 20

_MAX_CARD_BYTES = 1 << 20


class UnsafeCheckpointError(ValueError):
    """A checkpoint would run arbitrary code when loaded, and ``trust_pickle`` was not set.

    Attributes:
        unsafe_globals: the pickle globals (``module.name``) or archive members that make it unsafe.
    """

    def __init__(self, message: str, unsafe_globals: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.unsafe_globals = unsafe_globals


# --------------------------------------------------------------------------------------------------
# Hashing and sources
# --------------------------------------------------------------------------------------------------


def file_sha256(path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview) -> str:
    """Return the SHA-256 hex digest of a file (read in 1 MiB chunks) or of raw bytes.

    For a checkpoint that is loaded, use :attr:`LoadedModel.sha256` instead: it is the hash of the bytes the
    weights were loaded from, while hashing the path again may read a file replaced in between.
    """
    digest = hashlib.sha256()
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        digest.update(path_or_bytes)
        return digest.hexdigest()
    with open(path_or_bytes, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _as_source(source: object, name: str | None, root: str | os.PathLike[str] | None = None) -> Source:
    """Read a checkpoint path once (below ``root`` when given, see :mod:`kcore.safe_files`), or wrap uploaded bytes.

    Raises:
        FileNotFoundError: no file at the path.
        kcore.safe_files.UnsafePathError: a symlink below ``root`` (or swapped in after the path was resolved),
            ``..``, outside ``root``, not a regular file, or larger than :data:`MAX_CHECKPOINT_BYTES`.
        TypeError: ``source`` is neither a path nor bytes.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Source(path=None, data=bytes(source), display=name or "uploaded checkpoint")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        try:
            if root is not None:
                data = read_under(root, path, max_bytes=MAX_CHECKPOINT_BYTES, what="checkpoint")
            else:
                data = read_nofollow(path, max_bytes=MAX_CHECKPOINT_BYTES, what="checkpoint")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"source={str(path)!r}: no such checkpoint file. Fix: check the path "
                "(relative paths are resolved from " + (f"{str(root)!r}" if root is not None else
                                                         "the current working directory") + ")."
            ) from None
        return Source(path=path, data=data, display=name or path.name)
    raise TypeError(
        f"source must be a path (str or pathlib.Path) or the file's bytes; got {type(source).__name__}. "
        "Fix: for an upload pass uploaded_file.getvalue() and name=uploaded_file.name."
    )


def _card_under(root: str | os.PathLike[str], checkpoint: Path) -> ModelCard | None:
    """The model card beside ``checkpoint``, read below ``root`` without following symlinks; None if there is none.

    Raises:
        kcore.safe_files.UnsafePathError: the card is a symlink, a FIFO or device, or larger than 1 MiB.
        ValueError: the card is not valid JSON or not a valid card.
    """
    path = card_path_for(checkpoint)
    try:
        raw = read_under(root, path, max_bytes=_MAX_CARD_BYTES, what="model card")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"model card {str(path)!r} is not valid UTF-8 JSON ({exc}). "
            "Fix: correct the file or rewrite it with kcore.cards.write_card."
        ) from exc
    return ModelCard.from_dict(data, source=f"model card {str(path)!r}")


# --------------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------------


def _find_state_dict(obj: object, src: Source) -> tuple[dict[str, Tensor], tuple[str, ...]]:
    """Locate the tensors of a checkpoint; return them and the names of non-tensor entries beside them."""
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"checkpoint {src.where!r} holds a {type(obj).__name__}, expected a state dict (a mapping from "
            "parameter names to tensors). Fix: save it with torch.save(model.state_dict(), path)."
        )
    candidate: Mapping[str, object] = obj
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            candidate = inner
            break
    tensors = {str(k): v for k, v in candidate.items() if isinstance(v, Tensor)}
    others = tuple(str(k) for k, v in candidate.items() if not isinstance(v, Tensor))
    if not tensors:
        raise ValueError(
            f"checkpoint {src.where!r} holds no tensors at the top level nor under {list(STATE_DICT_KEYS)}; "
            f"its top-level keys are {[str(k) for k in list(obj)[:10]]}. Fix: save the weights with "
            "torch.save(model.state_dict(), path), or nest them under 'state_dict'."
        )
    return tensors, others


def stripped_names(keys: list[str] | tuple[str, ...], expected: set[str]) -> dict[str, str]:
    """Map each key to its name with DataParallel / Lightning prefixes removed, when that makes more keys match.

    Args:
        keys: the checkpoint's tensor names, in file order.
        expected: the model's tensor names.

    Returns:
        New name → original key, in file order: the prefixes of :data:`STRIPPED_PREFIXES` (one, or two in a row)
        removed from every key that has them, with the choice that makes the most names match ``expected``
        (unmodified keys win ties). Of keys that collide after stripping, the later one in file order wins.
    """
    def strip(prefix: str, names: dict[str, str]) -> dict[str, str]:
        return {new[len(prefix):] if new.startswith(prefix) else new: orig for new, orig in names.items()}

    plain = {k: k for k in keys}
    candidates = [plain]
    for first in STRIPPED_PREFIXES:
        once = strip(first, plain)
        candidates.append(once)
        for second in STRIPPED_PREFIXES:
            candidates.append(strip(second, once))
    # max() keeps the first best candidate, so the unmodified keys win ties.
    return max(candidates, key=lambda c: len(expected.intersection(c)))


def _strip_prefixes(state: dict[str, Tensor], expected: set[str]) -> dict[str, Tensor]:
    """Remove DataParallel / Lightning prefixes when that makes more keys match the model."""
    return {new: state[orig] for new, orig in stripped_names(list(state), expected).items()}


def _infer_num_classes(state: Mapping[str, Tensor]) -> int | None:
    """Outputs of the last 2-D ``.weight`` in file order (the classifier of torchvision-style models)."""
    for key in reversed(list(state)):
        value = state[key]
        if key.endswith(".weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def _model_from_state_dict(
    raw: object,
    src: Source,
    *,
    arch: str | None,
    num_classes: int | None,
    card: ModelCard | None,
    strict: bool,
) -> tuple[nn.Module, tuple[str, ...], tuple[str, ...], str, int]:
    state, non_tensors = _find_state_dict(raw, src)
    arch = arch or (card.architecture if card else None)
    if arch is None:
        raise ArgumentError(
            f"checkpoint {src.where!r} holds weights only, so its architecture is needed. Fix: pass "
            f"{spell('arch', ARCH_EXAMPLE, 'resnet18')} (or another name from "
            "kcore.architectures.available_architectures()), or write a model card with 'architecture' "
            f"beside it ({card_path_for(src.display).name})."
        )
    if num_classes is None:
        num_classes = card.num_classes if card and card.num_classes else _infer_num_classes(state)
    if num_classes is None:
        raise ArgumentError(
            f"checkpoint {src.where!r}: the number of classes is not given, not in a model card and cannot be "
            "inferred (no 2-D '.weight' tensor). Fix: pass "
            f"{spell('num_classes', 'num_classes=<number of classifier outputs>', 'N')}."
        )
    model = build_model(arch, num_classes)
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    # num_batches_tracked is BatchNorm bookkeeping that eval mode never reads; old checkpoints lack it.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected] + list(non_tensors)
    mismatched = [
        f"{k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if mismatched:
        inferred = _infer_num_classes(state)
        hint = (
            f" If only the classifier differs, pass {spell('num_classes', f'num_classes={inferred}', inferred)}."
            if inferred not in (None, num_classes)
            else ""
        )
        raise ArgumentError(
            f"checkpoint {src.where!r} does not fit architecture {arch!r} with {num_classes} classes: "
            f"{len(mismatched)} tensor(s) have other shapes: {'; '.join(mismatched[:MAX_LISTED])}.{hint} "
            "Fix: choose the architecture the checkpoint was trained with."
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected in the checkpoint: {listing(unexpected)}")
        renamed = (
            " If the file names its tensors differently (another codebase), map them onto the architecture "
            "with kcore.convert.convert_state_dict (CLI: kcore convert; by name, or by order and shape)."
            if len(missing) > len(expected) // 2 else ""
        )
        raise ArgumentError(
            f"checkpoint {src.where!r} does not match architecture {arch!r}: {'; '.join(parts)}. "
            "Fix: choose the architecture the checkpoint was trained with, or pass "
            f"{spell('strict', 'strict=False')} to load the matching tensors and leave the rest at their random "
            f"initialisation.{renamed}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return model, tuple(missing), tuple(unexpected), arch, num_classes


@dataclass(frozen=True, eq=False)
class StateDictFile:
    """The tensors of a weights-only checkpoint, read without building a model (:func:`read_state_dict`).

    Attributes:
        tensors: parameter name → tensor, in the file's order (a ``torch.save`` file keeps the order the state
            dict had when saved; a safetensors file does not, see :attr:`keeps_order`).
        others: names of the non-tensor entries beside the tensors (e.g. an epoch counter).
        name: display name (the file name, or ``name=`` for bytes).
        sha256: SHA-256 hex digest of the bytes the tensors were read from.
        kind: ``"state_dict"`` (torch.save, read weights-only) or ``"safetensors"``.
    """

    tensors: dict[str, Tensor]
    others: tuple[str, ...]
    name: str
    sha256: str
    kind: CheckpointKind

    @property
    def keeps_order(self) -> bool:
        """Whether :attr:`tensors` is in the order the state dict was saved in (safetensors files reorder it)."""
        return self.kind != "safetensors"


def read_state_dict(
    source: str | os.PathLike[str] | bytes,
    *,
    name: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> StateDictFile:
    """Read the tensors of a weights-only checkpoint (safetensors, or a ``torch.save`` state dict read weights-only).

    The state dict may be nested under one of :data:`STATE_DICT_KEYS`; prefixes are left as they are.

    Args:
        source: a path, or the file's bytes (then ``name`` is its file name).
        name: display name.
        root: a folder ``source`` must lie in (see :func:`load_model`).

    Returns:
        The tensors in file order, the names of non-tensor entries, and the hash of the bytes read.

    Raises:
        FileNotFoundError: ``source`` is a path with no file.
        UnsafeCheckpointError: the file is a full pickle (it would run code when loaded).
        ValueError: a TorchScript or torch.export archive (they carry their own graph: load them with
            :func:`load_model`), no tensors, or a truncated or corrupt file.
    """
    src = _as_source(source, name, root)
    fmt = sniff(src)
    sha256 = file_sha256(src.data)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        check_safetensors_header(src)
        try:
            raw: object = st_load(src.data)
        except (SafetensorError, OSError) as exc:
            raise corrupt(src, "safetensors", exc) from exc
        kind: CheckpointKind = "safetensors"
    elif fmt in ("torch_zip", "pickle_stream"):
        raw, _ = _torch_load(src, fmt, trust_pickle=False)
        kind = "state_dict"
    else:
        raise ValueError(
            f"checkpoint {src.where!r} is a {'TorchScript' if fmt == 'torchscript' else 'torch.export'} archive: it "
            "carries its own graph, so there is no bare state dict to map onto an architecture. Fix: load it "
            "directly with kcore.load_model (CLI: pass the file itself to kcore layers / kcore fit)."
        )
    tensors, others = _find_state_dict(raw, src)
    return StateDictFile(tensors=tensors, others=others, name=src.display, sha256=sha256, kind=kind)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model loaded by :func:`load_model`, in eval mode on the CPU, with where it came from.

    Attributes:
        model: the model, in eval mode.
        name: display name (the file name, or ``name=`` for uploads).
        sha256: SHA-256 hex digest of the checkpoint bytes (use it in cache keys).
        kind: one of :data:`CHECKPOINT_KINDS`.
        card: the model card used, if any.
        num_parameters: total number of parameter elements.
        missing_keys: model tensors the checkpoint did not provide (only with ``strict=False``).
        unexpected_keys: checkpoint entries the model has no place for (only with ``strict=False``).
        architecture: the architecture the weights were loaded into (``None`` for files that carry their graph).
        num_classes: classifier outputs (given, from the card, or inferred from the weights).
        preprocessing: how images become this model's input (:func:`kcore.preprocessing.resolve_preprocessing`:
            the card, else torchvision's standard evaluation transform of the architecture, else none).

    Examples::

        m = kcore.load_model("sample_models/kshapes_resnet_s0.safetensors")
        m.name, m.kind, m.card.input_size, m.num_parameters
    """

    model: nn.Module
    name: str
    sha256: str
    kind: CheckpointKind
    card: ModelCard | None
    num_parameters: int
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    architecture: str | None = None
    num_classes: int | None = None
    preprocessing: Preprocessing | None = None

    @property
    def short_hash(self) -> str:
        """The first 12 hex digits of :attr:`sha256`."""
        return self.sha256[:12]


try:  # torch's verifier of a loaded exported program (private module, so guarded)
    from torch._export.verifier import SpecViolationError as _SpecViolationError
except ImportError:  # pragma: no cover - older or newer torch
    _SpecViolationError = RuntimeError  # type: ignore[misc,assignment]

_LOAD_ERRORS = (RuntimeError, EOFError, OSError, zipfile.BadZipFile, pickle.UnpicklingError, KeyError, struct.error)


def _unsafe_message(src: Source, what: str, items: tuple[str, ...]) -> str:
    return (
        f"checkpoint {src.where!r} is {what}, and loading it could run arbitrary code; it needs: "
        f"{listing(list(items))}. kcore refused to load it (trust_pickle=False). Fix: if you trust where the "
        "file comes from, pass trust_pickle=True; better, re-save it as weights only with "
        "torch.save(model.state_dict(), 'model.pt') or safetensors.torch.save_file(model.state_dict(), "
        "'model.safetensors') and load that with arch=... and num_classes=...."
    )


def _torch_load(src: Source, fmt: Format, trust_pickle: bool) -> tuple[object, bool]:
    """``torch.load`` weights-only; with ``trust_pickle``, fall back to a full unpickle.

    Returns:
        The loaded object and whether the full (unsafe) unpickler was used.
    """
    try:
        return torch.load(src.arg(), map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as exc:
        weights_only_error: BaseException = exc
    except _LOAD_ERRORS as exc:
        raise corrupt(src, "a torch.save checkpoint", exc) from exc
    try:
        unsafe = pickle_risks(src, fmt)
    except (zipfile.BadZipFile, OSError, StopIteration, KeyError) as exc:
        raise corrupt(src, "a torch.save checkpoint", exc) from exc
    if not unsafe:
        raise corrupt(src, "a torch.save checkpoint", weights_only_error) from weights_only_error
    if not trust_pickle:
        raise UnsafeCheckpointError(
            _unsafe_message(src, "a full pickle (not a plain state dict)", unsafe), unsafe_globals=unsafe
        ) from None
    try:
        return torch.load(src.arg(), map_location="cpu", weights_only=False), True
    except _LOAD_ERRORS + (AttributeError, ImportError, ModuleNotFoundError, TypeError) as exc:
        raise ValueError(
            f"checkpoint {src.where!r} could not be unpickled even with trust_pickle=True: {exc}. A full pickle "
            "needs the code of its classes to be importable. Fix: re-save it as a state dict where it was created."
        ) from exc


def load_model(
    source: str | os.PathLike[str] | bytes,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    name: str | None = None,
    card: ModelCard | None = None,
    root: str | os.PathLike[str] | None = None,
    check_arch: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a trained model from a checkpoint file or its bytes (see the module docstring for formats).

    A path is read once into memory, from one open file; the hash and the weights both come from those bytes.

    Args:
        source: a path, or the file's bytes (an upload); then ``name`` is its file name.
        arch: architecture for weights-only files (see :func:`available_architectures`); default: the card's.
            Not used for TorchScript, torch.export and whole-module pickles, which carry their graph.
        num_classes: classifier outputs for weights-only files; default: the card's, else inferred.
        trust_pickle: allow full pickles (``torch.save(model)``), TorchScript archives and ``.pt2`` archives
            with pickled parts or with graph operations beyond pure tensor computations (file, storage, random or
            custom operators: :mod:`kcore.graph_check`). Loading these can run any code: only for files from a
            source you trust.
        strict: refuse a state dict whose keys differ from the model's (before anything runs). With
            ``False`` the matching tensors are loaded and the differences reported on the result.
        name: display name; for bytes it is also used to recognise the format by its extension.
        card: a model card to use instead of the one beside the file (e.g. uploaded with it).
        root: a folder ``source`` must lie in (a server root): the file and the model card beside it are opened
            below ``root`` without following any symlink (:func:`kcore.safe_files.read_under`); a relative
            ``source`` starts at ``root``. Without it, symlinks in the path are resolved first and the file itself
            is opened with ``O_NOFOLLOW``.
        check_arch: called with the architecture a weights-only file will be built as (``arch``, else the model
            card's) before anything is built; it raises to refuse one (the dashboard refuses timm models it does not
            offer, whether named by the user or by a card beside a file on the server).

    Returns:
        The model (eval mode, CPU) with its hash (of the bytes loaded), kind, card and key report.

    Raises:
        FileNotFoundError: ``source`` is a path with no file.
        kcore.safe_files.UnsafePathError: (a ``ValueError``) a symlink below ``root`` or one swapped in while the
            file was opened, ``..``, a path outside ``root``, not a regular file, or more than
            :data:`kcore.server_paths.MAX_CHECKPOINT_BYTES` bytes.
        UnsafeCheckpointError: the file would run code when loaded (or its graph would do more than compute on
            tensors) and ``trust_pickle`` is False.
        ValueError: unknown, truncated or corrupt file; missing arch; keys or shapes that do not fit.

    Examples::

        m = kcore.load_model("sample_models/kshapes_resnet_s0.safetensors")   # card read from beside it
        m.model, m.card.default_layer, m.sha256[:12]
    """
    src = _as_source(source, name, root)
    if card is None and src.path is not None:
        if root is not None:
            card = _card_under(root, src.path)
        elif card_path_for(src.path).is_file():
            card = read_card(card_path_for(src.path))
    if check_arch is not None and (arch or (card.architecture if card else None)):
        check_arch(arch or card.architecture)
    sha256 = file_sha256(src.data)  # the bytes everything below loads from
    fmt = sniff(src)
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    built_arch: str | None = None
    built_classes: int | None = None
    kind: CheckpointKind
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        check_safetensors_header(src)
        try:
            state = st_load(src.data)
        except (SafetensorError, OSError) as exc:
            raise corrupt(src, "safetensors", exc) from exc
        model, missing, unexpected, built_arch, built_classes = _model_from_state_dict(
            state, src, arch=arch, num_classes=num_classes, card=card, strict=strict
        )
        kind = "safetensors"
    elif fmt in ("torch_zip", "pickle_stream"):
        obj, unpickled = _torch_load(src, fmt, trust_pickle)
        module = obj if isinstance(obj, nn.Module) else None
        if module is None and unpickled and isinstance(obj, Mapping):
            module = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
        if module is not None:
            model, kind = module, "pickle"
        else:
            model, missing, unexpected, built_arch, built_classes = _model_from_state_dict(
                obj, src, arch=arch, num_classes=num_classes, card=card, strict=strict
            )
            kind = "state_dict"
    elif fmt == "torchscript":
        if not trust_pickle:
            # detected from the archive's entries only: torch.jit.load would run the archive's code
            # (e.g. a __setstate__ that writes files) before kcore could look at the model
            raise UnsafeCheckpointError(
                f"checkpoint {src.where!r} is a TorchScript archive (torch.jit.save: it has code/ and "
                "constants.pkl entries). Loading TorchScript runs the code stored in the file (its __setstate__ "
                "and forward methods), so kcore never loads it from an untrusted source (trust_pickle=False); "
                "its layers could not be hooked anyway. Fix: where the model was made, save its weights with "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') (or torch.save(model."
                "state_dict(), 'model.pt')) and load that with arch=... and num_classes=... (or a model card); "
                "pass trust_pickle=True (CLI: --trust-pickle) only for a file you trust.",
                unsafe_globals=("TorchScript code/",),
            )
        try:
            model = torch.jit.load(src.arg(), map_location="cpu")
        except _LOAD_ERRORS as exc:
            raise corrupt(src, "a TorchScript archive", exc) from exc
        kind = "torchscript"
    else:
        try:
            risks = pt2_risks(src)
        except (zipfile.BadZipFile, OSError, KeyError) as exc:
            raise corrupt(src, "a torch.export archive", exc) from exc
        if risks and not trust_pickle:
            raise UnsafeCheckpointError(
                _unsafe_message(src, "a torch.export archive with pickled or compiled parts or Python code", risks),
                unsafe_globals=risks,
            )
        try:
            program = torch.export.load(src.arg())  # parses the graph; runs none of its operators
        except _LOAD_ERRORS + (ValueError, AssertionError, TypeError, AttributeError, _SpecViolationError) as exc:
            raise corrupt(src, "a torch.export archive", exc) from exc
        if not trust_pickle:
            # before unflatten and before the layer-listing dry run run anything
            from kcore.limits import limits

            findings = unsafe_operations(program, max_bytes=limits().max_input_bytes)
            if findings:
                raise UnsafeCheckpointError(
                    f"checkpoint {src.where!r} is a torch.export graph that does more than compute on tensors: "
                    f"{describe_findings(findings)}. kcore runs only an allow-list of pure tensor operations from "
                    "an untrusted file (kcore.graph_check; an operator like aten.from_file writes files, random "
                    "operators change the process's random state), so it refused to load it (trust_pickle=False). "
                    "Fix: export the model in eval mode with plain tensor code, or better, save its weights with "
                    "safetensors.torch.save_file(model.state_dict(), 'model.safetensors') and load that with "
                    "arch=... and num_classes=... (CLI: --arch, or a model card); pass trust_pickle=True "
                    "(CLI: --trust-pickle) only for a file you trust.",
                    unsafe_globals=tuple(dict.fromkeys(f.operation for f in findings)),
                )
        try:
            model = torch.export.unflatten(program)
        except _LOAD_ERRORS + (ValueError, AssertionError) as exc:
            raise corrupt(src, "a torch.export archive", exc) from exc
        kind = "export"
    model.eval()
    return LoadedModel(
        model=model,
        name=src.display,
        sha256=sha256,
        kind=kind,
        card=card,
        num_parameters=sum(p.numel() for p in model.parameters()),
        missing_keys=missing,
        unexpected_keys=unexpected,
        architecture=built_arch,
        num_classes=built_classes if built_classes is not None else (card.num_classes if card else None),
        preprocessing=resolve_preprocessing(card, built_arch),
    )
