"""Hostile ``.pt2`` archives and safetensors headers: each payload is built at test time and must be refused
before it runs (no file written, no code run, the process's random state untouched), while the models people
export (the sample models, torchvision CNNs and a ViT) still load and list their layers.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from kcore import graph_check
from kcore.checkpoints import SAFETENSORS_MAX_TENSORS, UnsafeCheckpointError, load_model
from kcore.features import list_layers
from kcore.graph_check import GraphFinding, unsafe_operations, unsafe_serialized_values

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
HANG_GUARD_S = 300  # a subprocess that runs longer has hung; not a speed assertion
X = torch.zeros(2, 3, 8, 8)
BATCH = ({0: torch.export.Dim("batch", min=1, max=64)},)
ANY_SIZE = ({0: BATCH[0][0], 2: torch.export.Dim("height", min=4, max=512),
             3: torch.export.Dim("width", min=4, max=512)},)


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _cli_layers(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kcore.cli", "layers", str(path)], env=_env(),
                          capture_output=True, text=True, timeout=HANG_GUARD_S)


def _save(program: torch.export.ExportedProgram, path: Path) -> Path:
    torch.export.save(program, str(path))
    return path


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


# ------------------------------------------------------------------------------------- the from_file writer


class _FileWriter(nn.Module):
    """Maps ``target`` with ``from_file(shared=True)`` and copies 16 bytes of 'A' into it, then runs a conv."""

    def __init__(self, target: Path) -> None:
        super().__init__()
        self.target = str(target)
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.target, shared=True, size=16, dtype=torch.uint8)
        mapped.copy_(torch.full((16,), 65, dtype=torch.uint8))
        return self.conv(x) + mapped.sum() * 0


def _from_file_archive(folder: Path, target: Path) -> Path:
    """Export :class:`_FileWriter`; ``from_file`` has no meta kernel, so one is registered while tracing only."""
    before = target.read_bytes() if target.exists() else None
    lib = torch.library.Library("aten", "IMPL")
    try:
        lib.impl("from_file", lambda filename, shared=None, size=0, **kw: torch.empty(size, dtype=kw.get("dtype"),
                                                                                     device="meta"), "Meta")
        program = torch.export.export(_FileWriter(target), (X,), dynamic_shapes=ANY_SIZE)
    finally:
        lib._destroy()
    assert (target.read_bytes() if target.exists() else None) == before  # tracing ran on meta tensors only
    assert any(n.target is torch.ops.aten.from_file.default for n in program.graph.nodes)
    return _save(program, folder / "writer.pt2")


def test_the_from_file_payload_is_real_and_load_alone_runs_nothing(tmp_path):
    target = tmp_path / "outside" / "planted.pth"
    target.parent.mkdir()
    path = _from_file_archive(tmp_path, target)
    program = torch.export.load(str(path))
    torch.export.unflatten(program)
    assert not target.exists()  # torch.export.load and unflatten only build the graph
    loaded = load_model(path, trust_pickle=True)  # a trusted file is not checked: the dry run writes
    list_layers(loaded.model, (3, 8, 8))
    assert target.read_bytes() == b"A" * 16


def test_from_file_graph_is_refused_through_the_api_and_the_cli(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    new_target, old_target = outside / "new.pth", outside / "old.pth"
    old_target.write_bytes(b"keep me intact!!")
    for target in (new_target, old_target):
        path = _from_file_archive(tmp_path, target)
        for source in (path, path.read_bytes()):
            with pytest.raises(UnsafeCheckpointError) as info:
                load_model(source, name="writer.pt2")
            message = str(info.value)
            assert "aten.from_file.default (node 'from_file'" in message
            assert "reads or writes a file" in message and "trust_pickle=False" in message
            assert "Fix:" in message and "safetensors" in message and "--arch" in message
            assert "aten.from_file.default" in info.value.unsafe_globals
        r = _cli_layers(path)
        assert r.returncode == 2, r.stderr[-1500:]
        assert "from_file" in r.stderr and "Fix:" in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert not new_target.exists()
    assert old_target.read_bytes() == b"keep me intact!!"
    assert sorted(p.name for p in outside.iterdir()) == ["old.pth"]


# ------------------------------------------------------------------------------------- other operations


def _with_node(make) -> torch.export.ExportedProgram:
    """An exported conv whose graph gains the nodes ``make(graph, x)`` adds before its output (never run)."""
    program = torch.export.export(_Conv(), (X,))
    graph = program.graph_module.graph
    x = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "x")
    with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
        make(graph, x)
    return program


def _empty(graph: torch.fx.Graph) -> torch.fx.Node:
    return graph.call_function(torch.ops.aten.zeros.default, ([4],))


HAND_MADE = {
    "aten.set_.source_Tensor": (lambda g, x: g.call_function(torch.ops.aten.set_.source_Tensor, (_empty(g), x)),
                                "points a tensor at other memory"),
    "aten.resize_.default": (lambda g, x: g.call_function(torch.ops.aten.resize_.default, (_empty(g), [1 << 20])),
                             "points a tensor at other memory"),
    "aten.as_strided.default": (lambda g, x: g.call_function(torch.ops.aten.as_strided.default, (x, [4], [1000])),
                                "points a tensor at other memory"),
    "aten.normal_.default": (lambda g, x: g.call_function(torch.ops.aten.normal_.default, (_empty(g),)),
                             "random generator"),
    "aten.rand.default": (lambda g, x: g.call_function(torch.ops.aten.rand.default, ([4],)), "random generator"),
    "aten.empty.memory_format": (lambda g, x: g.call_function(torch.ops.aten.empty.memory_format, ([4],)),
                                 "uninitialised memory"),
    "aten.save.default": (lambda g, x: g.call_function(torch.ops.aten.save.default, (x, "/nonexistent/kcore.pt")),
                          "reads or writes a file"),
    "aten._pin_memory.default": (lambda g, x: g.call_function(torch.ops.aten._pin_memory.default, (x,)),
                                 "file or shared memory"),
    "posix.system": (lambda g, x: g.call_function(os.system, ("touch /nonexistent/kcore",)), "a Python function"),
    "builtins.exec": (lambda g, x: g.call_function(exec, ("import os",)), "a Python function"),
    "prims.add.default": (lambda g, x: g.call_function(torch.ops.prims.add.default, (x, x)),
                          "'prims' namespace"),
    "call_method write": (lambda g, x: g.call_method("write", (x,)), "not a tensor operator"),
}


@pytest.mark.parametrize("operation", sorted(HAND_MADE))
def test_storage_random_and_foreign_operations_are_found(operation):
    make, reason = HAND_MADE[operation]
    findings = unsafe_operations(_with_node(make))
    assert [f.operation for f in findings] == [operation], findings
    assert reason in findings[0].reason and findings[0].graph == "graph"
    assert operation in graph_check.describe_findings(findings)


@torch.library.custom_op("kcore_test::write_note", mutates_args=())
def _write_note(x: torch.Tensor, path: str) -> torch.Tensor:
    Path(path).write_text("written by a custom operator")
    return x.clone()


@_write_note.register_fake
def _(x: torch.Tensor, path: str) -> torch.Tensor:
    return torch.empty_like(x)


class _CustomOp(nn.Module):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = str(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.kcore_test.write_note(x, self.path) * 2


def test_custom_operator_is_refused_and_really_writes_when_trusted(tmp_path):
    note = tmp_path / "note.txt"
    path = _save(torch.export.export(_CustomOp(note), (X,)), tmp_path / "custom.pt2")
    with pytest.raises(UnsafeCheckpointError, match=r"kcore_test\.write_note\.default .*'kcore_test' namespace"):
        load_model(path)
    assert not note.exists()
    trusted = load_model(path, trust_pickle=True)
    trusted.model(X)
    assert note.read_text() == "written by a custom operator"


class _Noisy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


def test_random_operators_are_refused_and_leave_the_random_state_alone(tmp_path):
    path = _save(torch.export.export(_Noisy(), (X,)), tmp_path / "noisy.pt2")
    state = torch.get_rng_state()
    with pytest.raises(UnsafeCheckpointError, match=r"aten\.rand_like\.default.*random generator.*Fix:"):
        load_model(path)
    assert torch.equal(torch.get_rng_state(), state)


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = nn.Conv2d(3, 4, 3), nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x))


def test_dropout_is_accepted_in_eval_mode_only(tmp_path):
    eval_path = _save(torch.export.export(_Dropout().eval(), (X,)), tmp_path / "eval.pt2")
    assert load_model(eval_path).kind == "export"
    train_path = _save(torch.export.export(_Dropout().train(), (X,)), tmp_path / "train.pt2")
    with pytest.raises(UnsafeCheckpointError, match=r"aten\.dropout\.default .*train=True \(exported in training"):
        load_model(train_path)


class _MutatesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.view(-1)[:4].mul_(3)  # through two views
        return x * 2


class _TrainBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)


def test_writes_into_inputs_and_buffers_are_refused():
    findings = unsafe_operations(torch.export.export(_MutatesInput(), (X,)))
    assert [(f.operation, f.reason) for f in findings] == [
        ("aten.mul_.Tensor", "writes into the graph input or constant 'x'")]
    program = torch.export.export(_TrainBatchNorm().train(), (X,))
    operations = {f.operation: f.reason for f in unsafe_operations(program)}
    assert operations["aten.batch_norm.default"].startswith("training=True")
    assert "b_bn_num_batches_tracked" in operations["aten.add_.Tensor"]


class _Branches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda v: v.sin(), lambda v: v + torch.rand_like(v), (x,))


class _Loop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._higher_order_ops.while_loop import while_loop

        return while_loop(lambda i, v: i < 3, lambda i, v: (i + 1, v * 2), (torch.tensor(0), x))[1]


def test_subgraphs_are_checked_and_while_loop_is_refused():
    findings = unsafe_operations(torch.export.export(_Branches(), (X,)))
    assert [(f.operation, f.graph) for f in findings] == [("aten.rand_like.default", "false_graph_0")]
    try:
        loop = torch.export.export(_Loop(), (X,))
    except (torch._dynamo.exc.TorchDynamoException, NotImplementedError) as exc:  # torch.export's own limits
        pytest.skip(f"torch.export cannot trace while_loop on this torch build: {exc}")
    assert [f.operation for f in unsafe_operations(loop)] == ["higher_order.while_loop"]


def test_unsafe_operations_names_its_argument():
    with pytest.raises(TypeError, match=r"program must be a torch\.export\.ExportedProgram .*got _Conv.*Fix:"):
        unsafe_operations(_Conv())


def test_findings_beyond_five_are_counted():
    def many(graph, x):
        for _ in range(7):
            graph.call_function(torch.ops.aten.rand.default, ([4],))

    text = graph_check.describe_findings(unsafe_operations(_with_node(many)))
    assert text.count("aten.rand.default") == 5 and text.endswith("(7 in all)")
    assert GraphFinding("op", "", "", "why").describe() == "op: why"


# ------------------------------------------------------------------------------------- the archive's JSON


def _rewrite_program(data: bytes, edit) -> bytes:
    """The archive with ``edit(program_json_dict)`` applied to its models/model.json."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            member = src.read(info.filename)
            if info.filename.endswith("models/model.json"):
                program = json.loads(member)
                edit(program)
                member = json.dumps(program).encode()
            dst.writestr(info, member)
    return out.getvalue()


