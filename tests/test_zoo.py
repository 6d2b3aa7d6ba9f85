"""Sample architectures, training determinism, and the committed sample models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kcore.cards import CARD_FORMAT
from kcore.samples import (
    CHECK_N,
    SAMPLE_MODELS_DIR,
    SAMPLE_RECIPES,
    SAMPLE_SPEC,
    train_sample_models,
)
from kcore.synthetic import CLASS_NAMES, KShapesDataset, KShapesSpec
from kcore.training import evaluate, train_classifier
from kcore.zoo import DEFAULT_LAYERS, SAMPLE_ARCHITECTURES

REQUIRED_CARD_KEYS = {"format", "architecture", "num_classes", "input_size", "mean", "std",
                      "class_names", "dataset", "test_accuracy", "default_layer"}


@pytest.mark.parametrize("arch", sorted(SAMPLE_ARCHITECTURES))
def test_default_layer_has_the_advertised_shape(arch: str) -> None:
    torch.manual_seed(0)
    model = SAMPLE_ARCHITECTURES[arch](10).eval()
    info = DEFAULT_LAYERS[arch]
    captured = []
    handle = dict(model.named_modules())[info.name].register_forward_hook(
        lambda m, i, o: captured.append(o.detach().clone()))
    try:
        with torch.no_grad():
            out = model(torch.randn(2, 3, 64, 64))
    finally:
        handle.remove()
    assert out.shape == (2, 10)
    assert len(captured) == 1 and tuple(captured[0].shape) == (2, *info.shape)


@pytest.mark.parametrize("arch", sorted(SAMPLE_ARCHITECTURES))
def test_any_input_size_and_num_classes(arch: str) -> None:
    model = SAMPLE_ARCHITECTURES[arch](2).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 37, 50)).shape == (1, 2)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SAMPLE_ARCHITECTURES[arch](0)


def test_strong_and_weak_architectures_differ_in_capacity() -> None:
    sizes = {a: sum(p.numel() for p in b(10).parameters()) for a, b in SAMPLE_ARCHITECTURES.items()}
    assert sizes["kc_resnet"] > 4 * sizes["kc_tinynet"]
    assert DEFAULT_LAYERS["kc_resnet"].shape[1:] == DEFAULT_LAYERS["kc_tinynet"].shape[1:]


def test_training_is_deterministic_and_leaves_eval_mode() -> None:
    spec = KShapesSpec(n_train=64, n_test=32)
    train, test = KShapesDataset(spec, "train"), KShapesDataset(spec, "test")
    runs = [train_classifier("kc_tinynet", train, test, epochs=2, seed=3, lr=0.01,
                             optimizer="adamw", batch_size=16) for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].test_accuracy == runs[1].test_accuracy
    assert len(runs[0].history) == 2 and not runs[0].model.training
    other = train_classifier("kc_tinynet", train, None, epochs=1, seed=4, batch_size=16)
    assert not torch.equal(other.model.state_dict()["fc.weight"], a["fc.weight"])
    with pytest.raises(ValueError, match="model must be an nn.Module or one of"):
        train_classifier("resnet50", train, epochs=1, seed=0)


def test_evaluate_restores_nothing_it_should_not_touch() -> None:
    model = SAMPLE_ARCHITECTURES["kc_resnet"](10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(model, KShapesDataset(KShapesSpec(n_test=8), "test"))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float32


def test_quick_training_writes_weights_cards_and_readme(tmp_path: Path) -> None:
    models = train_sample_models(tmp_path, quick=True, only=["kshapes_tinynet_s0"])
    assert [m.name for m in models] == ["kshapes_tinynet_s0"]
    card = json.loads((tmp_path / "kshapes_tinynet_s0.card.json").read_text())
    assert REQUIRED_CARD_KEYS <= set(card) and card["format"] == CARD_FORMAT
    weights = (tmp_path / "kshapes_tinynet_s0.safetensors").read_bytes()
    assert len(weights) > 1000
    again = train_sample_models(tmp_path / "again", quick=True, only=["kshapes_tinynet_s0"])
    assert again[0].weights.read_bytes() == weights  # byte-identical files from the same seed
    with pytest.raises(ValueError, match="unknown sample model"):
        train_sample_models(tmp_path, quick=True, only=["nope"])


# ------------------------------------------------------------- committed models
def _cards() -> dict[str, dict]:
    return {r.name: json.loads((SAMPLE_MODELS_DIR / f"{r.name}.card.json").read_text())
            for r in SAMPLE_RECIPES}


def _load(name: str, card: dict) -> torch.nn.Module:
    model = SAMPLE_ARCHITECTURES[card["architecture"]](card["num_classes"])
    model.load_state_dict(load_file(str(SAMPLE_MODELS_DIR / f"{name}.safetensors")))
    return model.eval()


def test_committed_cards_are_complete() -> None:
    for name, card in _cards().items():
        assert REQUIRED_CARD_KEYS <= set(card), name
        assert card["format"] == CARD_FORMAT
        assert card["architecture"] in SAMPLE_ARCHITECTURES
        assert card["class_names"] == list(CLASS_NAMES) and card["num_classes"] == 10
        assert card["input_size"] == [64, 64] and card["dataset"].startswith("kshapes-v1 seed=0")
        assert card["default_layer"] == DEFAULT_LAYERS[card["architecture"]].name
        assert 0.0 <= card["test_accuracy"] <= 1.0
    total = sum(p.stat().st_size for p in SAMPLE_MODELS_DIR.iterdir())
    assert total < 5 * 2**20
    assert (SAMPLE_MODELS_DIR / "README.md").exists()


def test_committed_models_reproduce_their_check_accuracy() -> None:
    """Fast: accuracy on the first CHECK_N test images, as stored in each card."""
    cards = _cards()
    spec = KShapesSpec(seed=0, n_train=SAMPLE_SPEC.n_train, n_test=SAMPLE_SPEC.n_test)
    for name, card in cards.items():
        check = card["check_accuracy"]
        assert check["n"] == CHECK_N
        accuracy = evaluate(_load(name, card), KShapesDataset(spec, "test", n=CHECK_N))
        assert accuracy == pytest.approx(check["accuracy"], abs=1e-6), name
    strong = min(cards["kshapes_resnet_s0"]["test_accuracy"], cards["kshapes_resnet_s1"]["test_accuracy"])
    assert strong > cards["kshapes_tinynet_s0"]["test_accuracy"] + 0.2
    assert strong > 0.8


@pytest.mark.slow
def test_committed_models_reproduce_their_card_accuracy() -> None:
    """The full test split (1000 images, float64: about 10 s of CPU)."""
    cards = _cards()
    card = cards["kshapes_resnet_s0"]
    spec = KShapesSpec(seed=0, n_train=card["train_split"]["n"], n_test=card["test_split"]["n"])
    test = KShapesDataset(spec, "test", cache=True)  # rendered once for the three models
    for name, card in cards.items():
        assert spec.name == card["dataset"] and spec.n_test == card["test_split"]["n"]
        accuracy = evaluate(_load(name, card), test)
        assert accuracy == pytest.approx(card["test_accuracy"], abs=1e-6), name
