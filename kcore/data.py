"""Images as [0, 1] tensors: folders, file lists, uploads, zips and the bundled kshapes images.

This module only loads. An ``ImageSet`` decodes every image once, at construction, into uint8 RGB at one size
(the shorter side scaled to fit, the centre cropped: never stretched), so that corrupt files are found (and
skipped with a warning) before any feature is extracted, and ``raw(i)`` gives the exact pixels, for overlays.
Items are ``(tensor (3, H, W) float32 in [0, 1], label)``; the label is -1 when unknown. Every model's resize,
crop and normalisation is :class:`kcore.preprocessing.Preprocessing`; the labelled training and test splits of
the studies are :mod:`kcore.imagesets`.

Memory: ``N * H * W * 3`` bytes (about 150 kB per 224x224 image, 12 kB per 64x64 image).
"""
from __future__ import annotations

import copy
import functools
import hashlib
import io
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch.utils.data import Dataset

from kcore import synthetic
from kcore.decode import _DECODE_ERRORS, RESIZE_MODES, ResizeMode, _decode, decode_image, resize_image, to_unit
from kcore.groups import Groups, as_groups, groups_option
from kcore.limits import LimitExceeded, Limits, input_tensor_bytes
from kcore.limits import limits as current_limits
from kcore.preprocessing import Preprocessing
from kcore.safe_files import read_nofollow, read_under, scan_under
from kcore.synthetic import KShapesSpec, LabelKind, Split

__all__ = [
    "BUNDLED_DATA", "IMAGE_EXTENSIONS", "MAX_FILE_BYTES", "MAX_FOLDER_ENTRIES", "MAX_ZIP_BYTES", "RESIZE_MODES",
    "ImageSet", "Preprocess", "ResizeMode", "as_loading", "decode_image", "folder_entries", "is_bundled",
    "load_image", "make_transform", "read_regular_file", "resize_image", "sample_images", "to_unit",
]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm"})
"""Extensions reported as images (other files are still tried: the content decides)."""

MAX_FILE_BYTES = 256 * 2**20
"""Image files and zip members larger than this (uncompressed) are skipped, not read: bomb guard."""

MAX_ZIP_BYTES = 4 * 2**30
"""A zip archive read from disk may be at most this large."""


@dataclass(frozen=True)
class Preprocess:
    """How older callers described an image set's loading: size, resize mode and an optional normalisation.

    New code passes only the size (``ImageSet.from_folder(folder, (224, 224))``): an image set holds the images
    in [0, 1] and each model's :class:`kcore.preprocessing.Preprocessing` resizes, crops and normalises them.
    A ``mean``/``std`` given here is applied through that same class (:attr:`normalization`).

    Attributes:
        input_size: ``(H, W)`` in pixels the images are loaded at.
        mean: per-channel RGB mean in [0, 1]; ``None`` (default) = no normalisation, items in [0, 1].
        std: per-channel RGB std in [0, 1]; ``None`` together with ``mean``.
        resize: one of ``RESIZE_MODES`` (default ``"center_crop"``: the aspect ratio is kept).
    """

    input_size: tuple[int, int] = (64, 64)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: ResizeMode = "center_crop"

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be (H, W) with positive ints, got {self.input_size!r}. "
                             "Fix: give two positive integers such as (224, 224).")
        current_limits().check(
            "max_input_side", max(size), shown=f"{size[0]}×{size[1]}",
            what=f"input_size (one float32 RGB image alone would take {3 * 4 * size[0] * size[1] / 2**30:.1f} GiB)",
            fix="use the size the model was trained at (e.g. 224×224) in the model card or --input-size")
        object.__setattr__(self, "input_size", size)
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {sorted(RESIZE_MODES)}, got {self.resize!r}. "
                             "Fix: use 'center_crop' (keeps the aspect ratio).")
        norm = self.normalization  # validates mean and std (kcore.preprocessing's checks and messages)
        object.__setattr__(self, "mean", None if norm is None else norm.mean)
        object.__setattr__(self, "std", None if norm is None else norm.std)

    @property
    def normalization(self) -> Preprocessing | None:
        """The mean/std as a :class:`kcore.preprocessing.Preprocessing` (no resize), or ``None`` when none is given
        or it is the identity (mean 0, std 1)."""
        if self.mean is None and self.std is None:
            return None
        norm = Preprocessing(mean=self.mean, std=self.std, source="image set")
        if set(norm.mean or ()) == {0.0} and set(norm.std or ()) == {1.0}:
            return None
        return norm

    @classmethod
    def from_card(cls, card: dict, resize: ResizeMode = "center_crop") -> Preprocess:
        """Preprocessing of a model card (its ``input_size``, ``mean`` and ``std`` keys).

        Raises:
            ValueError: a key is missing.
        """
        missing = [k for k in ("input_size", "mean", "std") if k not in card]
        if missing:
            raise ValueError(f"model card lacks {missing}; it has {sorted(card)}. "
                             "Fix: give input_size, mean and std, or use kcore.preprocessing.Preprocessing.from_card.")
        return cls(tuple(card["input_size"]), tuple(card["mean"]), tuple(card["std"]), resize)


