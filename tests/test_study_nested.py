"""The studies' ``--nested``: order-wise gains of nested fits beside the split, equal to ``kcore.fit``'s own gains."""
from __future__ import annotations

import copy
import json
import math
import sys

import pandas as pd
import pytest
import torch

import kcore
from kcore.cli import main
from kcore.experiments._features import single_features
from kcore.experiments._fits import FitSettings, gains_on
from kcore.experiments._folder import read_study
from kcore.experiments.compression import compression_study
from kcore.experiments.distillation import StudentSettings, distillation_study
from kcore.experiments.families import train_family
from kcore.experiments.pruning import prune_magnitude
from kcore.experiments.stability import stability
from kcore.features import extract_features
from kcore.study_options import NESTED_FIT_COST, study_options, study_plan
from kcore.zoo import kc_resnet
from studies_page import open_in_dashboard

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# the columns a compression row had before nested fits: a study without --nested must keep exactly these
PLAIN_COMPRESSION = ["ratio", "n_weights", "n_pruned", "sparsity", "masked_nonzero", "accuracy_pruned", "accuracy",
                     "var_x0", "var_x1", "var_x2", "var_residual", "var_target", "instability", "heldout_error",
                     "linear_r2", "cka", "p1", "p2"]
GAIN_COLUMNS = ["gain_d0", "gain_d1", "gain_d2", "gain_instability"]


def _flat(intervals) -> list[float]:
    return [v for iv in intervals for v in iv]


def _check_sum(gain_orders, instability) -> None:
    assert math.isclose(sum(gain_orders) + instability, 1.0, abs_tol=1e-6)


@pytest.fixture(scope="module")
def pruned_runs(tiny_kshapes):
    data, model = tiny_kshapes
    kw = dict(ratios=(0.5,), finetune_epochs=0, n_maps=0, seed=0, device="cpu")
    plain = compression_study(model, "layer2", data, fit=FitSettings(orders=2, epochs=1), **kw)
    nested = compression_study(model, "layer2", data, fit=FitSettings(orders=2, epochs=1, nested=True), **kw)
    return plain, nested


def test_compression_gains_add_up_and_equal_kcore_fit_on_the_same_features(tiny_kshapes, pruned_runs):
    data, model = tiny_kshapes
    row = pruned_runs[1].points[0].row
    assert row.gains is not None and len(row.gains.gain_orders) == 3
    _check_sum(row.gains.gain_orders, row.gains.instability)
    # the other way: prune the same way, extract the same features, and fit with kcore.fit(..., nested=True)
    original = copy.deepcopy(model).eval()
    pruned = prune_magnitude(original, 0.5, "layer").model
    feats = extract_features(pruned, "layer2", original, "layer2", data.images, batch_size=64, device="cpu")
    res = kcore.fit(feats.x_a, feats.x_b, orders=2, lam=0.1, epochs=1, seed=0, device="cpu", nested=True,
                    gate="linear")
    g = res.nested.gains
    assert row.gains.gain_orders == pytest.approx(g.gain_orders, abs=1e-9)
    assert row.gains.instability == pytest.approx(g.instability, abs=1e-9)
    assert _flat(row.gains.gain_ci) == pytest.approx(_flat(g.ci.gain_orders), abs=1e-9)
    # g_K of the nested fit is the model whose Eq. 3–4 split stands beside the gains
    assert row.instability == pytest.approx(res.heldout_report.instability, abs=1e-9)
    assert row.gains.instability == pytest.approx(row.instability, abs=1e-5)


def test_compression_without_nested_has_exactly_the_old_columns_and_settings(pruned_runs):
    plain, nested = pruned_runs
    assert list(plain.tables()["compression"].columns) == PLAIN_COMPRESSION
    assert "nested" not in plain.settings["fit"] and "gains" not in json.dumps(plain.as_dict())
    cols = list(nested.tables()["compression"].columns)
    assert cols[: len(PLAIN_COMPRESSION)] == PLAIN_COMPRESSION  # the gains come beside the split, not instead
    assert cols[len(PLAIN_COMPRESSION):len(PLAIN_COMPRESSION) + 4] == GAIN_COLUMNS
    assert {"gain_d1_lo", "gain_d1_hi", "gain_instability_lo", "gain_instability_hi"} <= set(cols)
    assert nested.settings["fit"]["nested"] is True
    t = nested.tables()["compression"].iloc[0]
    assert t["gain_d1_lo"] <= t["gain_d1_hi"]


def test_gains_on_other_images_equal_the_fit_s_held_out_gains():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 4, 5, 5, generator=gen)
    w = torch.randn(3, 4, 1, 1, generator=gen)
    y = torch.nn.functional.conv2d(x, w) + 0.5 * torch.relu(torch.nn.functional.conv2d(x, w)) \
        + 0.3 * torch.randn(40, 3, 5, 5, generator=gen)
    res = kcore.fit(x, y, orders=1, epochs=3, seed=0, device="cpu", nested=True, gate="linear")
    held = torch.as_tensor(res.heldout_indices)
    mine = gains_on(res, x[held], y[held], batch_size=3)  # other batches, the same images
    g = res.nested.gains
    assert mine.gain_orders == pytest.approx(g.gain_orders, abs=1e-9)
    assert mine.instability == pytest.approx(g.instability, abs=1e-9)
    assert _flat(mine.gain_ci) == pytest.approx(_flat(g.ci.gain_orders), abs=1e-9)
    assert mine.n_images == len(held)
    plain = kcore.fit(x, y, orders=1, epochs=1, seed=0, device="cpu")
    assert gains_on(plain, x, y) is None


