"""Tests of kcore.checkpoints (every loading path gives back the saved model, unsafe files are refused), kcore.cards
and kcore.architectures."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kcore import architectures, cards
from kcore import checkpoints as ck
from kcore.cards import ModelCard
from kcore.checkpoints import UnsafeCheckpointError, load_model

ARCH = "kc_test_tiny"
OTHER_ARCH = "kc_test_other"
NUM_CLASSES = 5


class TinyNet(nn.Module):
    """Conv -> BN -> in-place ReLU -> conv -> pool -> fc; module level so that it can be pickled whole."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.conv2(x)).flatten(1))


class OtherNet(nn.Module):
    """Same shapes as TinyNet under other names, to provoke missing / unexpected keys."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(6, num_classes)


class Evil:
    """Unpickling this creates ``path``; used to prove that a refused file runs nothing."""

    def __init__(self, path: Path, how: str) -> None:
        self.path, self.how = path, how

    def __reduce__(self):
        if self.how == "system":
            return (os.system, (f"touch {self.path}",))
        return (open, (str(self.path), "w"))


@pytest.fixture(autouse=True)
def tiny_archs(monkeypatch: pytest.MonkeyPatch) -> None:
    from kcore import zoo

    monkeypatch.setitem(zoo.SAMPLE_ARCHITECTURES, ARCH, TinyNet)
    monkeypatch.setitem(zoo.SAMPLE_ARCHITECTURES, OTHER_ARCH, OtherNet)


@pytest.fixture()
def trained() -> TinyNet:
    """A TinyNet with non-default weights and BN statistics, in eval mode."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
    return model.eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_same_outputs(loaded: nn.Module, reference: nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), reference(X), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ state dicts


