"""Each model is fed what it was trained on: card, torchvision's standard evaluation transform, or the user's values."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from kcore.cards import ModelCard, card_path_for, read_card, write_card
from kcore.checkpoints import load_model
from kcore.cli import main
from kcore.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocessing,
    card_for,
    load_size,
    preprocessing_of,
    resolve_preprocessing,
    standard_preprocessing,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tv_model(tmp_path_factory) -> Path:
    """A torchvision architecture saved as a bare state dict, without a card."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    return path


def test_torchvision_standard_is_read_from_the_weight_metadata() -> None:
    p = standard_preprocessing("resnet50")  # IMAGENET1K_V2: resize 232, crop 224
    assert (p.input_size, p.resize_size, p.mean, p.std) == ((224, 224), 232, IMAGENET_MEAN, IMAGENET_STD)
    p = standard_preprocessing("inception_v3")
    assert (p.input_size, p.resize_size) == ((299, 299), 342)
    assert standard_preprocessing("kc_resnet") is None  # the project's sample, not torchvision's
    assert standard_preprocessing("no_such_net") is None


def test_transform_matches_torchvision_evaluation_transform() -> None:
    """Two ways to the same input: kcore's batch transform and torchvision's own ImageClassification preset."""
    prep = standard_preprocessing("resnet18")
    reference = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms(antialias=True)
    torch.manual_seed(1)
    images = torch.rand(2, 3, 240, 320)
    ours = prep.transform()(images)
    theirs = torch.stack([reference(im) for im in images])
    assert ours.shape == theirs.shape == (2, 3, 224, 224)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_torchvision_architecture_without_card_is_extracted_at_its_standard(tv_model: Path, tmp_path: Path,
                                                                           capsys) -> None:
    loaded = load_model(tv_model, arch="resnet18")
    assert loaded.card is None and loaded.num_classes == 7 and loaded.architecture == "resnet18"
    prep = preprocessing_of(loaded)
    assert (prep.input_size, prep.resize_size, prep.mean, prep.std) == ((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD)
    assert "torchvision's standard evaluation transform" in prep.source

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(tv_model), "--arch-a", "resnet18", "--layer-a", "layer1",
               "--b", str(tv_model), "--arch-b", "resnet18", "--layer-b", "layer1",
               "--data", str(folder), "--epochs", "1", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "A: preprocessing 224×224 (shorter side 256, centre crop)" in err
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["preprocessing"]["A"]["input_size"] == [224, 224]
    assert prov["preprocessing"]["A"]["mean"] == list(IMAGENET_MEAN)
    assert prov["feature_shapes"]["A"] == [64, 56, 56]  # resnet18 layer1 at a 224-px input


def test_flags_override_the_standard_and_are_recorded(tv_model: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (120, 120, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(tv_model), "--arch-a", "resnet18", "--layer-a", "layer1",
               "--b", str(tv_model), "--arch-b", "resnet18", "--layer-b", "layer1",
               "--input-size-a", "112", "112", "--mean-a", "0.5", "0.5", "0.5", "--std-a", "0.25", "0.25", "0.25",
               "--input-size-b", "96", "96",
               "--data", str(folder), "--epochs", "1", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    prov = json.loads((out / "provenance.json").read_text())
    a, b = prov["preprocessing"]["A"], prov["preprocessing"]["B"]
    assert a["input_size"] == [112, 112] and a["mean"] == [0.5] * 3 and a["std"] == [0.25] * 3
    assert a["resize_size"] == 128  # the 256/224 ratio of the standard is kept
    assert "--input-size-a" in a["source"] and "--mean-a" in a["source"]
    assert b["input_size"] == [96, 96] and b["mean"] == list(IMAGENET_MEAN)
    assert prov["feature_shapes"]["A"] == [64, 28, 28]  # layer1 at 112 px
    assert prov["feature_shapes"]["B"] == [64, 24, 24]  # layer1 at 96 px


def test_a_card_wins_and_a_partial_card_is_completed() -> None:
    full = ModelCard(architecture="resnet18", input_size=(64, 64), mean=(0.5,) * 3, std=(0.2,) * 3)
    p = resolve_preprocessing(full, "resnet18")
    assert (p.input_size, p.resize_size, p.mean, p.source) == ((64, 64), None, (0.5,) * 3, "model card")
    partial = ModelCard(architecture="resnet18", input_size=(128, 128))
    p = resolve_preprocessing(partial, None)
    assert p.input_size == (128, 128) and p.mean == IMAGENET_MEAN and "completed" in p.source
    none = resolve_preprocessing(None, "kc_resnet")
    assert none.input_size is None and none.mean is None and none.source.startswith("none")


def test_card_written_for_a_model_round_trips(tv_model: Path, tmp_path: Path) -> None:
    path = tmp_path / tv_model.name
    path.write_bytes(tv_model.read_bytes())
    loaded = load_model(path, arch="resnet18")
    prep = preprocessing_of(loaded).with_overrides(input_size=(160, 160), mean=(0.4, 0.4, 0.4), std=(0.3, 0.3, 0.3))
    write_card(card_for(loaded, prep), card_path_for(path))
    again = load_model(path)  # no arch: the card says it
    assert again.card == read_card(card_path_for(path))
    assert (again.architecture, again.num_classes) == ("resnet18", 7)
    back = preprocessing_of(again)
    assert (back.input_size, back.resize_size, back.mean, back.std) == (
        (160, 160), prep.resize_size, (0.4, 0.4, 0.4), (0.3, 0.3, 0.3))
    assert back.source == "model card"


def test_bad_values_are_refused_with_a_fix() -> None:
    with pytest.raises(ValueError, match="std must be > 0.*Fix"):
        Preprocessing((224, 224), (0.5,) * 3, (0.0, 0.2, 0.2))
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\).*Fix"):
        Preprocessing((224,))
    with pytest.raises(ValueError, match="mean must be 3 numbers"):
        Preprocessing((224, 224), (0.5, 0.5), (0.2, 0.2))


def test_load_size_is_the_largest_needed() -> None:
    a = Preprocessing((64, 64), (0.5,) * 3, (0.2,) * 3)
    assert load_size(a, standard_preprocessing("resnet18")) == (256, 256)
    assert load_size(Preprocessing(), default=(100, 90)) == (100, 90)