@pytest.fixture(scope="module")
def pair():
    return train_family("kc_resnet", (0, 1), epochs=1, n_train=40, n_test=10, image_size=32).loaded()


def test_stability_nested_gains_per_direction_and_mean_per_layer(pair):
    from kcore.data import labelled_images

    images = labelled_images("kshapes", "test", 30, 32)
    kw = dict(layers=["layer2"], orders=1, fit_epochs=2, seed=0, random_reference=False)
    plain = stability(pair, images, **kw)
    res = stability(pair, images, nested=True, **kw)
    assert not any(k.startswith("gain") for k in plain.summary()[0].as_row())
    assert "gains" not in json.dumps(plain.as_dict())
    feats = [single_features(m, "layer2", images)[0] for m in pair]
    for d, (s, t) in zip(res.directions, [(0, 1), (1, 0)]):
        _check_sum(d.gains.gain_orders, d.gains.instability)
        ref = kcore.fit(feats[s], feats[t], orders=1, epochs=2, seed=0, device="cpu", convention="paper",
                        nested=True, gate="linear").nested.gains
        assert d.gains.gain_orders == pytest.approx(ref.gain_orders, abs=1e-9)
    row = res.summary()[0].as_row()
    assert row["gain_d0"] == pytest.approx(sum(d.gains.gain_orders[0] for d in res.directions) / 2, abs=1e-12)
    _check_sum([row["gain_d0"], row["gain_d1"]], row["gain_instability"])
    tab = res.tables()["directions"]
    assert {"gain_d0", "gain_d1", "gain_instability", "gain_d1_lo"} <= set(tab.columns)
    assert res.as_dict()["directions"][0]["gains"]["gain_orders"] == list(res.directions[0].gains.gain_orders)
    plain_cols = list(plain.tables()["summary"].columns)
    assert list(res.tables()["summary"].columns)[: len(plain_cols)] == plain_cols


@pytest.mark.slow
def test_distillation_nested_keeps_gains_for_every_earlier_generation(tiny_kshapes):
    data, teacher = tiny_kshapes
    res = distillation_study(teacher, "layer2", data, lambda: kc_resnet(10), generations=1,
                             student=StudentSettings(epochs=1), fit=FitSettings(orders=2, epochs=1, nested=True),
                             seed=0, device="cpu", n_maps=0)
    row = res.generations[0].row
    _check_sum(row.gains.gain_orders, row.gains.instability)
    tab = res.tables()["generations"]
    assert tab["gain_d0"].notna().iloc[0] and pd.isna(tab["gain_d0"].iloc[1])  # the newest has no fit
    assert res.settings["fit"]["nested"] is True


def test_fit_settings_json_is_unchanged_without_nested():
    assert FitSettings().as_dict() == {"orders": 2, "lam": 0.1, "epochs": 10, "seed": 0}  # the key set before
    assert FitSettings(nested=True).as_dict()["nested"] is True


def test_the_four_studies_offer_nested_as_a_switch_and_plan_its_cost():
    for study in ("stability", "diagnosis", "compression", "distillation"):
        opt = {o.name: o for o in study_options(study)}["nested"]
        assert opt.kind == "switch" and opt.default is False
        plain, nested = study_plan(study, {}), study_plan(study, {"nested": True})
        assert nested.fit_units == pytest.approx(plain.fit_units * NESTED_FIT_COST)
        assert nested.train_units == plain.train_units
    assert "nested" not in {o.name for o in study_options("cross_task")}


@pytest.mark.slow
def test_compression_cli_nested_writes_gain_columns_and_prints_both(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["compression", "--ratios", "0.5", "--finetune-epochs", "0", "--n-train", "16", "--n-test", "16",
            "--n-images", "30", "--fit-epochs", "1", "--nested", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["kcore", *argv])  # the study records the command it was run with
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "order split of g_K" in printed and "Δ0" in printed and "Δ2" in printed
    st = read_study(out)
    tab = st.tables["compression"]
    assert set(GAIN_COLUMNS) <= set(tab.columns)
    _check_sum([tab["gain_d0"][0], tab["gain_d1"][0], tab["gain_d2"][0]], tab["gain_instability"][0])
    assert "--nested" in json.dumps(st.provenance["command"])
    assert st.result["points"][0]["gain_d1"] == pytest.approx(tab["gain_d1"][0])
    open_in_dashboard(out)  # the Studies page shows a folder with gain columns without errors


@pytest.mark.slow
def test_diagnosis_cli_nested_keeps_test_image_gains_beside_the_split(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["diagnosis", "--n-train", "24", "--n-test", "12", "--orders", "1", "--fit-epochs", "1", "--epochs",
                 "1", "--n-maps", "1", "--repeats", "1", "--nested", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "order-wise gains of the nested fits" in capsys.readouterr().out
    st = read_study(out)
    var = st.tables["variances"]
    for i in range(2):
        _check_sum([var["gain_d0"][i], var["gain_d1"][i]], var["gain_instability"][i])
        # the gains' x^Δ and the split's are of the same g_K on the same test images
        assert var["gain_instability"][i] == pytest.approx(var["var_delta_over_var_target"][i], abs=1e-4)
    blind = st.result["blind_spots"]["nested_gains"]
    assert blind["n_images"] == 12 and len(blind["gain_orders"]) == 2
