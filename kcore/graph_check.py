"""What a ``torch.export`` graph (a ``.pt2`` archive) may do before kcore runs it: pure tensor computations only.

A ``.pt2`` archive with no pickle and no compiled code still carries a graph of operator calls, and the dry run
that lists its layers runs them. An operator such as ``aten.from_file(path, shared=True)`` maps a file into a
tensor, so a graph that copies a weight into it writes a file of any name. kcore therefore accepts a graph only
when every node, in the top graph and in every subgraph that a control-flow operator calls, is one of:

- an ATen operator whose overload packet is in :data:`ALLOWED_ATEN_OPS` (convolution, matrix products, pooling,
  normalisation, activations, views and reshapes, element-wise arithmetic, reductions, tensor factories that only
  allocate, shape bookkeeping), or the in-place (``name_``) form of one of them;
- a dropout in :data:`EVAL_ONLY_OPS` whose ``train`` argument is ``False`` (it is then the identity; with
  ``True`` it draws from the process's random generator), and a batch norm whose ``training`` argument is
  ``False`` (with ``True`` it updates its running statistics at every call);
- a Python function in :data:`ALLOWED_PYTHON_CALLS` (``operator.getitem`` and the arithmetic torch.export uses on
  symbolic sizes);
- a higher-order operator in :data:`ALLOWED_HIGHER_ORDER_OPS` (``cond``, ``map_impl``, the grad-mode and autocast
  wrappers, ``invoke_subgraph``, ``scan``), whose subgraphs are checked in turn. ``while_loop`` is refused: a loop
  whose condition never turns false would hold the server forever.

Everything else is refused: file and storage operators (``from_file``, ``set_``, ``resize_``, ``as_strided``,
pinned or shared memory), uninitialised allocations (``empty*``: their values are whatever the allocator's memory
held, possibly another session's data), random operators (``rand*``, ``bernoulli``, ``normal``, ``uniform_``,
``multinomial``, ...), operators of any other namespace (``prims``, ``quantized``, custom operators registered with
``torch.library``), ``call_module``/``call_method`` nodes and any other Python callable (the archive format
resolves a target such as ``torch.os.system`` by attribute lookup).

A node whose output alone would take more memory than a whole model input may (``KCORE_MAX_INPUT_BYTES``,
counting the sizes the graph fixes: ``zeros`` of a huge literal size, an upsample by 10 000) is refused too: pure, but
the dry run would exhaust the server's memory.

Besides the operators, a graph must not write into its inputs, parameters, buffers or constants (an in-place
operator whose target is, through views, a graph input): results would depend on how often the model ran, and the
caller's image batch would change under it. Its signature may take only user inputs, parameters, buffers and
constant tensors (no script objects, no effect tokens), and return only user outputs (no buffer, parameter or input
mutations: export the model in eval mode).

The archive's JSON is also checked before ``torch.export.load`` reads it (:func:`unsafe_serialized_values`):
``torch.export.load`` parses each symbolic-shape expression with ``sympy.sympify``, which evaluates Python, so
an expression must be a plain arithmetic of sympy constructors and symbol names; the input and output tree specs,
which it reads with a decoder that imports the modules they name, must hold plain containers (tuple, list, dict)
of plain keys; and guard expressions, which ``ExportedProgram.module()`` would ``exec``, must be plain comparisons
of input sizes.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

MAX_LISTED = 5
"""How many findings an error message names before it gives the count."""

ALLOWED_ATEN_OPS: frozenset[str] = frozenset(
    {
        # convolution and matrix products
        "conv1d", "conv2d", "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
        "conv_transpose3d", "linear", "matmul", "mm", "bmm", "addmm", "addmv", "addbmm", "baddbmm", "mv", "dot",
        "outer", "einsum",
        # pooling and resampling
        "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
        "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "upsample_nearest1d",
        "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d",
        "upsample_bicubic2d", "upsample_trilinear3d", "pixel_shuffle", "pixel_unshuffle", "channel_shuffle",
        "native_channel_shuffle",
        # normalisation (batch norm's training flag is checked, see EVAL_ONLY_OPS)
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training", "layer_norm",
        "native_layer_norm", "group_norm", "native_group_norm", "instance_norm", "rms_norm", "_fused_rms_norm",
        # activations, softmax, attention
        "relu", "relu6", "hardtanh", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid",
        "hardsigmoid", "hardswish", "tanh", "softplus", "prelu", "_prelu_kernel", "glu", "threshold",
        "log_sigmoid", "log_sigmoid_forward", "softmax", "_softmax", "log_softmax", "_log_softmax",
        "_safe_softmax", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        # views, reshapes, joins, padding, indexing
        "view", "_unsafe_view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute",
        "transpose", "t", "expand", "expand_as", "squeeze", "unsqueeze", "select", "slice", "narrow", "split",
        "split_with_sizes", "chunk", "unbind", "tensor_split", "movedim", "alias", "detach", "contiguous",
        "clone", "lift_fresh_copy", "cat", "concat", "concatenate", "stack", "flip", "roll", "repeat", "tile",
        "pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
        "replication_pad1d", "replication_pad2d", "replication_pad3d", "index_select", "gather", "index",
        "where", "masked_fill", "tril", "triu", "embedding", "one_hot", "slice_scatter", "select_scatter",
        # dtype conversion, copies and filled new tensors (not ``empty*``: uninitialised memory could show what
        # another session left there)
        "_to_copy", "to", "type_as", "copy", "fill", "zeros", "zeros_like", "ones", "ones_like", "full",
        "full_like", "new_zeros", "new_ones", "new_full", "arange", "linspace", "eye", "scalar_tensor",
        # element-wise arithmetic and comparisons
        "add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "remainder", "fmod", "neg", "abs",
        "pow", "sqrt", "rsqrt", "exp", "exp2", "log", "log2", "log10", "log1p", "expm1", "reciprocal", "sin",
        "cos", "tan", "erf", "sign", "floor", "ceil", "round", "trunc", "frac", "clamp", "clamp_min",
        "clamp_max", "clip", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
        "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor",
        "addcmul", "addcdiv", "lerp", "square", "isnan", "isinf", "isfinite", "nan_to_num",
        # reductions
        "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "prod", "var", "var_mean", "std",
        "std_mean", "norm", "linalg_vector_norm", "logsumexp", "cumsum", "any", "all", "topk", "sort",
        # shape bookkeeping and scalar reads (no data leaves the process)
        "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_assert_scalar", "_assert_async",
        "_functional_assert_async", "sym_constrain_range", "sym_constrain_range_for_size",
        "_functional_sym_constrain_range", "_assert_tensor_metadata", "item", "_local_scalar_dense",
    }
)
"""ATen overload packets (``torch.ops.aten.<name>``) a graph may call; each name also allows its ``name_`` form.

