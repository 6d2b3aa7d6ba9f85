"""timm architectures by name (``timm:NAME``): build, load, layers, preprocessing from timm's pretrained_cfg, the CLI
end to end, kcore without timm; and the original layer types of a ``.pt2``.

Every timm model here is built with random weights (``pretrained=False``): nothing is downloaded. timm's tiny
``test_*`` models keep the fits to seconds.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kcore import architectures
from kcore.architectures import (
    TIMM_FAMILIES,
    build_model,
    curated_timm_architectures,
    timm_installed,
)
from kcore.cards import ModelCard, card_path_for, write_card
from kcore.checkpoints import load_model
from kcore.cli import main
from kcore.features import list_layers
from kcore.preprocessing import Preprocessing, card_for, preprocessing_from_timm_cfg, resolve_preprocessing

ROOT = Path(__file__).resolve().parents[1]
needs_timm = pytest.mark.skipif(not timm_installed(), reason="timm is not installed (pip install -e '.[timm]')")


def _save_timm(tmp_path: Path, name: str, seed: int, num_classes: int = 3) -> tuple[Path, torch.nn.Module]:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes).eval()
    path = tmp_path / f"{name}_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path, model


# ------------------------------------------------------------------------------------------ building by name


@needs_timm
def test_build_model_creates_timm_models_without_pretrained_weights(monkeypatch):
    import timm

    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    model = build_model("timm:test_resnet", 7)
    assert calls == [(("test_resnet",), {"pretrained": False, "num_classes": 7})]
    assert type(model).__module__.startswith("timm.") and model.get_classifier().out_features == 7
    assert "timm:test_resnet" in architectures.available_architectures()
    assert not any(a.startswith("timm:") for a in architectures.available_architectures(with_timm=False))


@needs_timm
@pytest.mark.parametrize(("arch", "message"), [
    ("timm:resnet81", r"arch='timm:resnet81': timm has no model called 'resnet81'\. Did you mean 'timm:resnet18'.*"
                      r"Fix: give a name from timm\.list_models\(\)"),
    ("timm:resnet18.no_such_tag", r"no pretrained tag 'no_such_tag' for 'resnet18'; its tags are \[.*'tv_in1k'.*\]\. "
                                  r"Fix: use one of them, or give 'timm:resnet18' for its default"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", r"is not a timm model name: .*Hub ids, paths and URLs are not accepted\. Fix:"),
    ("timm:local-dir:/tmp/x", r"is not a timm model name"),
    ("timm:", r"arch='timm:' is not a timm model name"),
    ("efficientnet_lite0", r"arch='efficientnet_lite0' is not a known architecture\. Did you mean "
                           r"'timm:efficientnet_lite0'.*Fix: give a name from .*available_architectures\(\)"),
])
def test_unknown_timm_names_get_did_you_mean_and_nothing_is_built(arch, message, monkeypatch):
    import timm

    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail(f"built {a} for an invalid name"))
    with pytest.raises(ValueError, match=message):
        build_model(arch, 3)


@needs_timm
def test_the_dashboard_list_is_common_families_without_giants():
    curated = curated_timm_architectures()
    everything = set(architectures.timm_architectures())
    assert {"timm:resnet18", "timm:tf_efficientnet_lite0", "timm:vit_small_patch16_224", "timm:convnext_tiny"} <= set(curated)
    assert set(curated) <= everything and len(curated) < len(everything)
    assert all(a[len("timm:"):].startswith(TIMM_FAMILIES) for a in curated)
    assert "timm:vit_giant_patch14_224" in everything and "timm:vit_giant_patch14_224" not in curated
    assert "timm:test_resnet" in everything and "timm:test_resnet" not in curated


# ------------------------------------------------------------------------------------------ loading and layers


@needs_timm
def test_a_timm_state_dict_loads_weights_only_and_computes_what_timm_computes(tmp_path):
    path, original = _save_timm(tmp_path, "test_efficientnet", seed=3)
    m = load_model(path, arch="timm:test_efficientnet")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m.model(x), original(x))
    assert (m.architecture, m.num_classes, m.kind) == ("timm:test_efficientnet", 3, "safetensors")
    pt = tmp_path / "sd.pt"  # a torch.save state dict goes through the weights-only unpickler the same way
    torch.save(original.state_dict(), pt)
    with torch.no_grad():
        assert torch.equal(load_model(pt, arch="timm:test_efficientnet").model(x), original(x))
    with pytest.raises(ValueError, match=r"does not fit .*'timm:test_resnet'.*have other shapes"):
        load_model(path, arch="timm:test_resnet")


@needs_timm
def test_kcore_layers_lists_timm_names_and_types_at_the_pretrained_cfg_size(tmp_path, capsys):
    path, _ = _save_timm(tmp_path, "test_resnet", seed=0)
    assert main(["layers", str(path), "--arch", "timm:test_resnet"]) == 0
    out = capsys.readouterr().out
    assert "input 3x160x160" in out  # test_resnet's pretrained_cfg input_size
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["layer1.0.conv1"] == ["Conv2d", "32x40x40"] and rows["layer1.0"] == ["BasicBlock", "32x40x40"]
    assert rows["act1"][0] == "ReLU" and "layer4" in rows


@needs_timm
def test_a_card_names_the_timm_architecture(tmp_path, capsys):
    path, original = _save_timm(tmp_path, "test_resnet", seed=1, num_classes=4)
    write_card(ModelCard(architecture="timm:test_resnet", num_classes=4), card_path_for(path))
    m = load_model(path)
    assert m.architecture == "timm:test_resnet" and m.num_classes == 4
    assert m.preprocessing.input_size == (160, 160) and "timm's pretrained_cfg for timm:test_resnet" in m.preprocessing.source
    assert main(["layers", str(path)]) == 0 and "layer4" in capsys.readouterr().out
    # a card with only the input size is completed from timm's pretrained_cfg, with the card's size
    write_card(ModelCard(architecture="timm:test_resnet", input_size=(96, 96)), card_path_for(path))
    prep = load_model(path).preprocessing
    assert prep.input_size == (96, 96) and prep.mean == (0.5, 0.5, 0.5)  # test_resnet's cfg mean
    assert prep.source.startswith("model card, completed from timm's pretrained_cfg for timm:test_resnet")


@pytest.mark.parametrize("arch", ["timm:hf-hub:timm/resnet18", "timm:../../x", "timm:a/b"])
def test_a_card_refuses_a_timm_architecture_that_is_not_a_name(arch):
    with pytest.raises(ValueError, match=r"card: 'architecture' .* is not a timm model name.*Fix: e\.g\. 'timm:resnet18'"):
        ModelCard.from_dict({"architecture": arch}, source="card")


# ------------------------------------------------------------------------------------------ preprocessing


def test_crop_pct_becomes_the_shorter_side_before_the_centre_crop():
    cfg = {"input_size": (3, 200, 200), "crop_pct": 0.8, "crop_mode": "center", "interpolation": "bicubic",
           "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    prep = preprocessing_from_timm_cfg(cfg, "timm:planted")
    assert (prep.input_size, prep.resize_size, prep.interpolation) == ((200, 200), 250, "bicubic")
    assert (prep.mean, prep.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    # floor, as timm does: 224 / 0.95 = 235.8 -> 235; a non-square input uses its shorter side
    assert preprocessing_from_timm_cfg({**cfg, "input_size": (3, 224, 224), "crop_pct": 0.95}, "x").resize_size == 235
    assert preprocessing_from_timm_cfg({**cfg, "input_size": (3, 192, 256), "crop_pct": 0.75}, "x").resize_size == 256
    squash = preprocessing_from_timm_cfg({**cfg, "crop_mode": "squash", "interpolation": "lanczos"}, "x")
    assert squash.interpolation == "bilinear" and "crop_mode 'squash' taken as a centre crop" in squash.source
    assert "interpolation 'lanczos' taken as bilinear" in squash.source
    with pytest.raises(ValueError, match=r"crop_pct must be in \(0, 1\]; got 1\.5.*Fix:"):
        preprocessing_from_timm_cfg({**cfg, "crop_pct": 1.5}, "x")


@needs_timm
def test_preprocessing_matches_timms_own_evaluation_transform():
    import timm
    from PIL import Image

    for arch in ("timm:resnet18", "timm:resnet18.tv_in1k", "timm:tf_efficientnet_lite0"):
        prep = resolve_preprocessing(None, arch)
        name = arch[len("timm:"):]
        cfg = timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        assert prep.resize_size == math.floor(cfg["input_size"][1] / cfg["crop_pct"])
        assert (prep.input_size, prep.interpolation) == (tuple(cfg["input_size"][1:]), cfg["interpolation"])
        assert (prep.mean, prep.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    assert resolve_preprocessing(None, "timm:resnet18").resize_size == 235  # crop_pct 0.95 (a1_in1k, the default)
    assert resolve_preprocessing(None, "timm:resnet18.tv_in1k").resize_size == 256  # crop_pct 0.875
    # the same pixels as timm's transform on a smooth non-square image (a wrong crop or scale would move the ramp)
    h, w = 300, 420
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([xx, yy, (xx + yy) / 2])
    prep = resolve_preprocessing(None, "timm:tf_efficientnet_lite0")
    ours = prep.transform()(img[None])[0]
    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    theirs = timm.data.create_transform(**timm.data.resolve_data_config({}, pretrained_cfg=timm.models.get_pretrained_cfg(
        "tf_efficientnet_lite0").to_dict()))(pil)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert (ours - theirs).abs().mean() < 0.01  # uint8 rounding and PIL's vs torch's bicubic only


def test_interpolation_is_checked_recorded_and_clamped(tmp_path):
    with pytest.raises(ValueError, match=r"interpolation must be one of \['bilinear', 'bicubic'\]; got 'nearest'.*Fix:"):
        Preprocessing((8, 8), interpolation="nearest")
    with pytest.raises(ValueError, match=r"'extra\.interpolation' must be 'bilinear' or 'bicubic'.*got 'lanczos'.*Fix:"):
        ModelCard.from_dict({"extra": {"interpolation": "lanczos"}}, source="card")
    prep = Preprocessing((8, 8), (0.5,) * 3, (0.5,) * 3, 10, "planted", "bicubic")
    assert prep.as_dict()["interpolation"] == "bicubic" and "bicubic" in prep.describe()
    step = torch.zeros(1, 3, 20, 20)
    step[..., 10:] = 1.0  # a sharp edge: bicubic rings past [0, 1] unless clamped
    raw = torch.nn.functional.interpolate(step, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    assert raw.max() > 1.0 or raw.min() < 0.0
    out = Preprocessing((8, 8), interpolation="bicubic").transform()(step)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # a card written for the model records it, and reading it back gives the same preprocessing
    from helpers import loaded

    card = card_for(loaded(torch.nn.Conv2d(3, 3, 1), "m.pt"), prep)
    assert card.extra["interpolation"] == "bicubic"
    write_card(card, tmp_path / "m.card.json")
    back = Preprocessing.from_card(ModelCard.from_dict(json.loads((tmp_path / "m.card.json").read_text())))
    assert (back.input_size, back.resize_size, back.interpolation) == ((8, 8), 10, "bicubic")


# ------------------------------------------------------------------------------------------ the CLI end to end


@needs_timm
@pytest.mark.slow
def test_fit_two_timm_models_end_to_end_with_baselines(tmp_path, capsys):
    a, _ = _save_timm(tmp_path, "test_resnet", seed=0)
    b, _ = _save_timm(tmp_path, "test_efficientnet", seed=1)
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(a), "--arch-a", "timm:test_resnet", "--layer-a", "layer4",
               "--b", str(b), "--arch-b", "timm:test_efficientnet", "--layer-b", "blocks.4",
               "--input-size-b", "128", "128", "--data", "kshapes", "--n-images", "40", "--epochs", "2",
               "--baselines", "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "timm's pretrained_cfg for timm:test_resnet (crop_pct 0.95" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["directions"]["A_to_B"]["instability"])
    assert metrics["baselines"]["random_b"]["extra"]["network"] == "built as timm:test_efficientnet"
    assert math.isfinite(metrics["baselines"]["random_b"]["directions"]["A_to_B"]["instability"])
    prov = json.loads((out / "provenance.json").read_text())
    assert "baselines_failed" not in prov
    # the architecture came from --arch-a/--arch-b (no card): provenance still names it
    assert (prov["checkpoint_a"]["architecture"], prov["checkpoint_b"]["architecture"]) == (
        "timm:test_resnet", "timm:test_efficientnet")
    prep_a, prep_b = prov["preprocessing"]["A"], prov["preprocessing"]["B"]
    assert (prep_a["input_size"], prep_a["resize_size"], prep_a["mean"]) == ([160, 160], 168, [0.5, 0.5, 0.5])
    # --input-size-b overrides timm's 160 and keeps its crop ratio (168/160); the bicubic filter stays
    assert (prep_b["input_size"], prep_b["resize_size"], prep_b["interpolation"]) == ([128, 128], 134, "bicubic")


# ------------------------------------------------------------------------------------------ without timm


def test_kcore_works_without_timm_and_says_how_to_install_it(tmp_path):
    script = f"""
