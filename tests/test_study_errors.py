"""A study given a checkpoint it cannot load without an architecture says what works: `kcore convert` first,
then the study's own option on the converted file (the studies have no --arch)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kcore.architectures import build_model
from kcore.arguments import ArgumentError, spell
from kcore.cli import main
from kcore.experiments._features import convert_first_message, load_checkpoint

WEAK = Path(__file__).resolve().parents[1] / "sample_models" / "kshapes_tinynet_s0.safetensors"


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A bare state dict of the sample architecture kc_tinynet (10 classes), saved now, with no model card."""
    torch.manual_seed(3)
    net = build_model("kc_tinynet", 10)
    path = tmp_path_factory.mktemp("bare") / "weights.pt"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


@pytest.mark.parametrize("study, option, other", [
    ("refinement", "--a", []),
    ("refinement", "--b", ["--a", str(WEAK)]),
    ("diagnosis", "--weak", []),
    ("compression", "--model", []),
    ("stability", "--ckpts", []),
])
def test_a_study_given_a_bare_state_dict_names_its_option_and_kcore_convert(bare, tmp_path, capsys, study, option,
                                                                           other):
    path, _ = bare
    if other and not WEAK.is_file():
        pytest.skip("sample models not built")
    args = [study, *other, option, str(path)] + ([str(path)] if option == "--ckpts" else [])
    rc = main(args + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"kcore {study}: error: {option} '{path}' cannot be loaded as it is: "), err
    assert "holds weights only, so its architecture is needed" in err
    converted = path.with_suffix(".safetensors")
    assert f"Fix: convert the file first with `kcore convert {path} --arch ARCH --out {converted}`" in err
    assert f"then pass `{option} {converted}`" in err
    assert "arch=" not in err and "Traceback" not in err  # no Python spelling, no traceback
    assert not (tmp_path / "out").exists()


def test_the_advice_works_the_converted_file_loads_with_its_card(bare, tmp_path, capsys):
    path, state = bare
    with pytest.raises(ValueError, match=r"--a '.*weights.pt' cannot be loaded as it is"):
        load_checkpoint(str(path), "--a")
    out = tmp_path / "weights.safetensors"
    assert main(["convert", str(path), "--arch", "kc_tinynet", "--out", str(out)]) == 0, capsys.readouterr().err
    m = load_checkpoint(str(out), "--a")  # the study's own loader, no architecture given
    assert m.card is not None and m.card.architecture == "kc_tinynet"
    loaded = m.model.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_the_message_spells_the_loaders_other_arguments_as_kcore_convert_flags():
    exc = ArgumentError(f"checkpoint 'w.safetensors' does not match architecture 'resnet18': missing 'fc.bias'. Fix: "
                        f"pass {spell('strict', 'strict=False')} to load the matching tensors.")
    msg = convert_first_message(exc, "models/w.safetensors", "--strong")
    assert msg.startswith("--strong 'models/w.safetensors' cannot be loaded as it is: checkpoint 'w.safetensors' does "
                          "not match architecture 'resnet18': missing 'fc.bias'. The study commands take no --arch")
    # a safetensors source gets another name for the converted file, so that convert does not refuse to overwrite it
    assert "`kcore convert models/w.safetensors --arch ARCH --out models/w_kcore.safetensors`" in msg
    assert msg.endswith("then pass `--strong models/w_kcore.safetensors`.")
    assert "strict=False" not in msg
    hint = ArgumentError(f"shapes differ. If only the classifier differs, pass {spell('num_classes', 'num_classes=7', 7)}."
                         " Fix: choose the architecture.")
    assert "If only the classifier differs, pass --num-classes 7" in convert_first_message(hint, "w.pt", "--a")