def _dynamic_archive() -> bytes:
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(_Conv(), (X,), dynamic_shapes=BATCH), buffer)
    return buffer.getvalue()


def _system_call(marker: Path) -> str:
    """Python that sympify would evaluate: os.system through object's subclasses (index of this process)."""
    index = next(i for i, c in enumerate(object.__subclasses__()) if c.__name__ == "_wrap_close")
    return f"().__class__.__base__.__subclasses__()[{index}].__init__.__globals__['system']('touch {marker}')"


def test_python_in_a_shape_expression_is_refused_before_torch_parses_it(tmp_path):
    marker = tmp_path / "made_by_sympify"
    clean = _dynamic_archive()
    symbols = set()

    def plant(program: dict) -> None:
        def walk(value):
            if isinstance(value, dict):
                for key, item in value.items():
                    if key == "expr_str":
                        symbols.add(item)
                        value[key] = _system_call(marker)
                    else:
                        walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
        walk(program)

    evil = _rewrite_program(clean, plant)
    assert symbols  # the dynamic batch is a symbol in the clean archive, which loads
    assert load_model(clean, name="clean.pt2").kind == "export"
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(evil, name="evil.pt2")
    assert "shape expression" in str(info.value) and "models/model.json" in str(info.value)
    assert not marker.exists()
    # The payload is real: torch.export.load alone runs it (then fails on what it returned).
    with pytest.raises(Exception):  # noqa: B017 - torch's own failure after the payload ran
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()


