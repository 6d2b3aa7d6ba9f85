"""Networks A and B as chosen on the Models page: loading (cached per server), layer listings, the slots."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from dashboard.state._paths import ROOT
from kcore.architectures import available_architectures, curated_timm_architectures, is_timm
from kcore.cards import ModelCard
from kcore.checkpoints import LoadedModel, file_sha256, load_model
from kcore.features import LayerInfo, list_layers
from kcore.preprocessing import Preprocessing, card_for, preprocessing_of

ROLES = ("A", "B")
DEFAULT_PAIR = ("kshapes_tinynet_s0", "kshapes_resnet_s0")
"""The embedded default: a weak network (A) against a strong one (B), the paper's diagnosis setting."""


@dataclass(frozen=True, eq=False)
class ModelSlot:
    """Network A or B as chosen on the Models page.

    Attributes:
        loaded: the checkpoint (model, name, hash, card).
        source: how it was chosen: ``"sample"``, ``"upload"`` or ``"path"``.
        path: its file on the server (None for uploads).
        layers: the spatial layers with output shapes, for the picker.
        input_size: (C, H, W) the layers were listed at.
    """

    loaded: LoadedModel
    source: str
    path: str | None
    layers: tuple[LayerInfo, ...]
    input_size: tuple[int, int, int]

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def default_layer(self) -> str:
        names = self.layer_names
        card = self.loaded.card
        if card is not None and card.default_layer in names:
            return card.default_layer
        return names[len(names) // 2] if names else ""

    def shape_of(self, layer: str) -> tuple[int, ...] | None:
        return next((layer_.shape for layer_ in self.layers if layer_.name == layer), None)


@st.cache_data(show_spinner=False)
def architectures() -> list[str]:
    """The architectures the Models page offers for a weights-only file: the samples, torchvision's, and the timm
    models of common CNN and ViT families (:func:`kcore.architectures.curated_timm_architectures`; none without timm).

    The browser picks one of these names; it never types a name, let alone a module path.
    """
    return available_architectures(with_timm=False) + curated_timm_architectures()


def _check_offered(arch: str | None, what: str) -> None:
    """Refuse a timm architecture the Models page does not offer (e.g. named by an uploaded model card).

    Raises:
        ValueError: ``arch`` is a ``timm:`` name whose model (the part before a ``.TAG``) is not in
            :func:`architectures`.
    """
    if arch is None or not is_timm(arch) or arch.partition(".")[0] in architectures():
        return
    raise ValueError(
        f"{what} {arch!r} is not among the timm architectures this dashboard offers (common CNN and ViT families, "
        "without the giant sizes). Fix: choose one in the **Architecture** box, or compare this model with the "
        "command line (kcore fit --arch-a/--arch-b), which accepts every name of timm.list_models()."
    )


def _offered_check(arch: str | None, card_what: str = "the model card's architecture"):
    """For :func:`kcore.load_model`'s ``check_arch``: refuse a timm architecture the page does not offer, naming
    where it came from (the user's choice ``arch``, else the card's)."""
    return lambda name: _check_offered(name, "architecture" if name == arch else card_what)


def sample_models() -> dict[str, Path]:
    """The bundled sample checkpoints in ``sample_models/``, name → path."""
    return {p.stem: p for p in sorted((ROOT / "sample_models").glob("*.safetensors"))}


Identity = tuple[int, int, int, int, int]


def _identity(st_: os.stat_result) -> Identity:
    """What tells one version of a file from another: device, inode, size, mtime and ctime in nanoseconds.

    The mtime alone can be set back by anyone who can write the file (``os.utime``); the ctime cannot: the kernel
    sets it on every write, rename and ``utime``, and a replaced file (``os.replace``) has a new inode too.
    """
    return (st_.st_dev, st_.st_ino, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns)


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_path(path: str, identity: Identity, card_identity: Identity | None, arch: str | None,
               num_classes: int | None, root: str | None) -> LoadedModel:
    # keyed by the identity of the checkpoint and of its card (never by path and mtime alone), so a replaced or
    # rewritten file is loaded again; load_model reads the file once, so the result's sha256 always names the
    # weights in it, even if the file changed between taking the identity and loading
    return load_model(path, arch=arch, num_classes=num_classes, root=root, check_arch=_offered_check(arch))


def _card_identity(real: Path, root: Path | None) -> Identity | None:
    """The identity of the model card beside ``real`` (read below ``root`` when given), None when there is none."""
    from kcore.cards import card_path_for
    from kcore.safe_files import UnsafePathError, open_under

    card = card_path_for(real)
    if root is None:
        try:
            return _identity(card.stat())
        except OSError:
            return None
    try:
        with open_under(root, card, max_bytes=1 << 20, what="model card") as fh:
            return _identity(os.fstat(fh.fileno()))
    except FileNotFoundError:
        return None
    except UnsafePathError:
        return (-1, -1, -1, -1, -1)  # load_model refuses it with its own message


@st.cache_resource(max_entries=8, show_spinner=False)
def _load_bytes(sha256: str, name: str, arch: str | None, num_classes: int | None, card_json: str | None,
                _data: bytes) -> LoadedModel:
    card = ModelCard.from_dict(json.loads(card_json), source="uploaded model card") if card_json else None
    # a full pickle is never accepted from the browser: trust_pickle stays False
    return load_model(_data, name=name, arch=arch, num_classes=num_classes, card=card, trust_pickle=False,
                      check_arch=_offered_check(arch, "the uploaded model card's architecture"))


def load_path(path: str, arch: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a checkpoint from the server's disk, e.g. a bundled sample (cached by the file's :func:`_identity`)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(p)!r} on the server. Fix: give the full path of an existing file.")
    real = p.resolve()
    return _load_path(str(real), _identity(real.stat()), _card_identity(real, None), arch, num_classes, None)