@pytest.mark.parametrize("nest_key", [None, "state_dict", "model", "net", "model_state_dict"])
@pytest.mark.parametrize("prefix", ["", "module.", "model."])
def test_state_dict_nested_and_prefixed(tmp_path: Path, trained: TinyNet, nest_key: str | None, prefix: str) -> None:
    state = {prefix + k: v for k, v in trained.state_dict().items()}
    payload = state if nest_key is None else {nest_key: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    path = tmp_path / "m.pt"
    torch.save(payload, path)
    loaded = load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    assert loaded.kind == "state_dict"
    assert loaded.missing_keys == () and loaded.unexpected_keys == ()
    assert not loaded.model.training
    assert loaded.num_parameters == sum(p.numel() for p in trained.parameters())
    assert_same_outputs(loaded.model, trained)


def test_safetensors(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.safetensors"
    save_file(trained.state_dict(), str(path))
    loaded = load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    assert loaded.kind == "safetensors"
    assert loaded.name == "m.safetensors"
    assert_same_outputs(loaded.model, trained)


def test_num_classes_inferred_from_last_linear(tmp_path: Path) -> None:
    model = TinyNet(num_classes=9).eval()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch=ARCH)
    assert loaded.model.fc.out_features == 9
    assert_same_outputs(loaded.model, model)


def test_wrong_arch_lists_missing_and_unexpected_keys(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(ValueError) as info:
        load_model(path, arch=OTHER_ARCH, num_classes=NUM_CLASSES)
    msg = str(info.value)
    assert f"{str(path)!r}" in msg and f"architecture {OTHER_ARCH!r}" in msg
    assert "missing from the checkpoint: 'stem.weight', 'stem.bias'" in msg
    assert "unexpected in the checkpoint: 'conv1.weight'" in msg
    assert "strict=False" in msg

    loaded = load_model(path, arch=OTHER_ARCH, num_classes=NUM_CLASSES, strict=False)
    assert set(loaded.missing_keys) == {"stem.weight", "stem.bias"}
    assert "conv1.weight" in loaded.unexpected_keys and "fc.weight" not in loaded.unexpected_keys
    torch.testing.assert_close(loaded.model.fc.weight, trained.fc.weight)


def test_shape_mismatch_is_a_clear_error(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(ValueError, match=r"'fc.weight': checkpoint \(5, 6\) vs model \(3, 6\).*num_classes=5"):
        load_model(path, arch=ARCH, num_classes=3)


def test_state_dict_without_arch_says_how_to_give_one(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.pt"
    torch.save(trained.state_dict(), path)
    with pytest.raises(ValueError, match=r"architecture is needed. Fix: pass arch='resnet18'.*available_architectures\(\).*m\.card\.json"):
        load_model(path)


# ------------------------------------------------------------------------------------------ model cards


def test_card_round_trip_and_automatic_use(tmp_path: Path, trained: TinyNet) -> None:
    card = ModelCard(
        architecture=ARCH,
        num_classes=NUM_CLASSES,
        input_size=(8, 8),
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.2, 0.2),
        class_names=tuple("abcde"),
        dataset="toy",
        test_accuracy=0.75,
        default_layer="conv2",
        extra={"seed": 3},
    )
    path = tmp_path / "m.safetensors"
    save_file(trained.state_dict(), str(path))
    card_path = cards.card_path_for(path)
    assert card_path == tmp_path / "m.card.json"
    cards.write_card(card, card_path)
    assert cards.read_card(card_path) == card
    assert '"format": "kcore-model-card/1"' in card_path.read_text()

    loaded = load_model(path)  # architecture and classes come from the card
    assert loaded.card == card
    assert_same_outputs(loaded.model, trained)


def test_card_with_wrong_format_or_types_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.card.json"
    path.write_text('{"format": "kcore-model-card/9"}')
    with pytest.raises(ValueError, match="'format' must be 'kcore-model-card/1'"):
        cards.read_card(path)
    path.write_text('{"input_size": [32]}')
    with pytest.raises(ValueError, match=r"'input_size' must be \[H, W\]"):
        cards.read_card(path)
    path.write_text('{"architecture": "a", "unknown_key": 1}')
    assert cards.read_card(path).extra == {"unknown_key": 1}


# ------------------------------------------------------------------------------------------ graph formats


def test_torchscript_is_refused_unless_trusted_and_then_needs_no_arch(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.ts.pt"
    torch.jit.save(torch.jit.script(trained), str(path))
    with pytest.raises(UnsafeCheckpointError, match=r"TorchScript archive.*Fix:.*safetensors"):
        load_model(path)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "torchscript"
    assert_same_outputs(loaded.model, trained)


def _export(model: nn.Module, path: Path) -> None:
    try:
        program = torch.export.export(model, (X,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except (torch._dynamo.exc.TorchDynamoException, NotImplementedError) as exc:  # torch.export's own limits
        pytest.skip(f"torch.export cannot trace the tiny model on this torch build: {exc}")
    torch.export.save(program, str(path))


def test_torch_export_archive_keeps_layer_names(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.pt2"
    _export(trained, path)
    loaded = load_model(path)
    assert loaded.kind == "export"
    assert {"conv1", "bn1", "conv2", "fc"} <= {n for n, _ in loaded.model.named_modules()}
    assert_same_outputs(loaded.model, trained)
    with torch.no_grad():
        assert loaded.model(X[:1]).shape == (1, NUM_CLASSES)  # dynamic batch kept


def test_torch_export_archive_with_pickled_payload_is_refused(tmp_path: Path, trained: TinyNet) -> None:
    """torch.export.load falls back to a full unpickle for sample inputs; kcore checks first."""
    clean = tmp_path / "clean.pt2"
    _export(trained, clean)
    marker = tmp_path / "pwned_pt2"
    buffer = io.BytesIO()
    torch.save(Evil(marker, "system"), buffer)
    evil = tmp_path / "evil.pt2"
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(evil, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            dst.writestr(info, buffer.getvalue() if info.filename.endswith("data/sample_inputs/model.pt") else data)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.system \(in data/sample_inputs/model\.pt\)"):
        load_model(evil)
    assert not marker.exists()
    # The archive really is dangerous: with trust it runs the payload, then fails on the odd sample inputs
    # (TypeError: torch's own fallback log message is malformed, which pytest's log handler raises).
    with contextlib.suppress(ValueError, TypeError):
        load_model(evil, trust_pickle=True)
    assert marker.exists()


# ------------------------------------------------------------------------------------------ pickles


def test_full_pickle_needs_trust(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "whole.pt"
    torch.save(trained, path)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(path)
    msg = str(info.value)
    assert "TinyNet" in msg and "trust_pickle=True" in msg and "state_dict()" in msg
    assert any(g.endswith("TinyNet") for g in info.value.unsafe_globals)
    loaded = load_model(path, trust_pickle=True)
    assert loaded.kind == "pickle"
    assert_same_outputs(loaded.model, trained)


@pytest.mark.parametrize("how", ["open", "system"])
@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "plain_pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, how: str, writer: str) -> None:
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"w": torch.zeros(2)}, "hook": Evil(marker, how)}
    path = tmp_path / "evil.pt"
    if writer == "plain_pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch_zip")
    expected_global = "open" if how == "open" else "posix.system"
    with pytest.raises(UnsafeCheckpointError, match=expected_global) as info:
        load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    assert f"{str(path)!r}" in str(info.value) and "trust_pickle=True" in str(info.value)
    assert any(expected_global in g for g in info.value.unsafe_globals)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ corrupt files


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "torchscript", "pt2"])
def test_truncated_file_is_a_value_error(tmp_path: Path, trained: TinyNet, fmt: str) -> None:
    path = tmp_path / f"m.{fmt}"
    if fmt == "pt":
        torch.save(trained.state_dict(), path)
    elif fmt == "safetensors":
        save_file(trained.state_dict(), str(path))
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.script(trained), str(path))
    else:
        path = tmp_path / "m.pt2"
        _export(trained, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"'{re.escape(str(path))}'.*(truncated or corrupt)") as info:
        load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_unknown_format_and_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.pt"
    path.write_bytes(b"hello, this is not a model")
    with pytest.raises(ValueError, match=r"notes.pt' is not a format kcore reads.*safetensors"):
        load_model(path)
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_model(path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(TypeError, match="getvalue"):
        load_model(123)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ bytes, hashes


def test_bytes_source_equals_path_source(tmp_path: Path, trained: TinyNet) -> None:
    path = tmp_path / "m.safetensors"
    save_file(trained.state_dict(), str(path))
    from_path = load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    from_bytes = load_model(path.read_bytes(), arch=ARCH, num_classes=NUM_CLASSES, name="upload.safetensors")
    assert from_bytes.name == "upload.safetensors"
    assert from_bytes.sha256 == from_path.sha256
    assert from_bytes.kind == from_path.kind == "safetensors"
    assert_same_outputs(from_bytes.model, from_path.model)


def test_sha256_matches_hashlib(tmp_path: Path, trained: TinyNet, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m.pt"
    torch.save(trained.state_dict(), path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(ck, "_CHUNK_BYTES", 100)  # many chunks: the streamed digest must still match
    assert ck.file_sha256(path) == expected
    assert ck.file_sha256(path.read_bytes()) == expected
    loaded = load_model(path, arch=ARCH, num_classes=NUM_CLASSES)
    assert loaded.sha256 == expected and loaded.short_hash == expected[:12]


# ------------------------------------------------------------------------------------------ architectures


def test_build_model_samples_then_torchvision() -> None:
    assert isinstance(architectures.build_model(ARCH, 3), TinyNet)
    resnet = architectures.build_model("resnet18", 7)
    assert resnet.fc.out_features == 7
    names = architectures.available_architectures()
    assert names.index(ARCH) < names.index("resnet18")


def test_unknown_arch_suggests_names() -> None:
    with pytest.raises(ValueError, match=r"arch='resnet81'.*Did you mean 'resnet18'.*available_architectures\(\)"):
        architectures.build_model("resnet81", 10)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        architectures.build_model("resnet18", 0)
