"""`kcore convert` (kcore/convert.py): a bare state dict into a named architecture by name or by order and shape;
CLI errors that name flags (kcore/arguments.py); the least-squares baseline's held-out error."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from torch import nn

from kcore.arguments import ArgumentError, spell
from kcore.cards import card_path_for, read_card
from kcore.checkpoints import load_model
from kcore.cli import _listed_layers, main
from kcore.convert import MATCH_KINDS, convert_state_dict, write_converted

ARCH, CLASSES, SIZE = "resnet18", 7, (32, 32)


@pytest.fixture(scope="module")
def original() -> nn.Module:
    """resnet18 with 7 classes and random weights, BatchNorm statistics made non-trivial, in eval mode."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=CLASSES)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_(1, 0.1)
    return m.eval()


def _weights(sd: dict) -> list[str]:
    return [k for k in sd if not k.endswith("num_batches_tracked")]


def _renamed(sd: dict) -> dict:
    """Another codebase's names for the same tensors, in the same order (no BatchNorm step counters)."""
    return {f"net._blocks.{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(sd.items())
            if not k.endswith("num_batches_tracked")}


def _same_outputs(sd: dict, original: nn.Module) -> bool:
    m = torchvision.models.resnet18(num_classes=CLASSES)
    m.load_state_dict(sd)
    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.equal(m.eval()(x), original(x))


def _swapped(sd: dict, a: str = "layer1.0.conv1.weight", b: str = "layer1.0.conv2.weight") -> dict:
    """The state dict with two equal-shape tensors' positions exchanged, each keeping its name."""
    items = list(sd.items())
    keys = [k for k, _ in items]
    i, j = keys.index(a), keys.index(b)
    items[i], items[j] = items[j], items[i]
    return dict(items)


# ------------------------------------------------------------------------------------------ errors name arguments


def test_argument_error_names_python_arguments_and_respells_them():
    exc = ArgumentError(f"no arch. Fix: pass {spell('arch', ARCH_EXAMPLE, 'resnet18')} or "
                        f"{spell('strict', 'strict=False')}; path 'a{{b}}'.")
    assert str(exc) == "no arch. Fix: pass arch='resnet18' or strict=False; path 'a{b}'."
    assert exc.arguments == ("arch", "strict") and exc.argument == "arch" and isinstance(exc, ValueError)
    cli = exc.respelled({"arch": "--arch-a {value}", "strict": "--non-strict-a"})
    assert str(cli) == "no arch. Fix: pass --arch-a resnet18 or --non-strict-a; path 'a{b}'."
    assert type(cli) is ArgumentError and cli.argument == "arch"
    assert str(exc.respelled({"strict": "--non-strict"})) == "no arch. Fix: pass arch='resnet18' or --non-strict; path 'a{b}'."


ARCH_EXAMPLE = "arch='resnet18'"