def test_code_in_guards_is_refused(tmp_path):
    evil = _rewrite_program(_dynamic_archive(), lambda p: p.update(guards_code=["__import__('os').system('id')"]))
    with pytest.raises(UnsafeCheckpointError, match=r"guard .*__import__.*unexpected text"):
        load_model(evil, name="guards.pt2")


@pytest.mark.parametrize("text", [
    "Symbol('s77', positive=True, integer=True)",
    "Mul(Integer(2), Symbol('s0', integer=True))",
    "FloorDiv(Add(Symbol('s0', integer=True), Integer(-1)), Integer(2))",
    "Pow(Symbol('s1', integer=True), Integer(2))",
    "s0*3 + Max(1, u0) // 2",
])
def test_plain_shape_expressions_pass(text):
    assert unsafe_serialized_values({"expr_str": text}) == ()


@pytest.mark.parametrize("text, problem", [
    ("Symbol('a').__class__", "Attribute"),
    ("S('x')", "names 'S'"),
    ("sympify('1')", "names 'sympify'"),
    ("Symbol('s0; import os')", "holds the string"),
    ("Pow(Integer(10), Integer(100000000))", "power above 64"),
    ("Integer(10) ** 99999999", "power above 64"),
    ("[c for c in ()]", "ListComp"),
    ("lambda: 0", "Lambda"),
    ("Symbol(**{})", "unpacks a mapping"),
    ("(" * 400 + "1" + ")" * 400, "not an expression"),
])
def test_python_beyond_sympy_arithmetic_is_named(text, problem):
    found = unsafe_serialized_values({"graph": [{"expr_str": text}]}, member="models/m.json")
    assert len(found) == 1 and "models/m.json" in found[0] and problem in found[0], found


