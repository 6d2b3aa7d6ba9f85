"""``.pt2`` models exported with a fixed or a dynamic batch: layer listing, extraction, compare() and baselines.

``torch.export`` fixes the batch size unless a dynamic batch is asked for; kcore feeds such a program batches
of exactly that size (the last one padded). The random-init B of an exported program is a re-initialised copy
(its symbolic graph metadata cannot be deep-copied), and a baseline that fails never loses the finished fit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from helpers import loaded, open_run_folder, tiny_net
from kcore import baselines as kb
from kcore.capture import run_capture
from kcore.checkpoints import load_model
from kcore.features import extract_features, list_layers
from kcore.layers import fixed_batch_size

FIXED = 4
SIZE = 16


def _export(tmp_path: Path, name: str, seed: int, dynamic: bool) -> Path:
    """Export ``tiny_net(seed)`` with a fixed batch of FIXED or a dynamic batch, save it, return the path."""
    net = tiny_net(seed)
    x = torch.rand(FIXED, 3, SIZE, SIZE)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
    try:
        program = torch.export.export(net, (x,), dynamic_shapes=shapes)
    except (torch._dynamo.exc.TorchDynamoException, NotImplementedError) as exc:  # torch.export's own limits
        pytest.skip(f"torch.export cannot trace the tiny model on this torch build: {exc}")
    path = tmp_path / name
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def pt2_files(tmp_path_factory):
    """Paths of tiny_net(0) exported with a fixed batch of FIXED, tiny_net(1) fixed, and tiny_net(0) dynamic."""
    d = tmp_path_factory.mktemp("pt2")
    return {"fixed": _export(d, "fixed.pt2", 0, False), "fixed_b": _export(d, "fixed_b.pt2", 1, False),
            "dynamic": _export(d, "dynamic.pt2", 0, True)}


def _eager_features(seed: int, x: torch.Tensor, layer: str = "2") -> torch.Tensor:
    return run_capture(tiny_net(seed), x, [layer])[layer]


def test_the_fixed_batch_size_is_read_from_the_program(pt2_files):
    assert fixed_batch_size(load_model(pt2_files["fixed"]).model) == FIXED
    assert fixed_batch_size(load_model(pt2_files["dynamic"]).model) is None
    assert fixed_batch_size(tiny_net(0)) is None


def test_a_fixed_batch_program_refuses_other_batch_sizes_on_its_own(pt2_files):
    # the problem kcore works around: the program itself accepts only its batch size
    model = load_model(pt2_files["fixed"]).model
    with pytest.raises(Exception):  # noqa: B017 - torch's guard error type differs between versions
        model(torch.rand(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_layer_listing_works_for_fixed_and_dynamic_batches(pt2_files, kind):
    layers = {info.name: info.shape for info in list_layers(load_model(pt2_files[kind]).model, (3, SIZE, SIZE))}
    assert layers["2"] == (6, SIZE, SIZE) and layers["6"] == (3,)


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
@pytest.mark.parametrize("batch_size", [1, 3, FIXED, 10])
def test_extraction_equals_the_eager_model_for_any_batch_size(pt2_files, kind, batch_size):
    m = load_model(pt2_files[kind])
    x = torch.rand(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    pair = extract_features(m.model, "2", m.model, "0", x, batch_size=batch_size, device="cpu")
    same = extract_features(m.model, "2", m.model, "2", x, batch_size=batch_size, device="cpu")  # one layer twice
    torch.testing.assert_close(same.x_b, same.x_a)
    assert pair.x_a.shape == (10, 6, SIZE, SIZE)
    torch.testing.assert_close(pair.x_a, _eager_features(0, x, "2"))
    torch.testing.assert_close(pair.x_b, _eager_features(0, x, "0"))


def test_run_capture_pads_the_last_chunk_and_drops_the_padding(pt2_files):
    model = load_model(pt2_files["fixed"]).model
    x = torch.rand(FIXED + 1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    calls: dict[str, int] = {}
    got = run_capture(model, x, ["2", "6"], calls=calls)
    assert got["2"].shape[0] == FIXED + 1 and got["6"].shape == (FIXED + 1, 3)
    torch.testing.assert_close(got["6"], tiny_net(0)(x))
    assert calls == {"2": 1, "6": 1}


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_every_parameter_of_the_random_b_of_a_pt2_differs_and_b_is_untouched(pt2_files, kind):
    b = load_model(pt2_files[kind])
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    rand, how = kb.random_init_like(b, seed=3)
    again, _ = kb.random_init_like(b, seed=3)
    trained = dict(b.model.named_parameters())
    params = dict(rand.model.named_parameters())
    assert set(params) == set(trained) and len(params) == 6
    for name, p in params.items():
        assert p.shape == trained[name].shape
        assert not (p == trained[name]).any(), name  # every element re-drawn
        assert torch.equal(p, dict(again.model.named_parameters())[name])  # seeded
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in before.items())  # the trained B is untouched
    assert "re-drawn by shape" in how and rand.sha256 != b.sha256
    x = torch.rand(FIXED, 3, SIZE, SIZE)
    assert not torch.allclose(rand.model(x), b.model(x))
    assert fixed_batch_size(rand.model) == fixed_batch_size(b.model)


def test_every_parameter_of_the_random_b_of_a_torchvision_model_differs():
    from kcore.architectures import build_model

    torch.manual_seed(11)
    net = build_model("resnet18", 5).eval()
    with torch.no_grad():  # "trained": no parameter keeps torch's initial value (norm scales 1, shifts 0)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = dataclasses.replace(loaded(net, "r18.safetensors"), architecture="resnet18", num_classes=5)
    rand, how = kb.random_init_like(b, seed=0)
    trained = dict(b.model.named_parameters())
    params = dict(rand.model.named_parameters())
    assert set(params) == set(trained)
    for name, p in params.items():  # every parameter differs (a float32 coincidence in millions of draws aside)
        assert (p == trained[name]).float().mean() < 1e-4, name
    assert kb.changed_share(b.model, rand.model) > 0.9999 and "built as resnet18" in how


def test_a_random_b_that_did_not_change_is_refused(pt2_files, monkeypatch):
    b = load_model(pt2_files["fixed"])
    monkeypatch.setattr(kb, "_reinitialise", lambda net: 0)
    with pytest.raises(ValueError) as err:
        kb.random_init_like(b, seed=0)
    msg = str(err.value)
    assert "fixed.pt2" in msg and "changed only 0.0%" in msg and "at least 90%" in msg and "Fix:" in msg


def test_changed_share_counts_elements():
    a, b = tiny_net(0), tiny_net(0)
    assert kb.changed_share(a, b) == 0.0
    with torch.no_grad():
        b[0].weight[0].add_(1.0)  # 27 of the parameters' elements
    total = sum(p.numel() for p in a.parameters())
    assert kb.changed_share(a, b) == pytest.approx(27 / total)


def test_compare_with_baselines_works_for_fixed_batch_pt2_models(pt2_files, random_images, tmp_path):
    from kcore.pipeline import compare, read_run, write_run

    a, b = load_model(pt2_files["fixed"]), load_model(pt2_files["fixed_b"])
    images = random_images(30, SIZE)
    comp = compare(a, "2", b, "2", images, orders=1, epochs=2, baselines=True, batch_size=7)
    assert set(comp.baselines) == {"random_b", "shuffled"}
    assert "baselines_failed" not in comp.provenance and "baselines_skipped" not in comp.provenance
    x = torch.stack([images[i][0] for i in range(len(images))])
    torch.testing.assert_close(comp.features.x_b, _eager_features(1, x))
    back = read_run(write_run(comp, tmp_path / "run"))
    assert set(back.baselines) == {"random_b", "shuffled"}


def _fail(*args, **kwargs):
    raise RuntimeError("planted failure of the random network")


def test_a_failing_baseline_keeps_the_fit_and_records_the_failure(random_images, tmp_path, monkeypatch):
    from kcore.pipeline import compare, read_run, write_run

    monkeypatch.setattr(kb, "random_init_like", _fail)
    a, b = loaded(tiny_net(0), "a.pt"), loaded(tiny_net(1, width=5), "b.pt")
    comp = compare(a, "2", b, "2", random_images(), orders=1, epochs=2, baselines=True)
    assert set(comp.baselines) == {"shuffled"} and "A_to_B" in comp.directions
    assert comp.provenance["baselines_failed"] == {"random_b": "RuntimeError: planted failure of the random network"}
    run = write_run(comp, tmp_path / "run")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["baselines_failed"]["random_b"].startswith("RuntimeError: planted")
    assert json.loads((run / "provenance.json").read_text())["baselines_failed"] == comp.provenance["baselines_failed"]
    assert read_run(run).directions["A_to_B"].fit.heldout_report == comp.directions["A_to_B"].fit.heldout_report
    # the dashboard says so on the Overview of that run folder (a warning naming the baseline and the error)
    import sys

    from streamlit.testing.v1 import AppTest

    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    monkeypatch.setenv("KCORE_RUNS_DIR", str(tmp_path))
    at = AppTest.from_file(str(root / "dashboard" / "app.py"), default_timeout=60).run()
    open_run_folder(at, run, "overview")
    assert not at.exception, [e.value for e in at.exception]
    warnings = [w.value for w in at.warning]
    assert any(w.startswith("Chance baseline random-init B failed: RuntimeError: planted failure") for w in warnings)
    assert not any("shuffled pairs failed" in w for w in warnings)


def test_the_cli_writes_the_fit_and_exits_3_when_a_baseline_fails(pt2_files, tmp_path, monkeypatch, capsys):
    from kcore.cli import EXIT_BASELINE_FAILED, main

    assert EXIT_BASELINE_FAILED == 3
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "3 the fit is written to RUN_DIR but a chance" in " ".join(capsys.readouterr().out.split())
    monkeypatch.setattr(kb, "random_init_like", _fail)
    out = tmp_path / "run"
    rc = main(["fit", "--a", str(pt2_files["fixed"]), "--b", str(pt2_files["fixed_b"]), "--layer-a", "2",
               "--layer-b", "2", "--input-size-a", str(SIZE), str(SIZE), "--input-size-b", str(SIZE), str(SIZE),
               "--data", "kshapes", "--n-images", "40", "--epochs", "2", "--orders", "1", "--baselines",
               "--batch-size", "6", "--out", str(out)])
    assert rc == EXIT_BASELINE_FAILED
    err = capsys.readouterr().err
    assert "chance baseline random_b failed" in err and "planted failure" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert "A_to_B" in metrics["directions"] and "shuffled" in metrics["baselines"]
    assert "planted failure" in metrics["baselines_failed"]["random_b"]
    assert (out / "g_A_to_B" / "g.safetensors").is_file()
