"""Cross-task consistency (Sec. 4.6): a fine-task and a coarse-task net compared in both directions."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kcore.cli import main
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.cross_task import DIRECTIONS, cross_task_study, train_task_pair
from kcore.imagesets import study_data
from kcore.synthetic import COARSE_OF_CLASS
from studies_page import open_in_dashboard

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny():
    kw = dict(image_size=32, n_train=40, n_test=20, n_images=30)
    fine, coarse = study_data("kshapes", labels="fine", **kw), study_data("kshapes", labels="coarse", **kw)
    nets = train_task_pair("kc_resnet", fine, coarse, epochs=1, seed=0)
    return fine, coarse, nets


def test_fine_and_coarse_data_are_the_same_images_with_two_labellings():
    kw = dict(image_size=32, n_train=10, n_test=10, n_images=10)
    fine, coarse = study_data("kshapes", labels="fine", **kw), study_data("kshapes", labels="coarse", **kw)
    assert fine.class_names != coarse.class_names and len(coarse.class_names) == 2
    # same images, labels of the two kinds
    assert fine.train.ids == coarse.train.ids
    assert [coarse.train[i][1] for i in range(10)] == [COARSE_OF_CLASS[fine.train[i][1]] for i in range(10)]


def test_train_task_pair_is_seeded():
    kw = dict(image_size=32, n_train=10, n_test=10, n_images=10)
    fine, coarse = study_data("kshapes", labels="fine", **kw), study_data("kshapes", labels="coarse", **kw)
    f1, c1 = train_task_pair("kc_resnet", fine, coarse, epochs=1, seed=5)
    f2, c2 = train_task_pair("kc_resnet", fine, coarse, epochs=1, seed=5)
    for a, b in ((f1.model, f2.model), (c1.model, c2.model)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert f1.model.fc.out_features == 10 and c1.model.fc.out_features == 2


def test_the_two_nets_start_from_the_same_weights_except_the_classifier(monkeypatch):
    import kcore.training

    started = {}

    def untrained(model, train_set, test_set, **kw):  # record the starting weights instead of training
        started[len(train_set.class_names)] = {k: v.clone() for k, v in model.state_dict().items()}
        return SimpleNamespace(model=model, test_accuracy=0.0)

    monkeypatch.setattr(kcore.training, "train_classifier", untrained)
    kw = dict(image_size=32, n_train=10, n_test=10, n_images=10)
    train_task_pair("kc_resnet", study_data("kshapes", **kw), study_data("kshapes", labels="coarse", **kw), epochs=1,
                    seed=5)
    fine, coarse = started[10], started[2]
    differ = sorted(k for k in fine if fine[k].shape != coarse[k].shape or not torch.equal(fine[k], coarse[k]))
    assert differ == ["fc.bias", "fc.weight"]


@pytest.mark.slow
def test_cross_task_study_end_to_end_is_deterministic_and_reopens(tiny_fit, tiny, tmp_path):
    fine, coarse, (f, c) = tiny
    kw = dict(fine_test=fine.test, coarse_test=coarse.test, fine_to_coarse=COARSE_OF_CLASS, fit=tiny_fit,
              device="cpu", n_maps=2)
    a = cross_task_study(f.model, c.model, "layer2", fine.images, **kw)
    b = cross_task_study(f.model, c.model, "layer2", fine.images, **kw)
    for name in ("directions", "accuracy"):
        pd.testing.assert_frame_equal(a.tables()[name], b.tables()[name], check_exact=True)
    d = a.tables()["directions"]
    assert list(d["direction"]) == list(DIRECTIONS)
    assert (d["instability"] > 0).all() and (d["var_target"] > 0).all()
    assert a.fine_reconstructs_more == (d["instability"].iloc[0] < d["instability"].iloc[1])
    assert 0.0 <= a.accuracy_fine_as_coarse <= 1.0 and a.accuracy_fine == f.test_accuracy
    # both directions decompose the same held-out images
    assert a.maps["fine_to_coarse"].target.shape[0] == a.maps["coarse_to_fine"].target.shape[0] == 2
    out = write_study(tmp_path / "study", "cross_task", a.as_dict(), a.tables(), a.figures(), {"seed": 0},
                      formats=("png",))
    folder = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert folder.study == "cross_task"
    assert set(folder.result["directions"]) == set(DIRECTIONS)
    assert {"variances", "maps_fine_to_coarse", "maps_coarse_to_fine"} <= set(folder.figures)
    assert len(folder.tables["directions"]) == 2


@pytest.mark.slow
def test_cli_trains_both_nets_and_writes_a_study(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["cross-task", "--image-size", "32", "--epochs", "1", "--n-train", "20", "--n-test", "10",
               "--n-images", "20", "--fit-epochs", "1", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    folder = read_study(out)
    assert folder.result["layer"] == "layer2" and folder.provenance["networks"]["trained"] == "here"
    assert "fine reconstructs more" in capsys.readouterr().out.replace("fine net reconstructs more", "fine reconstructs more")
    assert main(["cross-task", "--fine", str(tmp_path / "a.pt"), "--out", str(tmp_path / "x")]) == 2
    assert "--fine and --coarse go together" in capsys.readouterr().err


def _folder_dataset(root, classes, n_per=4, size=20):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n_per):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def test_folder_data_with_a_coarse_map(tmp_path, capsys):
    _folder_dataset(tmp_path / "data", ["cat", "dog", "owl"])
    fine = study_data(str(tmp_path / "data"), image_size=32, n_train=12, n_test=12, n_images=12)
    mapping = {"cat": "mammal", "dog": "mammal", "owl": "bird"}
    coarse = study_data(str(tmp_path / "data"), labels="coarse", image_size=32, n_train=12, n_test=12, n_images=12,
                        coarse_map=mapping)
    assert fine.class_names == ("cat", "dog", "owl") and coarse.class_names == ("bird", "mammal")
    assert fine.train[0][0].shape == (3, 32, 32)
    assert [coarse.train[i][1] for i in range(12)] == [[1, 1, 0][fine.train[i][1]] for i in range(12)]
    with pytest.raises(ValueError, match="no entry for class\\(es\\) \\['owl'\\]"):
        study_data(str(tmp_path / "data"), labels="coarse", coarse_map={"cat": "m", "dog": "m"})
    with pytest.raises(ValueError, match="needs coarse_map"):
        study_data(str(tmp_path / "data"), labels="coarse")
    with pytest.raises(ValueError, match="has no train/ subfolder"):
        study_data(str(tmp_path))
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    rc = main(["cross-task", "--data", str(tmp_path / "data"), "--coarse-map", str(tmp_path / "map.json"),
               "--image-size", "32", "--epochs", "1", "--n-train", "12", "--n-test", "12", "--n-images", "12",
               "--fit-epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")])
    assert rc == 0
    acc = read_study(tmp_path / "run").tables["accuracy"]
    assert len(acc) == 3 and acc["accuracy"].notna().all()