None of their in-place forms touches storage other than its own argument: ``set_``, ``resize_``, ``as_strided``,
the random ``*_`` fills (``uniform_``, ``normal_``, ``bernoulli_``, ``random_``, ``exponential_``) are absent by
design. The ``_unsafe_*`` operators other than ``_unsafe_view`` skip bounds checks and are refused.
"""

EVAL_ONLY_OPS: dict[str, str] = {
    "dropout": "train",
    "feature_dropout": "train",
    "alpha_dropout": "train",
    "feature_alpha_dropout": "train",
    "native_dropout": "train",
    "batch_norm": "training",
    "native_batch_norm": "training",
}
"""Operators allowed only when the named argument is ``False`` (the graph was exported in eval mode)."""

ALLOWED_PYTHON_CALLS: frozenset[object] = frozenset(
    {
        operator.getitem, operator.eq, operator.ne, operator.le, operator.ge, operator.lt, operator.gt,
        operator.neg, operator.pos, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
        operator.pow, operator.truediv, operator.and_, operator.or_, operator.lshift, operator.rshift, math.trunc,
        torch.sym_not, torch.sym_int, torch.sym_float, torch.sym_ite, torch.sym_max, torch.sym_min,
    }
    | {f for f in (getattr(torch, "sym_sqrt", None), getattr(torch, "_sym_sqrt", None)) if f is not None}
)
"""Python functions a graph may call: tuple indexing and arithmetic on symbolic sizes (torch.export's own)."""

ALLOWED_HIGHER_ORDER_OPS: frozenset[str] = frozenset(
    {"cond", "map_impl", "wrap_with_set_grad_enabled", "wrap_with_autocast", "invoke_subgraph", "scan"}
)
"""Higher-order operators (``torch.ops.higher_order.<name>``) whose subgraphs kcore checks and then accepts."""

_FILE_OPS = frozenset({"from_file", "save", "_pin_memory", "pin_memory"})  # aten::save(t item, str filename)
_STORAGE_OPS = frozenset({"set_", "resize_", "resize_as_", "as_strided", "as_strided_", "_reshape_alias"})
_RANDOM_OPS = frozenset(
    {
        "rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "bernoulli", "bernoulli_",
        "normal", "normal_", "uniform", "uniform_", "multinomial", "poisson", "exponential_", "geometric_",
        "cauchy_", "log_normal_", "random_", "rrelu", "rrelu_with_noise", "_fused_dropout", "seed", "manual_seed",
    }
)
_UNINITIALISED_OPS = frozenset(
    {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}
)
_INPUT_KINDS = frozenset({"USER_INPUT", "PARAMETER", "BUFFER", "CONSTANT_TENSOR"})
_OUTPUT_KINDS = frozenset({"USER_OUTPUT"})


@dataclass(frozen=True)
class GraphFinding:
    """One thing in an exported program that kcore does not run from an untrusted file.

    Attributes:
        operation: the operator or construct, e.g. ``"aten.from_file.default"`` or ``"signature: BUFFER_MUTATION"``.
        node: the graph node's name (empty for signature findings).
        graph: where the node sits: ``"graph"`` for the top graph, else the subgraph's attribute path.
        reason: why it is refused, in a few words.
    """

    operation: str
    node: str
    graph: str
    reason: str

    def describe(self) -> str:
        """One line for an error message: the operation, where it is, and why."""
        where = f" (node {self.node!r} in {self.graph})" if self.node else ""
        return f"{self.operation}{where}: {self.reason}"


def _target_name(target: object) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target) if isinstance(target, torch._ops.OpOverload) else f"higher_order.{target.name()}"
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or type(target).__module__
    return f"{module}.{getattr(target, '__qualname__', getattr(target, '__name__', repr(target)))}"


