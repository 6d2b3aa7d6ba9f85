"""ImageSet: folders, paths, uploads, zips, kshapes; skipping bad files; transforms; hashing."""
from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kcore.data import ImageSet, Preprocess, make_transform, resize_image, sample_images
from kcore.preprocessing import Preprocessing
from kcore.synthetic import CLASS_NAMES, MEAN, STD, KShapesSpec, render_sample


def _png(colour: tuple[int, int, int], size: tuple[int, int] = (10, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "cats" / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "cats" / "b.jpg").write_bytes(_jpeg((0, 255, 0)))
    (tmp_path / "dogs" / "c.png").write_bytes(_png((0, 0, 255), mode="L"))
    (tmp_path / "dogs" / "broken.png").write_bytes(_png((1, 2, 3))[:40])  # truncated
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0\1")  # hidden: ignored silently
    return tmp_path


def test_folder_with_corrupt_and_non_image_files(class_folder: Path) -> None:
    with pytest.warns(UserWarning, match="skipped 2 of 5 files") as record:
        ds = ImageSet.from_folder(class_folder)
    assert "dogs/broken.png" in str(record[0].message)
    assert len(ds) == 3
    assert ds.ids == ("cats/a.png", "cats/b.jpg", "dogs/c.png")
    assert ds.class_names == ("cats", "dogs") and ds.labels == (0, 0, 1)
    skipped = dict(ds.skipped)
    assert set(skipped) == {"dogs/broken.png", "dogs/notes.txt"}
    assert skipped["dogs/notes.txt"].startswith("not an image file")
    assert skipped["dogs/broken.png"].startswith("corrupt image")
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    assert ds.raw(0).shape == (64, 64, 3) and ds.raw(0).dtype == np.uint8
    assert ds.raw(0)[0, 0].tolist() == [255, 0, 0]  # RGB, not BGR
    gray = ds.raw(2)[0, 0]
    assert gray[0] == gray[1] == gray[2]  # grayscale PNG became RGB


def test_flat_folder_has_unknown_labels(tmp_path: Path) -> None:
    for k in range(3):
        (tmp_path / f"img{k}.png").write_bytes(_png((k, k, k)))
    ds = ImageSet.from_folder(tmp_path, Preprocess(input_size=(20, 30)))
    assert ds.labels == (-1, -1, -1) and ds.class_names == ()
    assert ds[0][0].shape == (3, 20, 30) and ds.raw(1).shape == (20, 30, 3)


def test_empty_folder_raises_with_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no readable image found; found nothing \(no files\)"):
        ImageSet.from_folder(tmp_path)
    (tmp_path / "readme.md").write_text("hello")
    with pytest.raises(ValueError, match=r"found 1 file\(s\), none a readable image: readme.md"), \
            pytest.warns(UserWarning):
        ImageSet.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageSet.from_folder(tmp_path / "missing")


def test_paths_in_given_order_and_missing_file_skipped(class_folder: Path) -> None:
    paths = [class_folder / "dogs" / "c.png", class_folder / "cats" / "a.png", class_folder / "nope.png"]
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        ds = ImageSet.from_paths(paths)
    assert ds.ids == ("dogs/c.png", "cats/a.png") and ds.labels == (-1, -1)
    assert ds.skipped[0][0] == "nope.png" and ds.skipped[0][1].startswith("cannot read")


def _zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_with_wrapper_folder_and_classes(tmp_path: Path) -> None:
    data = _zip_bytes({
        "photos/round/1.png": _png((10, 20, 30)),
        "photos/round/2.png": _png((40, 50, 60)),
        "photos/square/3.png": _png((70, 80, 90)),
        "photos/square/bad.png": b"garbage",
        "__MACOSX/photos/._1.png": b"resource fork",
    })
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        ds = ImageSet.from_zip(data)
    assert ds.class_names == ("round", "square") and ds.labels == (0, 0, 1)
    assert ds.ids[0] == "photos/round/1.png"
    path = tmp_path / "a.zip"
    path.write_bytes(data)
    with pytest.warns(UserWarning):
        assert ImageSet.from_zip(path).content_hash() == ds.content_hash()
    with pytest.raises(ValueError, match="not a zip archive"):
        ImageSet.from_zip(b"PK but not really")


def test_oversized_zip_member_is_skipped_not_inflated(monkeypatch: pytest.MonkeyPatch) -> None:
    import kcore.data

    data = _zip_bytes({"small.png": _png((1, 1, 1)), "big.png": _png((2, 2, 2), size=(200, 200))})
    sizes = {i.filename: i.file_size for i in zipfile.ZipFile(io.BytesIO(data)).infolist()}
    monkeypatch.setattr(kcore.data, "MAX_FILE_BYTES", (sizes["small.png"] + sizes["big.png"]) // 2)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        ds = ImageSet.from_zip(data)
    assert ds.ids == ("small.png",) and "MAX_FILE_BYTES" in dict(ds.skipped)["big.png"]


def test_uploads_with_zip_and_duplicate_names() -> None:
    uploads = [
        ("x.png", _png((1, 1, 1))),
        ("x.png", _png((2, 2, 2))),
        ("more.zip", _zip_bytes({"y.png": _png((3, 3, 3))})),
    ]
    ds = ImageSet.from_uploads(uploads)
    assert ds.ids == ("x.png", "x.png#2", "more.zip/y.png")
    assert [int(ds.raw(i)[0, 0, 0]) for i in range(3)] == [1, 2, 3]
    assert ds.labels == (-1, -1, -1)


def test_content_hash_depends_on_bytes_and_ids_only() -> None:
    a = ImageSet.from_uploads([("a.png", _png((1, 2, 3))), ("b.png", _png((4, 5, 6)))])
    same = ImageSet.from_uploads([("a.png", _png((1, 2, 3))), ("b.png", _png((4, 5, 6)))],
                                 Preprocess(input_size=(32, 32)))
    renamed = ImageSet.from_uploads([("a.png", _png((1, 2, 3))), ("c.png", _png((4, 5, 6)))])
    changed = ImageSet.from_uploads([("a.png", _png((1, 2, 3))), ("b.png", _png((4, 5, 7)))])
    assert len(a.content_hash()) == 64
    assert a.content_hash() == same.content_hash()
    assert a.content_hash(include_preprocess=True) != same.content_hash(include_preprocess=True)
    assert a.content_hash() != renamed.content_hash() != changed.content_hash()
    assert a.content_hash() != changed.content_hash()


def test_transform_shape_and_normalisation_on_a_constant_image() -> None:
    t = make_transform((16, 24), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    img = np.full((40, 30, 3), 255, np.uint8)
    x = t(img)
    assert x.shape == (3, 16, 24) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((16, 24), 2.0))
    assert torch.allclose(x[1], torch.full((16, 24), 1.0))
    assert torch.allclose(x[2], torch.full((16, 24), 0.5))
    assert torch.allclose(t(np.zeros((16, 24, 3), np.uint8))[0], torch.full((16, 24), -2.0))


def test_preprocess_validation_and_card() -> None:
    card = {"input_size": [32, 48], "mean": [0.1, 0.2, 0.3], "std": [1, 1, 1]}
    p = Preprocess.from_card(card)
    assert p.input_size == (32, 48) and p.mean == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError, match=r"model card lacks \['std'\]"):
        Preprocess.from_card({"input_size": [1, 1], "mean": [0, 0, 0]})
    with pytest.raises(ValueError, match="std must be > 0"):
        Preprocess(std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError, match="resize must be one of"):
        Preprocess(resize="squash")  # type: ignore[arg-type]


def test_center_crop_keeps_aspect() -> None:
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # white centre third
    out = resize_image(img, (10, 10), "center_crop")
    assert out.shape == (10, 10, 3) and out.min() == 255


def test_kshapes_images_match_the_renderer() -> None:
    ds = sample_images(n=8)
    assert len(ds) == 8 and ds.ids[3] == "kshapes/test/00003" and ds.class_names == CLASS_NAMES
    s = render_sample(KShapesSpec(), "test", 3)
    assert np.array_equal(ds.raw(3), s.image) and ds.labels[3] == s.label
    unit = (torch.from_numpy(s.image).float() / 255).permute(2, 0, 1)
    assert torch.equal(ds[3][0], unit)  # images only load, in [0, 1]: each model's Preprocessing normalises
    expected = (torch.from_numpy(s.image).float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    normalised = Preprocessing(mean=MEAN, std=STD).transform()(ds[3][0][None])[0]
    assert torch.allclose(normalised, expected.permute(2, 0, 1), atol=1e-6)
    assert ds.content_hash() == sample_images(n=8).content_hash()
    assert ds.content_hash() != sample_images(n=8, seed=1).content_hash()
    small = ImageSet.from_kshapes(n=2, preprocess=Preprocess(input_size=(32, 32)))
    assert small.raw(0).shape == (32, 32, 3)
    assert ds.tensors().shape == (8, 3, 64, 64)
    with pytest.raises(ValueError, match=r"n must be in \[1, 500\]"):
        sample_images(n=0)


def test_no_warning_when_nothing_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((9, 9, 9)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageSet.from_folder(tmp_path)
    assert ds.skipped == () and "1 images" in repr(ds)


# ---------------------------------------------------------------- labelled splits (FolderSplit, labelled_images)
def _split_folder(root, n_per_class=3):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def test_folder_split_subset_normalisation_and_relabel(tmp_path):
    from kcore.data import FolderSplit

    root = _split_folder(tmp_path)
    raw = FolderSplit(root, "train", (8, 8))
    assert len(raw) == 6 and raw.class_names == ("cat", "dog") and raw.ids[0] == "train/cat/0.png"
    norm = FolderSplit(root, "train", (8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.allclose(norm[4][0], (raw[4][0] - 0.5) / 0.25, atol=1e-6) and norm[4][1] == raw[4][1] == 1
    sub = FolderSplit(root, "train", (8, 8), n=4, seed=3)
    assert len(sub) == 4 and list(sub.ids) == sorted(sub.ids) and set(sub.ids) <= set(raw.ids)
    coarse = FolderSplit(root, "train", (8, 8), relabel={"cat": "pet", "dog": "pet"})
    assert coarse.class_names == ("pet",) and {coarse[i][1] for i in range(6)} == {0}
    with pytest.raises(ValueError, match="no entry for class"):
        FolderSplit(root, "train", (8, 8), relabel={"cat": "pet"})
    with pytest.raises(ValueError, match="does not exist"):
        FolderSplit(root, "test", (8, 8))


def test_folder_split_skips_symlinks_out_of_the_folder(tmp_path):
    from kcore.data import FolderSplit

    root = _split_folder(tmp_path / "data")
    outside = tmp_path / "secret.png"
    outside.write_bytes((root / "train" / "cat" / "0.png").read_bytes())
    (root / "train" / "cat" / "link.png").symlink_to(outside)
    ds = FolderSplit(root, "train", (8, 8))
    with pytest.raises(OSError, match="symlink"):
        ds[ds.ids.index("train/cat/link.png")]


def test_bundled_data_word_and_deprecated_alias():
    from kcore.data import BUNDLED_DATA, is_bundled, labelled_images

    assert BUNDLED_DATA == "kshapes" and is_bundled("kshapes") and not is_bundled("images/kshapes")
    with pytest.warns(DeprecationWarning, match="'kshapes'"):
        old = labelled_images("sample", "test", 3, 16)
    new = labelled_images("kshapes", "test", 3, 16)
    assert torch.equal(old[2][0], new[2][0]) and old.class_names == new.class_names
