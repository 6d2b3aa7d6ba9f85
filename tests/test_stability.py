"""Stability of learning (Sec. 4.2): families, all pairs both ways, instability in raw units, study folders."""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from kcore.checkpoints import LoadedModel, load_model
from kcore.cli import main
from kcore.data import labelled_images
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.families import disjoint_halves, load_family, train_family
from kcore.experiments.stability import stability
from kcore.metrics import paper_var
from studies_page import open_in_dashboard

TINY = dict(orders=1, fit_epochs=2, seed=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def family():
    return train_family("kc_resnet", (0, 1, 2), epochs=1, n_train=40, n_test=10, image_size=32)


@pytest.fixture(scope="module")
def images():
    return labelled_images("kshapes", "test", 30, 32)


@pytest.fixture(scope="module")
def result(family, images):
    return stability(family.loaded(), images, layers=["layer2", "layer3"], **TINY)


def test_all_pairs_both_ways_and_the_pair_formula(result):
    assert result.case == "seeds" and result.layers == ("layer2", "layer3")
    assert len(result.directions) == 2 * 3 * 2  # layers x pairs x directions
    for layer in result.layers:
        pairs = result.pair_instability(layer)
        assert len(pairs) == 3
        for (a, b), value in pairs.items():
            ab = [d.instability for d in result.directions if d.layer == layer and {d.source, d.target} == {a, b}]
            assert len(ab) == 2 and value == pytest.approx(sum(ab) / 2)  # [Var(xA^Δ)/Var(xA) + Var(xB^Δ)/Var(xB)]/2
        row = next(r for r in result.summary() if r.layer == layer)
        assert row.instability_mean == pytest.approx(statistics.fmean(pairs.values()))
        assert row.instability_std == pytest.approx(statistics.stdev(pairs.values()))
        assert row.n_pairs == 3
    for d in result.directions:
        assert d.instability == pytest.approx(d.var_residual / d.var_target)
        assert len(d.var_orders) == 2 and d.n_images == 6  # 20 % of 30 images held out
        lo, hi = d.instability_ci  # bootstrap over the held-out images
        assert lo <= d.instability <= hi
    for layer in result.layers:  # the chance level: the first member against a random-init network
        ref = result.random_reference[layer]
        assert ref["network"] and ref["ci"][0] <= ref["instability"] <= ref["ci"][1]
        row = next(r for r in result.summary() if r.layer == layer)
        assert row.random_init_instability == ref["instability"] and row.instability_ci_halfwidth_mean > 0
        assert row.random_init_ci == tuple(ref["ci"])


def test_deterministic_for_a_fixed_seed(without_timings, family, images, result):
    again = stability(family.loaded(), images, layers=["layer2", "layer3"], **TINY)
    assert without_timings(again.as_dict()) == without_timings(result.as_dict())


def test_a_network_against_its_own_copy_is_stable(family, images):
    m = family.members[0]
    twin = LoadedModel(m.model, "twin.safetensors", m.sha256, "safetensors", m.card, 0)
    res = stability([m.loaded(), twin], images, layers=["layer2"], orders=1, fit_epochs=2)
    # x* = x: the closed-form 0-order start already reconstructs it almost exactly
    assert all(d.instability < 0.02 for d in res.directions), [d.instability for d in res.directions]


def test_raw_units_variance_is_the_paper_var_of_raw_features(family, images):
    import kcore
    from kcore.experiments._features import single_features
    from kcore.experiments.stability import raw_report

    a, b = family.loaded()[:2]
    xa, _ = single_features(a, "layer3", images)
    xb, _ = single_features(b, "layer3", images)
    res = kcore.fit(xa, xb, orders=1, epochs=1, seed=0, device="cpu")
    rep = raw_report(res, xa, xb)
    assert rep.var_target == pytest.approx(paper_var(xb), rel=1e-5)
    dec = res.decompose(xa, xb)
    delta_raw = dec.residual * res.norm.tgt_std.view(1, -1, 1, 1).float()
    assert rep.var_residual == pytest.approx(paper_var(delta_raw), rel=1e-4)


def test_disjoint_halves_are_disjoint_balanced_and_complete():
    labels = [i % 4 for i in range(40)]
    h0, h1 = disjoint_halves(labels, seed=3)
    assert not set(h0) & set(h1) and sorted(h0 + h1) == list(range(40))
    assert [sum(labels[i] == c for i in h0) for c in range(4)] == [5, 5, 5, 5]
    assert disjoint_halves(labels, seed=3) == (h0, h1) and disjoint_halves(labels, seed=4) != (h0, h1)


def test_folder_images_for_real_data(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, colour in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 12), colour).save(tmp_path / split / c / f"{i}.png")
    imgs = labelled_images(str(tmp_path), "train", None, 16)
    assert len(imgs) == 6 and imgs.class_names == ("cat", "dog") and imgs.ids[0] == "train/cat/0.png"
    x, y = imgs[5]
    assert x.shape == (3, 16, 16) and y == 1 and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    sub = labelled_images(str(tmp_path), "test", 4, 16)
    assert len(sub) == 4 and sub.ids == labelled_images(str(tmp_path), "test", 4, 16).ids
    with pytest.raises(ValueError, match="does not exist"):
        labelled_images(str(tmp_path), "val", None, 16)


