"""Diagnosis (Sec. 4.1, App. B): blind spots, unreliable features, the two accuracy checks, maps, folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import kcore
from kcore.cli import main
from kcore.experiments._arms import FromLayer, TrainConfig, state_fingerprint, unchanged
from kcore.experiments._features import pair_features
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.diagnosis import _raw_output_and_residual, adapt_input_width, diagnose, reinitialised
from kcore.experiments.families import train_family
from kcore.pipeline import model_transform
from studies_page import open_in_dashboard

TINY = dict(orders=1, fit_epochs=2, train=TrainConfig(epochs=1, batch_size=16), n_maps=3, seed=0, repeats=1)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def nets():
    """(weak, strong): a kc_tinynet and a kc_resnet, 1 epoch on 40 images at 32 px."""
    weak = train_family("kc_tinynet", (0, 1), epochs=1, n_train=40, n_test=10, image_size=32)
    strong = train_family("kc_resnet", (0, 1), epochs=1, n_train=40, n_test=10, image_size=32)
    return weak, strong


@pytest.fixture(scope="module")
def images(kshapes_train_test):
    return kshapes_train_test


@pytest.fixture(scope="module")
def result(nets, images):
    return diagnose(nets[0].members[0].loaded(), nets[1].members[0].loaded(), *images, **TINY)


def test_arms_and_checks_of_section_4_1(result):
    assert [a.name for a in result.arms] == ["x_A", "g(x_A)", "g(x_A)+blind spots", "x_A-unreliable"]
    c_weak, c_strong = result.arm("x_A").channels, result.arm("g(x_A)").channels
    assert c_weak == result.arms[0].channels and c_strong == 32  # kc_resnet's layer2
    assert [a.channels for a in result.arms] == [c_weak, c_strong, c_strong, c_weak]
    # A's upper layers take B's channel count only where the widths differ
    assert result.adapted_layers == (() if c_weak == c_strong else ("block3.0",))
    acc = {a.name: a.test_accuracy for a in result.arms}
    e1, e2 = result.experiments.blind_spots, result.experiments.unreliable
    assert e1.gain_over_x_a == pytest.approx(acc["g(x_A)+blind spots"] - acc["x_A"])
    assert e1.gain_over_g_x_a == pytest.approx(acc["g(x_A)+blind spots"] - acc["g(x_A)"])
    assert e2.gain_over_x_a == pytest.approx(acc["x_A-unreliable"] - acc["x_A"])
    assert (e1.x_a, e1.g_x_a, e1.g_x_a_blind_spots, e2.x_a_unreliable) == (
        acc["x_A"], acc["g(x_A)"], acc["g(x_A)+blind spots"], acc["x_A-unreliable"])
    assert all(a.lower_unchanged for a in result.arms)
    assert 0 < result.blind_spots.instability and 0 < result.unreliable.instability
    assert set(result.tables()) == {"accuracy", "checks", "variances", "maps"}


def test_deterministic_for_a_fixed_seed(without_timings, nets, images, result):
    again = diagnose(nets[0].members[0].loaded(), nets[1].members[0].loaded(), *images, **TINY)
    assert without_timings(again.as_dict()) == without_timings(result.as_dict())


def test_repeats_train_every_arm_with_more_seeds(nets, images, result):
    res = diagnose(nets[0].members[0].loaded(), nets[1].members[0].loaded(), *images, **{**TINY, "repeats": 2})
    assert len(res.arms) == 8 and res.experiments.seeds == (0, 1)
    # seed 0 is the single-seed run, arm by arm
    for a in result.arms:
        assert res.arm(a.name, 0).test_accuracy == a.test_accuracy
    acc = {(a.name, a.seed): a.test_accuracy for a in res.arms}
    gains = [acc["x_A-unreliable", s] - acc["x_A", s] for s in (0, 1)]
    assert res.experiments.unreliable.gain_over_x_a == pytest.approx(sum(gains) / 2)
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        diagnose(nets[0].members[0].loaded(), nets[1].members[0].loaded(), *images, repeats=0)


def test_blind_spots_added_back_to_g_give_x_b(nets, images):
    weak, strong = nets[0].members[0].loaded(), nets[1].members[0].loaded()
    fp = pair_features(weak, "block2", strong, "layer2", images[1])
    g = kcore.fit(fp.x_a, fp.x_b, orders=1, epochs=1, seed=0, device="cpu")
    out, delta, energy = _raw_output_and_residual(g, fp.x_a, fp.x_b)
    torch.testing.assert_close(out + delta, fp.x_b, rtol=1e-4, atol=1e-4)
    resid = g.decompose(fp.x_a, fp.x_b).residual
    torch.testing.assert_close(energy, (resid.double() ** 2).mean(1))


def test_paper_convention_gives_standardised_energies(nets, images):
    res = diagnose(nets[0].members[0].loaded(), nets[1].members[0].loaded(), *images, convention="paper", **TINY)
    assert res.convention == "paper" and res.energy_units == "standardised units²"
    assert res.as_dict()["maps"]["units"].endswith("standardised units²")


def test_maps_are_channel_energies_of_the_shown_images(result):
    n = len(result.map_ids)
    assert n == 3 and result.blind_energy.shape == (3, 8, 8) and result.unreliable_energy.shape == (3, 8, 8)
    assert (result.blind_energy >= 0).all() and (result.unreliable_energy >= 0).all()
    assert result.images.shape == (3, 32, 32, 3) and 0 <= result.images.min() and result.images.max() <= 1
    fig = result.maps_figure()
    assert len([ax for ax in fig.axes if ax.images]) == 3 * n


def test_adapt_input_width_widens_every_reader_of_the_feature(nets):
    resnet = nets[1].members[0].model
    wide, names = adapt_input_width(resnet, "layer2", (3, 32, 32), 48, seed=0)
    assert names == ["layer3.0.conv1", "layer3.0.shortcut.0"]
    assert wide.layer3[0].conv1.in_channels == 48 and resnet.layer3[0].conv1.in_channels == 32
    out = FromLayer(wide, "layer2", (3, 32, 32)).eval()(torch.randn(2, 48, 8, 8))
    assert out.shape == (2, 10)
    same, none = adapt_input_width(resnet, "layer2", (3, 32, 32), 32)
    assert none == [] and torch.equal(same.layer3[0].conv1.weight, resnet.layer3[0].conv1.weight)


def test_adapt_input_width_refuses_what_it_cannot_widen():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="only plain Conv2d layers can be widened"):
        adapt_input_width(net, "0", (3, 8, 8), 6)


def test_reinitialised_is_seeded_and_leaves_the_original(nets):
    tiny = nets[0].members[0].model
    fp = state_fingerprint(tiny)
    r1, r2 = reinitialised(tiny, 3), reinitialised(tiny, 3)
    assert unchanged(tiny, fp)
    assert torch.equal(r1.block3[0].weight, r2.block3[0].weight)
    assert not torch.equal(r1.block3[0].weight, tiny.block3[0].weight)


def test_trained_init_starts_at_the_weak_net_s_accuracy(nets, images):
    weak, strong = nets[0].members[0].loaded(), nets[1].members[0].loaded()
    res = diagnose(weak, strong, *images, classifier_init="trained", **TINY)
    test = images[1]
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = float((weak.model(model_transform(weak.card)(x)).argmax(1) == y).float().mean())
    assert res.arm("x_A").test_accuracy_before == pytest.approx(acc)
    assert res.convention == "authors" and res.energy_units == "raw feature units²"
    with pytest.raises(ValueError, match="classifier_init must be one of"):
        diagnose(weak, strong, *images, classifier_init="pretrained")


def test_study_folder_reopens(result, tmp_path):
    out = write_study(tmp_path / "diag", "diagnosis", result.as_dict(), result.tables(), result.figures(), {"seed": 0})
    st = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert st.study == "diagnosis" and {"maps", "accuracy"} <= set(st.figures)
    assert list(st.tables["accuracy"]["arm"]) == [a.name for a in result.arms]
    assert np.allclose(st.result["maps"]["blind_spot_energy"], result.blind_energy)
    # the typed parts are written as their as_dict() forms
    for key in ("blind_spots", "unreliable", "experiments"):
        assert st.result[key] == json.loads(json.dumps(getattr(result, key).as_dict())), key
    assert list(st.result["experiments"]["blind_spots"]) == ["x_A", "g(x_A)", "g(x_A)+blind spots", "gain_over_x_A",
                                                            "gain_over_x_A_std", "gain_over_g(x_A)",
                                                            "gain_over_g(x_A)_std"]


@pytest.mark.slow
def test_cli_end_to_end(nets, tmp_path, capsys):
    w = nets[0].save(tmp_path / "weak") / "kc_tinynet_s0.safetensors"
    s = nets[1].save(tmp_path / "strong") / "kc_resnet_s0.safetensors"
    rc = main(["diagnosis", "--weak", str(w), "--strong", str(s), "--n-train", "24", "--n-test", "12",
               "--orders", "1", "--fit-epochs", "1", "--epochs", "1", "--n-maps", "2", "--repeats", "1",
               "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    st = read_study(tmp_path / "run")
    assert st.provenance["checkpoint_weak"]["sha256"] == nets[0].members[0].sha256
    assert st.provenance["layers"] == {"weak": "block2", "strong": "layer2"}
    assert "git_commit" in st.provenance["source"] or st.provenance["source"] == {}
    assert "blind_spots:" in capsys.readouterr().out