def test_guards_that_compare_sizes_pass():
    guards = ["L['x'].size()[0] <= 64", "(L['x'].size()[0] * 2) % 4 == 0 and L['x'].stride()[1] >= 1"]
    assert unsafe_serialized_values({"guards_code": guards}) == ()


def test_a_program_json_that_inflates_beyond_the_cap_is_refused_unread():
    from kcore.checkpoint_formats import _PT2_MAX_PROGRAM_JSON

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        dst.writestr("m/archive_format", b"pt2")
        dst.writestr("m/models/model.json", b" " * (_PT2_MAX_PROGRAM_JSON + 1))
        dst.writestr("m/data/weights/weight_0", bytes(3 * _PT2_MAX_PROGRAM_JSON))
    assert len(out.getvalue()) < _PT2_MAX_PROGRAM_JSON // 100  # a zip bomb: small upload, big members
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(out.getvalue(), name="bomb.pt2")
    assert f"program models/model.json larger than {_PT2_MAX_PROGRAM_JSON >> 20} MiB" in str(info.value)
    assert f"inflating to {4 * _PT2_MAX_PROGRAM_JSON + 4} bytes from a {len(out.getvalue())}-byte" in str(info.value)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_legacy_entries_beside_a_pt2_folder_are_refused(tmp_path):
    """torch.export.load falls back to the legacy reader (pickles, weights_only=False) for top-level entries."""
    from torch._export.serde.schema import SCHEMA_VERSION

    marker = tmp_path / "made_by_legacy_pickle"
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(_Conv(), (X,)), buffer)
    out = io.BytesIO()
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(out, "w") as dst:
        program = b""
        for info in src.infolist():
            if info.filename.endswith("models/model.json"):
                program = src.read(info.filename)
            elif "sample_inputs" not in info.filename:
                dst.writestr(info, src.read(info.filename))
        dst.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        dst.writestr("serialized_exported_program.json", program)
        for name in ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt"):
            dst.writestr(name, pickle.dumps(_Evil(marker)))
    evil = out.getvalue()
    with pytest.raises(UnsafeCheckpointError, match=r"entries outside the archive's one folder.*serialized_"):
        load_model(evil, name="hybrid.pt2")
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - torch's own failure after the payload ran
        torch.export.load(io.BytesIO(evil))
    assert marker.exists()


