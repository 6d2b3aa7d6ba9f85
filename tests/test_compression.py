"""Magnitude pruning (exact counts, ties, masks that hold during training) and the compression study (Sec. 4.4)."""
from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from kcore.cards import ModelCard, card_path_for, write_card
from kcore.cli import main
from kcore.experiments._arms import state_fingerprint, unchanged
from kcore.experiments._folder import read_study, write_study
from kcore.experiments.compression import compression_study
from kcore.experiments.pruning import PRUNE_SCOPES, kept_pruned, magnitude_masks, prunable_layers, prune_magnitude
from kcore.synthetic import MEAN, STD
from kcore.training import train_classifier
from kcore.zoo import kc_resnet
from studies_page import open_in_dashboard

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net() -> nn.Module:
    torch.manual_seed(0)
    return kc_resnet(10).eval()


def _pruned_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for _, m in prunable_layers(model)]


# ------------------------------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("scope", sorted(PRUNE_SCOPES))
def test_ratio_zero_leaves_outputs_and_weights_bit_identical(scope):
    net = _net()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    pruned = prune_magnitude(net, 0.0, scope)
    assert pruned.n_pruned == 0
    assert unchanged(pruned.model, state_fingerprint(net))
    with torch.no_grad():
        assert torch.equal(pruned.model(x), net(x))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.9, 0.95, 1.0])
def test_global_pruning_zeroes_exactly_round_r_n_weights(ratio):
    net = _net()
    n = sum(w.numel() for w in _pruned_weights(net))
    assert sum(int((w == 0).sum()) for w in _pruned_weights(net)) == 0  # nothing is zero before
    pruned = prune_magnitude(net, ratio, "global")
    zeros = sum(int((w == 0).sum()) for w in _pruned_weights(pruned.model))
    assert zeros == pruned.n_pruned == round(ratio * n)
    assert pruned.n_weights == n
    # the smallest magnitudes went: every pruned weight is at most as large as every kept one
    orig = torch.cat([w.abs().flatten() for w in _pruned_weights(net)])
    keep = torch.cat([k.flatten() for k in pruned.masks.values()])
    if 0 < keep.sum() < keep.numel():
        assert orig[~keep].max() <= orig[keep].min()


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.9])
def test_layer_pruning_zeroes_round_r_n_in_every_layer(ratio):
    net = _net()
    pruned = prune_magnitude(net, ratio, "layer")
    total = 0
    for (name, m), (_, p) in zip(prunable_layers(net), prunable_layers(pruned.model)):
        n_l = m.weight.numel()
        assert int((p.weight == 0).sum()) == round(ratio * n_l), name
        kept = pruned.masks[name]
        assert m.weight.detach().abs()[~kept].max() <= m.weight.detach().abs()[kept].min()
        total += round(ratio * n_l)
    assert pruned.n_pruned == total


def test_ties_are_broken_by_module_then_index_order():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(1.0)
    n = 18 + 6
    masks = magnitude_masks(net, 0.5, "global")
    flat = torch.cat([masks["0"].flatten(), masks["2"].flatten()])
    assert int((~flat).sum()) == round(0.5 * n)
    assert torch.equal(flat, torch.arange(n) >= 12)  # the first 12 (in module, then index order) go
    assert torch.equal(magnitude_masks(net, 0.5, "global")["0"], masks["0"])  # and again the same
    per_layer = magnitude_masks(net, 0.5, "layer")
    assert torch.equal(per_layer["2"].flatten(), torch.arange(6) >= 3)


def test_pruning_does_not_touch_the_caller_model_nor_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 3, 6, 6))
    before = state_fingerprint(net)
    pruned = prune_magnitude(net, 0.9, "global")
    assert unchanged(net, before)
    assert torch.equal(pruned.model[0].bias, net[0].bias) and torch.equal(pruned.model[3].bias, net[3].bias)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "half", True])
def test_bad_ratio_names_the_argument(bad):
    with pytest.raises(ValueError, match="ratio must be a fraction in \\[0, 1\\]"):
        prune_magnitude(_net(), bad)


def test_unknown_scope_lists_the_valid_ones():
    with pytest.raises(ValueError, match="scope must be one of \\['global', 'layer'\\]"):
        prune_magnitude(_net(), 0.5, "channel")


def test_pruned_weights_stay_zero_during_training_with_momentum_and_weight_decay(tiny_kshapes):
    data, model = tiny_kshapes
    pruned = prune_magnitude(model, 0.7, "global")
    before = [w.clone() for w in _pruned_weights(pruned.model)]
    with kept_pruned(pruned.model, pruned.masks) as net:
        assert all(parametrize.is_parametrized(m, "weight") for _, m in prunable_layers(net))
        train_classifier(net, data.train, None, epochs=1, seed=3, lr=0.05, weight_decay=5e-3)
    modules = dict(pruned.model.named_modules())
    for (name, keep), b in zip(pruned.masks.items(), before):
        m = modules[name]
        assert not parametrize.is_parametrized(m)  # plain parameters again
        assert int((m.weight.detach()[~keep] != 0).sum()) == 0
    assert any(not torch.equal(w, b) for w, b in zip(_pruned_weights(pruned.model), before))  # it did train


