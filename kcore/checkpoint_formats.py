"""What a checkpoint file is, read from its bytes without unpickling or running anything.

:class:`Source` holds a checkpoint's bytes, read once; :func:`sniff` tells its format from the first bytes and the
zip member names; :func:`check_safetensors_header` bounds a safetensors header before it is parsed;
:func:`pickle_risks` lists the globals a pickle would import (read with ``pickletools``, never executed) and
:func:`pt2_risks` the parts of a ``torch.export`` archive that ``torch.export.load`` would unpickle, execute or
decompress beyond bounds. :mod:`kcore.checkpoints` decides from these what it loads.
"""
from __future__ import annotations

import io
import json
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import torch

from kcore.graph_check import unsafe_serialized_values

CheckpointKind = Literal["state_dict", "safetensors", "torchscript", "export", "pickle"]
CHECKPOINT_KINDS: dict[str, str] = {
    "state_dict": "torch.save state dict (.pt/.pth/.bin), read weights-only; needs arch and num_classes",
    "safetensors": "safetensors weights (.safetensors); needs arch and num_classes",
    "torchscript": "TorchScript archive (torch.jit.save); runs code when loaded: only with trust_pickle=True",
    "export": "torch.export archive (.pt2, torch.export.save); no arch needed",
    "pickle": "whole pickled nn.Module (torch.save(model)); loaded only with trust_pickle=True",
}
"""The checkpoint kinds :func:`load_model` reports, with a description for pickers and help texts."""

MAX_LISTED = 5
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_PT2_MAX_PROGRAM_JSON = 64 * 1024 * 1024  # densenet121 and vit_b_16 write 1-2 MB
SAFETENSORS_MAX_TENSORS = 100_000
"""Most tensors a safetensors header may list; checked on the raw header before safetensors builds any tensor
(a header of a million empty entries otherwise costs minutes and gigabytes before it is refused)."""


@dataclass(frozen=True)
class Source:
    """A checkpoint's bytes, read once (from one open file, or uploaded), and where they came from.

    Everything (format detection, hashing, loading) reads :attr:`data`, never the path again, so all of it sees
    the same bytes.
    """

    path: Path | None
    data: bytes
    display: str

    @property
    def where(self) -> str:
        """How error messages name the checkpoint: its full path, or the upload's name."""
        return str(self.path) if self.path is not None else self.display

    @property
    def size(self) -> int:
        """The checkpoint's size in bytes."""
        return len(self.data)

    @property
    def suffix(self) -> str:
        """The display name's extension, lower-case (how an upload's format is guessed when its bytes do not say)."""
        return Path(self.display).suffix.lower()

    def arg(self) -> IO[bytes]:
        """What to hand to ``torch.load`` and friends: a fresh in-memory stream over the bytes."""
        return io.BytesIO(self.data)

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """A fresh binary stream over the bytes, as a context manager."""
        yield io.BytesIO(self.data)


def corrupt(src: Source, expected: str, detail: object) -> ValueError:
    """The error for a checkpoint that is not readable as ``expected`` (truncated or corrupt)."""
    return ValueError(
        f"checkpoint {src.where!r} could not be read as {expected}: {detail}. "
        "The file may be truncated or corrupt (an interrupted download or copy). "
        "Fix: copy or save the file again, then check its sha256."
    )


# --------------------------------------------------------------------------------------------------
# Format detection (never unpickles)
# --------------------------------------------------------------------------------------------------

Format = Literal["safetensors", "torch_zip", "torchscript", "export", "pickle_stream"]


def archive_members(zf: zipfile.ZipFile) -> set[str]:
    """Member names of a torch zip archive without their top-level folder (which is arbitrary)."""
    return {name.split("/", 1)[1] for name in zf.namelist() if "/" in name}