import sys
sys.modules["timm"] = None  # as if timm were not installed: `import timm` raises ImportError
import torch
import kcore
from kcore.architectures import available_architectures, build_model, timm_installed, TimmNotInstalled
from kcore.checkpoints import load_model
from kcore.preprocessing import resolve_preprocessing
assert not timm_installed()
assert not any(a.startswith("timm:") for a in available_architectures())
torch.manual_seed(0)
net = build_model("resnet18", 3)
torch.save(net.state_dict(), {str(tmp_path / "r.pt")!r})
m = load_model({str(tmp_path / "r.pt")!r}, arch="resnet18")
assert m.preprocessing.resize_size == 256
assert resolve_preprocessing(None, "timm:resnet18").source.startswith("none")
for call in (lambda: build_model("timm:resnet18", 3), lambda: load_model({str(tmp_path / "r.pt")!r}, arch="timm:resnet18")):
    try:
        call()
    except TimmNotInstalled as exc:
        assert isinstance(exc, ValueError)
        print(exc)
    else:
        raise SystemExit("no error")
try:
    build_model("resnet81", 3)
except ValueError as exc:
    print(exc)
assert "timm" not in sys.modules or sys.modules["timm"] is None
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == lines[1]
    assert lines[0].startswith("arch='timm:resnet18' is a timm architecture, but timm is not installed. "
                               "Fix: pip install -e '.[timm]'")
    assert "timm's as 'timm:NAME' after pip install -e '.[timm]'" in lines[2]