def _argument(node: torch.fx.Node, schema: torch._C.FunctionSchema, name: str) -> object:
    """The value a node passes for a named schema argument (positional, keyword or the schema's default)."""
    for i, arg in enumerate(schema.arguments):
        if arg.name == name:
            if name in node.kwargs:
                return node.kwargs[name]
            if i < len(node.args) and not arg.kwarg_only:
                return node.args[i]
            return arg.default_value if arg.has_default_value() else None
    return None


def _written_arguments(node: torch.fx.Node, schema: torch._C.FunctionSchema) -> Iterator[object]:
    """The values an operator writes into (``Tensor(a!)`` arguments: in-place ``self`` and ``out=``)."""
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            if arg.name in node.kwargs:
                yield node.kwargs[arg.name]
            elif i < len(node.args) and not arg.kwarg_only:
                yield node.args[i]


def _base(value: object) -> object:
    """Follow views (operators whose first argument is aliased by their result) back to the tensor they view.

    Terminates: a node's arguments are earlier nodes of the same graph.
    """
    while isinstance(value, torch.fx.Node) and value.op == "call_function":
        target = value.target
        if target is operator.getitem or (
            isinstance(target, torch._ops.OpOverload)
            and target._schema.arguments
            and target._schema.arguments[0].alias_info is not None
        ):
            if not value.args:
                return value
            value = value.args[0]
        else:
            return value
    return value


