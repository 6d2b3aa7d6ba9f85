"""One image pipeline: the data layer only loads [0, 1] images (centre crop, never stretched); every resize, crop
and normalisation is :class:`kcore.preprocessing.Preprocessing`; one folder loader for the CLI, the dashboard and the
studies; the dashboard and the CLI give the same model inputs and features for non-square photos."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import tiny_net
from kcore.data import ImageSet, Preprocess, as_loading, folder_entries, load_image, resize_image, to_unit
from kcore.imagesets import FolderSplit, Normalized, labelled_images, study_data
from kcore.preprocessing import Preprocessing, load_size


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A random non-square "photo" whose left and right eighths are black and whose centre is bright."""
    rng = np.random.default_rng(seed)
    img = rng.integers(128, 256, (h, w, 3), dtype=np.uint8)
    q = w // 8
    img[:, :q] = 0
    img[:, w - q:] = 0
    return img


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture()
def wide_photos(tmp_path: Path) -> Path:
    """Five non-square PNGs (landscape and portrait) in a folder."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, (h, w) in enumerate([(40, 96), (48, 120), (36, 80), (96, 40), (50, 50)]):
        img = _photo(h, w, k) if w >= h else _photo(w, h, k).transpose(1, 0, 2).copy()
        (folder / f"p{k}.png").write_bytes(_png(img))
    return folder


# ------------------------------------------------------------------------------ the data layer only loads
def test_image_sets_hold_unit_images_and_never_stretch(wide_photos: Path) -> None:
    ds = ImageSet.from_folder(wide_photos, (16, 16))
    x = ds.tensors()
    assert x.shape == (5, 3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(ds[2][0], x[2]) and torch.equal(x[0], to_unit(ds.raw(0)))
    # the black edges of a wide photo lie outside the centre crop: a stretched image would keep them
    landscape = [i for i, name in enumerate(ds.ids) if name in ("p0.png", "p1.png", "p2.png")]
    assert all(int(ds.raw(i).min()) > 0 for i in landscape)
    stretched = np.array(Image.fromarray(_photo(40, 96, 0)).resize((16, 16), Image.Resampling.BILINEAR))
    assert int(stretched.min()) == 0 and not np.array_equal(ds.raw(ds.ids.index("p0.png")), stretched)


def test_square_images_load_the_same_pixels_as_a_stretch() -> None:
    """The bundled kshapes images are square: centre crop and stretch agree, so no sample-model number moves."""
    rng = np.random.default_rng(7)
    for side, target in ((64, 64), (64, 32), (40, 100), (33, 20)):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        assert np.array_equal(resize_image(img, (target, target)), resize_image(img, (target, target), "stretch"))
    assert not np.array_equal(resize_image(_photo(30, 60, 1), (20, 20)), resize_image(_photo(30, 60, 1), (20, 20),
                                                                                        "stretch"))


def test_sizes_and_the_older_preprocess_describe_the_same_loading() -> None:
    assert as_loading(None) == Preprocess((64, 64)) and as_loading(12) == Preprocess((12, 12))
    assert as_loading((8, 10)).input_size == (8, 10) and as_loading((8, 10)).resize == "center_crop"
    assert Preprocess((8, 8), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).normalization is None
    with pytest.raises(TypeError, match=r"size must be \(H, W\), one int side or None; got '8x8' \(str\).*Fix:"):
        as_loading("8x8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"mean must be 3 numbers.*got \(0\.5, 0\.5\)"):
        Preprocess((8, 8), (0.5, 0.5), (0.2, 0.2, 0.2))


def test_an_older_normalising_preprocess_goes_through_preprocessing(wide_photos: Path) -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    unit = ImageSet.from_folder(wide_photos, (16, 16))
    normed = ImageSet.from_folder(wide_photos, Preprocess((16, 16), mean, std))
    by_hand = (unit.tensors() - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(normed.tensors(), Preprocessing(mean=mean, std=std).transform()(unit.tensors()))
    torch.testing.assert_close(normed.tensors(), by_hand)
    assert torch.equal(normed[1][0], normed.tensors()[1])
    assert normed.content_hash() == unit.content_hash()
    assert normed.content_hash(include_preprocess=True) != unit.content_hash(include_preprocess=True)


# ------------------------------------------------------------------------------ one folder loader
def _split(root: Path) -> Path:
    for c, (h, w) in (("cat", (30, 70)), ("dog", (64, 24))):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            img = _photo(h, w, 10 * i + len(c)) if w > h else _photo(w, h, i).transpose(1, 0, 2).copy()
            (root / "train" / c / f"{i}.png").write_bytes(_png(img))
    (root / "train" / "loose.png").write_bytes(_png(_photo(10, 20, 3)))  # no class folder: not in the split
    (root / "train" / "cat" / "notes.txt").write_text("not an image")  # not an image extension: left out
    return root


def test_folder_split_and_image_set_load_the_same_pixels(tmp_path: Path) -> None:
    root = _split(tmp_path / "data")
    split = FolderSplit(root, "train", (12, 12))
    assert split.ids == tuple(f"train/{c}/{i}.png" for c in ("cat", "dog") for i in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes.txt is skipped with a warning by the eager loader
        eager = ImageSet.from_folder(root / "train", (12, 12))
    for i, name in enumerate(split.ids):
        x, y = split[i]
        k = eager.ids.index(name.removeprefix("train/"))
        assert torch.equal(x, eager[k][0]) and y == eager.labels[k]
        assert split.class_names[y] == name.split("/")[1]
    norm = FolderSplit(root, "train", (12, 12), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.equal(norm[4][0], Preprocessing(mean=(0.5,) * 3, std=(0.25,) * 3).transform()(split[4][0][None])[0])
    assert (norm.mean, norm.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)) and split.mean == (0.0, 0.0, 0.0)


def test_folder_split_names_a_broken_file_and_an_empty_split(tmp_path: Path) -> None:
    root = _split(tmp_path / "data")
    (root / "train" / "dog" / "9.png").write_bytes(b"\x89PNG truncated")
    split = FolderSplit(root, "train", (8, 8))
    with pytest.raises(ValueError, match=r"image 'dog/9.png' is not a readable image .*Fix: remove or replace"):
        split[split.ids.index("train/dog/9.png")]
    (root / "test").mkdir()
    (root / "test" / "a.png").write_bytes(_png(_photo(8, 8, 0)))
    with pytest.raises(ValueError, match=r"holds no image in a class subfolder.*Fix: put the images in"):
        FolderSplit(root, "test", (8, 8))


def test_one_loader_reads_entries_once_and_refuses_a_symlink_out(tmp_path: Path) -> None:
    root = _split(tmp_path / "data")
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(_photo(8, 16, 5)))
    (root / "train" / "cat" / "link.png").symlink_to(outside)
    entries = {e.name: e for e in folder_entries(root / "train")}
    assert entries["cat/0.png"].label_name == "cat" and entries["loose.png"].label_name is None
    assert load_image(entries["cat/0.png"], (6, 6)).shape == (6, 6, 3)
    with pytest.raises(OSError, match=r"image 'cat/link.png': cannot read: a symlink that leads out of the folder"):
        load_image(entries["cat/link.png"], (6, 6))


def test_normalized_is_the_preprocessing_normalisation() -> None:
    base = labelled_images("kshapes", "test", 4, 16)
    mean, std = (0.503, 0.497, 0.501), (0.275, 0.289, 0.271)
    normed = Normalized(base, mean, std)
    x, y = base[3]
    old = (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)  # the formula it replaced
    assert torch.equal(normed[3][0], old) and normed[3][1] == y and normed.ids == base.ids


def test_study_data_of_kshapes_is_unchanged_by_the_move() -> None:
    """The studies' kshapes images still come normalised with kshapes' statistics (sample-model numbers kept)."""
    from kcore.synthetic import MEAN, STD, KShapesDataset, KShapesSpec

    data = study_data("kshapes", image_size=32, n_train=3, n_test=2, n_images=2)
    spec = KShapesSpec(seed=0, image_size=32, n_train=3, n_test=2)
    assert torch.equal(data.train[2][0], KShapesDataset(spec, "train", n=3, mean=MEAN, std=STD)[2][0])


# ------------------------------------------------------------------------------ the dashboard and the CLI agree
@pytest.mark.parametrize("prep", [
    Preprocessing((24, 24), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 32, "torchvision-like"),
    Preprocessing((20, 28), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), None, "card: input size only"),
], ids=["resize-and-crop", "card-size"])
def test_dashboard_and_cli_give_the_same_inputs_and_features_for_non_square_photos(
        wide_photos: Path, monkeypatch: pytest.MonkeyPatch, prep: Preprocessing) -> None:
    from dashboard.state import _images as dash
    from kcore.cli import _images as cli_images
    from kcore.features import extract_features

    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(wide_photos.parent))
    size = load_size(prep)
    on_server = dash.folder_images(str(wide_photos), size)
    uploaded = dash.uploaded_images([(p.name, p.read_bytes()) for p in sorted(wide_photos.iterdir())], size)
    from_cli, _ = cli_images(str(wide_photos), None, size)
    assert on_server.ids == uploaded.ids == from_cli.ids
    t = prep.transform()
    x_cli = t(from_cli.tensors())
    assert x_cli.shape[-2:] == prep.input_size
    assert torch.equal(t(on_server.tensors()), x_cli) and torch.equal(t(uploaded.tensors()), x_cli)
    # no stretch anywhere: the black edges of the wide photos are cropped away in every front end
    wide = [from_cli.ids.index(n) for n in ("p0.png", "p1.png", "p2.png")]
    assert float(from_cli.tensors()[wide].min()) > 0
    net_a, net_b = tiny_net(0), tiny_net(1)
    feats = [extract_features(net_a, "2", net_b, "2", s, device="cpu", transform_a=t, transform_b=t)
             for s in (from_cli, on_server, uploaded)]
    for f in feats[1:]:
        assert torch.equal(f.x_a, feats[0].x_a) and torch.equal(f.x_b, feats[0].x_b)
