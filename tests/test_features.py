"""Tests of kcore.features, feature_cache and feature_set: layers, hook hygiene, extraction, the cache."""
from __future__ import annotations

import gc
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kcore import feature_cache as fc
from kcore import features as kf
from kcore.devices import resolve_device
from kcore.feature_cache import CacheKey
from kcore.feature_set import FeaturePair
from kcore.features import extract_features


class TinyNet(nn.Module):
    """Conv -> BN -> in-place ReLU -> conv -> pool -> fc, counting its forward calls."""

    def __init__(self, width: int = 4, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        x = self.relu(self.bn1(self.conv1(x)))
        return self.fc(self.pool(self.conv2(x)).flatten(1))


class WithUnusedBranch(TinyNet):
    """TinyNet plus a ModuleList container and a branch that forward() never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([nn.Conv2d(4, 4, 1)])
        self.unused = nn.Conv2d(4, 4, 1)


class Images(Dataset):
    """Deterministic images made on the fly (so the data set itself holds no memory), labels i % 10."""

    def __init__(self, n: int, size: int = 8) -> None:
        self.n, self.size = n, size
        self.ids = [f"img{i:04d}" for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randn(3, self.size, self.size, generator=g), i % 10


def make_models() -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    a, b = TinyNet(width=4), TinyNet(width=6)
    for model in (a, b):
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.3, 0.3)
            model.bn1.running_var.uniform_(0.5, 2.0)
    return a.eval(), b.eval()


def manual_features(model: TinyNet, x: Tensor, upto: str, *, as_extracted: int | None = None) -> Tensor:
    """The layer outputs computed by hand (no hooks), for known-answer comparisons.

    ``as_extracted=B`` computes them as CPU extraction does (channels-last weights and maps, batches of B), so
    that they can be compared bit for bit: the layout and the batch change float32 rounding on some CPUs (AVX2).
    """
    if as_extracted is not None:
        from kcore.features import _channels_last

        with _channels_last(model, torch.device("cpu")):
            return torch.cat([manual_features(model, x[i : i + as_extracted].contiguous(memory_format=torch.channels_last), upto)
                              for i in range(0, len(x), as_extracted)])
    with torch.no_grad():
        h = model.conv1(x)
        if upto == "conv1":
            return h
        h = model.bn1(h)
        if upto == "bn1":
            return h
        h = model.conv2(torch.relu(h))
        assert upto == "conv2"
        return h


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"pre-forward hook left on {name!r}"


# ------------------------------------------------------------------------------------------ layers


def test_list_layers_shapes_equal_a_real_forward() -> None:
    model, _ = make_models()
    x = torch.randn(2, 3, 8, 8)
    layers = kf.list_layers(model, input_size=(3, 8, 8))
    assert [l.name for l in layers] == ["conv1", "bn1", "relu", "conv2", "pool", "fc"]  # noqa: E741
    by_name = {l.name: l for l in layers}  # noqa: E741
    assert by_name["conv1"] == kf.LayerInfo("conv1", "Conv2d", (4, 8, 8), True)
    assert by_name["fc"] == kf.LayerInfo("fc", "Linear", (5,), False)
    outputs = kf.run_capture(model, x, [l.name for l in layers])  # noqa: E741
    for layer in layers:
        assert outputs[layer.name].shape == (2, *layer.shape)
    assert [l.name for l in kf.list_layers(model, (3, 8, 8), spatial_only=True)] == [  # noqa: E741
        "conv1", "bn1", "relu", "conv2", "pool",
    ]
    assert_no_hooks(model)


def test_list_layers_torchvision_resnet_orders_containers_before_children() -> None:
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=10)
    layers = {l.name: l for l in kf.list_layers(model, (3, 32, 32))}  # noqa: E741
    assert layers["layer3.1"].shape == (256, 2, 2) and layers["layer3.1"].type == "BasicBlock"
    assert layers["layer1.0.relu"].shape == (64, 8, 8)  # a ReLU that runs twice per block
    names = list(layers)
    assert names.index("layer3") < names.index("layer3.0") < names.index("layer3.0.conv1")


def test_list_layers_restores_modes_and_buffers() -> None:
    model, _ = make_models()
    model.train()
    model.conv2.eval()  # mixed modes must come back exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kf.list_layers(model, (3, 8, 8))
    assert model.training and model.bn1.training and not model.conv2.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by the dry run"


def test_list_layers_bad_input_size_says_how_to_fix() -> None:
    model, _ = make_models()
    with pytest.raises(ValueError, match=r"dummy batch of shape \(1, 1, 8, 8\).*input_size=\(C, H, W\)"):
        kf.list_layers(model, (1, 8, 8))
    assert_no_hooks(model)


def test_validate_layer_did_you_mean_and_parameter_hint() -> None:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    assert kf.validate_layer(model, "layer3.1") is model.layer3[1]
    with pytest.raises(ValueError) as info:
        kf.validate_layer(model, "layer3.l")
    msg = str(info.value)
    assert "layer 'layer3.l' not found in ResNet; did you mean 'layer3.1'" in msg
    assert "kcore.features.list_layers(model)" in msg and "`kcore layers CKPT`" in msg
    with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight' is a parameter.*use the module name 'layer1.0.conv1'"):
        kf.validate_layer(model, "layer1.0.conv1.weight")
    with pytest.raises(ValueError, match="did you mean 'layer1.0'"):
        kf.validate_layer(model, "layer1_0")


# ------------------------------------------------------------------------------------------ capture


def test_capture_removes_hooks_also_after_an_exception() -> None:
    model, _ = make_models()
    with torch.no_grad(), kf.capture(model, ["conv1", "fc"]) as feats:
        model(torch.randn(1, 3, 8, 8))
    assert set(feats) == {"conv1", "fc"}
    assert_no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with kf.capture(model, ["conv1"]):
            raise RuntimeError("boom")
    assert_no_hooks(model)
    with pytest.raises(RuntimeError):  # an error inside the forward pass (wrong channel count)
        with kf.capture(model, ["conv2"]):
            model(torch.randn(1, 2, 8, 8))
    assert_no_hooks(model)
    with pytest.raises(ValueError, match="not found"):  # unknown names fail before any hook exists
        with kf.capture(model, ["conv1", "nope"]):
            pass
    assert_no_hooks(model)


def test_capture_keeps_the_training_mode() -> None:
    model, _ = make_models()
    model.train()
    with torch.no_grad(), kf.capture(model, ["conv1"]):
        model(torch.randn(2, 3, 8, 8))
    assert model.training and model.bn1.training
    model.eval()
    kf.run_capture(model, torch.randn(2, 3, 8, 8), ["conv1"])
    assert not model.training


@pytest.fixture(scope="module")
def vgg16_bn() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.vgg16_bn(weights=None).eval()


def test_capture_is_safe_from_inplace_relu(vgg16_bn: nn.Module) -> None:
    """features.2 is ReLU(inplace=True): it overwrites the output of features.1 (BN) unless we clone."""
    assert isinstance(vgg16_bn.features[2], nn.ReLU) and vgg16_bn.features[2].inplace
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = kf.run_capture(vgg16_bn, x, ["features.0", "features.1"], require_spatial=True)
    with torch.no_grad():
        for k in (0, 1):
            expected = vgg16_bn.features[: k + 1](x)
            got = outputs[f"features.{k}"]
            assert (got < 0).any(), f"features.{k} lost its negative values to the in-place ReLU"
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert_no_hooks(vgg16_bn)


def test_layer_that_never_runs_and_non_spatial_layer() -> None:
    model = WithUnusedBranch().eval()
    x = torch.randn(1, 3, 8, 8)
    for name in ("heads", "unused"):
        with pytest.raises(ValueError, match=rf"layer '{name}' did not run during the forward pass"):
            kf.run_capture(model, x, [name])
    assert {"heads", "heads.0", "unused"}.isdisjoint(l.name for l in kf.list_layers(model, (3, 8, 8)))  # noqa: E741
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape \(1, 5\), a feature map \(N, C, H, W\) is needed"):
        kf.run_capture(model, x, ["fc"], require_spatial=True)
    assert_no_hooks(model)


def test_torchscript_models_are_refused_clearly() -> None:
    model, _ = make_models()
    scripted = torch.jit.script(model)
    with pytest.raises(ValueError, match="TorchScript.*state dict or safetensors"):
        kf.list_layers(scripted, (3, 8, 8))
    with pytest.raises(ValueError, match="TorchScript"):
        with kf.capture(scripted, ["conv1"]):
            pass


def test_export_archive_layers_can_be_listed_and_captured(tmp_path: Path) -> None:
    from kcore.checkpoints import load_model

    model, _ = make_models()
    x = torch.randn(2, 3, 8, 8)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except (torch._dynamo.exc.TorchDynamoException, NotImplementedError) as exc:  # torch.export's own limits
        pytest.skip(f"torch.export cannot trace the tiny model on this torch build: {exc}")
    torch.export.save(program, str(tmp_path / "m.pt2"))
    exported = load_model(tmp_path / "m.pt2").model
    names = [l.name for l in kf.list_layers(exported, (3, 8, 8), spatial_only=True)]  # noqa: E741
    assert {"conv1", "bn1", "conv2"} <= set(names)
    got = kf.run_capture(exported, x, ["conv2"])["conv2"]
    torch.testing.assert_close(got, manual_features(model, x, "conv2"))


# ------------------------------------------------------------------------------------------ extraction


def test_extract_equals_manual_forward_for_every_input_kind() -> None:
    model_a, model_b = make_models()
    data = Images(10)
    x_all = torch.stack([data[i][0] for i in range(10)])
    expected_a = manual_features(model_a, x_all, "bn1")
    expected_b = manual_features(model_b, x_all, "conv2")

    pair = extract_features(model_a, "bn1", model_b, "conv2", data, batch_size=4, device="cpu")
    assert isinstance(pair, FeaturePair) and pair.x_a.dtype == torch.float32
    assert pair.x_a.shape == (10, 4, 8, 8) and pair.x_b.shape == (10, 12, 4, 4)
    torch.testing.assert_close(pair.x_a, expected_a)
    torch.testing.assert_close(pair.x_b, expected_b)
    assert (pair.x_a < 0).any()  # bn1 is followed by an in-place ReLU
    assert pair.image_ids == tuple(data.ids)
    assert pair.labels.tolist() == [i % 10 for i in range(10)]

    from_loader = extract_features(model_a, "bn1", model_b, "conv2", DataLoader(data, batch_size=3), device="cpu")
    from_tensor = extract_features(model_a, "bn1", model_b, "conv2", x_all, batch_size=7, device="cpu")
    for other in (from_loader, from_tensor):
        torch.testing.assert_close(other.x_a, pair.x_a)
        torch.testing.assert_close(other.x_b, pair.x_b)
    assert from_loader.labels.tolist() == pair.labels.tolist()
    assert from_tensor.labels is None and from_tensor.image_ids == tuple(str(i) for i in range(10))


def test_extract_same_model_runs_once_per_batch_and_applies_transforms() -> None:
    model, _ = make_models()
    data = Images(6)
    x_all = torch.stack([data[i][0] for i in range(6)])
    model.calls = 0
    pair = extract_features(model, "conv1", model, "conv2", data, batch_size=3, device="cpu")
    assert model.calls == 2
    torch.testing.assert_close(pair.x_b, manual_features(model, x_all, "conv2"))

    double = extract_features(model, "conv1", model, "conv1", data, batch_size=3, device="cpu", transform_b=lambda x: 2 * x)
    torch.testing.assert_close(double.x_b, manual_features(model, 2 * x_all, "conv1"))


def test_extraction_stops_each_forward_after_the_captured_layers_without_changing_them() -> None:
    """After a full first batch, the layers above the captured ones never run; the features are the same."""
    model_a, model_b = make_models()
    data = Images(12)
    x_all = torch.stack([data[i][0] for i in range(12)])
    ran = {"fc": 0, "relu": 0}
    hooks = [model_a.fc.register_forward_hook(lambda *_: ran.__setitem__("fc", ran["fc"] + 1)),
             model_a.relu.register_forward_hook(lambda *_: ran.__setitem__("relu", ran["relu"] + 1))]
    try:
        pair = extract_features(model_a, "bn1", model_b, "conv2", data, batch_size=4, device="cpu")
    finally:
        for h in hooks:
            h.remove()
    assert ran == {"fc": 1, "relu": 1}  # three batches: only the first ran past bn1
    torch.testing.assert_close(pair.x_a, manual_features(model_a, x_all, "bn1", as_extracted=4), rtol=0, atol=0)
    torch.testing.assert_close(pair.x_b, manual_features(model_b, x_all, "conv2", as_extracted=4), rtol=0, atol=0)


class ReusedReLU(TinyNet):
    """One ReLU module called twice per forward: its output is the second call's."""

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x) - 0.1)
        return self.fc(self.pool(x).flatten(1))