def as_loading(size: tuple[int, int] | int | Preprocess | None, default: tuple[int, int] = (64, 64)) -> Preprocess:
    """How to load an image set: ``(H, W)``, a side ``S`` (square), a :class:`Preprocess`, or ``None`` (``default``).

    Raises:
        TypeError: ``size`` is none of these.
    """
    if size is None:
        return Preprocess(tuple(default))
    if isinstance(size, Preprocess):
        return size
    if isinstance(size, int) and not isinstance(size, bool):
        return Preprocess((size, size))
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return Preprocess(tuple(size))
    raise TypeError(f"size must be (H, W), one int side or None; got {size!r} ({type(size).__name__}). "
                    "Fix: pass e.g. (224, 224), the size returned by kcore.preprocessing.load_size.")


def make_transform(input_size: tuple[int, int], mean: Sequence[float],
                   std: Sequence[float]) -> Callable[[np.ndarray], torch.Tensor]:
    """A function ``uint8 (H, W, 3) RGB -> float32 (3, h, w)``: resize (centre crop), scale to [0, 1], normalise.

    Args:
        input_size: ``(h, w)`` of the output.
        mean: per-channel mean in [0, 1], subtracted after scaling to [0, 1].
        std: per-channel std in [0, 1], divided by afterwards.

    Returns:
        The transform. Images already at ``input_size`` are not resampled. The normalisation is
        :class:`kcore.preprocessing.Preprocessing`'s.
    """
    pre = Preprocess(tuple(input_size), tuple(mean), tuple(std))
    norm = pre.normalization

    def transform(image: np.ndarray) -> torch.Tensor:
        x = to_unit(resize_image(image, pre.input_size, pre.resize))
        return x if norm is None else norm.transform()(x[None])[0]

    return transform


