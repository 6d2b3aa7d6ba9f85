"""kshapes: determinism, random access, labels and ground truth (rendering speed is a timing, for bench/)."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from kcore.synthetic import (
    CLASS_NAMES,
    COARSE_NAMES,
    COARSE_OF_CLASS,
    MEAN,
    STD,
    KShapesDataset,
    KShapesSpec,
    class_of,
    normalize,
    render_sample,
    render_split,
)

SPEC = KShapesSpec(seed=0, n_train=200, n_test=100)


def _digest(spec: KShapesSpec, split: str, n: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        s = render_sample(spec, split, i)
        h.update(s.image.tobytes() + s.mask.tobytes() + bytes([s.label]))
    return h.hexdigest()


def test_same_seed_gives_identical_bytes() -> None:
    assert _digest(SPEC, "test", 20) == _digest(KShapesSpec(seed=0, n_train=200, n_test=100), "test", 20)


def test_pixels_do_not_depend_on_split_sizes() -> None:
    a = render_sample(KShapesSpec(n_test=10), "test", 7)
    b = render_sample(KShapesSpec(n_test=1000), "test", 7)
    assert np.array_equal(a.image, b.image)


def test_golden_digest() -> None:
    # Known answer: a change here changes every sample model's data; bump DATASET_VERSION.
    assert _digest(KShapesSpec(), "test", 5) == GOLDEN_TEST5


GOLDEN_TEST5 = "69d5a5ac36a3ee29c6cbe7667dc2c25d74e6bcf92033038c120ca89e22cb9bee"


def test_random_access_matches_sequential_rendering() -> None:
    images, labels = render_split(SPEC, "train", 30)
    for i in (29, 0, 13):
        s = render_sample(SPEC, "train", i)
        assert np.array_equal(s.image, images[i])
        assert s.label == labels[i]


def test_different_index_seed_or_split_differ() -> None:
    a = render_sample(SPEC, "test", 3).image
    assert not np.array_equal(a, render_sample(SPEC, "test", 4).image)
    assert not np.array_equal(a, render_sample(SPEC, "train", 3).image)
    assert not np.array_equal(a, render_sample(KShapesSpec(seed=1, n_test=100), "test", 3).image)
    assert _digest(SPEC, "test", 10) != _digest(KShapesSpec(seed=1, n_test=100), "test", 10)


def test_labels_in_range_and_balanced() -> None:
    _, labels = render_split(SPEC, "train")
    assert labels.min() >= 0 and labels.max() < len(CLASS_NAMES)
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    assert counts.tolist() == [20] * 10  # 200 images: every block of 10 holds each class once
    assert len(set(labels[:10].tolist())) == 10
    assert labels[:10].tolist() != list(range(10))  # shuffled within blocks


def test_class_of_matches_rendered_label_and_coarse_label() -> None:
    for i in range(40):
        s = render_sample(SPEC, "test", i)
        assert s.label == class_of(SPEC, "test", i)
        assert s.coarse_label == COARSE_OF_CLASS[s.label]
    assert len(COARSE_OF_CLASS) == len(CLASS_NAMES)
    assert sorted(set(COARSE_OF_CLASS)) == list(range(len(COARSE_NAMES)))
    assert CLASS_NAMES[COARSE_OF_CLASS.index(0)] == "circle" and COARSE_NAMES[0] == "round"


def test_mask_and_bbox_are_consistent_with_drawn_pixels() -> None:
    for i in range(30):
        s = render_sample(SPEC, "train", i)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        assert s.mask.shape == (64, 64) and s.mask.dtype == bool
        area = int(s.mask.sum())
        assert area > 0.02 * 64 * 64
        x0, y0, x1, y1 = s.bbox
        ys, xs = np.nonzero(s.mask)
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x0, y0, x1, y1)
        assert 0 <= x0 <= x1 < 64 and 0 <= y0 <= y1 < 64
        # The object differs from its surroundings: inside and a ring outside the box differ.
        inside = s.image[s.mask].astype(float).mean(0)
        border = np.ones_like(s.mask)
        border[max(0, y0 - 2):y1 + 3, max(0, x0 - 2):x1 + 3] = False
        if border.any():
            outside = s.image[border].astype(float).mean(0)
            assert np.abs(inside - outside).sum() > 20


def test_image_size_is_configurable() -> None:
    s = render_sample(KShapesSpec(image_size=96, n_test=5), "test", 0)
    assert s.image.shape == (96, 96, 3) and s.mask.shape == (96, 96)


def test_bad_arguments_raise_with_the_valid_values() -> None:
    with pytest.raises(ValueError, match=r"split must be one of \['test', 'train', 'val'\]"):
        render_sample(SPEC, "validation", 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"index must be in \[0, 100\)"):
        render_sample(SPEC, "test", 100)
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        KShapesSpec(image_size=8)
    with pytest.raises(ValueError, match="labels must be one of"):
        KShapesDataset(SPEC, "test", labels="superclass")  # type: ignore[arg-type]


def test_dataset_items_ids_and_raw() -> None:
    ds = KShapesDataset(SPEC, "test", n=12)
    assert len(ds) == 12 and ds.ids[0] == "kshapes/test/00000" and ds.ids[11] == "kshapes/test/00011"
    x, y = ds[5]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert y == class_of(SPEC, "test", 5) == ds.label(5)
    raw = ds.raw(5)
    expected = (torch.from_numpy(raw).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x, expected.permute(2, 0, 1), atol=1e-6)
    coarse = KShapesDataset(SPEC, "test", labels="coarse", n=12)
    assert coarse.class_names == COARSE_NAMES and coarse[5][1] == COARSE_OF_CLASS[y]
    with pytest.raises(IndexError):
        ds[12]


def test_cached_dataset_gives_the_same_items() -> None:
    plain, cached = KShapesDataset(SPEC, "train", n=5), KShapesDataset(SPEC, "train", n=5, cache=True)
    for _ in range(2):
        for i in range(5):
            assert torch.equal(plain[i][0], cached[i][0]) and plain[i][1] == cached[i][1]


def test_mean_std_constants_match_the_training_split() -> None:
    images, _ = render_split(KShapesSpec(), "train", 400)
    x = images.reshape(-1, 3) / 255.0
    assert np.allclose(x.mean(0), MEAN, atol=0.02)
    assert np.allclose(x.std(0), STD, atol=0.02)


def test_normalize_known_answer_on_a_constant_image() -> None:
    img = np.full((4, 5, 3), 255, np.uint8)
    x = normalize(img, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    assert x.shape == (3, 4, 5)
    assert torch.allclose(x[0], torch.ones(4, 5)) and torch.allclose(x[1], torch.full((4, 5), 3.0))
    assert torch.allclose(x[2], torch.ones(4, 5))


def test_rendering_keeps_no_state_between_calls() -> None:
    # a DataLoader renders on the fly in any order and from other specs in between: each sample must stay a pure
    # function of (spec, split, index). (How fast it renders is a timing: bench/, not a test.)
    first = render_sample(SPEC, "train", 7)
    for i in range(40):
        render_sample(SPEC, "test", i)
        render_sample(KShapesSpec(seed=3, image_size=32), "train", i)
    again = render_sample(SPEC, "train", 7)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert (first.label, first.bbox) == (again.label, again.bbox)