def test_a_layer_that_runs_twice_keeps_its_last_output_in_every_batch() -> None:
    """No early stop for a module that runs more than once: every batch keeps the last call's output."""
    torch.manual_seed(0)
    model = ReusedReLU(width=4).eval()
    data = Images(9)
    x_all = torch.stack([data[i][0] for i in range(9)])
    with torch.no_grad():
        expected = torch.relu(model.conv2(torch.relu(model.bn1(model.conv1(x_all)))) - 0.1)
    pair = extract_features(model, "relu", model, "conv1", data, batch_size=3, device="cpu")
    assert pair.x_a.shape == (9, 8, 4, 4)
    torch.testing.assert_close(pair.x_a, expected)


def test_extraction_gives_the_weights_back_in_their_layout() -> None:
    """Extraction runs convolutions channels-last on the CPU; the caller's weights come back as they were."""
    model_a, model_b = make_models()
    model_b.to(memory_format=torch.channels_last)  # a model the caller keeps channels-last stays so
    data = Images(6)
    pair = extract_features(model_a, "conv2", model_b, "conv2", data, batch_size=3, device="cpu")
    assert model_a.conv1.weight.is_contiguous() and model_a.conv2.weight.is_contiguous()
    assert model_b.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model_b.conv2.weight.is_contiguous()
    x_all = torch.stack([data[i][0] for i in range(6)])
    torch.testing.assert_close(pair.x_a, manual_features(model_a, x_all, "conv2"))


