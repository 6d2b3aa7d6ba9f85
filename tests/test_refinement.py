"""Feature refinement (Sec. 4.3, App. A): fair arms, frozen g_θ and lower layers, study folders."""
from __future__ import annotations

import json

import pytest
import torch

import kcore
from kcore.cli import main
from kcore.experiments._arms import TrainConfig, state_fingerprint, train_upper, unchanged
from kcore.experiments._features import pair_features
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.families import train_family
from kcore.experiments.refinement import component_sums, refine
from kcore.pipeline import model_transform
from studies_page import open_in_dashboard

TINY = dict(orders=1, fit_epochs=2, train=TrainConfig(epochs=1, batch_size=16), seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def family():
    # two tiny kc_resnets (1 epoch on 40 images at 32 px): enough to exercise every code path
    return train_family("kc_resnet", (0, 1), epochs=1, n_train=40, n_test=10, image_size=32)


@pytest.fixture(scope="module")
def images(kshapes_train_test):
    return kshapes_train_test


@pytest.fixture(scope="module")
def result(family, images):
    a, b = family.loaded()
    return refine(a, b, *images, **TINY)


def test_arms_of_table_3(result):
    assert [a.name for a in result.arms] == ["network A", "network B", "x(0)", "x(0)+x(1)"]
    # accuracies are shares of the 16 test images (and of the 32 training images)
    assert all(float(a.test_accuracy * 16).is_integer() for a in result.arms), [a.test_accuracy for a in result.arms]
    assert all(float(a.train_accuracy * 32).is_integer() for a in result.arms), [a.train_accuracy for a in result.arms]
    assert all(len(a.train_loss) == 1 for a in result.arms)
    # the same upper architecture (B's layers above layer2) is trained in every arm
    assert len({a.n_trainable for a in result.arms}) == 1
    assert result.layer_a == result.layer_b == "layer2" and result.n_test == 16 and result.n_train == 32
    assert set(result.tables()) == {"accuracy", "fit_variances"}
    assert len(result.fit.var_orders) == 2 and result.fit.reported_on == "test images"


def test_deterministic_for_a_fixed_seed(without_timings, family, images, result):
    a, b = family.loaded()
    again = refine(a, b, *images, **TINY)
    assert without_timings(again.as_dict()) == without_timings(result.as_dict())


def test_g_and_lower_layers_stay_frozen(family, images):
    a, b = family.loaded()
    train, test = images
    fp = pair_features(a, "layer2", b, "layer2", train)
    g = kcore.fit(fp.x_a, fp.x_b, orders=1, epochs=2, seed=0, device="cpu")
    before = {"a": state_fingerprint(a.model), "b": state_fingerprint(b.model), "g": state_fingerprint(g.model)}
    res = refine(a, b, train, test, g=g, orders=1, train=TrainConfig(epochs=1, batch_size=16, lr=1e-2))
    assert unchanged(a.model, before["a"]) and unchanged(b.model, before["b"]) and unchanged(g.model, before["g"])
    assert all(res.frozen.values()), res.frozen
    assert all(arm.lower_unchanged for arm in res.arms)
    # (that the upper layers do learn meanwhile: test_upper_layers_learn_a_planted_labelling)


def test_upper_layers_learn_a_planted_labelling(family):
    # 12 random feature maps with arbitrary labels: only a trained upper part classifies all of them; the part
    # below stays as it was
    a = family.loaded()[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 32, 8, 8, generator=g)
    y = torch.randperm(12, generator=g) % 10
    arm = train_upper(a.model, "layer2", (3, 32, 32), x, y, x, y, TrainConfig(epochs=25, batch_size=12, lr=1e-2, lr_final=1e-3),
                      name="t", features="random", upper_layers="A")
    assert arm.test_accuracy_before < 0.5
    assert arm.train_accuracy == arm.test_accuracy == 1.0
    assert arm.train_loss[-1] < 0.2 * arm.train_loss[0]
    assert arm.lower_unchanged


@pytest.mark.parametrize("arm, which", [("network A", 0), ("network B", 1)])
def test_network_arms_start_at_their_network_s_own_accuracy(family, images, result, arm, which):
    net = family.loaded()[which]
    _, test = images
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([test[i][1] for i in range(len(test))])
    with torch.no_grad():
        acc = float((net.model(model_transform(net.card)(x)).argmax(1) == y).float().mean())
    assert result.arm(arm).test_accuracy_before == pytest.approx(acc)


def test_full_sum_of_components_is_g_of_x_in_raw_units(family, images):
    a, b = family.loaded()
    fp = pair_features(a, "layer2", b, "layer2", images[0])
    g = kcore.fit(fp.x_a, fp.x_b, orders=2, epochs=1, seed=0, device="cpu")
    sums = component_sums(g, fp.x_a, fp.x_b)
    assert len(sums) == 3
    torch.testing.assert_close(sums[-1], g.norm.target_to_raw(g.predict(fp.x_a)), rtol=1e-4, atol=1e-4)


def test_train_upper_does_not_touch_its_inputs(family):
    a = family.loaded()[0]
    x = torch.randn(8, 32, 8, 8)
    y = torch.arange(8) % 10
    x0, fp = x.clone(), state_fingerprint(a.model)
    arm = train_upper(a.model, "layer2", (3, 32, 32), x, y, x, y, TrainConfig(epochs=1, batch_size=4),
                      name="t", features="random", upper_layers="A")
    assert torch.equal(x, x0) and unchanged(a.model, fp) and arm.lower_unchanged
    assert arm.n_trainable == sum(p.numel() for n, p in a.model.named_parameters() if n.startswith(("layer3", "fc")))


def test_bad_training_options_name_the_argument():
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr and lr_final must be > 0"):
        TrainConfig(lr=0.0)


def test_study_folder_reopens(result, tmp_path):
    out = write_study(tmp_path / "ref", "refinement", result.as_dict(), result.tables(), result.figures(), {"seed": 0})
    st = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert st.study == "refinement"
    assert list(st.tables["accuracy"]["arm"]) == [a.name for a in result.arms]
    assert st.result["accuracy"]["network B"] == result.arm("network B").test_accuracy
    assert st.result["frozen"]["g_theta"] is True and "accuracy" in st.figures
    assert st.result["fit"] == json.loads(json.dumps(result.fit.as_dict()))  # the FitSummary's JSON form
    assert st.result["fit"]["reported_on"] == "test images" and list(st.result["fit"])[-1] == "reported_on"


@pytest.mark.slow
def test_cli_end_to_end(family, tmp_path, capsys):
    fam = family.save(tmp_path / "fam")
    rc = main(["refinement", "--a", str(fam / "kc_resnet_s0.safetensors"), "--b", str(fam / "kc_resnet_s1.safetensors"),
               "--n-train", "24", "--n-test", "12", "--orders", "1", "--fit-epochs", "1", "--epochs", "1",
               "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err
    st = read_study(tmp_path / "run")
    assert st.provenance["checkpoint_a"]["sha256"] == family.members[0].sha256
    assert st.provenance["layers"] == {"A": "layer2", "B": "layer2"} and "torch" in st.provenance["versions"]
    assert main(["refinement", "--a", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