# ------------------------------------------------------------------------------------------ .pt2 layer types


def test_layers_of_an_exported_program_have_their_original_types(tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.rand(2, 3, 64, 64)
    path = tmp_path / "r18.pt2"
    torch.export.save(torch.export.export(net, (x,)), str(path))
    m = load_model(path)
    types = {layer.name: layer.type for layer in list_layers(m.model, (3, 64, 64))}
    direct = {layer.name: layer.type for layer in list_layers(net, (3, 64, 64))}
    assert types["layer1.0.conv1"] == "Conv2d" and types["layer1.0"] == "BasicBlock" and types["fc"] == "Linear"
    assert types == direct  # the same names and types as the network it was exported from
    assert main(["layers", str(path), "--input-size", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "InterpreterModule" not in out
    assert next(line for line in out.splitlines() if line.startswith("layer1.0.conv1 ")).split()[1] == "Conv2d"


# ------------------------------------------------------------------------------------------ the dashboard


@needs_timm
def test_the_dashboard_offers_listed_timm_names_and_refuses_others(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from dashboard.state import models

    path, _ = _save_timm(tmp_path, "mobilenetv3_small_050", seed=0, num_classes=6)
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    for name, sub in (("KCORE_RUNS_DIR", "runs"), ("KCORE_EXPORTS_DIR", "exports")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    at.segmented_control(key="kc_src_A").set_value("path").run()
    options = at.selectbox(key="kc_arch_A").options
    assert "timm:tf_efficientnet_lite0" in options and "resnet18" in options
    assert "timm:test_resnet" not in options and not any("giant" in o for o in options)
    at.text_input(key="kc_path_A").set_value(str(path))
    at.selectbox(key="kc_arch_A").set_value("timm:mobilenetv3_small_050").run()
    at.button(key="kc_loadpath_A").click().run()
    assert not at.exception and not [e.value for e in at.error], [e.value for e in at.error]
    slot = at.session_state["kc_slot_A"]
    assert (slot.loaded.architecture, slot.loaded.num_classes, slot.input_size) == (
        "timm:mobilenetv3_small_050", 6, (3, 224, 224))
    assert "timm's pretrained_cfg for timm:mobilenetv3_small_050" in " ".join(c.value for c in at.caption)

    # an uploaded card (or a name from anywhere but the list) cannot reach a timm model the page does not offer
    data = path.read_bytes()
    card = json.dumps({"architecture": "timm:test_resnet", "num_classes": 6})
    with pytest.raises(ValueError, match=r"the uploaded model card's architecture 'timm:test_resnet' is not among the "
                                         r"timm architectures this dashboard offers.*Fix: choose one"):
        models.load_bytes(data, "m.safetensors", None, None, card)
    with pytest.raises(ValueError, match=r"architecture 'timm:vit_giant_patch14_224' is not among"):
        models.load_server_path(str(path), "timm:vit_giant_patch14_224")
    tagged = json.dumps({"architecture": "timm:mobilenetv3_small_050.lamb_in1k", "num_classes": 6})
    assert models.load_bytes(data, "m.safetensors", None, None, tagged).architecture == "timm:mobilenetv3_small_050.lamb_in1k"


@needs_timm
def test_a_card_beside_a_server_file_cannot_reach_a_timm_model_the_dashboard_does_not_offer(tmp_path, monkeypatch):
    import timm

    from dashboard.state import models

    path, _ = _save_timm(tmp_path, "mobilenetv3_small_050", seed=0, num_classes=6)
    card_path_for(path).write_text(json.dumps({"architecture": "timm:test_resnet", "num_classes": 6}))
    assert ModelCard.from_dict(json.loads(card_path_for(path).read_text())).architecture == "timm:test_resnet"
    monkeypatch.setenv("KCORE_SERVER_ROOTS", str(tmp_path))
    built: list[str] = []
    real_create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, *a, **k: built.append(name) or real_create(name, *a, **k))
    with pytest.raises(ValueError, match=r"the model card's architecture 'timm:test_resnet' is not among the timm "
                                         r"architectures this dashboard offers"):
        models.load_server_path(str(path))
    assert built == []  # refused before any model was built
    # the same card through the Python API (no dashboard) builds what it names: the allow-list is the dashboard's
    with pytest.raises(ValueError, match="does not fit architecture 'timm:test_resnet'"):
        load_model(path)
    assert built == ["test_resnet"]
    # a card naming an offered model loads from the server folder
    card_path_for(path).write_text(json.dumps({"architecture": "timm:mobilenetv3_small_050", "num_classes": 6}))
    assert models.load_server_path(str(path)).architecture == "timm:mobilenetv3_small_050"