def test_family_saves_and_reloads_with_the_same_hashes(family, tmp_path):
    out = family.save(tmp_path / "fam")
    models, manifest = load_family(out)
    assert [m.sha256 for m in models] == [m.sha256 for m in family.members]
    assert load_model(out / "kc_resnet_s1.safetensors").card.extra["seed"] == 1
    assert manifest["case"] == "seeds" and len(manifest["members"]) == 3
    for m, orig in zip(models, family.members):
        for (k, v), (k2, v2) in zip(m.model.state_dict().items(), orig.model.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)


def test_bad_inputs_name_the_fix(family, images):
    with pytest.raises(ValueError, match="at least two models"):
        stability(family.loaded()[:1], images)
    with pytest.raises(ValueError, match="exactly two seeds"):
        train_family("kc_tinynet", (0, 1, 2), halves=True, epochs=1, n_train=20)
    with pytest.raises(ValueError, match="exactly two networks"):
        stability(family.loaded(), images, case="halves")


def test_study_folder_reopens(result, tmp_path):
    out = write_study(tmp_path / "st", "stability", result.as_dict(), result.tables(), result.figures(), {"seed": 0})
    st = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert st.study == "stability" and set(st.tables) == {"summary", "directions", "members"}
    assert list(st.tables["summary"]["layer"]) == ["layer2", "layer3"]
    assert st.result["summary"][0]["instability_mean"] == pytest.approx(result.summary()[0].instability_mean)
    # the summary rows are written as their as_row() forms (json.dumps: NaN compares equal as text)
    assert json.dumps(st.result["summary"]) == json.dumps([r.as_row() for r in result.summary()])
    assert list(st.tables["summary"].columns) == list(result.summary()[0].as_row())
    assert "instability" in st.figures


@pytest.mark.slow
def test_cli_halves_family_then_stability(tmp_path, capsys):
    fam = tmp_path / "halves"
    assert main(["train-family", "--arch", "kc_tinynet", "--halves", "--epochs", "1", "--n-train", "40",
                 "--n-test", "10", "--image-size", "32", "--out", str(fam)]) == 0
    manifest = json.loads((fam / "family.json").read_text())
    assert manifest["case"] == "halves" and [m["half"] for m in manifest["members"]] == [0, 1]
    assert main(["stability", "--family", str(fam), "--layers", "block2", "--n-images", "24", "--orders", "1",
                 "--fit-epochs", "1", "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    st = read_study(tmp_path / "run")
    assert st.result["case"] == "halves" and len(st.result["directions"]) == 2
    assert st.provenance["checkpoints"][0]["sha256"] == manifest["members"][0]["sha256"]


@pytest.mark.slow
def test_cli_trains_its_own_family_when_given_none(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["stability", "--arch", "kc_tinynet", "--seeds", "0", "1", "--epochs", "1", "--n-train", "30",
                 "--n-test", "10", "--n-images", "24", "--orders", "1", "--fit-epochs", "1", "--out", str(out)]) == 0
    assert (out / "family" / "family.json").is_file() and (out / "summary.csv").is_file()
    assert read_study(out).result["layers"] == ["block1", "block2", "block3"]  # every stage by default
    models, _ = load_family(out / "family")
    assert read_study(out).result["members"][0]["sha256"] == models[0].sha256
    assert main(["stability", "--out", str(out)]) == 2 and "already exists" in capsys.readouterr().err
