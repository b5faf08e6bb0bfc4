"""The occlusion evaluation graph: one example and N window coordinates in, N target scores out.

The occluded copies are built inside the graph from `xaid_starts` ([N, r] window starts over the
r trailing dimensions), so a chunk of N evaluations sends one example and N·r integers instead of
N copies of the input. The window sizes and the input's spatial size are runtime values (read
with `Shape`), so one cached graph serves every window geometry and input size.

Only models with a single input are supported: the graph feeds the explained input alone, and
other inputs (masks, token types) would need their own batched or fixed feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import onnx
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.opsets import with_min_opset

log = logging.getLogger(__name__)

PREFIX = "xaid_"
MIN_OPSET = 13  # Slice/Unsqueeze/Squeeze with tensor inputs; GreaterOrEqual (12)

X = "xaid_x"
STARTS = "xaid_starts"
WINDOW = "xaid_window"
BASELINE = "xaid_baseline"
TARGET = "xaid_target"
SCORE = "xaid_score"


class _Nodes:
    """Appends nodes and int64 constants with unique `xaid_` names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[onnx.TensorProto] = []

    def op(self, op_type: str, inputs: Sequence[str], out: str = "", **attrs: Any) -> str:
        name = f"{PREFIX}{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out or name], name, **attrs))
        return out or name

    def ints(self, values: Sequence[int], *, scalar: bool = False) -> str:
        name = f"{PREFIX}const_{len(self.constants)}"
        dims: list[int] = [] if scalar else [len(values)]
        self.constants.append(helper.make_tensor(name, TensorProto.INT64, dims, list(values)))
        return name


