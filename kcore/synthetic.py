"""kshapes: a procedurally generated shape-classification dataset that ships as code.

Every image is a pure function of ``(seed, split, index)``: it is drawn with OpenCV from a
numpy ``Generator`` seeded with exactly those three numbers, so image 17 of the test split
can be rendered without rendering images 0-16, and it has the same bytes on every run and
machine. Nothing is downloaded or read from disk.

An image shows one shape (10 classes, see ``CLASS_NAMES``) at a random position, scale,
rotation and colour, on a random textured background (flat noise, stripes, checkerboard,
gradient or blobs), with a few distractor strokes and pixel noise on top. Besides the fine
label each sample carries a coarse label ("round" vs "angular", ``COARSE_NAMES``) for
cross-task studies, and the ground-truth object mask and bounding box for visual checks.

Paper context: the paper compares networks trained on the same or on different data and
tasks (Sec. 4, "stability", "cross-task"); kshapes is the offline stand-in for CUB/VOC.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

DATASET_VERSION = "kshapes-v1"
"""Bump when the rendering changes: sample-model cards record the version they saw."""

CLASS_NAMES: tuple[str, ...] = (
    "circle",
    "ellipse",
    "ring",
    "crescent",
    "trefoil",
    "square",
    "triangle",
    "pentagon",
    "star",
    "cross",
)
COARSE_NAMES: tuple[str, ...] = ("round", "angular")
COARSE_OF_CLASS: tuple[int, ...] = (0, 0, 0, 0, 0, 1, 1, 1, 1, 1)
"""Coarse label of each fine class: curved outlines are "round", polygons are "angular"."""

MEAN: tuple[float, float, float] = (0.503, 0.497, 0.501)
STD: tuple[float, float, float] = (0.275, 0.289, 0.271)
"""Per-channel mean/std of the default training split (seed 0, 2000 images) in [0, 1]."""

Split = Literal["train", "test", "val"]
SPLITS: dict[str, int] = {"train": 0, "test": 1, "val": 2}
"""Valid splits and the number each one mixes into the random seed."""

LabelKind = Literal["fine", "coarse"]
LABEL_KINDS: dict[str, tuple[str, ...]] = {"fine": CLASS_NAMES, "coarse": COARSE_NAMES}
"""Valid label kinds and their class names."""

BACKGROUNDS: tuple[str, ...] = ("noise", "stripes", "checker", "gradient", "blobs")

# Nuisance levels: tuned so that the small ResNet of kcore.zoo learns the task in minutes on a
# CPU while a weak plain CNN clearly lags behind.
_RADIUS = (0.20, 0.42)  # object radius, fraction of the image side
_BG_CONTRAST = (0.2, 0.6)  # strength of background textures, fraction of the colour difference
_MAX_DISTRACTORS = 2
_TEXTURE_P = 0.2  # probability of a noise-textured object
_NOISE = (2, 16)  # max amplitude of per-pixel noise, drawn per image
_MIN_LUMA_DIFF = 80.0  # luminance difference between object and mean background (0-255)

_SHIFT = 4  # OpenCV sub-pixel precision: coordinates are drawn in 1/16 px.
_ONE = 1 << _SHIFT


@dataclass(frozen=True)
class KShapesSpec:
    """Which kshapes dataset: a seed, an image size and the split sizes.

    Attributes:
        seed: dataset seed; different seeds give different images.
        image_size: side of the square images in pixels (>= 16).
        n_train: number of images in the "train" split.
        n_test: number of images in the "test" split (and in "val").
    """

    seed: int = 0
    image_size: int = 64
    n_train: int = 2000
    n_test: int = 500

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.n_train < 0 or self.n_test < 0:
            raise ValueError(f"n_train and n_test must be >= 0, got {self.n_train}, {self.n_test}")

    def split_size(self, split: Split) -> int:
        """Number of images in ``split``."""
        _check_split(split)
        return self.n_train if split == "train" else self.n_test

    @property
    def name(self) -> str:
        """Short description for model cards, e.g. ``"kshapes-v1 seed=0"``."""
        extra = "" if self.image_size == 64 else f" size={self.image_size}"
        return f"{DATASET_VERSION} seed={self.seed}{extra}"


@dataclass(frozen=True)
class ShapeSample:
    """One rendered kshapes image and its ground truth.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB image.
        label: fine label, an index into ``CLASS_NAMES``.
        coarse_label: coarse label, an index into ``COARSE_NAMES``.
        bbox: ``(x0, y0, x1, y1)`` inclusive pixel bounds of ``mask``.
        mask: ``(H, W)`` bool, True where the shape covers at least half a pixel (a
            distractor stroke may be drawn over part of it).
    """

    image: np.ndarray
    label: int
    coarse_label: int
    bbox: tuple[int, int, int, int]
    mask: np.ndarray


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")


def sample_id(split: Split, index: int) -> str:
    """Stable identifier of a kshapes image, e.g. ``"kshapes/test/00017"``."""
    return f"kshapes/{split}/{index:05d}"


def class_of(spec: KShapesSpec, split: Split, index: int) -> int:
    """Fine label of image ``index`` without rendering it.

    Labels cycle through a per-block permutation, so every block of 10 consecutive images
    holds each class exactly once (balanced splits) while the order still looks random.
    """
    block, pos = divmod(index, len(CLASS_NAMES))
    rng = np.random.default_rng([spec.seed, SPLITS[split], block, 0x5EED])
    return int(rng.permutation(len(CLASS_NAMES))[pos])


# ---------------------------------------------------------------------------- shapes
def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    # math.cos/sin (libm) rather than numpy's SIMD kernels, whose last bit can depend on the CPU.
    angles = [phase + 2.0 * math.pi * k / n for k in range(n)]
    return np.array([[radius * math.cos(t), radius * math.sin(t)] for t in angles], dtype=np.float64)


def _star(points: int, inner: float) -> np.ndarray:
    outer = _regular(points, 1.0, -math.pi / 2)
    inner_pts = _regular(points, inner, -math.pi / 2 + math.pi / points)
    return np.stack([outer, inner_pts], axis=1).reshape(-1, 2)


_CIRCLE = _regular(72)
_CROSS_ARM = 0.32


def _shape_parts(label: int, rng: np.random.Generator) -> list[tuple[np.ndarray, bool]]:
    """Polygons in a unit frame (radius about 1) with a flag "fill" (True) or "cut" (False)."""
    name = CLASS_NAMES[label]
    if name == "circle":
        return [(_CIRCLE, True)]
    if name == "ellipse":
        return [(_CIRCLE * np.array([1.0, rng.uniform(0.45, 0.62)]), True)]
    if name == "ring":
        return [(_CIRCLE, True), (_CIRCLE * rng.uniform(0.5, 0.65), False)]
    if name == "crescent":
        cut = _CIRCLE * rng.uniform(0.8, 0.95) + np.array([rng.uniform(0.42, 0.6), 0.0])
        return [(_CIRCLE, True), (cut, False)]
    if name == "trefoil":
        lobe = rng.uniform(0.5, 0.58)
        return [(_CIRCLE * lobe + c * (1.0 - lobe), True) for c in _regular(3, 1.0, -math.pi / 2)]
    if name == "square":
        return [(_regular(4, 1.0, math.pi / 4) * 1.05, True)]
    if name == "triangle":
        return [(_regular(3, 1.0, -math.pi / 2) * 1.1 + np.array([0.0, 0.15]), True)]
    if name == "pentagon":
        return [(_regular(5, 1.0, -math.pi / 2), True)]
    if name == "star":
        return [(_star(int(rng.integers(5, 7)), rng.uniform(0.42, 0.52)), True)]
    if name == "cross":
        a = _CROSS_ARM
        pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
               (-1, a), (-1, -a), (-a, -a)]
        return [(np.array(pts, dtype=np.float64) * 0.95, True)]
    raise AssertionError(f"no drawing for class {name!r}")  # unreachable: labels come from CLASS_NAMES


def _draw_alpha(parts: list[tuple[np.ndarray, bool]], size: int, center: tuple[float, float],
                radius: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage (0-255) of the transformed shape on a ``size``x``size`` canvas."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    alpha = np.zeros((size, size), np.uint8)
    for poly, fill in parts:
        xy = poly @ rot.T * radius + np.asarray(center)
        pts = np.round(xy * _ONE).astype(np.int32).reshape(1, -1, 2)
        cv2.fillPoly(alpha, pts, 255 if fill else 0, lineType=cv2.LINE_AA, shift=_SHIFT)
    return alpha


# ----------------------------------------------------------------------- backgrounds
def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    c1 = _random_colour(rng)
    c2 = c1 + np.float32(rng.uniform(*_BG_CONTRAST)) * (_random_colour(rng) - c1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "noise":
        return np.broadcast_to(c1, (size, size, 3)).copy()
    if kind in ("stripes", "gradient"):
        theta = rng.uniform(0.0, math.pi)
        proj = xx * np.float32(math.cos(theta)) + yy * np.float32(math.sin(theta))
        if kind == "stripes":
            period = np.float32(rng.uniform(0.08, 0.25) * size)
            t = (np.floor(proj / period) % 2).astype(np.float32)
        else:
            t = (proj - proj.min()) / np.float32(max(float(proj.max() - proj.min()), 1.0))
        return c1 + t[..., None] * (c2 - c1)
    if kind == "checker":
        cell = int(rng.integers(max(3, size // 12), max(4, size // 4)))
        t = (((xx.astype(np.int32) // cell) + (yy.astype(np.int32) // cell)) % 2).astype(np.float32)
        return c1 + t[..., None] * (c2 - c1)
    # blobs: a few soft discs of a second colour
    img = np.broadcast_to(c1, (size, size, 3)).copy()
    for _ in range(int(rng.integers(2, 5))):
        cx, cy = rng.uniform(0, size, size=2)
        r = rng.uniform(0.06, 0.16) * size
        col = c1 + np.float32(rng.uniform(*_BG_CONTRAST)) * (_random_colour(rng) - c1)
        img = cv2.circle(img, (int(cx * _ONE), int(cy * _ONE)), int(r * _ONE), col.tolist(), -1,
                         cv2.LINE_AA, _SHIFT)
    return img


def _distractors(rng: np.random.Generator, img: np.ndarray, size: int) -> None:
    """Thin random strokes: clutter that is not a shape class (drawn in place)."""
    for _ in range(int(rng.integers(0, _MAX_DISTRACTORS + 1))):
        p = (rng.uniform(0, size, size=4) * _ONE).astype(np.int64).tolist()
        thickness = max(1, int(rng.integers(1, max(2, size // 32) + 1)))
        cv2.line(img, (p[0], p[1]), (p[2], p[3]), _random_colour(rng).tolist(), thickness,
                 cv2.LINE_AA, _SHIFT)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _object_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A colour whose luminance differs enough from the mean background to stay visible."""
    ref = background.reshape(-1, 3).mean(axis=0)
    ref_luma = float(ref @ _LUMA)
    for _ in range(50):
        col = _random_colour(rng)
        if abs(float(col @ _LUMA) - ref_luma) >= _MIN_LUMA_DIFF:
            return col
    # Rare fallback: black or white, whichever is further away.
    return np.full(3, 0.0 if ref_luma > 127.5 else 255.0, dtype=np.float32)