def sniff(src: Source) -> Format:
    """The format of a checkpoint, from its first bytes and zip member names (never by unpickling)."""
    size = src.size
    if size == 0:
        raise ValueError(f"checkpoint {src.where!r} is empty (0 bytes). Fix: save or upload the file again.")
    with src.open() as fh:
        head = fh.read(16)
        if len(head) >= 9:
            (header_len,) = struct.unpack("<Q", head[:8])
            if 2 <= header_len <= min(size - 8, _SAFETENSORS_MAX_HEADER) and head[8:9] == b"{":
                return "safetensors"
        if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
            fh.seek(0)
            try:
                with zipfile.ZipFile(fh) as zf:
                    members = archive_members(zf)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise corrupt(src, "a zip archive (torch.save, TorchScript or torch.export)", exc) from exc
            if "constants.pkl" in members or any(m.startswith("code/") for m in members):
                return "torchscript"
            if "archive_format" in members or any(m.startswith("models/") and m.endswith(".json") for m in members):
                return "export"
            if "data.pkl" in members:
                return "torch_zip"
            raise ValueError(
                f"checkpoint {src.where!r} is a zip archive but not one PyTorch wrote: it has no data.pkl "
                f"(torch.save), code/ (TorchScript) or archive_format (torch.export). Members: "
                f"{sorted(members)[:MAX_LISTED]}. Fix: save the model with torch.save(model.state_dict(), path) "
                "or safetensors.torch.save_file."
            )
        if head[:1] == b"\x80":  # pickle protocol >= 2: a legacy torch.save file or a plain pickle
            return "pickle_stream"
    if src.suffix == ".safetensors":
        raise corrupt(src, "safetensors", "the 8-byte header length and JSON header are missing or inconsistent")
    raise ValueError(
        f"checkpoint {src.where!r} is not a format kcore reads. Expected one of: "
        + "; ".join(f"{k}: {v}" for k, v in CHECKPOINT_KINDS.items())
        + ". Fix: save the weights with safetensors.torch.save_file(model.state_dict(), 'model.safetensors') or "
        "torch.save(model.state_dict(), 'model.pt')."
    )


def check_safetensors_header(src: Source) -> None:
    """Refuse a safetensors header that lists more than :data:`SAFETENSORS_MAX_TENSORS` tensors, cheaply.

    Counts the ``"data_offsets"`` keys of the raw header (one per tensor; a tensor name cannot hold the quoted
    key, JSON escapes its quotes) before safetensors parses the header and builds the tensors.

    Raises:
        ValueError: too many tensors.
    """
    (header_len,) = struct.unpack("<Q", src.data[:8])
    count = src.data[8 : 8 + min(header_len, _SAFETENSORS_MAX_HEADER)].count(b'"data_offsets"')
    if count > SAFETENSORS_MAX_TENSORS:
        raise ValueError(
            f"checkpoint {src.where!r} lists {count} tensors in its safetensors header; kcore reads at most "
            f"{SAFETENSORS_MAX_TENSORS} (kcore.checkpoints.SAFETENSORS_MAX_TENSORS), since building that many "
            "tensors costs minutes and gigabytes. Fix: save only the model's state dict "
            "(safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))."
        )


# --------------------------------------------------------------------------------------------------
# Finding unsafe globals without unpickling
# --------------------------------------------------------------------------------------------------

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}


def pickle_globals(stream: IO[bytes], max_pickles: int = 6) -> set[str]:
    """Statically list the globals (``module.name``) a pickle stream would import.

    Reads up to ``max_pickles`` consecutive pickles (the legacy torch.save format writes several) with
    :func:`pickletools.genops`, which parses opcodes without executing them.
    """
    found: set[str] = set()
    for _ in range(max_pickles):
        pushes: list[object] = []
        memo: dict[int, object] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.add(str(arg).replace(" ", "."))
                elif name == "STACK_GLOBAL":
                    mod, attr = (pushes[-2], pushes[-1]) if len(pushes) >= 2 else (None, None)
                    found.add(f"{mod}.{attr}" if isinstance(mod, str) and isinstance(attr, str) else "<dynamic global>")
                elif name in _STRING_OPS:
                    pushes.append(arg)
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushes[-1] if pushes else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushes[-1] if pushes else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushes.append(memo.get(int(arg)))
                elif name not in ("PROTO", "FRAME", "STOP"):
                    pushes.append(None)
        except (ValueError, EOFError, struct.error, UnicodeDecodeError):
            break  # not a pickle any more (raw tensor bytes of the legacy format) or truncated
        if not stream.read(1):
            break
        stream.seek(-1, io.SEEK_CUR)
    return found


