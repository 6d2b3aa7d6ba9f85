"""Results that cross modules are typed: a sample model's card is a ModelCard, written exactly as before."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kcore.cards import CARD_FORMAT, ModelCard
from kcore.samples import QUICK_SPEC, SAMPLE_RECIPES, card_json, make_card
from kcore.training import EpochLog, TrainResult
from kcore.zoo import SAMPLE_ARCHITECTURES

SAMPLE_MODELS = Path(__file__).resolve().parents[1] / "sample_models"


@pytest.mark.parametrize("recipe", SAMPLE_RECIPES, ids=lambda r: r.name)
def test_a_committed_card_reads_and_writes_back_byte_for_byte(recipe):
    path = SAMPLE_MODELS / f"{recipe.name}.card.json"
    text = path.read_text()
    card = ModelCard.from_dict(json.loads(text), source=str(path))
    assert card.architecture == recipe.architecture and card.extra["seed"] == recipe.seed
    assert json.dumps(card_json(card), indent=2) + "\n" == text


def test_make_card_gives_a_model_card_whose_file_has_the_committed_layout():
    recipe = SAMPLE_RECIPES[-1]
    torch.manual_seed(0)
    model = SAMPLE_ARCHITECTURES[recipe.architecture](10).eval()
    result = TrainResult(model, 0.25, 1.26, (EpochLog(1, 2.5, 0.1, 1.0), EpochLog(2, 2.0, 0.2, 1.0)))
    card = make_card(recipe, result, QUICK_SPEC, command="kcore test", num_threads=1)
    assert isinstance(card, ModelCard)
    assert (card.test_accuracy, card.input_size, card.dataset) == (0.25, (64, 64), QUICK_SPEC.name)
    assert (card.extra["epochs"], card.extra["final_train_loss"], card.extra["train_seconds"]) == (2, 2.0, 1.3)
    assert card.extra["num_parameters"] == sum(p.numel() for p in model.parameters())
    written = card_json(card)
    assert written["format"] == CARD_FORMAT and "extra" not in written
    committed = json.loads((SAMPLE_MODELS / f"{recipe.name}.card.json").read_text())
    assert list(written) == list(committed)  # the same keys in the same order as the files made before
    assert ModelCard.from_dict(json.loads(json.dumps(written))) == card


def test_card_json_refuses_an_extra_key_that_is_a_card_field():
    with pytest.raises(ValueError, match=r"card.extra holds \['dataset'\], which are card fields.*Fix: set them"):
        card_json(ModelCard(dataset="a", extra={"dataset": "b"}))