def _check_op(node: torch.fx.Node, graph: str) -> Iterator[GraphFinding]:
    target = node.target
    name = _target_name(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() not in ALLOWED_HIGHER_ORDER_OPS:
            reason = (
                "a loop with no bound (it could hold the server forever)"
                if target.name() == "while_loop"
                else "a higher-order operator kcore has not vetted"
            )
            yield GraphFinding(name, node.name, graph, reason)
        return
    if not isinstance(target, torch._ops.OpOverload):
        if not any(target is allowed for allowed in ALLOWED_PYTHON_CALLS):
            yield GraphFinding(name, node.name, graph, "a Python function, not a tensor operator")
        return
    packet = target._opname
    if target.namespace != "aten":
        yield GraphFinding(name, node.name, graph, f"an operator of the {target.namespace!r} namespace, not ATen")
        return
    known = ALLOWED_ATEN_OPS | EVAL_ONLY_OPS.keys()
    base_name = packet[:-1] if packet.endswith("_") and packet[:-1] in known else packet
    if base_name not in known:
        if packet in _FILE_OPS:
            reason = "reads or writes a file or shared memory"
        elif packet in _STORAGE_OPS:
            reason = "points a tensor at other memory"
        elif packet in _UNINITIALISED_OPS:
            reason = "returns uninitialised memory (what another session left there)"
        elif packet in _RANDOM_OPS:
            reason = "draws from the process's random generator"
        else:
            reason = "not on kcore's list of pure tensor computations"
        yield GraphFinding(name, node.name, graph, reason)
        return
    flag = EVAL_ONLY_OPS.get(base_name)
    if flag is not None and _argument(node, target._schema, flag) is not False:
        yield GraphFinding(
            name, node.name, graph, f"{flag}={_argument(node, target._schema, flag)!r} (exported in training mode)"
        )
    for written in _written_arguments(node, target._schema):
        base = _base(written)
        if not (isinstance(base, torch.fx.Node) and base.op == "call_function"):
            # a graph input, a constant, or a Python list the writer reached through getitem
            what = repr(base.name) if isinstance(base, torch.fx.Node) else f"a Python {type(base).__name__}"
            yield GraphFinding(name, node.name, graph, f"writes into the graph input or constant {what}")


def _graphs(root: torch.fx.GraphModule) -> Iterator[tuple[str, torch.fx.GraphModule]]:
    """The top graph module and every graph module below it (submodules and ``get_attr`` subgraphs)."""
    seen: set[int] = set()
    stack: list[tuple[str, torch.fx.GraphModule]] = [("graph", root)]
    while stack:
        label, gm = stack.pop()
        if id(gm) in seen:
            continue
        seen.add(id(gm))
        yield label, gm
        for sub_name, sub in gm.named_modules():
            if sub is not gm and isinstance(sub, torch.fx.GraphModule):
                stack.append((sub_name if label == "graph" else f"{label}.{sub_name}", sub))
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = _fetch_attr(gm, str(node.target))
                if isinstance(value, torch.fx.GraphModule):
                    stack.append((str(node.target) if label == "graph" else f"{label}.{node.target}", value))


def _fetch_attr(gm: torch.nn.Module, target: str) -> object:
    value: object = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _fixed_bytes(value: object) -> int:
    """Bytes of a node's output tensor(s) counting only the sizes fixed in the graph (a symbolic size counts 1)."""
    if isinstance(value, (tuple, list)):
        return sum(_fixed_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    n = 1
    for dim in value.shape:
        n *= dim if isinstance(dim, int) else 1
    return n * value.element_size()


def _check_size(node: torch.fx.Node, graph: str, max_bytes: int | None) -> Iterator[GraphFinding]:
    """A node whose output alone takes more than ``max_bytes`` (e.g. ``zeros`` of a huge literal size, an
    upsample by a factor of 1000): pure, but it would exhaust the server's memory at the dry run."""
    if max_bytes is None:
        return
    size = _fixed_bytes(node.meta.get("val"))
    if size > max_bytes:
        yield GraphFinding(_target_name(node.target), node.name, graph,
                           f"its output takes {size / 2**30:.1f} GiB for one image, more than this server's "
                           f"{max_bytes / 2**30:.1f} GiB for a whole input (KCORE_MAX_INPUT_BYTES)")


def unsafe_operations(program: torch.export.ExportedProgram, *, max_bytes: int | None = None
                      ) -> tuple[GraphFinding, ...]:
    """List what an exported program would do beyond pure tensor computations, without running it.

    Walks every node of the top graph, of its submodules and of every subgraph a higher-order operator refers
    to (``get_attr`` nodes holding a graph module), and checks the program's signature.

    Args:
        program: a loaded ``torch.export.ExportedProgram`` (``torch.export.load``), not yet run or unflattened.
        max_bytes: refuse a node whose output takes more than this many bytes, counting the sizes the graph fixes
            (a symbolic size, such as a dynamic batch, counts as 1); default: no size check.

    Returns:
        The findings, in graph order (empty when the program only computes on tensors).

    Raises:
        TypeError: ``program`` is not an ``ExportedProgram``.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(
            f"program must be a torch.export.ExportedProgram (from torch.export.load); got "
            f"{type(program).__name__}. Fix: pass torch.export.load(path), before unflattening it."
        )
    findings: list[GraphFinding] = []
    signature = program.graph_signature
    for spec in signature.input_specs:
        if spec.kind.name not in _INPUT_KINDS:
            findings.append(
                GraphFinding(f"signature input {spec.kind.name}", "", "", f"input {spec.arg} is not a tensor")
            )
    for spec in signature.output_specs:
        if spec.kind.name not in _OUTPUT_KINDS:
            findings.append(
                GraphFinding(f"signature output {spec.kind.name}", "", "", "changes state at every call (eval mode?)")
            )
    for label, gm in _graphs(program.graph_module):
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if node.op == "get_attr":
                value = _fetch_attr(gm, str(node.target))
                if not isinstance(value, (torch.fx.GraphModule, torch.Tensor)):
                    findings.append(
                        GraphFinding(f"get_attr {node.target}", node.name, label, f"holds a {type(value).__name__}")
                    )
            elif node.op == "call_function":
                findings.extend(_check_op(node, label))
                findings.extend(_check_size(node, label, max_bytes))
            else:
                findings.append(GraphFinding(f"{node.op} {node.target}", node.name, label, "not a tensor operator"))
    return tuple(findings)


def describe_findings(findings: tuple[GraphFinding, ...]) -> str:
    """The first :data:`MAX_LISTED` findings, one clause each, and their count when there are more."""
    shown = "; ".join(f.describe() for f in findings[:MAX_LISTED])
    return shown + (f"; … ({len(findings)} in all)" if len(findings) > MAX_LISTED else "")


# --------------------------------------------------------------------------------------------------
# The archive's JSON, before torch.export.load parses it
# --------------------------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 10_000
"""Longest symbolic-shape expression accepted in an archive (real ones are a few dozen characters)."""

_SYMPY_NAMES = frozenset(
    {
        # sympy's constructors as srepr writes them, and constants
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod", "floor",
        "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "StrictGreaterThan", "LessThan",
        "GreaterThan", "Equality", "Unequality", "And", "Or", "Not", "Piecewise", "ExprCondPair", "true", "false",
        "True", "False", "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "NaN", "One", "Zero", "NegativeOne",
        "Half", "BooleanTrue", "BooleanFalse",
        # torch.utils._sympy.functions, as the archive loader names them
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
        "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat",
        "Identity", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
    }
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,8}[0-9]{1,9}")
_STRING_LITERAL = re.compile(r"[A-Za-z0-9_.+\-]{0,64}")
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow"})
_MAX_EXPONENT = 64
_EXPR_NODES = (
    ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp, ast.Compare,
    ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not,
    ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or,
)


def _small_exponent(node: ast.AST) -> bool:
    """An exponent sympy can evaluate quickly: a symbol, or a literal (``3``, ``Integer(3)``) of at most 64."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer" and node.args:
        node = node.args[0]
    if isinstance(node, ast.Constant):
        try:
            return abs(float(node.value)) <= _MAX_EXPONENT
        except (TypeError, ValueError):
            return False
    return True


def _expression_problem(text: str) -> str | None:
    """Why a symbolic-shape expression is not plain sympy arithmetic, or ``None`` when it is."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return f"{len(text)} characters (at most {MAX_EXPRESSION_CHARS})"
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not an expression"
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return f"uses Python syntax {type(node).__name__}"
        if isinstance(node, ast.Name) and node.id not in _SYMPY_NAMES and not _SYMBOL_NAME.fullmatch(node.id):
            return f"names {node.id!r}"
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return "calls something other than a sympy constructor"
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str) and not _STRING_LITERAL.fullmatch(value):
                return f"holds the string {value[:40]!r}"
            if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**63:
                return "holds an integer beyond 64 bits"
            if not isinstance(value, (str, int, float, bool)) and value is not None:
                return f"holds a {type(value).__name__} literal"
        if isinstance(node, ast.keyword) and node.arg is None:
            return "unpacks a mapping (**)"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _POWERS:
            if len(node.args) >= 2 and not _small_exponent(node.args[1]):
                return f"raises to a literal power above {_MAX_EXPONENT}"
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow) and not _small_exponent(node.right):
            return f"raises to a literal power above {_MAX_EXPONENT}"
    return None


_GUARD_TOKEN = re.compile(
    r"\s+|L\['[A-Za-z_][A-Za-z0-9_]{0,64}'\](?:\[\d{1,4}\])*|\.size\(\)|\.stride\(\)|\.storage_offset\(\)|\[\d{1,4}\]"
    r"|\d{1,19}|==|!=|<=|>=|<|>|\+|-|\*\*|\*|//|/|%|\(|\)|\band\b|\bor\b|\bnot\b"
)


def _guard_problem(text: str) -> str | None:
    """Why a guard string is not a plain comparison of input sizes, or ``None`` when it is."""
    if len(text) > MAX_EXPRESSION_CHARS:
        return f"{len(text)} characters (at most {MAX_EXPRESSION_CHARS})"
    position = 0
    while position < len(text):
        match = _GUARD_TOKEN.match(text, position)
        if match is None or match.end() == position:
            return f"unexpected text at {text[position:position + 30]!r}"
        position = match.end()
    return None


_SPEC_TYPES = frozenset(
    {
        None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict",
        "torch.fx.immutable_collections.immutable_list", "torch.fx.immutable_collections.immutable_dict",
    }
)


def _plain_context(value: object) -> bool:
    """A pytree context made of lists and scalars only (a JSON object would reach torch's enum hook)."""
    if isinstance(value, list):
        return all(_plain_context(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _spec_problem(text: str) -> str | None:
    """Why a serialized input/output tree spec could import or call something, or ``None`` when it is plain.

    ``torch.export.load`` reads these with ``torch.utils._pytree.treespec_loads``, which imports the module a
    ``defaultdict`` context names and, for a context holding ``{"__enum__": ..., "fqn": "module:attr"}``, imports
    that module and indexes the attribute (``ctypes:cdll`` would load a shared library).
    """
    if len(text) > MAX_EXPRESSION_CHARS * 10:
        return f"{len(text)} characters (at most {MAX_EXPRESSION_CHARS * 10})"
    try:
        parsed = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        return f"not JSON ({str(exc)[:40]})"
    if not (isinstance(parsed, list) and len(parsed) == 2 and isinstance(parsed[1], dict)):
        return "not a [protocol, tree] pair"
    stack: list[object] = [parsed[1]]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            return f"a {type(node).__name__} where a tree node belongs"
        if node.get("type") not in _SPEC_TYPES:
            return f"container type {str(node.get('type'))[:60]!r}"
        context = node.get("context")
        if context is not None:
            try:
                loaded = json.loads(context) if isinstance(context, str) else context
            except (json.JSONDecodeError, RecursionError):
                return "a context that is not JSON"
            if not _plain_context(loaded):
                return "a context holding an object (torch would import what it names)"
        children = node.get("children_spec", [])
        if not isinstance(children, list):
            return "children that are not a list"
        stack.extend(children)
    return None


def unsafe_serialized_values(model_json: object, *, member: str = "model.json") -> tuple[str, ...]:
    """Find the strings in an archive's program JSON that ``torch.export.load`` would evaluate as Python.

    ``torch.export.load`` turns every ``expr_str`` (symbolic sizes) into a sympy expression with
    ``sympy.sympify``, which runs Python code, and reads ``in_spec``/``out_spec`` with a decoder that imports
    the modules they name; ``ExportedProgram.module()`` would ``exec`` each of ``guards_code``. This accepts
    only plain sympy arithmetic (constructors such as ``Symbol('s0', integer=True)``, ``Mul``, ``FloorDiv``;
    symbol names; small literals), tree specs of tuples, lists and dicts with plain keys, and plain size
    comparisons.

    Args:
        model_json: the parsed ``models/<name>.json`` of a ``.pt2`` archive.
        member: the archive member's name, for the messages.

    Returns:
        One line per refused string, naming the member, the field and what is wrong (empty when all are plain).
    """
    problems: list[str] = []
    stack: list[object] = [model_json]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str":
                    problem = _expression_problem(item) if isinstance(item, str) else f"a {type(item).__name__}"
                    if problem:
                        problems.append(f"shape expression {str(item)[:60]!r} in {member}: {problem}")
                elif key in ("in_spec", "out_spec") and item is not None:
                    problem = _spec_problem(item) if isinstance(item, str) else f"a {type(item).__name__}"
                    if problem:
                        problems.append(f"{key} {str(item)[:60]!r} in {member}: {problem}")
                elif key == "guards_code":
                    guards = item if isinstance(item, list) else [item]
                    for guard in guards:
                        problem = _guard_problem(guard) if isinstance(guard, str) else f"a {type(guard).__name__}"
                        if problem:
                            problems.append(f"guard {str(guard)[:60]!r} in {member}: {problem}")
                else:
                    stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
    return tuple(problems)