def allowed_globals() -> set[str]:
    """Globals torch's weights-only unpickler accepts (private API, so guarded)."""
    try:
        from torch import _weights_only_unpickler

        allowed = set(_weights_only_unpickler._get_allowed_globals())
        allowed |= set(_weights_only_unpickler._get_user_allowed_globals())
    except (ImportError, AttributeError):
        return set()
    return allowed


def pickle_risks(src: Source, fmt: Format) -> tuple[str, ...]:
    """The globals that stop a weights-only load, found without unpickling."""
    if fmt == "torch_zip":
        with src.open() as fh:
            try:
                return tuple(sorted(torch.serialization.get_unsafe_globals_in_checkpoint(fh)))
            except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError):
                pass  # an opcode torch's scanner does not know: fall back to the generic scanner
        with src.open() as fh, zipfile.ZipFile(fh) as zf:
            member = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
            stream: IO[bytes] = io.BytesIO(zf.read(member))
    else:
        with src.open() as fh:
            stream = io.BytesIO(fh.read())
    return tuple(sorted(pickle_globals(stream) - allowed_globals()))


def pt2_risks(src: Source) -> tuple[str, ...]:
    """Parts of a torch.export archive that ``torch.export.load`` would unpickle or execute."""
    risks: list[str] = []
    with src.open() as fh, zipfile.ZipFile(fh) as zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        members = {n[len(root):]: n for n in names if n.startswith(root)}
        if members.get("archive_format") is None or zf.read(members["archive_format"]).strip() != b"pt2":
            risks.append("legacy torch.export archive (before PyTorch 2.8): loaded with a pickle fallback")
        # torch.export.load falls back to the legacy reader (pickles, read weights_only=False on failure) for
        # entries at the top level of the zip, which the checks below would not see
        # torch.save writes members stored, not deflated: a member that inflates far beyond the file is a bomb
        inflated = sum(info.file_size for info in zf.infolist())
        if inflated > max(2 * src.size, _PT2_MAX_PROGRAM_JSON):
            risks.append(f"members inflating to {inflated} bytes from a {src.size}-byte file (a zip bomb)")
        stray = sorted(n for n in names if not root or not n.startswith(root))
        if stray:
            risks.append(f"entries outside the archive's one folder (read by the legacy loader): {stray[:3]}")
        for rel, full in sorted(members.items()):
            if rel.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")) or rel.endswith(
                (".so", ".dll", ".dylib")
            ):
                risks.append(f"compiled code or external weights: {rel}")
            elif rel.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(zf.read(full)).get("config", {})
                except (json.JSONDecodeError, AttributeError) as exc:
                    risks.append(f"unreadable payload config {rel} ({exc})")
                    continue
                for fqn, meta in config.items():
                    path_name = str(meta.get("path_name", ""))
                    if meta.get("use_pickle"):
                        risks.append(f"pickled payload {fqn!r} ({rel})")
                    elif path_name.startswith(("custom_obj_", "opaque_obj_")):
                        risks.append(f"custom object {fqn!r} ({rel})")
            elif rel.endswith(".pt"):
                # Sample inputs (and legacy constants) go through torch.load, which falls back to
                # weights_only=False when the weights-only load fails.
                try:
                    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(zf.read(full)))
                except (pickle.UnpicklingError, ValueError, RuntimeError, EOFError, KeyError) as exc:
                    risks.append(f"unreadable pickle {rel} ({exc})")
                    continue
                risks.extend(f"{g} (in {rel})" for g in sorted(unsafe))
            elif rel.startswith("models/") and rel.endswith(".json"):
                # every program in models/ is parsed by torch.export.load, whose sympy parser evaluates Python
                with zf.open(full) as member:
                    raw = member.read(_PT2_MAX_PROGRAM_JSON + 1)
                if len(raw) > _PT2_MAX_PROGRAM_JSON:
                    risks.append(f"program {rel} larger than {_PT2_MAX_PROGRAM_JSON >> 20} MiB")
                    continue
                try:
                    program = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                    risks.append(f"unreadable program {rel} ({str(exc)[:80]})")
                    continue
                risks.extend(unsafe_serialized_values(program, member=rel))
    return tuple(risks)


def listing(keys: list[str]) -> str:
    """The first :data:`MAX_LISTED` keys, quoted, and their count when there are more."""
    shown = ", ".join(repr(k) for k in keys[:MAX_LISTED])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")
