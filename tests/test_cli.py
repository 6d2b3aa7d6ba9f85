"""The `kcore` command end to end on the bundled sample models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kcore.cards import card_path_for, read_card, write_card
from kcore.checkpoints import load_model
from kcore.cli import main
from kcore.pipeline import read_heldout_images

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
STRONG = SAMPLES / "kshapes_resnet_s0.safetensors"
WEAK = SAMPLES / "kshapes_tinynet_s0.safetensors"
pytestmark = pytest.mark.skipif(not STRONG.is_file(), reason="sample models not built")


def test_help_explains_the_directions(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "blind spots of A" in out and "kcore layers CKPT" in out and "--both-directions" in out


def test_layers_lists_shapes_and_the_card_default(capsys):
    assert main(["layers", str(STRONG)]) == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "32x16x16" in out and "(card default)" in out


@pytest.mark.slow
def test_fit_on_sample_models_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    # speed is measured by the benchmark (bench/), not here: a short schedule keeps CI quick
    rc = main(["fit", "--a", str(WEAK), "--b", str(STRONG), "--data", "kshapes", "--n-images", "160",
               "--epochs", "4", "--both-directions", "--out", str(out)])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("A_to_B", "B_to_A"):
        block = metrics["directions"][key]
        assert len(block["var_orders"]) == 3
        assert 0 <= block["instability"] < 2
        assert {"linear_r2", "cka"} <= set(block["baseline"])
        assert len(block["per_channel"]["var_target"]) in (16, 32)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["checkpoint_a"]["sha256"] == load_model(WEAK).sha256
    assert prov["images"]["n"] == 160 and "torch" in prov["versions"]
    assert (out / "g_A_to_B" / "g.safetensors").is_file() and (out / "config.json").is_file()
    # the held-out input images travel with the run, so the dashboard draws overlays of a CLI run too
    shown = read_heldout_images(out)
    assert list(shown) == json.loads((out / "images.json").read_text())["ids"]
    assert next(iter(shown.values())).shape == (64, 64, 3)


def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys):
    assert main(["fit", "--a", str(tmp_path / "nope.pt"), "--b", str(STRONG), "--out", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["fit", "--a", str(STRONG), "--layer-a", "layer9", "--b", str(STRONG), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "layer9" in err and "did you mean" in err
    assert not (tmp_path / "r").exists()


def _permuted_copy(tmp_path: Path) -> Path:
    """kshapes_resnet_s0 with layer2.0.conv1's output channels permuted and permuted back in bn1/conv2."""
    from safetensors.torch import save_file

    m = load_model(STRONG).model
    blk = m.layer2[0]
    perm = torch.randperm(blk.conv1.out_channels, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blk.conv1.weight.copy_(blk.conv1.weight[perm])
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(blk.bn1, name)
            t.copy_(t[perm])
        blk.conv2.weight.copy_(blk.conv2.weight[:, perm])
    path = tmp_path / "permuted.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    write_card(read_card(card_path_for(STRONG)), card_path_for(path))
    return path


def test_permuted_copy_is_zero_order_consistent(tmp_path):
    perm_path = _permuted_copy(tmp_path)
    orig, perm = load_model(STRONG).model, load_model(perm_path).model
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(perm(x), orig(x), rtol=1e-4, atol=1e-4)  # the function is unchanged
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(STRONG), "--layer-a", "layer2.0.conv1", "--b", str(perm_path),
               "--layer-b", "layer2.0.conv1", "--data", "kshapes", "--n-images", "120", "--epochs", "5",
               "--out", str(out)])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["var_orders"][0] >= 0.95 * m["var_target"]
    assert m["instability"] <= 0.05


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "kcore"
    if not exe.exists():
        pytest.skip("kcore console script not installed in this environment")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "layers" in out.stdout