# ------------------------------------------------------------------------------------- what must still load


@pytest.mark.parametrize("sample", ["kshapes_resnet_s0", "kshapes_tinynet_s0"])
def test_sample_models_exported_load_and_list_their_layers(tmp_path, sample):
    eager = load_model(SAMPLES / f"{sample}.safetensors")
    size = (3, *eager.card.input_size)
    program = torch.export.export(eager.model, (torch.zeros(2, *size),), dynamic_shapes=BATCH)
    assert unsafe_operations(program) == ()
    assert unsafe_operations(program.run_decompositions()) == ()  # the core-ATen form too
    exported = load_model(_save(program, tmp_path / f"{sample}.pt2"))
    before = {(i.name, i.shape) for i in list_layers(eager.model, size)}
    after = {(i.name, i.shape) for i in list_layers(exported.model, size)}
    assert after <= before and eager.card.default_layer in {name for name, _ in after}
    images = torch.rand(3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported.model(images), eager.model(images))


def _torchvision(name: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def test_resnet18_exported_loads_and_lists_its_layers(tmp_path):
    model = _torchvision("resnet18")
    program = torch.export.export(model, (torch.zeros(2, 3, 64, 64),), dynamic_shapes=BATCH)
    assert unsafe_operations(program.run_decompositions()) == ()
    loaded = load_model(_save(program, tmp_path / "resnet18.pt2"))
    names = {i.name for i in list_layers(loaded.model, (3, 64, 64))}
    assert {"conv1", "layer4.1.conv2", "avgpool"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "vit_b_16"])
def test_torchvision_models_pass_the_graph_check(name):
    program = torch.export.export(_torchvision(name), (torch.zeros(2, 3, 224, 224),), dynamic_shapes=BATCH)
    assert unsafe_operations(program) == ()


# ------------------------------------------------------------------------------------- safetensors headers


def _header_file(entries: int) -> bytes:
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(entries)})
    return struct.pack("<Q", len(header)) + header.encode()


def test_safetensors_header_with_too_many_tensors_is_refused_before_parsing(monkeypatch):
    import safetensors.torch

    def never(*args, **kwargs):
        raise AssertionError("safetensors parsed a header kcore should have refused")

    monkeypatch.setattr(safetensors.torch, "load", never)
    entries = 2 * SAFETENSORS_MAX_TENSORS
    with pytest.raises(ValueError, match=rf"many\.safetensors' lists {entries} tensors .* at most "
                                         rf"{SAFETENSORS_MAX_TENSORS} .*Fix:"):
        load_model(_header_file(entries), name="many.safetensors", arch="kc_tinynet", num_classes=10)


def test_safetensors_header_under_the_cap_reaches_safetensors():
    with pytest.raises(ValueError, match=r"does not match architecture 'kc_tinynet'") as info:
        load_model(_header_file(1000), name="few.safetensors", arch="kc_tinynet", num_classes=10)
    assert "tensors in its safetensors header" not in str(info.value)


# ------------------------------------------------------------------------------------- the dashboard