# ---------------------------------------------------------------------------- render
def render_sample(spec: KShapesSpec, split: Split, index: int) -> ShapeSample:
    """Render image ``index`` of ``split``: a pure function of ``(spec, split, index)``.

    Args:
        spec: which dataset (seed and image size).
        split: "train", "test" or "val".
        index: image index, ``0 <= index < spec.split_size(split)``.

    Returns:
        The image ``(H, W, 3)`` uint8 RGB with its labels, bounding box and mask.

    Raises:
        ValueError: unknown split or index out of range.
    """
    _check_split(split)
    n = spec.split_size(split)
    if not 0 <= index < n:
        raise ValueError(f"index must be in [0, {n}) for split {split!r} of {spec}, got {index}")
    size = spec.image_size
    label = class_of(spec, split, index)
    rng = np.random.default_rng([spec.seed, SPLITS[split], index])

    background = _background(rng, size)
    radius = rng.uniform(*_RADIUS) * size
    margin = radius * 1.05
    center = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    alpha = _draw_alpha(_shape_parts(label, rng), size, center, radius, angle)

    colour = _object_colour(rng, background)
    if rng.random() < _TEXTURE_P:  # textured object: its own colour noise
        fg = colour + rng.integers(-40, 41, size=(size, size, 1)).astype(np.float32)
    else:
        fg = np.broadcast_to(colour, (size, size, 3))
    a = alpha.astype(np.float32)[..., None] / np.float32(255.0)
    img = background * (1.0 - a) + fg * a
    _distractors(rng, img, size)
    noise = int(rng.integers(_NOISE[0], _NOISE[1] + 1))
    img = img + rng.integers(-noise, noise + 1, size=(size, size, 3)).astype(np.float32)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    mask = alpha >= 128
    if not mask.any():  # a thin shape on a tiny canvas: keep any coverage rather than none
        mask = alpha > 0
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return ShapeSample(image=image, label=label, coarse_label=COARSE_OF_CLASS[label], bbox=bbox,
                       mask=mask)


