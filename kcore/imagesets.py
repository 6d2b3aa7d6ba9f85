"""Labelled image splits for training and the studies: the bundled kshapes images or ``DIR/<split>/<class>/*``.

A folder split is listed and read exactly as :meth:`kcore.data.ImageSet.from_folder` reads a folder
(:func:`kcore.data.folder_entries`, :func:`kcore.data.load_image`: regular files under the size cap, no symlink
out of the folder, the pixel caps, the shorter side scaled and the centre cropped), but lazily, image by image, so
that a large training split is never held in memory. Items are ``(image (3, H, W) float32 in [0, 1], label)``;
a normalisation (``mean``/``std``) is :class:`kcore.preprocessing.Preprocessing`'s, as for every model input.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor
from torch.utils.data import Dataset

from kcore.data import BUNDLED_DATA, IMAGE_EXTENSIONS, folder_entries, is_bundled, load_image, to_unit
from kcore.preprocessing import Preprocessing


def _normalizer(mean: Sequence[float] | None, std: Sequence[float] | None) -> Preprocessing | None:
    """``(x − mean) / std`` on one image (3, H, W) as :class:`Preprocessing` does it, or ``None`` when not given."""
    if mean is None and std is None:
        return None
    return Preprocessing(mean=tuple(mean) if mean is not None else (0.0, 0.0, 0.0),
                         std=tuple(std) if std is not None else (1.0, 1.0, 1.0), source="image set")


class FolderSplit(Dataset):
    """``ROOT/<split>/<class>/<image>`` read lazily as ``(image (3, H, W), label)``.

    For large labelled training and test splits, where :class:`kcore.data.ImageSet`'s decode-everything-first
    would hold every image in memory. Files are listed and read as :meth:`kcore.data.ImageSet.from_folder` does
    (hidden files and files directly in the split folder left out; only image file extensions, as
    torchvision's ImageFolder), resized to ``size`` (shorter side, centre crop) and scaled to [0, 1], then
    normalised with ``mean``/``std`` when given.

    Attributes:
        ids: path of each image relative to ``root`` (e.g. ``"train/cat/001.jpg"``).
        class_names: the class folder names, or the coarse names with ``relabel``.
        mean, std: the normalisation applied ((0, 0, 0) and (1, 1, 1) when none).

    Args:
        root: the folder holding one subfolder per split.
        split: ``"train"``, ``"test"``, ``"val"`` (any subfolder name).
        size: (H, W) every image is loaded at.
        n: use ``n`` images (a seeded random subset, in folder order); default all.
        seed: seed of the subset.
        mean, std: per-channel normalisation (default: none, images in [0, 1]).
        relabel: class folder name → coarse class name (labels become indices into ``class_names``).
        coarse_names: the coarse class names in label order (default: the sorted values of ``relabel``).

    Raises:
        ValueError: the split folder is missing or holds no class folder with images, or ``relabel`` misses a
            class.
    """

    def __init__(self, root: str | os.PathLike, split: str, size: tuple[int, int], n: int | None = None,
                 seed: int = 0, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 relabel: dict[str, str] | None = None, coarse_names: Sequence[str] | None = None) -> None:
        root = Path(root)
        folder = root / split
        if not folder.is_dir():
            raise ValueError(f"data folder {str(folder)!r} does not exist. Fix: pass a folder DIR with "
                             f"DIR/{split}/<class>/* images, or {BUNDLED_DATA!r} for the bundled images.")
        self.size = (int(size[0]), int(size[1]))
        entries = [e for e in folder_entries(folder) if e.label_name is not None
                   and PurePosixPath(e.name).suffix.lower() in IMAGE_EXTENSIONS]
        entries.sort(key=lambda e: (e.label_name, e.name))
        if not entries:
            raise ValueError(f"data folder {str(folder)!r} holds no image in a class subfolder. Fix: put the images "
                             f"in {str(folder)!r}/<class>/ (extensions {', '.join(sorted(IMAGE_EXTENSIONS))}).")
        fine = tuple(sorted({e.label_name for e in entries}))  # type: ignore[type-var]
        total = len(entries)
        if n is not None and n < total:  # a seeded subset that covers every class, in a fixed order
            perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n]
            idx = sorted(int(i) for i in perm)
        else:
            idx = list(range(total))
        self._entries = [entries[i] for i in idx]
        self.ids = tuple(f"{split}/{e.name}" for e in self._entries)
        self.class_names = fine
        labels = [fine.index(e.label_name) for e in self._entries]  # type: ignore[arg-type]
        if relabel is not None:
            missing = sorted(set(fine) - set(relabel))
            if missing:
                raise ValueError(f"the coarse label map has no entry for class(es) {missing} of {str(folder)!r}. "
                                 "Fix: map every class folder name to a coarse class name.")
            self.class_names = tuple(coarse_names) if coarse_names else tuple(sorted(set(relabel.values())))
            labels = [self.class_names.index(relabel[fine[k]]) for k in labels]
        self._labels = labels
        self._norm = _normalizer(mean, std)
        self._apply = self._norm.transform() if self._norm is not None else None
        self.mean = self._norm.mean if self._norm is not None else (0.0, 0.0, 0.0)
        self.std = self._norm.std if self._norm is not None else (1.0, 1.0, 1.0)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = to_unit(load_image(self._entries[i], self.size))
        if self._apply is not None:
            x = self._apply(x[None])[0]
        return x, self._labels[i]


def labelled_images(data: str, split: str, n: int | None, image_size: int, *, seed: int = 0) -> Dataset:
    """A labelled split as images in [0, 1]: the bundled kshapes images or a folder.

    Args:
        data: ``"kshapes"`` (or its deprecated alias ``"sample"``) or a folder ``DIR`` with
            ``DIR/<split>/<class>/*``.
        split: ``"train"`` or ``"test"``.
        n: number of images (kshapes: the first ``n`` of the split; a folder: a seeded subset).
        image_size: side of the square images (kshapes renders at it; a folder is loaded at it).
        seed: kshapes' dataset seed, or the folder subset's seed.

    Returns:
        A Dataset of ``(image (3, S, S) float in [0, 1], label)`` with ``ids`` and ``class_names``.

    Raises:
        ValueError: ``n`` is below 1, or the folder split is missing.
    """
    if n is not None and n < 1:
        raise ValueError(f"the number of {split} images must be >= 1; got {n}. Fix: pass a positive count or None.")
    if is_bundled(data):
        from kcore.synthetic import KShapesDataset, KShapesSpec

        count = n if n is not None else (2000 if split == "train" else 500)
        spec = KShapesSpec(seed=seed, image_size=image_size, n_train=count if split == "train" else 0,
                           n_test=count if split != "train" else 0)
        return KShapesDataset(spec, split, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return FolderSplit(data, split, (image_size, image_size), n, seed)


class Normalized(Dataset):
    """A [0, 1] image dataset normalised with a per-channel mean and std (for training).

    The normalisation is :class:`kcore.preprocessing.Preprocessing`'s; ``ids`` and ``class_names`` are kept.
    """

    def __init__(self, base: Dataset, mean: Sequence[float], std: Sequence[float]):
        self.base = base
        self._norm = Preprocessing(mean=tuple(mean), std=tuple(std), source="image set")
        self._apply = self._norm.transform()
        self.mean, self.std = self._norm.mean, self._norm.std
        self.class_names = getattr(base, "class_names", None)
        self.ids = getattr(base, "ids", None)

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x, y = self.base[i]
        return self._apply(x[None])[0], y


class Subset(Dataset):
    """Items ``indices`` of a dataset, keeping ``ids`` and ``class_names``."""

    def __init__(self, base: Dataset, indices: Sequence[int]):
        self.base, self.indices = base, [int(i) for i in indices]
        ids = getattr(base, "ids", None)
        self.ids = tuple(ids[i] for i in self.indices) if ids is not None else None
        self.class_names = getattr(base, "class_names", None)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]


@dataclass(frozen=True, eq=False)
class StudyData:
    """The images of a study.

    Attributes:
        train: labelled training images (fine-tuning, training students).
        test: labelled test images (accuracy).
        images: the images whose features g_θ is fitted on and evaluated with (its own held-out split).
        source: a description for provenance.
        class_names: names of the labels.
    """

    train: Dataset
    test: Dataset
    images: Dataset
    source: str
    class_names: tuple[str, ...]


def study_data(data: str = BUNDLED_DATA, *, labels: str = "fine", image_size: int = 64, n_train: int = 800,
               n_test: int = 500, n_images: int = 300, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, coarse_map: dict[str, str] | None = None) -> StudyData:
    """Training, test and consistency images, normalised, from the bundled kshapes data or from a folder.

    Args:
        data: ``"kshapes"`` (dataset seed 0: the first ``n_train`` images of its train split, the first
            ``n_test`` of its test split, and the first ``n_images`` of its val split for the fits; the
            deprecated ``"sample"`` means the same) or a folder holding ``train/<class>/*`` and
            ``test/<class>/*`` (and optionally ``val/<class>/*``, else the fits use test images)
            (:class:`FolderSplit`).
        labels: ``"fine"`` or ``"coarse"`` (kshapes: round vs angular; folders: through ``coarse_map``).
        image_size: side of the images (kshapes), or of the loaded folder images.
        n_train, n_test, n_images: how many images of each part (a seeded subset of a folder's split).
        mean, std: normalisation of the images (default: kshapes'; pass the model card's).
        coarse_map: for folders with ``labels="coarse"``: fine class folder name → coarse class name.

    Raises:
        ValueError: bad sizes, a missing folder, or an incomplete coarse map.
    """
    from kcore.synthetic import MEAN, STD, KShapesDataset, KShapesSpec

    for name, v in (("n_train", n_train), ("n_test", n_test), ("n_images", n_images)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer; got {v!r}.")
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse'; got {labels!r}.")
    norm = {"mean": tuple(mean or MEAN), "std": tuple(std or STD)}
    if is_bundled(data):
        spec = KShapesSpec(seed=0, image_size=image_size, n_train=n_train, n_test=max(n_test, n_images))
        return StudyData(
            KShapesDataset(spec, "train", labels, n=n_train, **norm),
            KShapesDataset(spec, "test", labels, n=n_test, **norm),
            KShapesDataset(spec, "val", labels, n=n_images, **norm),
            f"kshapes ({spec.name}, {labels} labels): train[:{n_train}], test[:{n_test}], val[:{n_images}] for the fits",
            KShapesDataset(spec, "test", labels, n=0).class_names)
    root = Path(data)
    for part in ("train", "test"):
        if not (root / part).is_dir():
            raise ValueError(f"data folder {str(root)!r} has no {part}/ subfolder. Fix: pass {BUNDLED_DATA!r}, or "
                             "a folder with train/<class>/* and test/<class>/* images.")
    relabel = None
    if labels == "coarse":
        if coarse_map is None:
            raise ValueError("labels='coarse' on a folder needs coarse_map (fine class name -> coarse class name). "
                             "Fix: pass --coarse-map FILE.json.")
        relabel = dict(coarse_map)
    size = (image_size, image_size)
    coarse_names = tuple(sorted(set(relabel.values()))) if relabel else None
    img_part = "val" if (root / "val").is_dir() else "test"
    train, test, images = (FolderSplit(root, p, size, n, 0, relabel=relabel, coarse_names=coarse_names, **norm)
                           for p, n in (("train", n_train), ("test", n_test), (img_part, n_images)))
    return StudyData(train, test, images, f"folder {root} ({labels} labels; fits on {img_part}/)", train.class_names)