def test_dashboard_upload_of_the_from_file_graph_is_refused(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    target = tmp_path / "outside" / "planted.pth"
    target.parent.mkdir()
    data = _from_file_archive(tmp_path, target).read_bytes()
    for name in ("KCORE_RUNS_DIR", "KCORE_STUDIES_DIR", "KCORE_EXPORTS_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    at = AppTest.from_file(str(ROOT / "dashboard" / "app.py"), default_timeout=60).run()
    at.segmented_control(key="kc_src_B").set_value("upload").run()
    at.file_uploader(key="kc_upload_B").upload("writer.pt2", data).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("from_file" in e.value and "Fix:" in e.value for e in at.error), [e.value for e in at.error]
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_write_through_getitem_of_a_python_list_is_refused():
    def write(graph, x):
        item = graph.call_function(__import__("operator").getitem, ([x], 0))
        graph.call_function(torch.ops.aten.mul_.Tensor, (item, 3))

    findings = unsafe_operations(_with_node(write))
    assert [f.operation for f in findings] == ["aten.mul_.Tensor"]
    assert findings[0].reason.startswith("writes into the graph input or constant a Python ")  # fx's immutable_list


def _with_input_context(data: bytes, context: str) -> bytes:
    """The archive with the context of its input spec's kwargs node replaced."""
    def edit(program: dict) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1]["context"] = context
        signature["in_spec"] = json.dumps(spec)

    return _rewrite_program(data, edit)


def test_an_input_spec_that_imports_a_module_is_refused(tmp_path, capfd):
    """torch's tree-spec decoder imports the module an "__enum__" object names ('this' prints a poem)."""
    clean = _dynamic_archive()
    evil = _with_input_context(clean, json.dumps([{"__enum__": True, "fqn": "this:d", "name": "a"}]))
    sys.modules.pop("this", None)
    with pytest.raises(UnsafeCheckpointError, match=r"in_spec .*a context holding an object"):
        load_model(evil, name="spec.pt2")
    assert "this" not in sys.modules and "Zen of Python" not in capfd.readouterr().out
    with contextlib.suppress(Exception):  # the payload is real: torch imports the module while loading
        torch.export.load(io.BytesIO(evil))
    assert "this" in sys.modules and "Zen of Python" in capfd.readouterr().out
    defaultdict = _rewrite_program(clean, lambda p: p["graph_module"]["module_call_graph"][0]["signature"].update(
        in_spec=json.dumps([1, {"type": "collections.defaultdict", "context": "{}", "children_spec": []}])))
    with pytest.raises(UnsafeCheckpointError) as info:
        load_model(defaultdict, name="defaultdict.pt2")
    assert any("container type 'collections.defaultdict'" in risk for risk in info.value.unsafe_globals)


def test_plain_specs_pass():
    leaf = {"type": None, "context": None, "children_spec": []}
    spec = [1, {"type": "builtins.tuple", "context": "null", "children_spec": [
        {"type": "builtins.dict", "context": '["logits", "aux"]', "children_spec": [leaf, leaf]}]}]
    assert unsafe_serialized_values({"in_spec": json.dumps(spec), "out_spec": None}) == ()


class _HugeZeros(nn.Module):
    def forward(self, x):
        z = torch.zeros(100_000, 100_000)  # 37 GiB if it ever ran
        return x * z[:1, :1].sum() + x


class _HugeUpsample(nn.Module):
    def forward(self, x):
        return x + nn.functional.interpolate(x, scale_factor=10_000.0).mean()  # 8x8 -> 80 000 x 80 000


def _saved(module: nn.Module, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=2, max=64)
    torch.export.save(torch.export.export(module, (X,), dynamic_shapes=({0: batch},)), path)
    return path


def test_a_graph_whose_tensors_would_exhaust_memory_is_refused_before_it_runs(tmp_path, monkeypatch):
    """Pure operators can still ask for terabytes (a literal zeros, an upsample by 10 000): refused from the graph's
    recorded shapes, before the layer-listing dry run could allocate them."""
    for module, op in ((_HugeZeros(), "aten.zeros"), (_HugeUpsample(), "aten.upsample_nearest2d")):
        path = _saved(module, tmp_path / f"{type(module).__name__}.pt2")
        with pytest.raises(UnsafeCheckpointError, match=r"GiB for one image, more than this server's 8\.0 GiB") as err:
            load_model(path)
        assert op in str(err.value) and "KCORE_MAX_INPUT_BYTES" in str(err.value)
    # the size check reads the cap in force; a small graph passes it, and a tiny cap refuses even that
    small = _saved(_Conv(), tmp_path / "conv.pt2")
    assert load_model(small).kind == "export"
    monkeypatch.setenv("KCORE_MAX_INPUT_BYTES", "64")
    with pytest.raises(UnsafeCheckpointError, match="KCORE_MAX_INPUT_BYTES"):
        load_model(small)