def test_extract_restores_modes_and_device_and_leaves_no_hooks() -> None:
    model_a, model_b = make_models()
    model_a.train()
    before = {k: v.clone() for k, v in model_a.state_dict().items()}
    extract_features(model_a, "conv1", model_b, "conv2", Images(4), device="auto")
    assert model_a.training and not model_b.training
    assert next(model_a.parameters()).device.type == "cpu"
    for key, value in model_a.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed: extraction must run in eval mode"
    assert_no_hooks(model_a)
    assert_no_hooks(model_b)


def test_extract_rejects_bad_layers_and_inputs() -> None:
    model_a, model_b = make_models()
    with pytest.raises(ValueError, match="did you mean 'conv1'"):
        extract_features(model_a, "conv_1", model_b, "conv2", Images(2))
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape \(2, 5\)"):
        extract_features(model_a, "fc", model_b, "conv2", Images(2))
    with pytest.raises(ValueError, match="float tensor"):
        extract_features(model_a, "conv1", model_b, "conv2", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="yielded no images"):
        extract_features(model_a, "conv1", model_b, "conv2", [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        extract_features(model_a, "conv1", model_b, "conv2", Images(2), batch_size=0)
    assert_no_hooks(model_a)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='auto' or device='cpu'"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------------------ cache


def key(name: str = "set") -> CacheKey:
    return CacheKey(checkpoint_a="a" * 64, checkpoint_b="b" * 64, image_set=name, transform="none")


def test_cache_hit_returns_identical_features_without_running_models(tmp_path: Path) -> None:
    model_a, model_b = make_models()
    data = Images(10)
    x_all = torch.stack([data[i][0] for i in range(10)])
    first = extract_features(model_a, "bn1", model_b, "conv2", data, batch_size=4, cache_dir=tmp_path, cache_key=key())
    assert first.x_a.dtype == torch.float16 and first.x_b.dtype == torch.float16
    # Cached features are the float32 features rounded to float16.
    assert torch.equal(first.x_a, manual_features(model_a, x_all, "bn1", as_extracted=4).half())
    assert torch.equal(first.x_b, manual_features(model_b, x_all, "conv2", as_extracted=4).half())
    assert first.image_ids == tuple(data.ids) and first.labels.tolist() == [i % 10 for i in range(10)]
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temporary folder left
    assert {p.name for p in entries[0].iterdir()} == {"x_a.npy", "x_b.npy", "labels.npy", "ids.json", "meta.json"}

    model_a.calls = model_b.calls = 0
    second = extract_features(model_a, "bn1", model_b, "conv2", data, batch_size=4, cache_dir=tmp_path, cache_key=key())
    assert model_a.calls == 0 and model_b.calls == 0
    assert torch.equal(second.x_a, first.x_a) and torch.equal(second.x_b, first.x_b)
    assert second.image_ids == first.image_ids and torch.equal(second.labels, first.labels)

    loaded = fc.load_cached_features(tmp_path, key(), "bn1", "conv2")
    assert loaded is not None and torch.equal(loaded.x_a, first.x_a)
    batches = list(loaded.iter_batches(batch_size=4))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2] and batches[0][0].dtype == torch.float32
    assert fc.load_cached_features(tmp_path, key(), "bn1", "conv1") is None  # other layer: other entry
    assert fc.load_cached_features(tmp_path, key("other"), "bn1", "conv2") is None
    assert fc.load_cached_features(tmp_path, key(), "bn1", "conv2", cache_key_extra="224px") is None


def test_cache_from_an_iterable_of_unknown_length(tmp_path: Path) -> None:
    model_a, model_b = make_models()
    data = Images(9)
    loader = (batch for batch in DataLoader(data, batch_size=4))  # a generator: its length is unknown
    cached = extract_features(model_a, "conv1", model_b, "conv2", loader, cache_dir=tmp_path, cache_key="my-key")
    in_memory = extract_features(model_a, "conv1", model_b, "conv2", data, batch_size=4)
    assert torch.equal(cached.x_a, in_memory.x_a.half()) and torch.equal(cached.x_b, in_memory.x_b.half())
    assert [p.name for p in next(tmp_path.iterdir()).iterdir() if "part" in p.name] == []


def test_cancel_leaves_no_cache_entry(tmp_path: Path) -> None:
    model_a, model_b = make_models()
    stop = threading.Event()
    seen: list[tuple[int, int | None]] = []

    def progress(done: int, total: int | None) -> None:
        seen.append((done, total))
        if done >= 4:
            stop.set()

    with pytest.raises(kf.ExtractionCancelled, match="after 4 images"):
        extract_features(
            model_a, "conv1", model_b, "conv2", Images(12), batch_size=2,
            cache_dir=tmp_path, cache_key=key(), progress=progress, cancel=stop,
        )
    assert seen == [(2, 12), (4, 12)]
    assert list(tmp_path.iterdir()) == []
    assert_no_hooks(model_a)


def test_cache_needs_a_key_and_float16_range(tmp_path: Path) -> None:
    model_a, model_b = make_models()
    with pytest.raises(ValueError, match="cache_key is None.*CacheKey"):
        extract_features(model_a, "conv1", model_b, "conv2", Images(2), cache_dir=tmp_path)
    huge = torch.full((2, 3, 8, 8), 1e5)
    with pytest.raises(ValueError, match="beyond float16.*cache_dir=None"):
        extract_features(model_a, "conv1", model_b, "conv2", huge, cache_dir=tmp_path, cache_key=key())
    assert list(tmp_path.iterdir()) == []


def test_size_estimate_and_format() -> None:
    assert kf.estimate_feature_bytes(10, (4, 8, 8), (2, 4, 4), dtype_bytes=2) == 10 * (256 + 32) * 2
    assert kf.format_bytes(512) == "512 B"
    assert kf.format_bytes(1536) == "1.5 KiB"
    assert kf.format_bytes(3 * 1024**3) == "3.0 GiB"


def _live_tensor_bytes() -> int:
    """Bytes of all distinct CPU tensor storages reachable as Python objects right now."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        # Exact types: subclasses such as FakeTensor (left over from torch.export) have no real storage.
        if type(obj) in (Tensor, nn.Parameter) and obj.device.type == "cpu":
            storage = obj.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _measure(n: int, cache_dir: Path | None) -> tuple[int, int]:
    """Extract n images; return (max live tensor bytes at batch ends, tracemalloc peak of the run)."""
    model_a, model_b = TinyNet(width=16).eval(), TinyNet(width=8).eval()
    live: list[int] = []
    peak = 0

    def progress(done: int, total: int | None) -> None:
        nonlocal peak
        peak = max(peak, tracemalloc.get_traced_memory()[1])  # before the scan, which allocates itself
        live.append(_live_tensor_bytes())
        tracemalloc.reset_peak()

    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        extract_features(
            model_a, "conv1", model_b, "conv1", Images(n, size=16), batch_size=64, device="cpu",
            cache_dir=cache_dir, cache_key=None if cache_dir is None else key(str(n)), progress=progress,
        )
        peak = max(peak, tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()
    return max(live), peak - base


def test_cache_path_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """Bounded memory, measured two ways at the end of every batch and compared between N=64 and N=512.

    - Live tensor bytes: the distinct storages of every CPU tensor the garbage collector can see (features
      gathered in torch tensors would show up here).
    - tracemalloc peak: numpy registers its buffers with tracemalloc, so features gathered in numpy arrays
      would show up here (memory-mapped pages are not allocations and do not).
    Features of 512 images are 512·(16+8)·16·16·2 B = 6 MiB in float16; the allowed growth is 1 MiB.
    The in-memory path is the positive control: its live tensor bytes must grow by the float32 size.
    """
    _measure(8, tmp_path / "warmup")  # one-time allocations (imports, caches) happen here
    live_small, peak_small = _measure(64, tmp_path / "small")
    live_large, peak_large = _measure(512, tmp_path / "large")
    budget = 1 << 20
    assert live_large - live_small < budget, (live_small, live_large)
    assert peak_large - peak_small < budget, (peak_small, peak_large)

    live_small_mem, _ = _measure(64, None)
    live_large_mem, _ = _measure(512, None)
    grown = live_large_mem - live_small_mem
    assert grown >= 0.9 * kf.estimate_feature_bytes(448, (16, 16, 16), (8, 16, 16), dtype_bytes=4), grown


def test_cache_path_resident_memory_stays_flat_over_thousands_of_images(tmp_path: Path) -> None:
    """The process's resident set (what the OS counts, heap fragmentation and mapped pages included) after
    1024 images and after 4096 images of one extraction with the disk cache differ by less than 24 MiB.

    The 3072 images in between make 3072·2·(32·16·16)·2 B = 96 MiB of float16 features and 144 MiB of input
    images. Two ways memory used to grow here: writing the cache through a shared memory map kept every written
    page resident, and a small labels tensor kept per batch pinned each freed batch of images in the heap
    (48 KiB per image), though no live object held them.
    """
    from bench.common import proc_status
    from kcore.zoo import DEFAULT_LAYERS, kc_resnet, kc_tinynet

    if "VmRSS" not in proc_status():
        pytest.skip("needs /proc/self/status")

    torch.manual_seed(0)
    a, b = kc_tinynet(10), kc_resnet(10)
    rss: dict[int, int] = {}

    def progress(done: int, total: int | None) -> None:
        if done in (1024, 4096):
            rss[done] = proc_status()["VmRSS"]

    feats = extract_features(
        a, DEFAULT_LAYERS["kc_tinynet"].name, b, DEFAULT_LAYERS["kc_resnet"].name, Images(4096, size=64),
        batch_size=64, device="cpu", cache_dir=tmp_path, cache_key="flat", progress=progress,
    )
    assert feats.x_a.shape == (4096, 32, 16, 16) and feats.x_b.shape == (4096, 32, 16, 16)
    assert rss[4096] - rss[1024] < 24 << 20, {k: v >> 20 for k, v in rss.items()}


@pytest.mark.needs_cuda
def test_extract_on_cuda_matches_cpu_and_gives_models_back_on_cpu() -> None:
    model_a, model_b = make_models()
    on_cpu = extract_features(model_a, "bn1", model_b, "conv2", Images(6), batch_size=4, device="cpu")
    on_gpu = extract_features(model_a, "bn1", model_b, "conv2", Images(6), batch_size=4, device="cuda")
    assert on_gpu.x_a.device.type == "cpu" and on_gpu.x_a.dtype == torch.float32
    torch.testing.assert_close(on_gpu.x_a, on_cpu.x_a, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(on_gpu.x_b, on_cpu.x_b, rtol=1e-3, atol=1e-4)
    assert next(model_a.parameters()).device.type == "cpu" and next(model_b.parameters()).device.type == "cpu"
