"""Training and evaluating classifiers (kcore.training): a planted task is learnt, runs repeat, evaluation is exact.

Training the sample architectures on kshapes is tested in test_zoo.py; these tests use a tiny separable set and a
linear model, so each takes about a second.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from kcore.training import OPTIMIZERS, EpochLog, evaluate, predict, train_classifier


def _planted(n: int, seed: int) -> TensorDataset:
    """``n`` images (3, 4, 4): class k is the image whose channel k is bright, plus small noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.2 * torch.randn(n, 3, 4, 4, generator=g)
    x[torch.arange(n), y] += 1.0
    return TensorDataset(x, y)


def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))


TRAIN, TEST = _planted(60, seed=0), _planted(30, seed=1)
SETTINGS = dict(epochs=8, seed=0, lr=0.5, weight_decay=0.0, batch_size=16)


def test_a_planted_separable_task_is_learnt() -> None:
    res = train_classifier(_linear(), TRAIN, TEST, **SETTINGS)
    assert res.test_accuracy == 1.0
    assert [h.epoch for h in res.history] == list(range(1, 9)) and all(isinstance(h, EpochLog) for h in res.history)
    assert res.history[-1].loss < 0.5 * res.history[0].loss
    assert res.history[-1].accuracy == 1.0  # the last epoch, measured on the fly
    assert not res.model.training
    # the same images with the labels shuffled: nothing to learn, so the true labels are not found
    x, y = TRAIN.tensors
    shuffled = TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(5))])
    assert train_classifier(_linear(), shuffled, TEST, **SETTINGS).test_accuracy < 0.9


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_training_repeats_exactly_for_a_seed(optimizer: str) -> None:
    runs = [train_classifier(_linear(), TRAIN, TEST, **{**SETTINGS, "epochs": 2, "lr": 0.05}, optimizer=optimizer)
            for _ in range(2)]
    a, b = (r.model.state_dict() for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h.loss for h in runs[0].history] == [h.loss for h in runs[1].history]
    other = train_classifier(_linear(), TRAIN, TEST, **{**SETTINGS, "epochs": 2, "lr": 0.05, "seed": 1},
                             optimizer=optimizer)
    assert not torch.equal(other.model.state_dict()["2.weight"], a["2.weight"])  # another seed: another order


def test_stacking_the_training_set_first_changes_nothing() -> None:
    cached = train_classifier(_linear(), TRAIN, None, **SETTINGS, cache=True)
    streamed = train_classifier(_linear(), TRAIN, None, **SETTINGS, cache=False)
    a, b = cached.model.state_dict(), streamed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert np.isnan(cached.test_accuracy)  # no test set


def test_progress_says_one_line_per_epoch() -> None:
    lines: list[str] = []
    train_classifier(_linear(), TRAIN, None, **{**SETTINGS, "epochs": 3}, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all("loss" in line and "train acc" in line for line in lines)


def test_predict_and_evaluate_known_answers() -> None:
    model = _linear()
    with torch.no_grad():  # a hand-set model: the class is the brightest channel
        model[2].weight.copy_(torch.eye(3))
        model[2].bias.zero_()
    x, y = TEST.tensors
    want = x.mean(dim=(2, 3)).argmax(1).numpy()
    assert np.array_equal(predict(model, TEST), want) and predict(model, TEST).dtype == np.int64
    assert evaluate(model, TEST) == 1.0
    wrong = TensorDataset(x, (y + 1) % 3)
    assert evaluate(model, wrong) == 0.0
    half = TensorDataset(x, torch.where(torch.arange(len(y)) < 12, y, (y + 1) % 3))
    assert evaluate(model, half) == pytest.approx(12 / 30)
    assert all(evaluate(model, half, batch_size=b) == pytest.approx(12 / 30) for b in (1, 7, 100))


def test_evaluation_leaves_the_callers_model_as_it_was() -> None:
    model = _linear().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(model, TEST)
    evaluate(model, TEST, dtype=torch.float32)
    assert model.training and next(model.parameters()).dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments_name_what_was_expected_and_got() -> None:
    with pytest.raises(ValueError, match=r"epochs must be an integer >= 1, got 0\. Fix: pass epochs=1"):
        train_classifier(_linear(), TRAIN, epochs=0, seed=0)
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adamw', 'sgd'\], got 'adam'\. Fix: "):
        train_classifier(_linear(), TRAIN, epochs=1, seed=0, optimizer="adam")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model must be an nn\.Module or one of \[.*'kc_resnet'.*\], got 'resnet9'\. Fix: "):
        train_classifier("resnet9", TRAIN, epochs=1, seed=0)
    with pytest.raises(ValueError, match=r"num_classes is required: train_set has no class_names attribute.*Fix: pass num_classes=N"):
        train_classifier("kc_tinynet", TRAIN, epochs=1, seed=0)
    with pytest.raises(ValueError, match=r"dataset is empty: an accuracy needs at least one image; got 0\. Fix: "):
        evaluate(_linear(), TensorDataset(torch.zeros(0, 3, 4, 4), torch.zeros(0, dtype=torch.long)))
