"""The occlusion evaluation graph: one example and N window coordinates in, N target scores out.

The occluded copies are built inside the graph from `xaid_starts` ([N, r] window starts over the
r trailing dimensions), so a chunk of N evaluations sends one example and N·r integers instead of
N copies of the input. The window sizes and the input's spatial size are runtime values (read
with `Shape`), so one cached graph serves every window geometry and input size.

Only models with a single input are supported: the graph feeds the explained input alone, and
other inputs (masks, token types) would need their own batched or fixed feeds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx
from onnx import TensorProto, helper

from xaid_server.graphs.compose import PREFIX, SCORE, TARGET, compose_scored, example_type

MIN_OPSET = 13  # Slice/Unsqueeze/Squeeze with tensor inputs; GreaterOrEqual (12)

X = "xaid_x"
STARTS = "xaid_starts"
WINDOW = "xaid_window"
BASELINE = "xaid_baseline"

__all__ = ["BASELINE", "SCORE", "STARTS", "TARGET", "WINDOW", "X", "build_occlusion_graph"]


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

    def prelude(
        source: onnx.TypeProto,
    ) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], list[onnx.TensorProto]]:
        tensor = source.tensor_type
        nodes = _Nodes()
        mask = _window_mask(nodes, rank=len(tensor.shape.dim))
        # Captum's x * (1 - mask) + baseline * mask: exact, and faster than Where on the CPU
        keep = nodes.op("Cast", [nodes.op("Not", [mask])], to=tensor.elem_type)
        fill = nodes.op("Mul", [nodes.op("Cast", [mask], to=tensor.elem_type), BASELINE])
        nodes.op("Add", [nodes.op("Mul", [X, keep]), fill], out=input_name)
        feeds = [
            helper.make_value_info(X, example_type(source, 1)),
            helper.make_tensor_value_info(STARTS, TensorProto.INT64, ["xaid_n", "xaid_r"]),
            helper.make_tensor_value_info(WINDOW, TensorProto.INT64, ["xaid_r"]),
            helper.make_tensor_value_info(BASELINE, tensor.elem_type, []),
        ]
        return nodes.nodes, feeds, nodes.constants

    return compose_scored(model, input_name, output_name, "occlusion", prelude, MIN_OPSET)


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