def test_loader_errors_name_python_arguments_in_the_api_and_flags_in_the_cli(tmp_path, original, capsys):
    path = tmp_path / "a.pt"
    torch.save(original.state_dict(), path)
    with pytest.raises(ArgumentError, match=r"Fix: pass arch='resnet18'") as info:
        load_model(path)
    assert info.value.argument == "arch"
    assert main(["fit", "--a", str(path), "--b", str(path), "--arch-b", ARCH, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Fix: pass --arch-a resnet18" in err and "arch='" not in err
    other = tmp_path / "b.pt"
    torch.save(torchvision.models.resnet34(num_classes=CLASSES).state_dict(), other)
    assert main(["fit", "--a", str(path), "--arch-a", ARCH, "--b", str(other), "--arch-b", ARCH,
                 "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "unexpected in the checkpoint: 'layer1.2.conv1.weight'" in err and "pass --non-strict-b" in err
    assert "strict=False" not in err and not (tmp_path / "r").exists()
    # the classifier's size: the Python argument in the API, the flag of the right model in the CLI
    with pytest.raises(ValueError, match=r"pass num_classes=7"):
        load_model(path, arch=ARCH, num_classes=3)
    assert main(["layers", str(path), "--arch", ARCH, "--num-classes", "3"]) == 2
    assert "pass --num-classes 7" in capsys.readouterr().err


def test_non_strict_flag_loads_the_matching_tensors_and_says_what_is_missing(tmp_path, original, capsys):
    sd = dict(original.state_dict())
    del sd["fc.bias"]
    path = tmp_path / "a.pt"
    torch.save(sd, path)
    assert main(["layers", str(path), "--arch", ARCH, "--input-size", "32", "32"]) == 2
    assert "pass --non-strict to load" in capsys.readouterr().err
    assert main(["layers", str(path), "--arch", ARCH, "--input-size", "32", "32", "--non-strict"]) == 0
    captured = capsys.readouterr()
    assert "1 tensor(s) missing from the file" in captured.err and "fc.bias" in captured.err
    assert "layer4" in captured.out


def test_layer_listing_errors_name_the_input_size_flag_of_the_model():
    net = nn.Sequential(nn.Conv2d(3, 4, 5))  # a 2×2 input is smaller than its kernel
    with pytest.raises(ArgumentError, match=r"Fix: pass input_size=\(C, H, W\)"):
        from kcore.features import list_layers

        list_layers(net, (3, 2, 2))
    with pytest.raises(ArgumentError, match=r"Fix: pass --input-size-b H W matching") as info:
        _listed_layers(SimpleNamespace(model=net), (3, 2, 2), "b")
    assert "input_size=" not in str(info.value)


# ------------------------------------------------------------------------------------------ conversion


def test_by_name_after_prefix_strip_gives_identical_outputs(original):
    sd = {f"module.{k}": v for k, v in original.state_dict().items()}
    res = convert_state_dict(sd, ARCH, input_size=SIZE)  # num_classes inferred from fc.weight
    assert res.match == "name" and res.num_classes == CLASSES and res.output_shape == (2, CLASSES)
    n = len(_weights(original.state_dict()))
    assert res.counts() == {"name": 0, "name after prefix strip": n, "order+shape": 0, "missing": 0, "unexpected": 0}
    assert res.matched[0] == res.matched[0].__class__("conv1.weight", "module.conv1.weight", "name after prefix strip",
                                                      (64, 3, 7, 7))
    assert _same_outputs(res.state_dict, original)
    assert not any(v.data_ptr() == w.data_ptr() for v, w in zip(res.state_dict.values(), sd.values()))  # copies


def test_by_order_when_names_differ_gives_identical_outputs(original):
    sd = _renamed(original.state_dict())
    for match in ("auto", "order"):
        res = convert_state_dict(sd, ARCH, num_classes=CLASSES, match=match, input_size=SIZE)
        assert res.match == "order" and res.counts()["order+shape"] == len(sd) == len(res.matched)
        assert _same_outputs(res.state_dict, original)
    lines = res.report_lines()
    assert "matched by order" in lines[0] and "order+shape: 102" in lines[1]
    assert "net._blocks.0.weight → conv1.weight" in lines[1]
    with pytest.raises(ArgumentError, match=r"none of its 102 tensors has the name.*Fix: pass match='order'"):
        convert_state_dict(sd, ARCH, num_classes=CLASSES, match="name", input_size=SIZE)


def test_order_report_says_name_where_names_and_positions_agree(original):
    sd = dict(original.state_dict())
    sd = {(k if k.startswith("layer") else f"stem_{i}"): v for i, (k, v) in enumerate(sd.items())
          if not k.endswith("num_batches_tracked")}
    res = convert_state_dict(sd, ARCH, num_classes=CLASSES, input_size=SIZE)
    counts = res.counts()
    renamed = sum(not k.startswith("layer") for k in sd)
    assert res.match == "order" and counts["order+shape"] == renamed and counts["name"] == len(sd) - renamed
    assert set(MATCH_KINDS) <= set(counts)
    assert _same_outputs(res.state_dict, original)


def test_swapped_equal_shape_tensors_are_refused_by_order_and_loaded_right_by_name(original):
    sd = _swapped(dict(original.state_dict()))
    with pytest.raises(ArgumentError) as info:
        convert_state_dict(sd, ARCH, match="order", input_size=SIZE)
    msg = str(info.value)
    assert "names and order disagree for 2 tensor(s)" in msg
    assert "'layer1.0.conv2.weight' is at position 5 (the architecture's 'layer1.0.conv1.weight')" in msg
    assert "Fix: pass match='name'" in msg and info.value.argument == "match"
    res = convert_state_dict(sd, ARCH, input_size=SIZE)  # auto: every name is there, so names decide
    assert res.match == "name" and _same_outputs(res.state_dict, original)


def test_a_count_mismatch_and_a_shape_mismatch_are_refused(original):
    sd = _renamed(original.state_dict())
    extra = {**sd, "net.ema.weight": torch.zeros(3)}
    with pytest.raises(ArgumentError, match=r"by order: the file holds 103 tensors and the architecture 102"):
        convert_state_dict(extra, ARCH, num_classes=CLASSES, input_size=SIZE)
    items = list(sd.items())
    del items[5]  # a tensor lost: everything after it is shifted
    with pytest.raises(ArgumentError, match=r"holds 101 tensors"):
        convert_state_dict(dict(items), ARCH, num_classes=CLASSES, match="order", input_size=SIZE)
    with pytest.raises(ArgumentError, match=r"the shapes differ at 2 position\(s\): position 100: file "
                                            r"'net._blocks.120.weight' \(7, 512\) vs architecture 'fc.weight' \(3, 512\)"
                                            r".*pass num_classes=7"):
        convert_state_dict(sd, ARCH, num_classes=3, match="order", input_size=SIZE)


def test_safetensors_files_are_never_matched_by_order(tmp_path, original):
    from safetensors.torch import save_file

    path = tmp_path / "renamed.safetensors"
    save_file({k: v.contiguous() for k, v in _renamed(original.state_dict()).items()}, str(path))
    with pytest.raises(ArgumentError, match=r"a safetensors file stores its tensors sorted.*convert from the "
                                            r"torch.save state dict"):
        convert_state_dict(path, ARCH, num_classes=CLASSES, match="order", input_size=SIZE)
    torch.save(_renamed(original.state_dict()), tmp_path / "renamed.pt")  # a torch.save file keeps the order
    res = convert_state_dict(tmp_path / "renamed.pt", ARCH, num_classes=CLASSES, input_size=SIZE)
    assert res.match == "order" and res.source_name == "renamed.pt" and len(res.source_sha256) == 64
    assert _same_outputs(res.state_dict, original)


def test_missing_and_unexpected_keys_are_listed_and_non_strict_keeps_them_out(original):
    sd = dict(original.state_dict())
    ema = {f"ema.{k}": v for k, v in list(sd.items())[:6]}
    with pytest.raises(ArgumentError) as info:
        convert_state_dict({**sd, **ema}, ARCH, input_size=SIZE)
    msg = str(info.value)
    assert "holds 5 tensor(s) the architecture has no place for: 'ema.conv1.weight', 'ema.bn1.weight'" in msg
    assert "an EMA copy" in msg and "pass strict=False" in msg
    res = convert_state_dict({**sd, **ema}, ARCH, strict=False, input_size=SIZE)
    assert res.unexpected == tuple(k for k in ema if not k.endswith("num_batches_tracked"))
    assert _same_outputs(res.state_dict, original)
    partial = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ArgumentError, match=r"10 of the architecture's 102 tensors are not in the file by name: "
                                            r"'layer4.1.conv1.weight'.*pass match='order'.*pass strict=False"):
        convert_state_dict(partial, ARCH, match="name", input_size=SIZE)
    res = convert_state_dict(partial, ARCH, match="name", strict=False, input_size=SIZE)
    assert res.missing[0] == "layer4.1.conv1.weight" and len(res.missing) == 10
    assert any(line.startswith("  missing (left as built): 10") for line in res.report_lines())
    with pytest.raises(ArgumentError, match=r"pass match='name' with strict=False"):  # auto never loads a part
        convert_state_dict(partial, ARCH, input_size=SIZE)


def test_classifier_size_and_bad_options_are_refused_with_their_fix(original):
    sd = original.state_dict()
    with pytest.raises(ArgumentError, match=r"'fc.weight': file \(7, 512\) vs architecture \(5, 512\).*classifier's "
                                            r"shape differs, so pass num_classes=7"):
        convert_state_dict(sd, ARCH, num_classes=5, input_size=SIZE)
    with pytest.raises(ValueError, match=r"match must be one of \['auto', 'name', 'order'\]; got 'shape'"):
        convert_state_dict(sd, ARCH, match="shape")
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\).*got \(3, 32, 32\)"):
        convert_state_dict(sd, ARCH, input_size=(3, 32, 32))
    with pytest.raises(TypeError, match=r"state_dict_or_path must be a path.*got int"):
        convert_state_dict(3, ARCH)


def test_write_converted_refuses_to_overwrite_and_loads_back(tmp_path, original):
    res = convert_state_dict(_renamed(original.state_dict()), ARCH, num_classes=CLASSES, input_size=SIZE)
    out = tmp_path / "m.safetensors"
    weights, card = write_converted(res, out, card=res.card(SIZE))
    assert card == card_path_for(out) and read_card(card).architecture == ARCH
    assert read_card(card).extra["converted"]["match"] == "order"
    loaded = load_model(out)  # the card says the architecture and classes
    assert loaded.architecture == ARCH and loaded.num_classes == CLASSES
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), original(x))
    with pytest.raises(ArgumentError, match=r"already exist.*pass overwrite=True"):
        write_converted(res, out)
    with pytest.raises(ArgumentError, match=r"out must be a .safetensors file"):
        write_converted(res, tmp_path / "m.pt")
    write_converted(res, out, overwrite=True)


