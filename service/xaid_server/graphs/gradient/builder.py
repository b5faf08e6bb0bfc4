"""The gradient graph: a model plus its reverse-mode backward pass, in standard ONNX ops only."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.graphs.compose import subgraph_inputs
from xaid_server.graphs.gradient import rules, spatial
from xaid_server.graphs.gradient.emit import FLOAT_TYPES, PREFIX, Context, Emitter, Rule
from xaid_server.graphs.gradient.peephole import optimise
from xaid_server.graphs.gradient.shapes import Tensors, probe
from xaid_server.graphs.opsets import default_opset, with_min_opset

log = logging.getLogger(__name__)

TARGET = "target"
GRADIENT = "gradient"
WRT_VALUE = "wrt_value"
RELU_RULES = rules.RELU_RULES
MIN_OPSET = 16  # ScatterElements reduction="add"; Softmax axis semantics from 13
UPGRADE_OPSET = 17
MAX_IR_VERSION = 10  # the newest onnxruntime 1.31 loads

RULES: dict[str, Rule] = {**rules.RULES, **spatial.RULES}
SUPPORTED_OPS = frozenset(RULES)

# Input slots that carry only shapes, indices, conditions or dtypes: no gradient flows through.
NONDIFF_SLOTS: dict[str, frozenset[int]] = {
    "CastLike": frozenset({1}),
    "Dropout": frozenset({1, 2}),
    "Expand": frozenset({1}),
    "Gather": frozenset({1}),
    "GatherElements": frozenset({1}),
    "GatherND": frozenset({1}),
    "Pad": frozenset({1, 3}),
    "ReduceMax": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "ReduceMin": frozenset({1}),
    "ReduceSum": frozenset({1}),
    "Reshape": frozenset({1}),
    "Resize": frozenset({1, 2, 3}),
    "ScatterElements": frozenset({1}),
    "ScatterND": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Split": frozenset({1}),
    "Squeeze": frozenset({1}),
    "Tile": frozenset({1}),
    "TopK": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Upsample": frozenset({1}),
    "Where": frozenset({0}),
}
# Ops whose floating-point outputs carry no gradient: they read only shapes, or are piecewise
# constant (zero derivative almost everywhere, as in torch).
NONDIFF_OPS = frozenset(
    {
        "Bernoulli",
        "Ceil",
        "EyeLike",
        "Floor",
        "RandomNormalLike",
        "RandomUniformLike",
        "Round",
        "Sign",
    }
)


def build_gradient_graph(
    model: onnx.ModelProto,
    *,
    wrt: str | None = None,
    output: str | None = None,
    relu: str = "standard",
) -> onnx.ModelProto:
    """The model with an int64 `target` input ([batch] class indices) and a `gradient` output.

    `gradient` is d(output[row, target[row]])/d(wrt), the output flattened per row (a target
    outside [0, columns) selects nothing: callers validate it). `wrt` defaults to the first
    input and may name any tensor the graph computes, whose value is then also returned as
    `wrt_value`. `output` defaults to the first output. The original outputs
    are computed by the original nodes, untouched. `relu` swaps the ReLU backward rule for
    guided backprop or deconvnet. Ops without a rule are refused at build time, naming the op.
    """
    if relu not in RELU_RULES:
        raise InvalidArgument(
            f"relu must be one of {', '.join(RELU_RULES)}, got {relu!r}", field="relu"
        )
    ir_version = model.ir_version
    model = with_min_opset(model, MIN_OPSET, UPGRADE_OPSET, "gradient")
    graph = model.graph
    _check_names(graph)
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if not inputs or not graph.output:
        raise FailedPrecondition("the gradient graph needs a model with an input and an output")
    wrt = wrt or inputs[0].name
    output = output or graph.output[0].name
    if output not in {o.name for o in graph.output}:
        raise FailedPrecondition(f"{output!r} is not a model output")
    computed = {o for node in graph.node for o in node.output}
    if wrt not in computed and wrt not in {i.name for i in inputs}:
        raise FailedPrecondition(f"wrt {wrt!r} is neither a model input nor a computed tensor")

    # refuse ops without a rule before running anything: onnxruntime may not even load them
    inferred = _element_types(model)
    _check_rules(
        graph, _path(graph, lambda name: inferred.get(name, TensorProto.FLOAT), wrt, output)
    )
    tensors = probe(model)
    for name, role in ((wrt, "wrt"), (output, "output")):
        if tensors.dtypes[name] not in FLOAT_TYPES:
            raise FailedPrecondition(f"{role} {name!r} is not a floating-point tensor")
    path = _path(graph, lambda name: tensors.dtypes.get(name, TensorProto.UNDEFINED), wrt, output)
    _check_rules(graph, path)

    emit = Emitter()
    seed = _seed(emit, tensors, output)
    grad = _backward(graph, emit, tensors, path, seed, wrt, output, relu, default_opset(model))
    emit.op("Identity", [grad], out=GRADIENT)
    batch = _batch_dim(inputs[0])
    graph.input.append(helper.make_tensor_value_info(TARGET, TensorProto.INT64, [batch]))
    graph.output.append(_value_info(GRADIENT, wrt, graph, tensors, batch))
    if wrt not in {i.name for i in inputs}:
        emit.op("Identity", [wrt], out=WRT_VALUE)
        graph.output.append(_value_info(WRT_VALUE, wrt, graph, tensors, batch))
    optimise(emit, graph.node, {GRADIENT, WRT_VALUE})
    graph.node.extend(emit.nodes)
    graph.initializer.extend(emit.initializers)
    _validate(model, ir_version)
    return model


def _validate(model: onnx.ModelProto, ir_version: int) -> None:
    """The checker and strict shape inference; an IR version onnxruntime loads."""
    needed = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(min(ir_version, MAX_IR_VERSION), needed)
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        log.warning("the gradient graph failed validation: %s", exc)
        raise FailedPrecondition("the gradient graph of this model failed validation") from exc


def _backward(
    graph: onnx.GraphProto,
    emit: Emitter,
    tensors: Tensors,
    path: set[str],
    seed: str,
    wrt: str,
    output: str,
    relu: str,
    opset: int,
) -> str:
    """Walk the nodes backwards, one rule per node, summing where a tensor feeds several."""
    contributions: dict[str, list[str]] = {output: [seed]}
    for node in reversed(graph.node):
        wanted = _wanted(node, path)
        if not wanted:
            continue  # off the path: its outputs do not reach `output`, or it precedes `wrt`
        grads = [emit.total(contributions[o]) if o in contributions else None for o in node.output]
        context = Context(node, emit, tensors, grads, wanted, relu, opset)
        results = RULES[node.op_type].backward(context)
        for index in wanted:
            contributions.setdefault(node.input[index], []).append(results[index])
    if wrt not in contributions:
        raise FailedPrecondition(f"the gradient did not reach {wrt!r}")
    return emit.total(contributions[wrt])


def _edges(node: onnx.NodeProto) -> Iterable[tuple[int, str]]:
    """(slot, tensor) for each input a gradient can flow through; subgraph reads count too."""
    if node.domain in ("", "ai.onnx"):
        if node.op_type in NONDIFF_OPS:
            return
        skipped = NONDIFF_SLOTS.get(node.op_type, frozenset())
    else:
        skipped = frozenset()
    for index, name in enumerate(node.input):
        if name and index not in skipped:
            yield index, name
    for offset, name in enumerate(subgraph_inputs(node)):
        yield len(node.input) + offset, name


def _path(graph: onnx.GraphProto, dtype: Callable[[str], int], wrt: str, output: str) -> set[str]:
    """The floating-point tensors that depend on `wrt` and that `output` depends on."""
    active = {wrt}
    for node in graph.node:
        if any(name in active for _, name in _edges(node)):
            active.update(o for o in node.output if o and dtype(o) in FLOAT_TYPES)
    path = {output} & active
    for node in reversed(graph.node):
        if any(o in path for o in node.output):
            path.update(name for _, name in _edges(node) if name in active)
    if wrt not in path:
        raise FailedPrecondition(f"{output!r} does not depend differentiably on {wrt!r}")
    return path


def _wanted(node: onnx.NodeProto, path: set[str]) -> frozenset[int]:
    """The input slots of a node that need a gradient; empty when the node is off the path."""
    if not any(o in path for o in node.output):
        return frozenset()
    return frozenset(i for i, name in _edges(node) if name in path)


def _check_rules(graph: onnx.GraphProto, path: set[str]) -> None:
    """Refuse nodes on the path without a rule, or that need a gradient for an input their
    rule does not differentiate (weights, exponents, clip bounds)."""
    for node in graph.node:
        wanted = _wanted(node, path)
        if not wanted:
            continue
        where = f"{_op_name(node)} (node {node.name or node.output[0]})"
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is None:
            raise FailedPrecondition(f"no gradient rule for op {where}")
        unsupported = sorted(wanted - rule.inputs) if rule.inputs is not None else []
        if unsupported:
            name = node.input[unsupported[0]] if unsupported[0] < len(node.input) else "a subgraph"
            raise FailedPrecondition(
                f"no gradient rule for {where} with respect to input {unsupported[0]} ({name})"
            )


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types from ONNX shape inference, which knows them even where shapes fail."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        return {}
    graph = inferred.graph
    types = {t.name: t.data_type for t in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _seed(emit: Emitter, tensors: Tensors, output: str) -> str:
    """One-hot of `target` over each row of the output, in the output's element type."""
    dims = tensors.dims[output]
    if not dims or any(d is None for d in dims[1:]):
        raise FailedPrecondition(f"output {output!r} needs a batch dim and static other dims")
    count = int(np.prod([d for d in dims[1:] if d is not None]))
    columns = emit.constant(np.arange(count, dtype=np.int64))
    hit = emit.op("Equal", [emit.op("Unsqueeze", [TARGET, emit.ints([1])]), columns])
    seed = emit.op("Cast", [hit], to=tensors.dtypes[output])
    return seed if len(dims) == 2 else emit.op("Reshape", [seed, emit.shape(output)])


def _value_info(
    name: str, like: str, graph: onnx.GraphProto, tensors: Tensors, batch: str | int
) -> onnx.ValueInfoProto:
    """A value info shaped like tensor `like`: the declared input type, else the probed dims."""
    declared = next((i for i in graph.input if i.name == like), None)
    if declared is not None:
        return helper.make_value_info(name, declared.type)
    dims: list[str | int | None] = [
        d if d is not None else batch if axis == 0 else None
        for axis, d in enumerate(tensors.dims[like])
    ]
    return helper.make_tensor_value_info(name, tensors.dtypes[like], dims)


def _batch_dim(value_info: onnx.ValueInfoProto) -> str | int:
    dim = value_info.type.tensor_type.shape.dim[0]
    if dim.HasField("dim_value"):
        return dim.dim_value
    return dim.dim_param or "batch"


def _check_names(graph: onnx.GraphProto) -> None:
    names = {t.name for t in graph.initializer}
    names.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in graph.node:
        names.update([*node.input, *node.output, node.name])
    clashes = sorted(n for n in names if n in (TARGET, GRADIENT, WRT_VALUE) or n.startswith(PREFIX))
    if clashes:
        raise FailedPrecondition(f"the model already uses the gradient graph's names {clashes}")


def _op_name(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