def test_kept_pruned_removes_its_parametrisations_after_an_error():
    net = _net()
    pruned = prune_magnitude(net, 0.5)
    with pytest.raises(RuntimeError, match="boom"):
        with kept_pruned(pruned.model, pruned.masks):
            raise RuntimeError("boom")
    assert not any(parametrize.is_parametrized(m) for m in pruned.model.modules())


# --------------------------------------------------------------------------------------------------- study
@pytest.mark.slow
def test_compression_study_end_to_end_is_deterministic_and_reopens(tiny_fit, tiny_kshapes, tmp_path):
    data, model = tiny_kshapes
    before = state_fingerprint(model)
    kw = dict(ratios=(0.0, 0.9), finetune_epochs=1, fit=tiny_fit, seed=0, device="cpu", n_maps=2)
    a = compression_study(model, "layer2", data, **kw)
    b = compression_study(model, "layer2", data, **kw)
    assert unchanged(model, before)
    pd.testing.assert_frame_equal(a.tables()["compression"], b.tables()["compression"], check_exact=True)
    t = a.tables()["compression"]
    assert list(t["ratio"]) == [0.0, 0.9]
    assert t["n_pruned"].iloc[0] == 0 and t["sparsity"].iloc[1] == pytest.approx(0.9, abs=1e-4)
    assert (t["masked_nonzero"] == 0).all()  # pruned weights stayed zero through fine-tuning
    assert {"var_residual", "var_target", "instability", "var_x0", "var_x2", "accuracy", "accuracy_pruned"} <= set(t)
    assert a.maps is not None and a.maps.residual.shape[0] == 2
    out = write_study(tmp_path / "study", "compression", a.as_dict(), a.tables(), a.figures(), {"seed": 0},
                      formats=("png",))
    folder = read_study(out)
    open_in_dashboard(out)  # the dashboard's Studies page shows it without errors
    assert folder.study == "compression"
    assert len(folder.result["points"]) == 2
    pd.testing.assert_frame_equal(folder.tables["compression"], t, check_dtype=False)
    assert {"compression_curve", "discarded_components"} <= set(folder.figures)


def test_unpruned_point_without_finetuning_is_the_original(tiny_fit, tiny_kshapes):
    data, model = tiny_kshapes
    res = compression_study(model, "layer2", data, ratios=(0.0,), fit=tiny_fit, n_maps=0)
    p = res.points[0]
    assert p.accuracy == p.accuracy_pruned == res.original_accuracy
    # identical features: the closed-form 0-order map reconstructs them (g_θ after one epoch nearly so)
    assert p.row.linear_r2 > 0.9999 and p.row.cka == pytest.approx(1.0)
    assert p.row.instability < 0.1


def test_bad_study_input_is_explained(tiny_kshapes):
    data, model = tiny_kshapes
    with pytest.raises(ValueError, match="ratios must lie in \\[0, 1\\]"):
        compression_study(model, "layer2", data, ratios=(0.5, 2.0))
    with pytest.raises(ValueError, match="layer9"):
        compression_study(model, "layer9", data, ratios=(0.5,))


def _checkpoint(model: nn.Module, folder) -> str:
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    write_card(ModelCard(architecture="kc_resnet", num_classes=10, input_size=(32, 32), mean=MEAN, std=STD,
                         default_layer="layer2"), card_path_for(path))
    return str(path)


@pytest.mark.slow
def test_cli_writes_a_study_folder(tiny_kshapes, tmp_path, capsys):
    _, model = tiny_kshapes
    ckpt = _checkpoint(model, tmp_path)
    out = tmp_path / "run"
    rc = main(["compression", "--model", ckpt, "--ratios", "0,0.5", "--scope", "global", "--finetune-epochs", "0",
               "--n-train", "10", "--n-test", "10", "--n-images", "20", "--fit-epochs", "1", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    folder = read_study(out)
    assert folder.result["scope"] == "global" and folder.result["layer"] == "layer2"
    assert folder.provenance["checkpoint"]["sha256"] and "torch" in folder.provenance["versions"]
    assert len(folder.tables["compression"]) == 2
    assert re.search(r"^\[compression +[0-9.]+s\] r = 0\.5:", capsys.readouterr().err, re.M)
    assert main(["compression", "--model", ckpt, "--out", str(out)]) == 2  # exists: no overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["compression", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["compression", "--model", ckpt, "--ratios", "0,abc", "--out", str(tmp_path / "y")]) == 2
    assert json.loads((out / "result.json").read_text())["format"] == "kcore-study/1"
