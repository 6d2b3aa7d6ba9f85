"""Model cards (kcore.cards): a card round-trips through its JSON file, and every bad field is refused by name.

How load_model uses a card beside a checkpoint is tested in test_checkpoints.py; the size caps on a card's
fields (``KCORE_MAX_INPUT_SIDE``, ``KCORE_MAX_CLASSES``) in test_hostile_limits.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kcore.cards import CARD_FORMAT, ModelCard, card_path_for, read_card, write_card

FULL = ModelCard(
    architecture="kc_resnet", num_classes=3, input_size=(32, 24), mean=(0.5, 0.25, 0.0), std=(0.2, 0.3, 1.0),
    class_names=("disc", "ring", "star"), dataset="toy", test_accuracy=0.75, default_layer="layer2",
    extra={"seed": 3, "resize_size": 36, "notes": ["a", "b"]},
)


@pytest.mark.parametrize("card", [FULL, ModelCard()], ids=["every field", "empty"])
def test_a_card_round_trips_through_its_file(tmp_path: Path, card: ModelCard) -> None:
    path = write_card(card, tmp_path / "m.card.json")
    assert path == tmp_path / "m.card.json"
    back = read_card(path)
    assert back == card and back.extra == card.extra
    assert isinstance(back.input_size, (tuple, type(None))) and isinstance(back.mean, (tuple, type(None)))
    assert ModelCard.from_dict(card.to_dict()) == card


def test_the_file_is_json_with_the_format_first() -> None:
    d = FULL.to_dict()
    assert next(iter(d)) == "format" and d["format"] == CARD_FORMAT == "kcore-model-card/1"
    assert d["input_size"] == [32, 24] and d["class_names"] == ["disc", "ring", "star"]  # tuples as JSON lists
    assert json.loads(json.dumps(d)) == d


def test_the_card_lives_beside_its_checkpoint() -> None:
    assert card_path_for("runs/m.safetensors") == Path("runs/m.card.json")
    assert card_path_for(Path("/x/y/model.v2.pt")) == Path("/x/y/model.v2.card.json")


def test_unknown_keys_are_kept_in_extra_and_a_missing_format_is_the_current_one() -> None:
    card = ModelCard.from_dict({"architecture": "kc_tinynet", "arch_version": 2, "extra": {"seed": 1}})
    assert card.architecture == "kc_tinynet" and card.extra == {"seed": 1, "arch_version": 2}
    assert ModelCard.from_dict({"num_classes": 4, "test_accuracy": 1}).test_accuracy == 1.0


@pytest.mark.parametrize(
    "data, message",
    [
        ({"format": "kcore-model-card/2"}, r"'format' must be 'kcore-model-card/1'; got 'kcore-model-card/2'\. "
                                           r"Fix: write the card with kcore.cards.write_card"),
        ({"architecture": 3}, r"'architecture' must be a string or null; got 3"),
        ({"default_layer": ["layer2"]}, r"'default_layer' must be a string or null; got \['layer2'\]"),
        ({"num_classes": 0}, r"'num_classes' must be a positive integer; got 0\. Fix: give the number of outputs"),
        ({"num_classes": True}, r"'num_classes' must be a positive integer; got True"),
        ({"num_classes": "10"}, r"'num_classes' must be a positive integer; got '10'"),
        ({"input_size": [32]}, r"'input_size' must be \[H, W\] \(two positive integers\); got \[32\]"),
        ({"input_size": [32, 0]}, r"'input_size' must be \[H, W\] \(two positive integers\); got \[32, 0\]"),
        ({"input_size": [32.0, 32]}, r"'input_size' must be \[H, W\]"),
        ({"mean": [0.5, "0.5", 0.5]}, r"'mean' must be a list of numbers, e\.g\. \[0\.5, 0\.5, 0\.5\]"),
        ({"mean": 0.5}, r"'mean' must be a list of numbers"),
        ({"std": [0.2, 0.0, 0.2]}, r"'std' must hold positive numbers; got \[0\.2, 0\.0, 0\.2\]"),
        ({"std": [True, 1, 1]}, r"'std' must be a list of numbers"),
        ({"class_names": ["a", 2]}, r"'class_names' must be a list of strings; got \['a', 2\]"),
        ({"num_classes": 3, "class_names": ["a", "b"]},
         r"'class_names' has 2 names but 'num_classes' is 3\. Fix: give one name per class"),
        ({"test_accuracy": "high"}, r"'test_accuracy' must be a number or null; got 'high'"),
        ({"extra": [["seed", 1]]}, r"'extra' must be a JSON object; got \[\['seed', 1\]\]"),
        ({"extra": {"resize_size": 0}}, r"'extra\.resize_size' .* must be a positive integer or absent; got 0"),
    ],
)
def test_a_bad_field_is_named_with_what_was_expected_and_got(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"^card 'm\.card\.json': " + message):
        ModelCard.from_dict(data, source="card 'm.card.json'")


def test_an_extra_that_is_a_plain_list_is_named() -> None:
    with pytest.raises(ValueError, match=r"'extra' must be a JSON object; got \[1, 2\]"):
        ModelCard.from_dict({"extra": [1, 2]})


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^model card: expected a JSON object, got list\.$"):
        ModelCard.from_dict([1, 2])  # type: ignore[arg-type]


def test_a_file_that_is_not_json_is_named_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "m.card.json"
    path.write_text('{"architecture": "kc_resnet",', encoding="utf-8")  # cut short
    with pytest.raises(ValueError, match=r"model card '.*m\.card\.json' is not valid JSON .*Fix: correct the file"):
        read_card(path)
    path.write_text('{"num_classes": -1}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"^model card '.*m\.card\.json': 'num_classes' must be a positive"):
        read_card(path)
    with pytest.raises(FileNotFoundError):
        read_card(tmp_path / "missing.card.json")


def test_extra_that_json_cannot_store_is_a_type_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_card(ModelCard(extra={"when": object()}), tmp_path / "m.card.json")
    assert not (tmp_path / "m.card.json").exists()


def test_a_card_is_a_frozen_value() -> None:
    with pytest.raises(AttributeError):
        FULL.num_classes = 4  # type: ignore[misc]
    assert ModelCard(num_classes=3) == ModelCard(num_classes=3) != ModelCard(num_classes=4)
