"""The image set to compare on: bundled kshapes images, uploads, or a folder on the server."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import streamlit as st

from dashboard.state._models import slot

DEFAULT_N_IMAGES = 400
"""Bundled images used by default (the kshapes test split, made by kcore; nothing is downloaded)."""

GROUPINGS = {"none": "None: every image its own", "folder": "By subfolder", "pattern": "By a file-name pattern"}
"""How the Models & images page can say which images belong together (:mod:`kcore.groups`)."""


@dataclass(frozen=True, eq=False)
class ImageChoice:
    """The images to compare on.

    Attributes:
        images: a dataset of ``(image (3, H, W) in [0, 1], label)`` with ``ids`` and ``raw(i)``.
        description: where they came from (for provenance).
        kind: ``"bundled"``, ``"upload"`` or ``"folder"``.
        token: identifies the uploaded files it was made from (see :func:`upload_token`), else ``""``.
        grouping: ``(how, pattern)`` the images were grouped by (:func:`group_images`); ``("none", "")`` = none.
    """

    images: Any
    description: str
    kind: str
    token: str = ""
    grouping: tuple[str, str] = ("none", "")

    @property
    def n(self) -> int:
        return len(self.images)


def _load_size(size: tuple[int, int]) -> tuple[int, int]:
    """Images as floats in [0, 1] at ``size`` (shorter side scaled, centre cropped, as the CLI loads them): each
    model's preprocessing resizes, crops and normalises them in the pipeline."""
    return (int(size[0]), int(size[1]))


@st.cache_resource(max_entries=4, show_spinner=False)
def bundled_images(n: int, size: int = 64) -> Any:
    """The bundled kshapes test images (rendered from code, nothing downloaded)."""
    from kcore import data as kdata

    return kdata.sample_images(n, preprocess=_load_size((size, size)))


def uploaded_images(files: Sequence[tuple[str, bytes]], size: tuple[int, int]) -> Any:
    """Uploaded image files and/or zips of images as one image set (at ``size``, for the overlays)."""
    from kcore import data as kdata

    return kdata.ImageSet.from_uploads(files, _load_size(size))


def upload_token(files: Sequence[tuple[str, int]]) -> str:
    """A key for a set of uploaded files (name, size): the images are decoded again only when it changes."""
    import hashlib

    return hashlib.sha256(repr(sorted((str(n), int(b)) for n, b in files)).encode()).hexdigest()[:16]


def folder_images(folder: str, size: tuple[int, int]) -> Any:
    """The images in a folder on the server (flat, or one subfolder per class), at ``size``.

    Only a folder under the server's roots (``KCORE_SERVER_ROOTS``; off when unset); symlinks leading out of it,
    FIFOs and devices inside it are skipped (:meth:`kcore.data.ImageSet.from_folder`). The folder is listed and
    each image read below its server root without following any symlink, so a folder or file swapped for a symlink
    after the path check is refused or skipped, never read."""
    from kcore import data as kdata
    from kcore.server_paths import resolve_server_path, server_root_of

    real = resolve_server_path(folder, kind="folder", what="image folder")
    return kdata.ImageSet.from_folder(real, _load_size(size), root=server_root_of(real))


def working_image_size() -> tuple[int, int]:
    """Size to decode uploaded / folder images at: the largest either model needs (each model resizes, crops and
    normalises to its own input, :mod:`kcore.preprocessing`), else 224 × 224."""
    from kcore.preprocessing import load_size, preprocessing_of

    return load_size(*(preprocessing_of(s.loaded) for s in (slot("A"), slot("B")) if s is not None))


def group_images(choice: ImageChoice, how: str, pattern: str = "") -> ImageChoice:
    """``choice`` with its images grouped ``how`` (a key of :data:`GROUPINGS`): no group is split by a fit, and
    the intervals resample whole groups.

    Args:
        choice: the images chosen (uploads or a server folder; the bundled images have no groups).
        how: ``"none"``, ``"folder"`` (each image's subfolder in the zip or folder) or ``"pattern"``.
        pattern: for ``"pattern"``: a regular expression with one group applied to each file name, e.g.
            ``^(.*)_crop\\d+``; it comes from the browser, so :func:`kcore.groups.pattern_groups` bounds its length and
            the file names' and runs it in a separate process under a time limit.

    Returns:
        A new :class:`ImageChoice` (the image set is a grouped copy; ``choice`` is not changed).

    Raises:
        ValueError: an unknown ``how``, groups asked for the bundled images, or a grouping kcore refuses (no
            subfolders; a pattern that is too long, does not compile, matches nothing or takes too long).
    """
    from kcore.groups import folder_groups, pattern_groups

    if how not in GROUPINGS:
        raise ValueError(f"grouping must be one of {sorted(GROUPINGS)}; got {how!r}.")
    if how == "none":
        return dataclasses.replace(choice, images=choice.images.with_groups(None), grouping=("none", ""))
    if choice.kind == "bundled":
        raise ValueError("the bundled images are each rendered independently, so they have no groups. Fix: choose "
                         "'None', or upload images (a zip with one subfolder per group).")
    ids = choice.images.ids
    groups = folder_groups(ids) if how == "folder" else pattern_groups(pattern, ids)
    return dataclasses.replace(choice, images=choice.images.with_groups(groups),
                               grouping=(how, pattern if how == "pattern" else ""))


def images() -> ImageChoice | None:
    """The image set chosen on the Models page."""
    return st.session_state.get("kc_images")


def set_images(choice: ImageChoice) -> None:
    st.session_state["kc_images"] = choice


def image_size(choice: ImageChoice | None) -> tuple[int, int]:
    """(H, W) of the chosen images (64 × 64 for the bundled ones)."""
    if choice is None or choice.n == 0:
        return (64, 64)
    x = choice.images[0]
    x = x[0] if isinstance(x, (tuple, list)) else x
    return (int(x.shape[-2]), int(x.shape[-1]))