def build_occlusion_graph(
    model: onnx.ModelProto, input_name: str, output_name: str
) -> onnx.ModelProto:
    """Compose `model` with the occlusion step and the selection of one class score.

    Inputs: `xaid_x` (one example, [1, ...]), `xaid_starts` int64 [N, r], `xaid_window` int64
    [r], `xaid_baseline` (scalar, the input's type), `xaid_target` int64 scalar. Output:
    `xaid_score` float [N], the target column of `output_name` flattened per row. Leading
    per-example dimensions not named by the window (channels) are covered whole.
    """
    ir_version = model.ir_version
    model = with_min_opset(model, MIN_OPSET, MIN_OPSET, "occlusion")
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    others = [i.name for i in inputs if i.name != input_name]
    if others:
        raise FailedPrecondition(
            f"occlusion supports single-input models; this model also takes {others}"
        )
    if not inputs:
        raise FailedPrecondition(f"occlusion: {input_name!r} is not a model input")
    source = inputs[0].type.tensor_type
    output = next((o for o in graph.output if o.name == output_name), None)
    if output is None:
        raise FailedPrecondition(f"occlusion: {output_name!r} is not a model output")
    if not source.HasField("shape") or len(source.shape.dim) < 2:
        raise FailedPrecondition(
            "occlusion needs an input of known rank with a batch and a per-example dimension"
        )
    if source.elem_type in (TensorProto.BOOL, TensorProto.STRING):
        raise FailedPrecondition("occlusion needs a numeric input")
    if any(name.startswith(PREFIX) for name in _names(graph)):
        raise FailedPrecondition(f"occlusion: the model already uses names starting {PREFIX!r}")

    nodes = _Nodes()
    mask = _window_mask(nodes, rank=len(source.shape.dim))
    # Captum's x * (1 - mask) + baseline * mask: exact, and faster than Where on the CPU
    keep = nodes.op("Cast", [nodes.op("Not", [mask])], to=source.elem_type)
    fill = nodes.op("Mul", [nodes.op("Cast", [mask], to=source.elem_type), BASELINE])
    nodes.op("Add", [nodes.op("Mul", [X, keep]), fill], out=input_name)
    split = len(nodes.nodes)
    flat = nodes.op("Flatten", [output_name], axis=1)
    score_type = output.type.tensor_type.elem_type
    if score_type == TensorProto.FLOAT:
        nodes.op("Gather", [flat, TARGET], out=SCORE, axis=1)
    else:
        picked = nodes.op("Gather", [flat, TARGET], axis=1)
        nodes.op("Cast", [picked], out=SCORE, to=TensorProto.FLOAT)

    x_type = onnx.TypeProto()
    x_type.CopyFrom(inputs[0].type)
    x_type.tensor_type.shape.dim[0].Clear()
    x_type.tensor_type.shape.dim[0].dim_value = 1
    model_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes.nodes[:split], *model_nodes, *nodes.nodes[split:]])
    graph.initializer.extend(nodes.constants)
    del graph.input[:]
    graph.input.extend(
        [
            helper.make_value_info(X, x_type),
            helper.make_tensor_value_info(STARTS, TensorProto.INT64, ["xaid_n", "xaid_r"]),
            helper.make_tensor_value_info(WINDOW, TensorProto.INT64, ["xaid_r"]),
            helper.make_tensor_value_info(BASELINE, source.elem_type, []),
            helper.make_tensor_value_info(TARGET, TensorProto.INT64, []),
        ]
    )
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["xaid_n"]))
    _prune(graph)
    # recorded shapes hold for the model's own batch, not for N occluded rows: infer them anew
    del graph.value_info[:]
    model.ir_version = max(ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        log.warning("the occlusion graph failed the ONNX checker: %s", exc)
        raise FailedPrecondition("occlusion: this model could not be composed with it") from exc
    return model


def _window_mask(nodes: _Nodes, rank: int) -> str:
    """Bool mask broadcastable to [N, *x.shape[1:]]: True inside each row's window.

    `xaid_starts`/`xaid_window` name the trailing r dimensions, r a runtime value. The k - r
    leading per-example dimensions (k = rank - 1) get a window of size 1 over a dimension of
    size 1, so their part of the mask is [N, 1, ...] and broadcasts: the mask only has the full
    size of x when the window names every dimension.
    """
    k = rank - 1
    starts_shape = nodes.op("Shape", [STARTS])
    n = nodes.op("Slice", [starts_shape, nodes.ints([0]), nodes.ints([1])])
    r = nodes.op("Slice", [starts_shape, nodes.ints([1]), nodes.ints([2])])
    pad = nodes.op("Sub", [nodes.ints([k]), r])
    zeros = nodes.op(
        "ConstantOfShape",
        [nodes.op("Concat", [n, pad], axis=0)],
        value=helper.make_tensor("zero", TensorProto.INT64, [1], [0]),
    )
    ones = nodes.op(
        "ConstantOfShape", [pad], value=helper.make_tensor("one", TensorProto.INT64, [1], [1])
    )
    starts = nodes.op("Concat", [zeros, STARTS], axis=1)  # [N, k]
    window = nodes.op("Concat", [ones, WINDOW], axis=0)  # [k]
    one = nodes.ints([1])
    trailing = nodes.op(
        "Slice", [nodes.op("Shape", [X]), nodes.op("Add", [one, pad]), nodes.ints([rank])]
    )
    sizes = nodes.op("Concat", [ones, trailing], axis=0)  # [k]

    zero_s, one_s = nodes.ints([0], scalar=True), nodes.ints([1], scalar=True)
    insides: list[str] = []
    for d in range(k):
        first, after = nodes.ints([d]), nodes.ints([d + 1])
        size = nodes.op("Squeeze", [nodes.op("Slice", [sizes, first, after])])
        index = nodes.op("Range", [zero_s, size, one_s])  # [L_d], or [1] when covered whole
        start = nodes.op("Slice", [starts, first, after, one])  # [N, 1]
        end = nodes.op("Add", [start, nodes.op("Slice", [window, first, after])])
        inside = nodes.op(
            "And",
            [nodes.op("GreaterOrEqual", [index, start]), nodes.op("Less", [index, end])],
        )  # [N, L_d]
        axes = [a for a in range(1, k + 1) if a != d + 1]
        insides.append(nodes.op("Unsqueeze", [inside, nodes.ints(axes)]) if axes else inside)
    mask = insides[-1]
    for inside in reversed(insides[:-1]):
        mask = nodes.op("And", [inside, mask])
    return mask


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers the score does not need (onnxruntime runs dead nodes)."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)


def _subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    """Every name read inside the node's subgraphs (If/Loop/Scan bodies see outer tensors)."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
