"""Chance-level baselines: a shuffled pairing reconstructs (almost) nothing; a random B is the same architecture."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import loaded, tiny_net
from kcore.baselines import derangement, random_init_like, shuffled_baseline
from kcore.checkpoints import load_model

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
STRONG = SAMPLES / "kshapes_resnet_s0.safetensors"
WEAK = SAMPLES / "kshapes_tinynet_s0.safetensors"
needs_samples = pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")


@pytest.mark.parametrize("n", [2, 3, 17, 100])
def test_derangement_is_a_seeded_permutation_without_fixed_points(n):
    p = derangement(n, seed=5)
    assert sorted(p.tolist()) == list(range(n))
    assert not (p == torch.arange(n)).any()
    assert torch.equal(p, derangement(n, seed=5))
    with pytest.raises(ValueError, match="at least 2 images"):
        derangement(1)


@needs_samples
def test_random_network_has_the_architecture_but_not_the_weights():
    b = load_model(STRONG)
    r1, how = random_init_like(b, seed=3)
    r2, _ = random_init_like(b, seed=3)
    sd, s1, s2 = b.model.state_dict(), r1.model.state_dict(), r2.model.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in s1.items()}
    assert all(torch.equal(s1[k], s2[k]) for k in sd)  # seeded
    conv = next(k for k, v in sd.items() if v.ndim == 4)
    assert not torch.equal(sd[conv], s1[conv])
    assert "built as" in how and r1.sha256 != b.sha256


@needs_samples
def test_shuffled_pairing_gives_instability_near_one_on_the_sample_models():
    from kcore import data as kdata
    from kcore.features import extract_features
    from kcore.fit import make_config
    from kcore.preprocessing import preprocessing_of

    a, b = load_model(WEAK), load_model(STRONG)
    images = kdata.sample_images(n=160)
    feats = extract_features(a.model, a.card.default_layer, b.model, b.card.default_layer, images,
                             transform_a=preprocessing_of(a).transform(), transform_b=preprocessing_of(b).transform())
    ref = shuffled_baseline(feats.x_a, feats.x_b, ["A_to_B", "B_to_A"], make_config("fast", epochs=6), seed=0)
    for key in ("A_to_B", "B_to_A"):
        assert ref.reports[key].instability >= 0.9, (key, ref.reports[key].instability)


def test_baselines_travel_with_the_run_folder(tmp_path, random_images):
    from kcore.pipeline import compare, read_run, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, baselines=True)
    # the test nets name no architecture: the random B is a re-initialised copy
    assert set(comp.baselines) == {"random_b", "shuffled"}
    assert "reset_parameters" in comp.baselines["random_b"].extra["network"]
    run = write_run(comp, tmp_path / "run")
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["baselines"]) == {"random_b", "shuffled"} and m["preset"] == "fast"
    assert "ci" in m["baselines"]["shuffled"]["directions"]["A_to_B"]
    back = read_run(run)
    for kind in ("random_b", "shuffled"):
        assert back.baselines[kind].reports["A_to_B"] == comp.baselines[kind].reports["A_to_B"]
    with pytest.raises(ValueError, match="baselines must be"):
        compare(a, "2", b, "2", random_images(), orders=1, epochs=2, baselines=["nope"])


def test_fit_seeds_reports_the_spread_of_instability_and_order_split(tmp_path, random_images):
    import statistics

    from kcore.pipeline import compare, read_run, write_run

    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, seed=4, fit_seeds=3)
    sp = comp.seed_spread["A_to_B"]
    assert sp["seeds"] == [4, 5, 6]
    assert sp["instability"][0] == comp.directions["A_to_B"].fit.heldout_report.instability
    assert sp["summary"]["instability"]["sd"] == pytest.approx(statistics.stdev(sp["instability"]))
    assert len(sp["share_orders"]) == 3 and len(sp["summary"]["share_orders"]) == 2
    for shares, resid in zip(sp["share_orders"], sp["share_residual"]):
        assert sum(shares) + resid == pytest.approx(1.0, abs=1e-6)
    assert read_run(write_run(comp, tmp_path / "run")).seed_spread == json.loads(json.dumps(comp.seed_spread))
    with pytest.raises(ValueError, match="fit_seeds must be a positive integer"):
        compare(a, "2", b, "2", random_images(), orders=1, epochs=2, fit_seeds=0)