def normalize(images: np.ndarray, mean: tuple[float, ...] = MEAN,
              std: tuple[float, ...] = STD) -> torch.Tensor:
    """uint8 RGB images to a normalised float32 tensor.

    Args:
        images: ``(H, W, 3)`` or ``(N, H, W, 3)`` uint8 RGB.
        mean: per-channel mean in [0, 1].
        std: per-channel std in [0, 1].

    Returns:
        ``(3, H, W)`` or ``(N, 3, H, W)`` float32 tensor ``(x / 255 - mean) / std``.
    """
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div_(255.0)  # copy: inputs may be read-only
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    x = (x - m) / s
    return x.movedim(-1, -3).contiguous()


class KShapesDataset(Dataset):
    """A kshapes split as a torch Dataset of ``(image (3, H, W) float32, label)`` pairs.

    Images are rendered on demand (random access, nothing precomputed) and normalised with
    ``MEAN``/``STD`` unless told otherwise.

    Args:
        spec: which dataset; default ``KShapesSpec()``.
        split: "train", "test" or "val".
        labels: "fine" (10 shape classes) or "coarse" (round vs angular).
        n: use only the first ``n`` images of the split (default: all).
        mean: normalisation mean; default ``MEAN``.
        std: normalisation std; default ``STD``.
        cache: keep every rendered uint8 image in memory (``N * H * W * 3`` bytes), so that
            training epochs after the first do not render again.
    """

    def __init__(self, spec: KShapesSpec | None = None, split: Split = "train",
                 labels: LabelKind = "fine", n: int | None = None,
                 mean: tuple[float, float, float] = MEAN,
                 std: tuple[float, float, float] = STD, cache: bool = False) -> None:
        self.spec = spec if spec is not None else KShapesSpec()
        _check_split(split)
        if labels not in LABEL_KINDS:
            raise ValueError(f"labels must be one of {sorted(LABEL_KINDS)}, got {labels!r}")
        size = self.spec.split_size(split)
        if n is not None and not 0 <= n <= size:
            raise ValueError(f"n must be in [0, {size}] for split {split!r}, got {n}")
        self.split = split
        self.labels = labels
        self.class_names = LABEL_KINDS[labels]
        self.mean = tuple(mean)
        self.std = tuple(std)
        self._n = size if n is None else n
        self.ids = tuple(sample_id(split, i) for i in range(self._n))
        self._cache: dict[int, tuple[np.ndarray, int]] | None = {} if cache else None

    def __len__(self) -> int:
        return self._n

    def _index(self, i: int) -> int:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} images")
        return i % self._n

    def sample(self, i: int) -> ShapeSample:
        """The full ground truth (image, labels, bbox, mask) of item ``i``."""
        return render_sample(self.spec, self.split, self._index(i))

    def raw(self, i: int) -> np.ndarray:
        """Item ``i`` as ``(H, W, 3)`` uint8 RGB."""
        return self.sample(i).image

    def label(self, i: int) -> int:
        """Label of item ``i`` (of the chosen kind) without rendering the image."""
        fine = class_of(self.spec, self.split, self._index(i))
        return fine if self.labels == "fine" else COARSE_OF_CLASS[fine]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = self._index(i)
        hit = self._cache.get(i) if self._cache is not None else None
        if hit is None:
            s = self.sample(i)
            hit = (s.image, s.label if self.labels == "fine" else s.coarse_label)
            if self._cache is not None:
                self._cache[i] = hit
        return normalize(hit[0], self.mean, self.std), hit[1]


def render_split(spec: KShapesSpec, split: Split, n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render the first ``n`` images of a split at once.

    Returns:
        ``(images (N, H, W, 3) uint8, fine labels (N,) int64)``.
    """
    count = spec.split_size(split) if n is None else n
    samples = [render_sample(spec, split, i) for i in range(count)]
    size = spec.image_size
    images = np.stack([s.image for s in samples]) if samples else np.zeros((0, size, size, 3), np.uint8)
    return images, np.array([s.label for s in samples], dtype=np.int64)
