"""What every backward rule works with: an emitter for new nodes, the rule's context, broadcasting.

Rules see static shapes (from the probe, `None` where a dim follows the batch) and emit standard
`ai.onnx` nodes only. Run-time shapes come from `Shape` nodes, so the batch stays dynamic.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.gradient.shapes import Dims, Tensors

PREFIX = "xaid_grad_"
FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)


class Emitter:
    """Appends backward nodes and constants under unique `xaid_grad_` names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._memo: dict[Hashable, str] = {}

    def op(self, op_type: str, inputs: Sequence[str], out: str = "", **attrs: Any) -> str:
        """A single-output node; its output is named `out` when given."""
        output = self.ops(op_type, inputs, 1, **attrs)[0]
        if out:
            self.nodes[-1].output[0] = output = out
        return output

    def ops(self, op_type: str, inputs: Sequence[str], count: int, **attrs: Any) -> list[str]:
        """A node with `count` outputs; returns their names."""
        name = f"{PREFIX}{len(self.nodes)}_{op_type.lower()}"
        outputs = [name] if count == 1 else [f"{name}_{i}" for i in range(count)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name, **attrs))
        return outputs

    def constant(self, value: np.ndarray) -> str:
        name = f"{PREFIX}c{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def scalar(self, value: float, dtype: int) -> str:
        """A shared 0-d constant of an ONNX element type (rules mix them with activations)."""
        key = ("scalar", float(value), dtype)
        if key not in self._memo:
            array = np.array(value, dtype=helper.tensor_dtype_to_np_dtype(dtype))
            self._memo[key] = self.constant(array)
        return self._memo[key]

    def ints(self, values: Sequence[int]) -> str:
        """A shared 1-D int64 constant (axes, sizes, pads)."""
        key = ("ints", tuple(int(v) for v in values))
        if key not in self._memo:
            self._memo[key] = self.constant(np.array(list(values), dtype=np.int64))
        return self._memo[key]

    def shape(self, tensor: str) -> str:
        """The run-time shape of a tensor, one `Shape` node per tensor."""
        key = ("shape", tensor)
        if key not in self._memo:
            self._memo[key] = self.op("Shape", [tensor])
        return self._memo[key]

    def reduce_sum(self, tensor: str, axes: Sequence[int], *, keepdims: bool) -> str:
        return self.op("ReduceSum", [tensor, self.ints(axes)], keepdims=int(keepdims))

    def total(self, terms: Sequence[str]) -> str:
        """The sum of a tensor's gradient contributions from its several consumers."""
        if len(terms) == 1:
            return terms[0]
        if len(terms) == 2:
            return self.op("Add", terms)
        return self.op("Sum", terms)


@dataclass
class Context:
    """One forward node being differentiated: its incoming gradients and the slots to return."""

    node: onnx.NodeProto
    emit: Emitter
    tensors: Tensors
    grads: list[str | None]  # per output; None where no gradient flows back
    wanted: frozenset[int]  # input slots that need a gradient
    relu: str  # "standard", "guided" or "deconvnet"
    opset: int  # of the default domain, for rules that evaluate a node at build time

    @property
    def where(self) -> str:
        return f"{self.node.op_type} (node {self.node.name or self.node.output[0]})"

    @property
    def g(self) -> str:
        """The gradient of the first output, which single-output rules differentiate."""
        grad = self.grads[0]
        if grad is None:
            raise AssertionError(f"{self.where}: no incoming gradient")
        return grad

    def input(self, index: int) -> str:
        return self.node.input[index] if index < len(self.node.input) else ""

    @property
    def x(self) -> str:
        return self.node.input[0]

    @property
    def y(self) -> str:
        return self.node.output[0]

    def attr(self, name: str, default: Any = None) -> Any:
        for attribute in self.node.attribute:
            if attribute.name == name:
                return helper.get_attribute_value(attribute)
        return default

    def dims(self, tensor: str) -> Dims:
        return self.tensors.dims[tensor]

    def dtype(self, tensor: str) -> int:
        return self.tensors.dtypes[tensor]

    def const(self, index: int) -> np.ndarray | None:
        """The value of input slot `index` when it is the same for every run, else None."""
        return self.tensors.values.get(self.input(index))

    def require_const(self, index: int, what: str) -> np.ndarray:
        value = self.const(index)
        if value is None:
            raise self.refuse(f"needs a constant {what}")
        return value

    def refuse(self, why: str) -> FailedPrecondition:
        return FailedPrecondition(f"no gradient rule for {self.where}: {why}")

    def scalar(self, value: float) -> str:
        """A constant in the element type of the node's first input."""
        return self.emit.scalar(value, self.dtype(self.x))


@dataclass(frozen=True)
class Rule:
    """A backward rule and the input slots it differentiates (None: all of them); other slots
    must not need a gradient."""

    backward: Callable[[Context], dict[int, str]]
    inputs: frozenset[int] | None = frozenset({0})


def unbroadcast(emit: Emitter, grad: str, grad_dims: Dims, dims: Dims) -> str:
    """Sum a broadcast result's gradient back to an operand's shape.

    The leading extra axes are summed away, then the axes where the operand had size 1. Summing
    over a batch dim that may be 1 at run time is harmless; an operand dim that follows the batch
    against a static result dim cannot come from a valid broadcast and is refused.
    """
    extra = len(grad_dims) - len(dims)
    if extra:
        grad = emit.reduce_sum(grad, range(extra), keepdims=False)
    axes = []
    for axis, (outer, inner) in enumerate(zip(grad_dims[extra:], dims, strict=True)):
        if inner is None and outer is not None and outer != 1:
            raise FailedPrecondition(
                f"ambiguous broadcast of {_show(dims)} to {_show(grad_dims)} for the gradient"
            )
        if inner == 1 and outer != 1:
            axes.append(axis)
    return emit.reduce_sum(grad, axes, keepdims=True) if axes else grad


def _show(dims: Dims) -> str:
    return "[" + ", ".join("batch" if d is None else str(d) for d in dims) + "]"
