"""Results that cross modules are frozen dataclasses (cards, fit summaries, checks, study rows), written as before."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import kcore
from kcore.cards import CARD_FORMAT, ModelCard
from kcore.experiments._arms import ArmResult
from kcore.experiments._fits import FitSummary, fit_summary
from kcore.experiments._folder import write_study
from kcore.experiments.diagnosis import DiagnosisChecks, checks
from kcore.experiments.stability import PairDirection, StabilityResult, StabilityRow
from kcore.samples import QUICK_SPEC, SAMPLE_RECIPES, CheckAccuracy, card_json, check_accuracy, make_card
from kcore.synthetic import KShapesDataset, KShapesSpec
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
    assert list(written["check_accuracy"]) == list(committed["check_accuracy"])  # CheckAccuracy.as_dict()
    assert (written["check_accuracy"]["split"], written["check_accuracy"]["n"]) == ("test", QUICK_SPEC.n_test)
    assert ModelCard.from_dict(json.loads(json.dumps(written))) == card


def test_card_json_refuses_an_extra_key_that_is_a_card_field():
    with pytest.raises(ValueError, match=r"card.extra holds \['dataset'\], which are card fields.*Fix: set them"):
        card_json(ModelCard(dataset="a", extra={"dataset": "b"}))


# ----------------------------------------------------------------- study rows: frozen, with their JSON form
def _arm(name: str, seed: int, test_accuracy: float) -> ArmResult:
    return ArmResult(name=name, features=name, upper_layers="above block2", channels=4, test_accuracy_before=0.1,
                     test_accuracy=test_accuracy, train_accuracy=0.5, train_loss=(1.0,), n_trainable=10,
                     lower_unchanged=True, seconds=0.0, seed=seed)


def test_fit_summary_is_a_frozen_fit_summary_whose_as_dict_is_the_result_json_form():
    torch.manual_seed(0)
    x = torch.randn(30, 3, 4, 4)
    y = torch.cat([2.0 * x[:, :2], x[:, :1] ** 2], 1) + 0.1 * torch.randn(30, 3, 4, 4)
    res = kcore.fit(x, y, orders=1, epochs=2, seed=0, device="cpu")
    summary = fit_summary(res)
    assert isinstance(summary, FitSummary)
    with pytest.raises(dataclasses.FrozenInstanceError):
        summary.instability = 0.0
    rep = res.heldout_report
    assert (summary.instability, summary.var_orders, summary.n_images) == (rep.instability, rep.var_orders,
                                                                          rep.n_images)
    assert (summary.epochs_run, summary.config, summary.reported_on) == (len(res.history), res.config, None)
    d = summary.as_dict()
    assert list(d) == ["heldout_error", "instability", "var_orders", "var_residual", "var_target", "n_images",
                       "share_orders", "share_residual", "gates", "linear_r2", "best_epoch", "epochs_run", "config"]
    assert d["var_orders"] == list(rep.var_orders) and d["gates"] == list(res.gates)
    assert d["config"] == dataclasses.asdict(res.config)
    assert json.loads(json.dumps(d)) == d  # plain JSON values
    on_all = fit_summary(res, res.report(x, y), reported_on="test images")
    assert on_all.n_images == 30 and on_all.heldout_error == summary.heldout_error
    assert list(on_all.as_dict())[-1] == "reported_on" and on_all.as_dict()["reported_on"] == "test images"


def test_checks_are_frozen_means_and_gains_over_the_seeds():
    accuracies = {"x_A": (0.5, 0.6), "g(x_A)": (0.55, 0.5), "g(x_A)+blind spots": (0.7, 0.8),
                  "x_A-unreliable": (0.625, 0.5)}
    arms = [_arm(name, seed, acc[seed]) for seed in (0, 1) for name, acc in accuracies.items()]
    c = checks(arms)
    assert isinstance(c, DiagnosisChecks) and c.seeds == (0, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.blind_spots.gain_over_x_a = 1.0
    b, u = c.blind_spots, c.unreliable
    assert (b.x_a, b.g_x_a, b.g_x_a_blind_spots) == pytest.approx((0.55, 0.525, 0.75))
    assert (b.gain_over_x_a, b.gain_over_x_a_std) == pytest.approx((0.2, 0.0), abs=1e-12)
    assert (b.gain_over_g_x_a, b.gain_over_g_x_a_std) == pytest.approx((0.225, 0.15 / 2**0.5))
    assert (u.x_a_unreliable, u.gain_over_x_a, u.gain_over_x_a_std) == pytest.approx((0.5625, 0.0125, 0.225 / 2**0.5))
    d = c.as_dict()
    assert list(d) == ["blind_spots", "unreliable", "seeds"] and d["seeds"] == [0, 1]
    assert d["blind_spots"] == {"x_A": b.x_a, "g(x_A)": b.g_x_a, "g(x_A)+blind spots": b.g_x_a_blind_spots,
                                "gain_over_x_A": b.gain_over_x_a, "gain_over_x_A_std": b.gain_over_x_a_std,
                                "gain_over_g(x_A)": b.gain_over_g_x_a, "gain_over_g(x_A)_std": b.gain_over_g_x_a_std}
    assert d["unreliable"] == {"x_A": u.x_a, "x_A-unreliable": u.x_a_unreliable, "gain_over_x_A": u.gain_over_x_a,
                               "gain_over_x_A_std": u.gain_over_x_a_std}
    one = checks([a for a in arms if a.seed == 1])
    assert one.seeds == (1,) and one.unreliable.gain_over_x_a_std == 0.0  # one seed: no spread


def _direction(layer: str, source: str, target: str, instability: float, ci=None) -> PairDirection:
    return PairDirection(layer=layer, source=source, target=target, instability=instability,
                         instability_std_units=2 * instability, var_orders=(1.0, 0.5), var_residual=instability,
                         var_target=1.0, heldout_error=instability / 2, linear_r2=0.25, gates=(0.5,), n_images=6,
                         instability_ci=ci)


def test_stability_summary_rows_are_frozen_and_written_as_their_as_row(tmp_path):
    directions = (_direction("l1", "a", "b", 0.2, (0.1, 0.3)), _direction("l1", "b", "a", 0.4, (0.2, 0.8)),
                  _direction("l1", "a", "c", 0.6), _direction("l1", "c", "a", 0.6),
                  _direction("l2", "a", "b", 0.5), _direction("l2", "b", "a", 0.7))
    result = StabilityResult(case="seeds", architecture=None, members=({"name": "a"}, {"name": "b"}, {"name": "c"}),
                             layers=("l1", "l2"), directions=directions, orders=1, both_directions=True, n_images=30,
                             seed=0, family=None, seconds=0.0,
                             random_reference={"l1": {"instability": 0.9, "ci": [0.85, 0.95], "network": "random"}})
    l1, l2 = result.summary()
    assert isinstance(l1, StabilityRow) and (l1.layer, l2.layer) == ("l1", "l2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        l1.instability_mean = 0.0
    # pairs at l1: (a, b) 0.3 and (a, c) 0.6; at l2: (a, b) 0.6
    assert l1.n_pairs == 2
    assert (l1.instability_mean, l1.instability_min, l1.instability_max) == pytest.approx((0.45, 0.3, 0.6))
    assert l1.instability_std == pytest.approx(0.3 / 2**0.5) and l2.instability_std == 0.0
    assert l1.instability_ci_halfwidth_mean == pytest.approx(0.2)  # half-widths 0.1 and 0.3 of the two intervals
    assert (l1.random_init_instability, l1.random_init_ci) == (0.9, (0.85, 0.95))
    assert math.isnan(l2.random_init_instability) and all(math.isnan(v) for v in l2.random_init_ci)
    assert math.isnan(l2.instability_ci_halfwidth_mean)
    assert l1.var_orders == (1.0, 0.5) and l1.var_residual == pytest.approx(0.45)
    row = l1.as_row()
    assert list(row) == ["layer", "case", "n_pairs", "instability_mean", "instability_std", "instability_min",
                         "instability_max", "instability_std_units_mean", "instability_ci_halfwidth_mean",
                         "random_init_instability", "random_init_ci_lo", "random_init_ci_hi", "var_x0", "var_x1",
                         "var_residual", "var_target", "heldout_error_mean", "linear_r2_mean"]
    assert (row["random_init_ci_lo"], row["random_init_ci_hi"], row["var_x1"]) == (0.85, 0.95, 0.5)
    out = write_study(tmp_path / "st", "stability", result.as_dict(), result.tables(), {}, {"seed": 0})
    written = json.loads((out / "result.json").read_text())
    assert json.dumps(written["summary"]) == json.dumps([l1.as_row(), l2.as_row()])  # NaN equal as text
    assert (out / "summary.csv").read_text().splitlines()[0] == ",".join(row)


def test_check_accuracy_is_a_frozen_check_written_into_the_card_as_before():
    spec = KShapesSpec(seed=0, image_size=32, n_train=10, n_test=24)

    always_zero = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))  # zero weights, bias for class 0
    with torch.no_grad():
        always_zero[1].weight.zero_()
        always_zero[1].bias.copy_(torch.eye(10)[0])
    check = check_accuracy(always_zero, spec, n=20)
    assert isinstance(check, CheckAccuracy) and (check.split, check.n) == ("test", 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.accuracy = 1.0
    labels = [KShapesDataset(spec, "test", n=20)[i][1] for i in range(20)]
    assert check.accuracy == labels.count(0) / 20  # the share of class-0 images: the only right answers
    assert check_accuracy(always_zero, spec, n=10**6).n == 24  # capped at the split
    for recipe in SAMPLE_RECIPES:  # the committed cards' entries are CheckAccuracy.as_dict(), text for text
        entry = json.loads((SAMPLE_MODELS / f"{recipe.name}.card.json").read_text())["check_accuracy"]
        assert json.dumps(CheckAccuracy(**entry).as_dict(), indent=2) == json.dumps(entry, indent=2)