def load_server_path(path: str, arch: str | None = None, num_classes: int | None = None) -> LoadedModel:
    """Load a checkpoint typed into the browser: only a regular file under the server's roots (``KCORE_SERVER_ROOTS``;
    off when unset), never with ``trust_pickle``.

    The file (and its card) are opened below their root without following any symlink, so a path swapped for a
    symlink after the check is refused; the cache is keyed by the identity of the open file (:func:`_identity`), so a
    file replaced under the same name and mtime is loaded again, and the result's hash is that of the bytes loaded.
    """
    from kcore.safe_files import open_under
    from kcore.server_paths import MAX_CHECKPOINT_BYTES, resolve_server_path, server_root_of

    _check_offered(arch, "architecture")
    real = resolve_server_path(path, kind="file", what="checkpoint path")
    root = server_root_of(real)
    with open_under(root, real, max_bytes=MAX_CHECKPOINT_BYTES, what="checkpoint path") as fh:
        identity = _identity(os.fstat(fh.fileno()))
    return _load_path(str(real), identity, _card_identity(real, root), arch, num_classes, str(root))


def load_bytes(data: bytes, name: str, arch: str | None = None, num_classes: int | None = None,
               card_json: str | None = None) -> LoadedModel:
    """Load uploaded checkpoint bytes (cached by their SHA-256)."""
    return _load_bytes(file_sha256(data), name, arch, num_classes, card_json, data)


@st.cache_resource(max_entries=16, show_spinner=False)
def _layers(sha256: str, key: str, input_size: tuple[int, int, int], _model: Any) -> tuple[LayerInfo, ...]:
    return tuple(list_layers(_model, input_size, spatial_only=True))


def make_slot(loaded: LoadedModel, source: str, path: str | None, image_size: tuple[int, int]) -> ModelSlot:
    """List the model's spatial layers at its input size (:func:`kcore.preprocessing.preprocessing_of`: the user's
    values, the card's, or torchvision's standard), else at the images' size."""
    hw = preprocessing_of(loaded).input_size or tuple(image_size)
    size = (3, int(hw[0]), int(hw[1]))
    key = f"{loaded.kind}:{loaded.architecture or ''}:{loaded.num_parameters}"
    return ModelSlot(loaded, source, path, _layers(loaded.sha256, key, size, loaded.model), size)


def preprocessing_override(role: str, sha256: str) -> Preprocessing | None:
    """The input size / mean / std the user set on the Models page for this checkpoint as ``role``, if any."""
    saved = st.session_state.get(f"kc_prep_{role}")
    return saved[1] if saved is not None and saved[0] == sha256 else None


def set_preprocessing_override(role: str, sha256: str, prep: Preprocessing | None) -> None:
    """Remember (or with ``None`` forget) the user's preprocessing for this checkpoint as ``role``."""
    if prep is None:
        st.session_state.pop(f"kc_prep_{role}", None)
    else:
        st.session_state[f"kc_prep_{role}"] = (sha256, prep)


def with_override(role: str, loaded: LoadedModel) -> LoadedModel:
    """``loaded`` with the user's preprocessing for ``role`` applied (unchanged when there is none)."""
    prep = preprocessing_override(role, loaded.sha256)
    return loaded if prep is None else dataclasses.replace(loaded, preprocessing=prep)


def card_text(s: ModelSlot) -> str:
    """The model card (JSON) recording the model's architecture, class count and preprocessing in use."""
    return json.dumps(card_for(s.loaded).to_dict(), indent=2) + "\n"


def slot(role: str) -> ModelSlot | None:
    """The chosen model ``"A"`` or ``"B"``."""
    return st.session_state.get(f"kc_slot_{role}")


def set_slot(role: str, value: ModelSlot) -> None:
    st.session_state[f"kc_slot_{role}"] = value


def clear_slot(role: str) -> None:
    """Empty ``role``: no model, card or layers (a new source is chosen, or a load failed)."""
    st.session_state.pop(f"kc_slot_{role}", None)
    forget_layer(role)


def layer_key(role: str) -> str:
    """The widget key of the Models page's layer picker for ``role``."""
    return f"kc_layer_{role}"


def forget_layer(role: str) -> None:
    """Drop the layer chosen for ``role`` (a new model starts on its default layer)."""
    st.session_state.pop(layer_key(role), None)


def keep_layer(role: str) -> None:
    """Before the layer picker of ``role`` is drawn: back to its model's default layer when it holds another
    model's layer (or nothing yet)."""
    s = slot(role)
    if s is not None and st.session_state.get(layer_key(role)) not in s.layer_names:
        st.session_state[layer_key(role)] = s.default_layer


def chosen_layer(role: str) -> str | None:
    """The layer picked for ``role`` on the Models page, else its model's default layer (None without a model)."""
    s = slot(role)
    if s is None:
        return None
    picked = st.session_state.get(layer_key(role))
    return picked if picked in s.layer_names else s.default_layer