def test_timm_architecture_by_order(original):
    timm = pytest.importorskip("timm")
    try:
        from kcore.architectures import build_model

        build_model("timm:resnet10t", 5)
    except ValueError as exc:  # the timm names are not in this checkout's registry yet
        pytest.skip(f"timm architectures unavailable: {exc}")
    src = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    sd = {f"other.{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(src.state_dict().items())
          if not k.endswith("num_batches_tracked")}
    res = convert_state_dict(sd, "timm:resnet10t", num_classes=5, input_size=SIZE)
    assert res.match == "order" and res.output_shape == (2, 5)
    dst = timm.create_model("resnet10t", pretrained=False, num_classes=5)
    dst.load_state_dict(res.state_dict)
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        assert torch.equal(dst.eval()(x), src(x))


# ------------------------------------------------------------------------------------------ the command


def test_cli_convert_then_layers(tmp_path, original, capsys):
    src = tmp_path / "other.pth"
    torch.save({"state_dict": _renamed(original.state_dict()), "epoch": 3}, src)
    out = tmp_path / "conv.safetensors"
    rc = main(["convert", str(src), "--arch", ARCH, "--num-classes", str(CLASSES), "--input-size", "32", "32",
               "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "matched by order" in captured.out and "order+shape: 102" in captured.out
    assert f"wrote {out}" in captured.out
    assert main(["layers", str(out)]) == 0  # no --arch: the card beside it says it
    listed = capsys.readouterr().out
    assert "layer4" in listed and "input 3x32x32" in listed
    with torch.no_grad():
        x = torch.randn(2, 3, *SIZE)
        assert torch.equal(load_model(out).model(x), original(x))
    assert main(["convert", str(src), "--arch", ARCH, "--num-classes", str(CLASSES), "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


def test_cli_convert_errors_name_the_flag_that_fixes_them(tmp_path, original, capsys):
    sd = dict(original.state_dict())
    cases = {
        "swapped": (_swapped(sd), ["--match", "order"], "pass --match name"),
        "ema": ({**sd, "ema.fc.weight": sd["fc.weight"]}, [], "pass --non-strict to leave them out"),
        "classes": (sd, ["--num-classes", "5"], "pass --num-classes 7"),
        "renamed": (_renamed(sd), ["--match", "name"], "pass --match order"),
    }
    for name, (state, flags, fix) in cases.items():
        src = tmp_path / f"{name}.pt"
        torch.save(state, src)
        rc = main(["convert", str(src), "--arch", ARCH, "--input-size", "32", "32", *flags,
                   "--out", str(tmp_path / f"{name}.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and fix in err, (name, err)
        assert "match='" not in err and "strict=False" not in err and "num_classes=" not in err
        assert not (tmp_path / f"{name}.safetensors").exists()


# ------------------------------------------------------------------------------------------ least-squares error


def test_least_squares_error_two_ways_and_a_planted_noise_level():
    from kcore.fit.evaluate import relative_error
    from kcore.metrics.linear import Baseline, fit_linear_map, linear_baseline

    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, 8, 8, generator=g)
    w = torch.randn(5, 4, 3, 3, generator=g) * 0.3
    signal = torch.nn.functional.conv2d(x, w, padding=1)
    noise_sd = float(signal.std()) * 0.5  # noise variance = a quarter of the signal's: error ≈ 0.25 / 1.25
    y = signal + noise_sd * torch.randn(signal.shape, generator=g)
    tr, te = slice(0, 80), slice(80, 120)
    base = linear_baseline(x[tr], y[tr], x[te], y[te], kernel_size=3)
    lin = fit_linear_map(x[tr], y[tr], 3)
    direct = relative_error(lin, x[te], y[te], batch_size=7, device=torch.device("cpu"))  # g's formula, on the LS map
    assert base.linear_error == pytest.approx(direct, rel=1e-6)
    assert base.linear_error == pytest.approx(0.2, abs=0.02)
    exact = linear_baseline(x[tr], signal[tr], x[te], signal[te], kernel_size=3)  # no noise: the map is exact
    assert exact.linear_error < 1e-6
    d = base.as_dict()
    assert d["linear_error"] == pytest.approx(1 - d["linear_r2"]) and Baseline.from_dict(d) == base
    assert Baseline.from_dict(json.loads(json.dumps(d))) == base


@pytest.mark.slow
def test_fit_prints_and_stores_the_least_squares_error(tmp_path, capsys):
    root = Path(__file__).resolve().parents[1] / "sample_models"
    weak, strong = root / "kshapes_tinynet_s0.safetensors", root / "kshapes_resnet_s0.safetensors"
    if not strong.is_file():
        pytest.skip("sample models not built")
    out = tmp_path / "run"
    assert main(["fit", "--a", str(weak), "--b", str(strong), "--data", "kshapes", "--n-images", "60",
                 "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    block = json.loads((out / "metrics.json").read_text())["directions"]["A_to_B"]["baseline"]
    assert block["linear_error"] == pytest.approx(1 - block["linear_r2"])
    assert f"least-squares held-out error {block['linear_error']:.4f}" in printed
