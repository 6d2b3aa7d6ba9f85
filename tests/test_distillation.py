"""Born-again distillation (Sec. 4.5): the KD loss on known answers, training, and the study end to end."""
from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import torch

from kcore.cli import main
from kcore.experiments._arms import state_fingerprint, unchanged
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.distillation import (
    StudentSettings,
    born_again_loss,
    distillation_study,
    kd_loss,
    train_born_again,
)
from kcore.zoo import kc_resnet
from studies_page import open_in_dashboard

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------ KD loss
def test_kd_loss_matches_a_hand_computation():
    # teacher soft targets (1/4, 3/4); student log-probabilities log(1/2), log(1/2): KD = -(1/4 + 3/4) log(1/2)
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.tensor([[0.0, 0.0]])
    assert kd_loss(s, t, tau=1.0).item() == pytest.approx(math.log(2.0), abs=1e-7)
    # student = teacher: the teacher's entropy -(1/4 log 1/4 + 3/4 log 3/4)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert kd_loss(t, t).item() == pytest.approx(h, abs=1e-7)
    # a batch averages over samples: (log 2 + h) / 2
    assert kd_loss(torch.cat([s, t]), torch.cat([t, t])).item() == pytest.approx((math.log(2.0) + h) / 2, abs=1e-7)


def test_kd_loss_temperature_and_tau_squared_factor():
    # τ = 2 on logits (0, 2 log 3): soft targets (1/4, 3/4) again; student logits 0 -> KD = τ² log 2 = 4 log 2
    t = torch.tensor([[0.0, 2 * math.log(3.0)]])
    s = torch.zeros(1, 2)
    assert kd_loss(s, t, tau=2.0).item() == pytest.approx(4 * math.log(2.0), abs=1e-6)


def test_kd_gradient_vanishes_when_the_student_equals_the_teacher():
    t = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.2, -1.0]])
    s = t.clone().requires_grad_(True)
    kd_loss(s, t, tau=1.0).backward()
    assert s.grad.abs().max().item() < 1e-7
    # and equals τ (softmax(s/τ) − softmax(t/τ)) / N elsewhere (here τ = 2)
    s2 = torch.zeros(2, 3, requires_grad=True)
    kd_loss(s2, t, tau=2.0).backward()
    expected = 2.0 * (torch.softmax(s2.detach() / 2, 1) - torch.softmax(t / 2, 1)) / 2
    assert torch.allclose(s2.grad, expected, atol=1e-7)


def test_born_again_loss_is_ce_plus_lambda_kd():
    t = torch.tensor([[0.0, math.log(3.0)]])
    s = torch.zeros(1, 2)
    y = torch.tensor([1])
    assert born_again_loss(s, t, y, lambd=0.5).item() == pytest.approx(math.log(2.0) * 1.5, abs=1e-7)


def test_kd_loss_rejects_mismatched_shapes_and_bad_tau():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau must be > 0"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), tau=0.0)


def test_training_a_student_leaves_the_teacher_alone(tiny_kshapes):
    data, teacher = tiny_kshapes
    before = state_fingerprint(teacher)
    teacher.train()
    torch.manual_seed(10)
    student, losses = train_born_again(kc_resnet(10), teacher, data.train, StudentSettings(epochs=1), seed=10)
    assert unchanged(teacher, before) and teacher.training  # mode given back
    teacher.eval()
    assert not student.training and len(losses) == 1 and math.isfinite(losses[0])


# --------------------------------------------------------------------------------------------------- study
@pytest.mark.slow
def test_distillation_study_end_to_end_is_deterministic_and_reopens(tiny_fit, tiny_kshapes, tmp_path):
    data, teacher = tiny_kshapes
    kw = dict(generations=2, student=StudentSettings(epochs=1), fit=tiny_fit, seed=0, device="cpu", n_maps=2)
    a = distillation_study(teacher, "layer2", data, lambda: kc_resnet(10), **kw)
    b = distillation_study(teacher, "layer2", data, lambda: kc_resnet(10), **kw)
    ta, tb = a.tables()["generations"], b.tables()["generations"]
    pd.testing.assert_frame_equal(ta, tb, check_exact=True)
    assert list(ta["generation"]) == [0, 1, 2]
    assert list(ta["seed"].iloc[1:]) == [10, 20]  # seed + 10 · generation
    assert ta["var_residual"].iloc[:2].notna().all() and pd.isna(ta["var_residual"].iloc[2])
    # every fit shares the newest generation's features as x*: the same Var(x*)
    assert ta["var_target"].iloc[0] == ta["var_target"].iloc[1]
    assert len(a.maps) == 2 and a.maps[0].shape == a.map_target.shape
    out = write_study(tmp_path / "study", "distillation", a.as_dict(), a.tables(), a.figures(), {"seed": 0},
                      formats=("png",))
    folder = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert folder.study == "distillation" and folder.result["newest_generation"] == 2
    assert len(folder.tables["generations"]) == 3
    assert {"blind_spots", "blind_spot_maps"} <= set(folder.figures)


def test_generations_must_be_positive(tiny_kshapes):
    data, teacher = tiny_kshapes
    with pytest.raises(ValueError, match="generations must be a positive integer"):
        distillation_study(teacher, "layer2", data, lambda: kc_resnet(10), generations=0)


@pytest.mark.slow
def test_cli_with_a_teacher_trained_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["distillation", "--teacher", "scratch", "--teacher-epochs", "1", "--image-size", "32",
               "--generations", "1", "--epochs", "1", "--n-train", "20", "--n-test", "10", "--n-images", "20",
               "--fit-epochs", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    folder = read_study(out)
    assert folder.result["layer"] == "layer2" and len(folder.result["generations"]) == 2
    assert folder.provenance["teacher"]["trained"].startswith("here")
    assert folder.provenance["seeds"]["generations"] == [0, 10]
    assert re.search(r"^\[distillation +[0-9.]+s\] generation 1 \(seed 10\)", capsys.readouterr().err, re.M)
    assert main(["distillation", "--teacher", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
