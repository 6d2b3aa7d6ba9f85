"""The pipeline: checkpoints + images → features → g_θ both ways → run folders that re-open exactly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import loaded, tiny_net
from kcore.pipeline import HELDOUT_IMAGES_FILE, compare, heldout_images, read_heldout_images, read_run, write_run


@pytest.fixture(scope="module")
def comparison(random_images):
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    return compare(a, "2", b, "2", random_images(), orders=1, epochs=2, both_directions=True, image_source="test")


def test_both_directions_and_provenance(comparison):
    assert set(comparison.directions) == {"A_to_B", "B_to_A"}
    assert comparison.directions["A_to_B"].fit.model.spec.in_channels == 6
    assert comparison.directions["B_to_A"].fit.model.spec.in_channels == 5
    prov = comparison.provenance
    assert prov["layers"] == {"A": "2", "B": "2"} and prov["images"]["n"] == 40
    assert prov["checkpoint_a"]["name"] == "a.pt" and "torch" in prov["versions"]
    # held-out images are the fit's held-out split
    assert comparison.heldout_positions == comparison.directions["A_to_B"].fit.heldout_indices


def test_captured_features_are_the_conv_outputs_before_inplace_relu(comparison, random_images):
    data = random_images()
    with torch.no_grad():
        expected = tiny_net(0)[:3](data.x)
    torch.testing.assert_close(comparison.features.x_a, expected)
    assert float(comparison.features.x_a.min()) < 0  # not overwritten by the in-place ReLU after it


def test_run_folder_round_trip(tmp_path, comparison):
    run = write_run(comparison, tmp_path / "run")
    names = {p.name for p in run.iterdir()}
    assert {"metrics.json", "config.json", "provenance.json", "images.json", "features_heldout.safetensors",
            "g_A_to_B", "g_B_to_A"} <= names
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("A_to_B", "B_to_A"):
        block = metrics["directions"][key]
        assert {"var_orders", "var_residual", "var_target", "instability", "per_channel", "baseline"} <= set(block)
    back = read_run(run)
    assert back.image_ids() == comparison.image_ids()
    for key in ("A_to_B", "B_to_A"):
        d1, d2 = comparison.decompose(key), back.decompose(key)
        for c1, c2 in zip(d1.components, d2.components):
            torch.testing.assert_close(c1, c2)
        # the stored held-out report is what decomposing the stored held-out features gives
        rep = d2.report()
        assert rep.var_residual == pytest.approx(back.directions[key].fit.heldout_report.var_residual, rel=1e-5)
    with pytest.raises(ValueError, match="already exists"):
        write_run(comparison, tmp_path / "run")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.tmp")]  # no debris


def test_read_run_rejects_other_folders(tmp_path):
    with pytest.raises(ValueError, match="not a kcore run folder"):
        read_run(tmp_path)


def test_run_folder_keeps_the_heldout_input_images(tmp_path, comparison, random_images):
    data = random_images()
    run = write_run(comparison, tmp_path / "run", images=data)
    back = read_heldout_images(run)
    ids = comparison.image_ids()
    assert list(back) == ids  # every held-out image (fewer than the cap), in held-out order
    for pos, image_id in zip(comparison.heldout_positions, ids):
        assert back[image_id].dtype == np.uint8 and (back[image_id] == data.raw(pos)).all()
    assert heldout_images(comparison, data, limit=2).keys() == set(ids[:2])
    # without images (or with a dataset that has no raw images) the folder simply has none
    plain = write_run(comparison, tmp_path / "plain")
    assert not (plain / HELDOUT_IMAGES_FILE).exists() and read_heldout_images(plain) == {}
    assert heldout_images(comparison, list(range(40))) == {}


def test_selecting_images_of_a_decomposition(comparison):
    dec = comparison.decompose("A_to_B")
    sub = dec.select([2, 0])
    for part, whole in zip([*sub.components, sub.residual, sub.target], [*dec.components, dec.residual, dec.target]):
        torch.testing.assert_close(part, whole[[2, 0]])
    assert sub.convention == dec.convention and sub.orders == dec.orders
    with pytest.raises(ValueError, match="indices must lie in"):
        dec.select([dec.target.shape[0]])