def read_regular_file(path: str | os.PathLike, max_bytes: int = MAX_FILE_BYTES, *, what: str = "file") -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes from one open file; never blocks on a FIFO or reads a device.

    Symlinks in ``path`` are resolved first; the resolved file is then opened without following a symlink
    (:func:`kcore.safe_files.read_nofollow`), so one swapped in after the resolve is refused.

    Raises:
        OSError: not a regular file (FIFO, device, socket, folder), larger than ``max_bytes``, a symlink swapped in
            while it was opened (:class:`kcore.safe_files.UnsafePathError`, also a ``ValueError``), or unreadable.
            The message names the path and never includes the file's contents.
    """
    return read_nofollow(path, max_bytes=max_bytes, what=what)


MAX_FOLDER_ENTRIES = 1_000_000
"""An image folder with more entries (files, symlinks, FIFOs, in all its subfolders) is refused before any is read."""


def _folder_reader(path: Path, root: Path, open_root: Path | None = None) -> Callable[[], bytes]:
    """Read ``path`` (an entry of the folder ``root``) from one open file, if it resolves inside ``root``.

    A symlink inside the folder is followed only to a file inside ``root``; the resolved file is then opened below
    ``open_root`` (default: ``root``; a server root for typed folders) without following any symlink
    (:func:`kcore.safe_files.read_under`), so a file or folder swapped for a symlink after this check is refused.
    """
    base = root if open_root is None else open_root

    def read() -> bytes:
        real = path.resolve()
        if not real.is_relative_to(root):
            raise OSError("a symlink that leads out of the folder (not followed)")
        return read_under(base, real, max_bytes=MAX_FILE_BYTES, what="image file")

    return read


@dataclass(frozen=True)
class _Entry:
    """One candidate image before decoding."""

    name: str
    read: Callable[[], bytes]
    label_name: str | None = None


def folder_entries(folder: str | os.PathLike, root: str | os.PathLike | None = None) -> list[_Entry]:
    """Every file of ``folder`` (subfolders too) as a candidate image, listed and read safely; nothing is read yet.

    The one listing of image folders, for :meth:`ImageSet.from_folder` and :class:`kcore.imagesets.FolderSplit`.
    Each entry's ``name`` is its path relative to ``folder``, its ``label_name`` its first subfolder (``None`` for
    files directly in ``folder``), and ``read()`` returns its bytes or raises ``OSError`` (a symlink out of the
    folder, a FIFO or device, a file over :data:`MAX_FILE_BYTES`).

    Args:
        folder: the folder.
        root: a folder that ``folder`` lies in, below which everything is opened without following symlinks
            (see :meth:`ImageSet.from_folder`); default ``folder`` with the symlinks in its own path resolved.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        kcore.safe_files.UnsafePathError: (a ``ValueError``) see :meth:`ImageSet.from_folder`.
    """
    given = Path(folder)
    if root is None:
        if not given.is_dir():
            raise FileNotFoundError(f"folder {str(given)!r} does not exist or is not a folder")
        open_root = real_folder = given.resolve()
    else:
        open_root = Path(root)
        real_folder = given if given.is_absolute() else open_root / given
    try:
        found = scan_under(open_root, real_folder, max_files=MAX_FOLDER_ENTRIES, skip_hidden=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"folder {str(given)!r} does not exist or is not a folder") from None
    entries = []
    for path, _kind in found:  # FIFOs, devices and symlinks too: reading them says why they are skipped
        rel = path.relative_to(real_folder).as_posix()
        entries.append(_Entry(rel, _folder_reader(path, real_folder, open_root), _label_of(rel)))
    return entries


def load_image(entry: _Entry, size: tuple[int, int], resize: ResizeMode = "center_crop") -> np.ndarray:
    """One entry of :func:`folder_entries` read, decoded (:func:`decode_image`, under the caps) and resized.

    Returns:
        uint8 ``(H, W, 3)`` RGB at ``size``.

    Raises:
        OSError: the file cannot be read (see :func:`folder_entries`); the message names it.
        ValueError: not a readable image, or over ``max_image_pixels``; the message names it.
    """
    try:
        data = entry.read()
    except OSError as exc:
        raise OSError(f"image {entry.name!r}: cannot read: {exc}") from exc
    try:
        image = decode_image(data)
    except LimitExceeded:
        raise
    except _DECODE_ERRORS as exc:
        raise ValueError(f"image {entry.name!r} is not a readable image ({type(exc).__name__}: {exc}). "
                         "Fix: remove or replace the file.") from exc
    return resize_image(image, size, resize)


class ImageSet(Dataset):
    """Decoded images at one size, as a torch Dataset of ``(x (3, H, W) in [0, 1], label)``.

    Build one with ``from_folder``, ``from_paths``, ``from_uploads``, ``from_zip``,
    ``from_kshapes`` or ``sample_images``; the constructor takes already decoded images.

    Attributes:
        ids: stable string id of each image (relative path, upload name, kshapes id).
        labels: label of each image, -1 when unknown.
        class_names: names of the labels (empty when there are none).
        skipped: ``(name, reason)`` of each file that was not loaded.
        source: description of where the images came from.
        size: ``(H, W)`` of every image.
        preprocess: how the images were loaded (size, resize mode; a normalisation only if an older caller gave
            one through :class:`Preprocess`).
        groups: which images belong together (:class:`kcore.groups.Groups`), or ``None``: every image its own
            group (the default; kcore makes no crops or flips of an image, so none of its own sets has groups).
    """

    def __init__(self, images: np.ndarray, ids: Sequence[str], labels: Sequence[int],
                 size: tuple[int, int] | int | Preprocess | None, *, class_names: Sequence[str] = (),
                 skipped: Sequence[tuple[str, str]] = (), source: str = "",
                 digests: Sequence[bytes] | None = None, groups: Groups | Sequence | None = None) -> None:
        """Wrap decoded images.

        Args:
            images: ``(N, H, W, 3)`` uint8 RGB at ``size``.
            ids: N unique strings.
            labels: N ints (-1 = unknown).
            size: ``(H, W)`` the images have (or a :class:`Preprocess`, see :func:`as_loading`).
            class_names: label names.
            skipped: files that were not loaded, as ``(name, reason)``.
            source: where the images came from (for messages).
            digests: per-image sha256 digests of the source bytes; default: of the pixels.
            groups: one group per image (:class:`kcore.groups.Groups` or N keys); default none.

        Raises:
            ValueError: inconsistent lengths, shapes or duplicate ids.
        """
        preprocess = as_loading(size)
        images = np.asarray(images)
        n = len(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if tuple(images.shape[1:3]) != preprocess.input_size:
            raise ValueError(f"images are {images.shape[1:3]} but size is {preprocess.input_size}. "
                             "Fix: pass the (H, W) the images have.")
        if len(ids) != n or len(labels) != n:
            raise ValueError(f"got {n} images, {len(ids)} ids and {len(labels)} labels")
        if len(set(ids)) != n:
            raise ValueError("ids must be unique")
        _check_set_size(n, preprocess.input_size, source or "the image set")
        self.images = images
        self.ids = tuple(ids)
        self.labels = tuple(int(v) for v in labels)
        self.preprocess = preprocess
        self.size = preprocess.input_size
        self._norm = preprocess.normalization
        self.class_names = tuple(class_names)
        self.skipped = tuple(skipped)
        self.source = source
        if digests is None:
            digests = [hashlib.sha256(img.tobytes()).digest() for img in images]
        self._digests = tuple(digests)
        self.groups = as_groups(groups, n)

    def with_groups(self, groups: Groups | Sequence | str | None) -> ImageSet:
        """This image set with ``groups``: a :class:`kcore.groups.Groups`, one key per image, ``"folder"`` (each
        image's subfolder, :func:`kcore.groups.folder_groups`), a CSV path, or ``None`` (no grouping).

        Raises:
            ValueError: see :func:`kcore.groups.groups_option`, or not one group per image.
        """
        out = copy.copy(self)
        if isinstance(groups, (str, os.PathLike)):
            groups = groups_option(groups, self.ids, ignore=[name for name, _ in self.skipped])
        out.groups = as_groups(groups, len(self))
        return out

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = to_unit(self.images[i])
        return (x if self._norm is None else self._norm.transform()(x[None])[0]), self.labels[i]

    def raw(self, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``(H, W, 3)`` RGB at the model input size (a read-only view)."""
        view = self.images[i].view()
        view.flags.writeable = False
        return view

    def tensors(self) -> torch.Tensor:
        """All images as one ``(N, 3, H, W)`` float32 tensor in [0, 1] (normalised only by an older ``Preprocess``)."""
        x = to_unit(self.images)
        return x if self._norm is None else self._norm.transform()(x)

    def content_hash(self, *, include_preprocess: bool = False) -> str:
        """sha256 (hex) over the ids and the source bytes of every image, in order.

        Args:
            include_preprocess: also hash the size, resize mode and any normalisation, i.e.
                identify the exact tensors the set yields rather than the source images.
        """
        h = hashlib.sha256(b"kcore-imageset/1\0")
        for name, digest in zip(self.ids, self._digests):
            h.update(name.encode("utf-8") + b"\0" + digest)
        if include_preprocess:
            p = self.preprocess
            h.update(repr((p.input_size, p.mean, p.std, p.resize)).encode("utf-8"))
        return h.hexdigest()

    def __repr__(self) -> str:
        return (f"ImageSet({len(self)} images from {self.source!r}, size {self.size}, "
                f"{len(self.class_names)} classes, {len(self.skipped)} skipped)")

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_folder(cls, folder: str | os.PathLike, size: tuple[int, int] | int | Preprocess | None = None, *,
                    limit: int | None = None, root: str | os.PathLike | None = None) -> ImageSet:
        """Images of a folder: class subfolders (ImageFolder layout) or a flat folder.

        Files directly in ``folder`` get label -1 when there are class subfolders too. Hidden
        files and folders (name starting with ".") are ignored; other files that are not
        readable images are skipped with a warning, as are FIFOs, devices and symlinks that lead out
        of the folder. The folder is listed without following symlinks (a symlinked subfolder is
        skipped, not entered) and each image is read from one open file whose bytes are both decoded
        and hashed (:meth:`content_hash`).

        Args:
            folder: the folder.
            size: ``(H, W)`` to load at (shorter side scaled, centre cropped; :func:`as_loading`); default 64 × 64.
            limit: keep at most this many images (in sorted id order).
            root: a folder that ``folder`` lies in (a server root, :func:`kcore.server_paths.server_root_of`):
                ``folder`` and every image are then opened below ``root`` without following any symlink,
                so a folder swapped for a symlink after it was checked is refused, and an image swapped
                for one is skipped. Default: ``folder`` itself, with the symlinks in its own path resolved.

        Raises:
            FileNotFoundError: ``folder`` does not exist or is not a folder.
            kcore.safe_files.UnsafePathError: (a ``ValueError``) ``folder`` is or passes through a symlink
                below ``root``, lies outside it, is not a folder, or holds more than
                :data:`MAX_FOLDER_ENTRIES` entries.
            ValueError: no readable image was found.
        """
        return _build(folder_entries(folder, root), size, f"folder {str(folder)!r}", limit)

    @classmethod
    def from_paths(cls, paths: Iterable[str | os.PathLike],
                   size: tuple[int, int] | int | Preprocess | None = None) -> ImageSet:
        """Images of a list of files, in the given order, with label -1, at ``size`` (as :meth:`from_folder`).

        Ids are the paths relative to their common parent folder. Missing and unreadable
        files are skipped with a warning.

        Raises:
            ValueError: no readable image among ``paths``.
        """
        paths = [Path(p) for p in paths]
        parent = Path(os.path.commonpath([p.resolve().parent for p in paths])) if paths else Path()
        entries = []
        for p in paths:
            try:
                name = p.resolve().relative_to(parent).as_posix()
            except ValueError:  # different drives on Windows
                name = p.as_posix()
            entries.append(_Entry(name, functools.partial(read_regular_file, p, what="image file")))
        return _build(entries, size, f"{len(paths)} file paths", None)

    @classmethod
    def from_uploads(cls, uploads: Iterable[tuple[str, bytes]],
                     size: tuple[int, int] | int | Preprocess | None = None) -> ImageSet:
        """Images given as ``(file name, bytes)`` pairs (e.g. a browser upload), at ``size`` as :meth:`from_folder`.

        A ``.zip`` upload is expanded (see ``from_zip``). Repeated names get ``#2``, ``#3`` ...

        Raises:
            ValueError: no readable image among the uploads.
        """
        entries: list[_Entry] = []
        for name, data in uploads:
            if name.lower().endswith(".zip"):
                entries.extend(_zip_entries(data, prefix=name + "/"))
            else:
                entries.append(_Entry(name, _constant(data)))
        return _build(_unique(entries), size, "uploads", None)

    @classmethod
    def from_zip(cls, archive: bytes | str | os.PathLike,
                 size: tuple[int, int] | int | Preprocess | None = None) -> ImageSet:
        """Images of a zip archive (bytes or path) at ``size``. Class subfolders give labels, as for folders.

        A single top folder wrapping everything (``photos/cat/1.png``) is ignored for labels.

        Raises:
            ValueError: not a zip archive, or no readable image in it.
        """
        if isinstance(archive, (bytes, bytearray)):
            data, source = bytes(archive), "zip archive (bytes)"
        else:
            data = read_regular_file(archive, MAX_ZIP_BYTES, what="zip archive")
            source = f"zip archive {str(archive)!r}"
        return _build(_zip_entries(data), size, source, None)

    @classmethod
    def from_kshapes(cls, spec: KShapesSpec | None = None, split: Split = "test",
                     n: int | None = None, preprocess: tuple[int, int] | int | Preprocess | None = None,
                     labels: LabelKind = "fine") -> ImageSet:
        """The bundled kshapes images (rendered, nothing read from disk).

        Args:
            spec: which dataset; default ``KShapesSpec()``.
            split: "train", "test" or "val".
            n: the first ``n`` images of the split (default: all).
            preprocess: the size to load at (:func:`as_loading`); default: the spec's image size.
            labels: "fine" (shape classes) or "coarse" (round vs angular).
        """
        ds = synthetic.KShapesDataset(spec, split, labels, n)
        pre = as_loading(preprocess, (ds.spec.image_size,) * 2)
        _check_set_size(len(ds), pre.input_size, f"{ds.spec.name} {split}")  # before rendering any image
        raw = [ds.raw(i) for i in range(len(ds))]
        digests = [hashlib.sha256(img.tobytes()).digest() for img in raw]
        size = pre.input_size
        images = np.stack([resize_image(img, size, pre.resize) for img in raw]) if raw \
            else np.zeros((0, *size, 3), np.uint8)
        if len(images) == 0:
            raise ValueError(f"kshapes {split!r} split of {ds.spec} with n={n} has no images")
        return cls(images, ds.ids, [ds.label(i) for i in range(len(ds))], pre,
                   class_names=ds.class_names, source=f"{ds.spec.name} {split}", digests=digests)


def sample_images(n: int = 100, split: Split = "test", seed: int = 0,
                  preprocess: tuple[int, int] | int | Preprocess | None = None) -> ImageSet:
    """The first ``n`` kshapes images of ``split`` for dataset ``seed``, in [0, 1]: a ready-made image set.

    ``preprocess`` is the size to load at (:func:`as_loading`; default 64 × 64, the images' own).

    Raises:
        ValueError: ``n`` is not in ``[1, size of the split]``.
    """
    spec = KShapesSpec(seed=seed)
    size = spec.split_size(split)
    if not 1 <= n <= size:
        raise ValueError(f"n must be in [1, {size}] for the kshapes {split!r} split, got {n}")
    return ImageSet.from_kshapes(spec, split, n, preprocess)


# ----------------------------------------------------------------------- internals
def _check_set_size(n: int, size: tuple[int, int], source: str) -> None:
    """Refuse an image set of ``n`` images at ``size`` over the image-count or model-input caps."""
    lim = current_limits()
    fewer = "use fewer images (a subset, or --n-images on the command line)"
    lim.check("max_images", n, what=f"{source}: the number of images", fix=fewer)
    lim.check("max_input_bytes", input_tensor_bytes(n, size),
              what=f"{source}: the model input of {n:,} images at {size[0]}×{size[1]}",
              fix=f"{fewer} (at most {lim.max_input_bytes // input_tensor_bytes(1, size):,} at {size[0]}×{size[1]}), "
                  "or a smaller input size")


def _constant(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _label_of(rel: str) -> str | None:
    parts = PurePosixPath(rel).parts
    return parts[0] if len(parts) > 1 else None


def _unique(entries: list[_Entry]) -> list[_Entry]:
    seen: dict[str, int] = {}
    out = []
    for e in entries:
        count = seen.get(e.name, 0) + 1
        seen[e.name] = count
        out.append(e if count == 1 else _Entry(f"{e.name}#{count}", e.read, e.label_name))
    return out


def _zip_entries(data: bytes, prefix: str = "") -> list[_Entry]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{prefix.rstrip('/') or 'archive'}: not a zip archive ({exc})") from exc
    infos = {i.filename: i for i in zf.infolist() if not i.is_dir() and not _hidden(i.filename)}
    names = sorted(infos)
    # Drop a single folder that wraps everything ("photos/...") before reading class folders.
    tops = {PurePosixPath(n).parts[0] for n in names}
    strip = len(tops) == 1 and all(len(PurePosixPath(n).parts) > 1 for n in names)
    entries = []
    for name in names:
        rel = PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix() if strip else name
        entries.append(_Entry(prefix + name, _zip_reader(zf, infos[name]), _label_of(rel)))
    return entries


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Callable[[], bytes]:
    def read() -> bytes:
        if info.file_size > MAX_FILE_BYTES:
            raise OSError(f"{info.file_size} bytes uncompressed, more than MAX_FILE_BYTES "
                          f"({MAX_FILE_BYTES})")
        return zf.read(info)

    return read


def _hidden(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _decode_all(entries: Iterable[_Entry], pre: Preprocess, limit: int | None, source: str = "images",
                lim: Limits | None = None) -> Iterator[tuple[_Entry, np.ndarray | None, bytes, str]]:
    """Yield ``(entry, image or None, digest, reason)``; stop after ``limit`` good images.

    One image set is one request: its image count, its decoded pixels (from each header, before decoding) and
    its model input (images × 3 × H × W float32 at ``pre.input_size``) are checked against ``lim`` as the images
    are decoded, so the work stops at the cap. An image over the per-image cap is skipped (with the reason).

    Raises:
        LimitExceeded: the image set goes over ``max_images``, ``max_request_pixels`` or ``max_input_bytes``;
            the message says how many images were read.
    """
    lim = lim if lim is not None else current_limits()
    h, w = pre.input_size
    good, pixels = 0, 0
    fewer = "use fewer images (a subset of the folder or zip, or --n-images on the command line)"
    for e in entries:
        if limit is not None and good >= limit:
            return

        def budget(n: int, e: _Entry = e) -> None:
            lim.check("max_request_pixels", pixels + n, shown=f"{pixels + n:,} pixels",
                      what=f"{source}: the decoded size of the images ({good} read, {pixels:,} pixels, then "
                           f"{e.name!r} with {n:,})",
                      fix=f"{fewer}, or smaller ones (downscale photos towards the model's input size first)")

        try:
            data = e.read()
        except (OSError, zipfile.BadZipFile, RuntimeError) as exc:  # RuntimeError: encrypted zip
            yield e, None, b"", f"cannot read: {exc}"
            continue
        try:
            image = _decode(data, lim, budget)
        except LimitExceeded as exc:
            if exc.cap_name != "max_image_pixels":
                raise
            yield e, None, b"", f"too large: {exc}"
            continue
        except _DECODE_ERRORS as exc:
            ext = PurePosixPath(e.name).suffix.lower()
            what = "not an image file" if ext not in IMAGE_EXTENSIONS else "corrupt image"
            yield e, None, b"", f"{what}: {type(exc).__name__}: {exc}"
            continue
        good += 1
        pixels += image.shape[0] * image.shape[1]
        lim.check("max_images", good, shown=f"at least {good:,}",
                  what=f"{source}: the number of images (reading stopped at {e.name!r}, after {good - 1:,})",
                  fix=fewer)
        lim.check("max_input_bytes", input_tensor_bytes(good, (h, w)),
                  what=f"{source}: the model input of {good:,} images at {h}×{w} (reading stopped at {e.name!r}, "
                       f"after {good - 1:,})",
                  fix=f"{fewer} (at most {lim.max_input_bytes // input_tensor_bytes(1, (h, w)):,} at {h}×{w}), "
                      "or a smaller input size (a model card's input_size and extra.resize_size)")
        yield e, resize_image(image, pre.input_size, pre.resize), hashlib.sha256(data).digest(), ""


def _build(entries: Iterable[_Entry], size: tuple[int, int] | int | Preprocess | None, source: str,
           limit: int | None) -> ImageSet:
    pre = as_loading(size)
    images, ids, label_names, digests, skipped = [], [], [], [], []
    seen = 0
    for entry, image, digest, reason in _decode_all(entries, pre, limit, source):
        seen += 1
        if image is None:
            skipped.append((entry.name, reason))
            continue
        images.append(image)
        ids.append(entry.name)
        label_names.append(entry.label_name)
        digests.append(digest)
    if skipped:
        shown = "; ".join(f"{n} ({r})" for n, r in skipped[:5])
        more = f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"{source}: skipped {len(skipped)} of {seen} files that are not readable "
                      f"images: {shown}{more}", stacklevel=3)
    if not images:
        found = "nothing (no files)" if seen == 0 else (
            f"{seen} file(s), none a readable image: "
            + "; ".join(f"{n} ({r})" for n, r in skipped[:5]))
        raise ValueError(f"{source}: no readable image found; found {found}. Supported formats: "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
    class_names = tuple(sorted({n for n in label_names if n is not None}))
    index = {n: k for k, n in enumerate(class_names)}
    labels = [index[n] if n is not None else -1 for n in label_names]
    return ImageSet(np.stack(images), ids, labels, pre, class_names=class_names,
                    skipped=skipped, source=source, digests=digests)


# ------------------------------------------------------------------ labelled splits (training and studies)
BUNDLED_DATA = "kshapes"
"""The word for the bundled kshapes images wherever a ``data`` argument takes a folder or the bundled set."""

DEPRECATED_DATA_ALIASES = ("sample",)
"""Older words for :data:`BUNDLED_DATA`, still accepted (with a DeprecationWarning)."""


def is_bundled(data: str | os.PathLike) -> bool:
    """True when ``data`` names the bundled kshapes images (``"kshapes"``, or the deprecated ``"sample"``)."""
    if not isinstance(data, str):
        return False
    if data in DEPRECATED_DATA_ALIASES:
        warnings.warn(f"data={data!r} is deprecated; pass {BUNDLED_DATA!r} for the bundled images.",
                      DeprecationWarning, stacklevel=3)
        return True
    return data == BUNDLED_DATA


def __getattr__(name: str):
    """The labelled splits moved to :mod:`kcore.imagesets`; their old names here still work."""
    if name in ("FolderSplit", "labelled_images"):
        from kcore import imagesets

        return getattr(imagesets, name)
    raise AttributeError(f"module 'kcore.data' has no attribute {name!r}")
