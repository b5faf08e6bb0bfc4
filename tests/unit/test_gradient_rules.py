"""Each backward rule against central differences of the forward graph: the dot-product test.

For random u (shaped like the input) and v (shaped like one example's output), <v, J u> from
central differences of the forward ONNX graph must equal <J^T v, u> from the gradient graph.
J^T v is assembled from one batched run of the gradient graph: the example repeated once per
output element, `target` selecting each element, which also exercises the dynamic batch.
float64 wherever onnxruntime's CPU provider has the kernels; float32 otherwise, with a step of 1
for linear ops (exact up to rounding) and a looser tolerance for smooth nonlinear ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import make_model
from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.graphs.gradient import (
    GRADIENT,
    PREFIX,
    RELU_RULES,
    SUPPORTED_OPS,
    TARGET,
    build_gradient_graph,
)

F32, F64 = TensorProto.FLOAT, TensorProto.DOUBLE
Values = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
node = helper.make_node


def standard(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.standard_normal(shape)


def positive(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape)


def nonzero(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)


def away_from(*kinks: float, scale: float = 4.0, margin: float = 0.1) -> Values:
    """Wide random values kept `margin` away from an activation's kinks: finite differences
    with a float32 step must not straddle one."""

    def values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape) * scale
        for kink in kinks:
            near = np.abs(x - kink) < margin
            x[near] = kink + np.where(x[near] >= kink, margin, -margin)
        return x

    return values


@dataclass
class Case:
    """A one-output test graph; every input is batched ([b, *shape]); `wrt` defaults to the
    first."""

    nodes: list[onnx.NodeProto]
    inputs: Mapping[str, tuple[int, ...]]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    dtype: int = F64
    out_dtype: int | None = None
    wrt: str | None = None
    values: dict[str, Values] = field(default_factory=dict)
    opset: int = 17
    step: float = 1e-5
    rtol: float = 1e-7

    def model(self) -> onnx.ModelProto:
        inputs = [
            helper.make_tensor_value_info(name, self.dtype, ["b", *shape])
            for name, shape in self.inputs.items()
        ]
        output = helper.make_tensor_value_info("y", self.out_dtype or self.dtype, None)
        constants = [numpy_helper.from_array(v, k) for k, v in self.constants.items()]
        graph = helper.make_graph(self.nodes, "case", inputs, [output], constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 9 if self.opset >= 19 else 8
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # the output's shape
        onnx.checker.check_model(model)
        return model


def linear(nodes: list[onnx.NodeProto], inputs: Mapping[str, tuple[int, ...]], **kw: Any) -> Case:
    """A float32 case for an op that is linear in its input: a step of 1 is exact."""
    return Case(nodes, inputs, dtype=F32, step=1.0, rtol=1e-5, **kw)


def smooth32(nodes: list[onnx.NodeProto], inputs: Mapping[str, tuple[int, ...]], **kw: Any) -> Case:
    """A float32 case for a nonlinear op without a float64 kernel in onnxruntime's CPU provider."""
    return Case(nodes, inputs, dtype=F32, step=1e-2, rtol=1e-3, **kw)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def check(case: Case) -> None:
    model = case.model()
    grad_model = build_gradient_graph(model, wrt=case.wrt)
    forward, backward = session(model), session(grad_model)
    rng = np.random.default_rng(0)
    np_dtype = helper.tensor_dtype_to_np_dtype(case.dtype)
    feeds = {
        name: case.values.get(name, standard)(rng, (1, *shape)).astype(np_dtype)
        for name, shape in case.inputs.items()
    }
    count = forward.run(["y"], feeds)[0][0].size
    rows = {name: np.repeat(value, count, axis=0) for name, value in feeds.items()}
    jacobian = backward.run([GRADIENT], {**rows, TARGET: np.arange(count, dtype=np.int64)})[0]
    jacobian = jacobian.reshape(count, -1).astype(np.float64)  # row k: d y[k] / d wrt
    assert np.any(jacobian), "the gradient is identically zero"
    wrt = case.wrt or next(iter(case.inputs))
    for _ in range(4):
        u = rng.standard_normal(feeds[wrt].shape)
        v = rng.standard_normal(count)
        pair = {
            **feeds,
            wrt: np.concatenate([feeds[wrt] + case.step * u, feeds[wrt] - case.step * u]),
        }
        for name in case.inputs:
            if name != wrt:
                pair[name] = np.repeat(feeds[name], 2, axis=0)
        ends = forward.run(["y"], {k: a.astype(np_dtype) for k, a in pair.items()})[0]
        jvp = ((ends[0].astype(np.float64) - ends[1]) / (2 * case.step)).ravel()
        vjp = v @ jacobian
        lhs, rhs = float(v @ jvp), float(vjp @ u.ravel())
        scale = np.linalg.norm(v) * np.linalg.norm(jvp) + np.linalg.norm(vjp) * np.linalg.norm(u)
        assert abs(lhs - rhs) <= case.rtol * scale, (lhs, rhs)


def const(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


X34 = {"x": (3, 4)}

ELEMENTWISE = {
    "relu": Case([node("Relu", ["x"], ["y"])], X34),
    "leaky_relu": Case([node("LeakyRelu", ["x"], ["y"], alpha=0.1)], X34),
    "clip_relu6": Case(
        [node("Clip", ["x", "lo", "hi"], ["y"])],
        X34,
        {"lo": np.array(0.0), "hi": np.array(6.0)},
        values={"x": away_from(0, 6)},
    ),
    "clip_min_only": Case([node("Clip", ["x", "lo"], ["y"])], X34, {"lo": np.array(-0.5)}),
    "clip_max_only": Case([node("Clip", ["x", "", "hi"], ["y"])], X34, {"hi": np.array(0.5)}),
    "hard_sigmoid": smooth32(
        [node("HardSigmoid", ["x"], ["y"], alpha=0.25, beta=0.4)],
        X34,
        values={"x": away_from(-1.6, 2.4)},
    ),
    "hard_swish": smooth32([node("HardSwish", ["x"], ["y"])], X34, values={"x": away_from(-3, 3)}),
    "sigmoid": Case([node("Sigmoid", ["x"], ["y"])], X34),
    "tanh": Case([node("Tanh", ["x"], ["y"])], X34),
    "exp": Case([node("Exp", ["x"], ["y"])], X34),
    "log": Case([node("Log", ["x"], ["y"])], X34, values={"x": positive}),
    "sqrt": Case([node("Sqrt", ["x"], ["y"])], X34, values={"x": positive}),
    "reciprocal": Case([node("Reciprocal", ["x"], ["y"])], X34, values={"x": nonzero}),
    "neg": Case([node("Neg", ["x"], ["y"])], X34),
    "erf": smooth32([node("Erf", ["x"], ["y"])], X34),
    "gelu": smooth32([node("Gelu", ["x"], ["y"])], X34, opset=20),
    "gelu_tanh": smooth32([node("Gelu", ["x"], ["y"], approximate="tanh")], X34, opset=20),
    "identity": Case([node("Identity", ["x"], ["y"])], X34),
    "dropout": Case(
        [node("Dropout", ["x", "ratio", "training"], ["y"])],
        X34,
        {"ratio": np.array(0.3), "training": np.array(False)},
    ),
    "cast": Case(
        [node("Cast", ["x"], ["c"], to=F32), node("Mul", ["c", "w"], ["y"])],
        X34,
        {"w": const(3, 4).astype(np.float32)},
        out_dtype=F32,
        step=1.0,
        rtol=1e-5,
    ),
    "cast_like": linear(
        [node("CastLike", ["x", "like"], ["c"]), node("Mul", ["c", "w"], ["y"])],
        X34,
        constants={"like": np.zeros(1, np.float64), "w": const(3, 4)},
        out_dtype=F64,
    ),
    "pow_cube": Case([node("Pow", ["x", "e"], ["y"])], X34, {"e": np.array(3.0)}),
    "pow_root_float32_exponent": Case(
        [node("Pow", ["x", "e"], ["y"])],
        X34,
        {"e": np.array(0.5, np.float32)},
        values={"x": positive},
    ),
    "pow_broadcast_exponent": Case(
        [node("Pow", ["x", "e"], ["y"])],
        {"x": (1, 4)},
        {"e": np.array([[1.0, 2.0, 3.0, 0.5]] * 3)},
        values={"x": positive},
    ),
    "softmax": Case([node("Softmax", ["x"], ["y"])], X34),
    "softmax_axis1": Case([node("Softmax", ["x"], ["y"], axis=1)], X34),
    "log_softmax": Case([node("LogSoftmax", ["x"], ["y"])], X34),
    "log_softmax_axis1": Case([node("LogSoftmax", ["x"], ["y"], axis=1)], X34),
}

BINARY = {
    "add_same_shape_wrt_second": Case(
        [node("Add", ["x", "c"], ["y"])], {"x": (3, 4), "c": (3, 4)}, wrt="c"
    ),
    "add_broadcast_wrt_small": Case(
        [node("Add", ["x", "c"], ["y"])], {"x": (3, 4), "c": (1, 4)}, wrt="c"
    ),
    "add_broadcast_wrt_large": Case([node("Add", ["x", "c"], ["y"])], {"x": (3, 4), "c": (1, 4)}),
    "add_constant_lower_rank": Case(
        [node("Add", ["x", "w"], ["y"])], {"x": (2, 3, 4)}, {"w": const(4)}
    ),
    "sub_wrt_second": Case([node("Sub", ["x", "c"], ["y"])], {"x": (3, 4), "c": (3, 1)}, wrt="c"),
    "sub_wrt_first": Case([node("Sub", ["x", "c"], ["y"])], {"x": (3, 4), "c": (3, 1)}),
    "mul_both_broadcast": Case([node("Mul", ["x", "c"], ["y"])], {"x": (1, 4), "c": (3, 1)}),
    "mul_both_broadcast_wrt_second": Case(
        [node("Mul", ["x", "c"], ["y"])], {"x": (1, 4), "c": (3, 1)}, wrt="c"
    ),
    "mul_self": Case([node("Mul", ["x", "x"], ["y"])], X34),
    "div_wrt_numerator": Case(
        [node("Div", ["x", "c"], ["y"])], {"x": (3, 4), "c": (3, 1)}, values={"c": nonzero}
    ),
    "div_wrt_denominator": Case(
        [node("Div", ["x", "c"], ["y"])],
        {"x": (3, 4), "c": (3, 1)},
        values={"c": nonzero},
        wrt="c",
    ),
    "div_constant_numerator": Case(
        [node("Div", ["w", "x"], ["y"])], {"x": (1, 4)}, {"w": const(3, 4)}, values={"x": nonzero}
    ),
    "where_first": Case(
        [node("Where", ["cond", "x", "c"], ["y"])],
        {"x": (3, 4), "c": (1, 4)},
        {"cond": const(3, 4) > 0},
    ),
    "where_second_broadcast": Case(
        [node("Where", ["cond", "x", "c"], ["y"])],
        {"x": (3, 4), "c": (1, 4)},
        {"cond": const(3, 4) > 0},
        wrt="c",
    ),
    "sum_repeated_operand": Case([node("Sum", ["x", "c", "x"], ["y"])], {"x": (3, 4), "c": (3, 4)}),
    "expand": Case(
        [node("Expand", ["x", "shape"], ["y"])], {"x": (1, 4)}, {"shape": ints(1, 3, 4)}
    ),
    "matmul_constant": Case([node("MatMul", ["x", "w"], ["y"])], X34, {"w": const(4, 5)}),
    "matmul_pair_first": Case([node("MatMul", ["x", "c"], ["y"])], {"x": (3, 4), "c": (4, 5)}),
    "matmul_pair_second": Case(
        [node("MatMul", ["x", "c"], ["y"])], {"x": (3, 4), "c": (4, 5)}, wrt="c"
    ),
    "matmul_broadcast_batch": Case(
        [node("MatMul", ["x", "c"], ["y"])], {"x": (2, 3, 4), "c": (1, 4, 5)}, wrt="c"
    ),
    "matmul_broadcast_batch_first": Case(
        [node("MatMul", ["x", "c"], ["y"])], {"x": (2, 3, 4), "c": (1, 4, 5)}
    ),
    "matmul_rank2": Case([node("MatMul", ["x", "w"], ["y"])], {"x": (4,)}, {"w": const(4, 3)}),
}

W43, W34 = const(4, 3), const(3, 4)
GEMM = {
    "plain": Case(
        [node("Gemm", ["x", "w", "bias"], ["y"])], {"x": (4,)}, {"w": W43, "bias": const(3)}
    ),
    "transB_alpha_beta": Case(
        [node("Gemm", ["x", "w", "bias"], ["y"], transB=1, alpha=0.5, beta=2.0)],
        {"x": (4,)},
        {"w": W34, "bias": const(1, 3)},
    ),
    "transA": Case(
        [node("Transpose", ["x"], ["xt"]), node("Gemm", ["xt", "w"], ["y"], transA=1)],
        {"x": (4,)},
        {"w": W43},
    ),
    "transA_transB": Case(
        [node("Transpose", ["x"], ["xt"]), node("Gemm", ["xt", "w"], ["y"], transA=1, transB=1)],
        {"x": (4,)},
        {"w": W34},
    ),
    "wrt_B": Case(
        [
            node("Transpose", ["x"], ["xt"]),
            node("Gemm", ["w", "xt"], ["yt"], alpha=1.5),
            node("Transpose", ["yt"], ["y"]),
        ],
        {"x": (4,)},
        {"w": W34},
    ),
    "wrt_B_transB": Case(
        [node("Gemm", ["w", "x"], ["yt"], transB=1), node("Transpose", ["yt"], ["y"])],
        {"x": (4,)},
        {"w": W34},
    ),
    "wrt_B_transA_transB": Case(
        [node("Gemm", ["w", "x"], ["yt"], transA=1, transB=1), node("Transpose", ["yt"], ["y"])],
        {"x": (4,)},
        {"w": W43},
    ),
    "wrt_C": Case(
        [node("Gemm", ["a", "w", "c"], ["y"], beta=0.5)],
        {"a": (4,), "c": (3,)},
        {"w": W43},
        wrt="c",
    ),
}

SHAPES = {
    "flatten": Case(
        [node("Flatten", ["x"], ["f"]), node("Mul", ["f", "w"], ["y"])],
        {"x": (2, 3, 4)},
        {"w": const(24)},
    ),
    "reshape": Case(
        [node("Reshape", ["x", "shape"], ["y"])], {"x": (2, 3, 4)}, {"shape": ints(-1, 4, 6)}
    ),
    "reshape_computed_shape": Case(
        [
            node("Shape", ["x"], ["s"], end=1),
            node("Concat", ["s", "rest"], ["shape"], axis=0),
            node("Reshape", ["x", "shape"], ["r"]),
            node("Mul", ["r", "w"], ["y"]),
        ],
        {"x": (2, 3, 4)},
        {"rest": ints(12, 2), "w": const(12, 2)},
    ),
    "squeeze": Case([node("Squeeze", ["x", "axes"], ["y"])], {"x": (1, 4)}, {"axes": ints(1)}),
    "unsqueeze": Case([node("Unsqueeze", ["x", "axes"], ["y"])], X34, {"axes": ints(1, 3)}),
    "transpose": Case([node("Transpose", ["x"], ["y"], perm=[0, 2, 3, 1])], {"x": (2, 3, 4)}),
    "concat_repeated": Case(
        [node("Neg", ["x"], ["n"]), node("Concat", ["x", "n", "x"], ["y"], axis=1)], {"x": (2, 3)}
    ),
    "concat_negative_axis": Case(
        [node("Concat", ["x", "c"], ["y"], axis=-1)], {"x": (2, 3), "c": (2, 2)}, wrt="c"
    ),
    "split_unused_output": Case(
        [
            node("Split", ["x", "sizes"], ["a", "b", "c"], axis=1),
            node("Concat", ["c", "a"], ["y"], axis=1),
        ],
        {"x": (6, 2)},
        {"sizes": ints(1, 2, 3)},
    ),
    "split_num_outputs": Case(
        [node("Split", ["x"], ["a", "b"], axis=-1, num_outputs=2), node("Mul", ["a", "b"], ["y"])],
        {"x": (3, 4)},
        opset=18,
    ),
    "slice_negative_clamped": Case(
        [node("Slice", ["x", "starts", "ends", "axes"], ["y"])],
        {"x": (5, 6)},
        {"starts": ints(1, -4), "ends": ints(4, 100), "axes": ints(1, 2)},
    ),
    "slice_negative_axis": Case(
        [node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"])],
        {"x": (5, 6)},
        {"starts": ints(-3), "ends": ints(-1), "axes": ints(-1), "steps": ints(1)},
    ),
    "slice_computed_end": Case(
        [
            node("Shape", ["x"], ["s"], start=2),
            node("Div", ["s", "two"], ["half"]),
            node("Slice", ["x", "zero", "half", "two"], ["y"]),
        ],
        {"x": (3, 6)},
        {"two": ints(2), "zero": ints(0)},
    ),
    "pad": Case([node("Pad", ["x", "pads"], ["y"])], X34, {"pads": ints(0, 1, 0, 0, 2, 1)}),
    "pad_axes": Case(
        [node("Pad", ["x", "pads", "", "axes"], ["y"])],
        X34,
        {"pads": ints(1, 2), "axes": ints(-1)},
        opset=18,
    ),
    "reduce_mean_attribute": Case(
        [node("ReduceMean", ["x"], ["y"], axes=[1], keepdims=0)], {"x": (3, 4, 2)}
    ),
    "reduce_mean_keepdims": Case([node("ReduceMean", ["x"], ["y"], axes=[-1])], {"x": (3, 4, 2)}),
    "reduce_mean_axes_input": Case(
        [node("ReduceMean", ["x", "axes"], ["y"], keepdims=0)],
        {"x": (3, 4, 2)},
        {"axes": ints(1, 3)},
        opset=18,
    ),
    "reduce_sum_keepdims": Case(
        [node("ReduceSum", ["x", "axes"], ["y"])], {"x": (3, 4, 2)}, {"axes": ints(2)}
    ),
    "reduce_sum_noop": Case(
        [node("ReduceSum", ["x"], ["y"], noop_with_empty_axes=1)], {"x": (3, 4)}
    ),
    "batch_norm": Case(
        [node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], epsilon=1e-3)],
        {"x": (3, 4, 2)},
        {
            "scale": const(3),
            "bias": const(3),
            "mean": const(3),
            "var": positive(np.random.default_rng(2), (3,)),
        },
    ),
    "layer_norm": Case(
        [node("LayerNormalization", ["x", "scale", "bias"], ["y"])],
        {"x": (3, 4)},
        {"scale": const(4), "bias": const(4)},
    ),
    "layer_norm_axis1": Case(
        [node("LayerNormalization", ["x", "scale"], ["y"], axis=1, epsilon=1e-3)],
        {"x": (3, 4)},
        {"scale": const(3, 4)},
    ),
}


def conv(
    channels: int = 4,
    size: tuple[int, ...] = (7, 6),
    out: int = 3,
    kernel: tuple[int, ...] = (3, 3),
    group: int = 1,
    bias: bool = False,
    **attrs: Any,
) -> Case:
    weight = const(out, channels // group, *kernel).astype(np.float32)
    inputs = ["x", "w", "bias"] if bias else ["x", "w"]
    constants = {"w": weight, "bias": const(out).astype(np.float32)} if bias else {"w": weight}
    return linear(
        [node("Conv", inputs, ["y"], group=group, **attrs)],
        {"x": (channels, *size)},
        constants=constants,
    )


CONV = {
    "k3_s1_p1": conv(pads=[1, 1, 1, 1], bias=True),
    "k3_s1_asymmetric": conv(pads=[0, 1, 1, 0]),
    "k3_s1_p1_wide": conv(channels=8, pads=[1, 1, 1, 1], bias=True),
    "k3_s1_asymmetric_wide": conv(channels=9, pads=[0, 1, 1, 0]),
    "dilation2_s1_wide": conv(channels=8, size=(8, 7), dilations=[2, 2], pads=[2, 2, 2, 2]),
    "k3_s2_p1_odd": conv(strides=[2, 2], pads=[1, 1, 1, 1]),
    "k3_s2_asymmetric": conv(strides=[2, 2], pads=[0, 0, 1, 1]),
    "k3_s2_p0_even": conv(size=(8, 8), strides=[2, 2]),
    "k3_s3_sizes_7_8_9": conv(size=(8, 9), strides=[3, 3], pads=[1, 0, 0, 1]),
    "k3_s3_output_padding_1": conv(size=(7, 7), strides=[3, 3]),
    "k3_s3_output_padding_2": conv(size=(8, 8), strides=[3, 3]),
    "k2_s2": conv(size=(6, 7), kernel=(2, 2), strides=[2, 2]),
    "k1_s2_shortcut": conv(kernel=(1, 1), strides=[2, 2], out=5),
    "k1_s1_pad1_negative_backward_pad": conv(kernel=(1, 1), pads=[1, 1, 1, 1]),
    "dilation2_s1": conv(size=(8, 7), dilations=[2, 2], pads=[2, 2, 2, 2]),
    "dilation2_s2": conv(size=(9, 8), dilations=[2, 2], strides=[2, 2], pads=[1, 2, 0, 1]),
    "dilation3_s2_output_padding": conv(size=(10, 9), dilations=[3, 1], strides=[2, 2]),
    "groups_m_ne_c": conv(channels=4, out=6, group=2, pads=[1, 1, 1, 1]),
    "groups_strided": conv(channels=4, out=6, group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
    "depthwise": conv(channels=4, out=4, group=4, pads=[1, 1, 1, 1]),
    "depthwise_multiplier_strided": conv(
        channels=3, out=6, group=3, strides=[2, 1], pads=[0, 1, 2, 1]
    ),
    "rectangular_kernel": conv(kernel=(3, 1), strides=[2, 1], pads=[1, 0, 1, 0]),
    "same_upper_s2": conv(size=(7, 8), strides=[2, 2], auto_pad="SAME_UPPER"),
    "same_lower_s2": conv(size=(7, 8), strides=[2, 2], auto_pad="SAME_LOWER"),
    "same_upper_s1": conv(size=(7, 8), kernel=(4, 4), auto_pad="SAME_UPPER"),
    "valid_s2": conv(size=(8, 7), strides=[2, 2], auto_pad="VALID"),
    "conv1d_s2": conv(size=(11,), kernel=(3,), strides=[2], pads=[1, 0]),
    "conv1d_s1": conv(size=(9,), kernel=(5,), pads=[2, 1], bias=True),
    "conv3d": conv(
        channels=2, size=(4, 5, 4), kernel=(2, 3, 2), strides=[1, 2, 2], pads=[0, 1, 1, 1, 0, 0]
    ),
}


def pool(op: str, size: tuple[int, ...] = (7, 6), channels: int = 3, **attrs: Any) -> Case:
    nodes = [node(op, ["x"], ["y"], **attrs)]
    if op == "MaxPool":  # float64 kernel; max is piecewise linear, ties have probability zero
        return Case(nodes, {"x": (channels, *size)})
    return linear(nodes, {"x": (channels, *size)})


def pool32(size: tuple[int, ...] = (7, 6), **attrs: Any) -> Case:
    """A float32 MaxPool (onnxruntime's MaxUnpool has no float64 kernel): max is piecewise
    linear, and a small step does not cross a decision of these seeded values."""
    nodes = [node("MaxPool", ["x"], ["y"], **attrs)]
    return Case(nodes, {"x": (3, *size)}, dtype=F32, step=1e-3, rtol=1e-3)


POOL = {
    "max_k2_s2": pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    "max_k2_s2_float32": pool32(kernel_shape=[2, 2], strides=[2, 2]),
    "max_ceil_odd_float32": pool32(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "max_dilated_disjoint_float32": pool32(
        size=(8, 9), kernel_shape=[2, 2], strides=[3, 3], dilations=[2, 2], pads=[1, 0, 0, 1]
    ),
    "max_k3_s2_p1_overlapping_float32": pool32(
        kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
    ),
    "max_k2_s2_tiling": pool("MaxPool", size=(8, 6), kernel_shape=[2, 2], strides=[2, 2]),
    "max_k3_s3_tiling": pool("MaxPool", size=(6, 9), kernel_shape=[3, 3], strides=[3, 3]),
    "max_k3_s2_p1_overlapping": pool(
        "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
    ),
    "max_k3_s1_overlapping": pool("MaxPool", kernel_shape=[3, 3]),
    "max_ceil_odd": pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
    "max_ceil_k3_s2_p1": pool(
        "MaxPool", size=(8, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1
    ),
    "max_dilated_asymmetric": pool(
        "MaxPool", kernel_shape=[2, 3], dilations=[2, 1], pads=[0, 1, 1, 0]
    ),
    "max_1d": pool("MaxPool", size=(9,), kernel_shape=[3], strides=[2]),
    "avg_k2_s2": pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "avg_k3_s1_p1_exclude_pad": pool("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avg_k3_s1_p1_include_pad": pool(
        "AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1
    ),
    "avg_k3_s2_asymmetric": pool(
        "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0]
    ),
    "avg_ceil_exclude_pad": pool(
        "AveragePool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1
    ),
    "avg_ceil_include_pad": pool(
        "AveragePool",
        size=(8, 7),
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
        count_include_pad=1,
    ),
    "avg_same_upper": pool(
        "AveragePool", kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_UPPER"
    ),
    "global_average": linear([node("GlobalAveragePool", ["x"], ["y"])], {"x": (3, 4, 5)}),
}


@pytest.mark.parametrize("case", list(ELEMENTWISE.values()), ids=list(ELEMENTWISE))
def test_elementwise(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", list(BINARY.values()), ids=list(BINARY))
def test_binary_and_matmul(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", list(GEMM.values()), ids=list(GEMM))
def test_gemm(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", list(SHAPES.values()), ids=list(SHAPES))
def test_shape_reduction_and_normalisation(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", list(CONV.values()), ids=list(CONV))
def test_conv(case: Case) -> None:
    check(case)


@pytest.mark.parametrize("case", list(POOL.values()), ids=list(POOL))
def test_pool(case: Case) -> None:
    check(case)


ACTIVATIONS: dict[str, tuple[onnx.NodeProto, Callable[[np.ndarray], np.ndarray], bool]] = {
    "Relu": (node("Relu", ["x"], ["r"]), lambda x: (x > 0) * 1.0, True),
    "LeakyRelu": (
        node("LeakyRelu", ["x"], ["r"], alpha=0.1),
        lambda x: np.where(x > 0, 1, 0.1),
        True,
    ),
    "Clip": (node("Clip", ["x", "lo", "hi"], ["r"]), lambda x: ((x > 0) & (x < 1)) * 1.0, True),
    "Sigmoid": (node("Sigmoid", ["x"], ["r"]), lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2, False),
}


@pytest.mark.parametrize("relu", RELU_RULES)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_relu_rules(activation: str, relu: str) -> None:
    """Guided backprop and deconvnet change ReLU-like activations only (Clip from 0 counts)."""
    activation_node, derivative, relu_like = ACTIVATIONS[activation]
    weight = const(4, 3)
    case = Case(
        [activation_node, node("MatMul", ["r", "w"], ["y"])],
        {"x": (4,)},
        {"w": weight, "lo": np.array(0.0), "hi": np.array(1.0)},
    )
    x = np.random.default_rng(3).standard_normal((3, 4))
    target = np.array([0, 2, 1])
    grad_model = build_gradient_graph(case.model(), relu=relu)
    (gradient,) = session(grad_model).run([GRADIENT], {"x": x, TARGET: target})
    incoming = weight[:, target].T
    if relu_like and relu == "deconvnet":
        expected = np.maximum(incoming, 0)
    elif relu_like and relu == "guided":
        expected = np.maximum(incoming, 0) * derivative(x)
    else:
        expected = incoming * derivative(x)
    np.testing.assert_allclose(gradient, expected, rtol=1e-7)  # onnxruntime's Sigmoid: ~1e-8


def test_shape_and_dtype_inputs_carry_no_gradient() -> None:
    """A conv bias built as Expand(CastLike(0, x), ...) and a reshape to Shape(x) stay
    constant: naive reachability would ask for a gradient through the bias."""
    case = linear(
        [
            node("CastLike", ["zero", "x"], ["z"]),
            node("Expand", ["z", "channels"], ["bias"]),
            node("Conv", ["x", "w", "bias"], ["c"], pads=[1, 1, 1, 1]),
            node("Shape", ["x"], ["shape"]),
            node("Reshape", ["c", "shape"], ["y"]),
        ],
        {"x": (3, 4, 4)},
        constants={
            "zero": np.array(0.0, np.float32),
            "channels": ints(3),
            "w": const(3, 3, 3, 3).astype(np.float32),
        },
    )
    check(case)


def test_old_opsets_are_upgraded() -> None:
    """Opset 11: Softmax with 2-D coercion, ReduceSum and Unsqueeze with axes attributes."""
    case = Case(
        [
            node("Softmax", ["x"], ["s"], axis=1),
            node("ReduceSum", ["s"], ["r"], axes=[1], keepdims=0),
            node("Unsqueeze", ["r"], ["y"], axes=[1]),
        ],
        {"x": (3, 4)},
        opset=11,
    )
    check(case)
    grad_model = build_gradient_graph(case.model())
    assert grad_model.opset_import[0].version >= 16


@pytest.mark.parametrize(
    ("ir_version", "opset", "expected"), [(11, 17, 10), (7, 12, 8), (8, 17, 8)]
)
def test_ir_version_stays_loadable(ir_version: int, opset: int, expected: int) -> None:
    model = Case([node("Tanh", ["x"], ["y"])], X34, opset=opset).model()
    model.ir_version = ir_version
    grad_model = build_gradient_graph(model)
    assert grad_model.ir_version == expected
    assert {o.domain for o in grad_model.opset_import} == {""}
    assert all(n.domain == "" for n in grad_model.graph.node)


@pytest.mark.parametrize("dtype", [F64, F32])
@pytest.mark.parametrize("block", [2, 3])
def test_tiling_max_pool_routes_ties_to_the_first_maximum(block: int, dtype: int) -> None:
    """Windows of equal values (a ReLU's zeros) give their gradient to the first, row-major
    (float64 scatters, float32 unpools)."""
    shape = (1, 2, 2 * block, 2 * block)
    model = make_model(
        [node("MaxPool", ["x"], ["y"], kernel_shape=[block, block], strides=[block, block])],
        [helper.make_tensor_value_info("x", dtype, ["b", *shape[1:]])],
        [helper.make_tensor_value_info("y", dtype, ["b", 2, 2, 2])],
    )
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, shape).astype(helper.tensor_dtype_to_np_dtype(dtype))  # ties at 0, 1
    x[0, 0, :block, :block] = 0.0  # a window of zeros only
    outputs = x[0].size // block**2
    rows = np.repeat(x, outputs, axis=0)
    targets = np.arange(outputs, dtype=np.int64)
    (gradient,) = session(build_gradient_graph(model)).run([GRADIENT], {"x": rows, TARGET: targets})
    for k in range(outputs):
        channel, rest = divmod(k, 4)
        top, left = (rest // 2) * block, (rest % 2) * block
        window = x[0, channel, top : top + block, left : left + block]
        expected = np.zeros(shape[1:])
        first = np.unravel_index(int(np.argmax(window)), window.shape)
        expected[channel, top + first[0], left + first[1]] = 1.0
        np.testing.assert_array_equal(gradient[k], expected)


@pytest.mark.parametrize(
    ("case", "emitted", "avoided"),
    [
        (conv(channels=3, pads=[1, 1, 1, 1]), "ConvTranspose", "Conv"),
        (conv(channels=8, pads=[1, 1, 1, 1]), "Conv", "ConvTranspose"),
        (conv(channels=4, out=4, group=4, pads=[1, 1, 1, 1]), "Conv", "ConvTranspose"),
        (pool32(kernel_shape=[2, 2], strides=[2, 2]), "MaxUnpool", "ScatterElements"),
        (pool("MaxPool", kernel_shape=[2, 2], strides=[2, 2]), "ScatterElements", "MaxUnpool"),
        (pool32(kernel_shape=[3, 3], strides=[2, 2]), "ScatterElements", "MaxUnpool"),
    ],
    ids=["conv_few_channels", "conv_wide", "depthwise", "pool_disjoint", "pool_f64", "overlap"],
)
def test_backward_picks_the_faster_formulation(case: Case, emitted: str, avoided: str) -> None:
    """Stride-1 conv backward: ConvTranspose below FEW_CHANNELS outputs (onnxruntime's blocked
    Conv pads them to a block), Conv otherwise; disjoint float32 pools unpool, others scatter."""
    grad_model = build_gradient_graph(case.model())
    backward = {n.op_type for n in grad_model.graph.node if n.name.startswith(PREFIX)}
    assert emitted in backward
    assert avoided not in backward


def test_operand_without_batch_sums_over_rows() -> None:
    model = make_model(
        [node("Add", ["x", "w"], ["y"])],
        [
            helper.make_tensor_value_info("x", F64, ["b", 3]),
            helper.make_tensor_value_info("w", F64, [1, 3]),
        ],
        [helper.make_tensor_value_info("y", F64, ["b", 3])],
    )
    grad_model = build_gradient_graph(model, wrt="w")
    feeds = {"x": np.zeros((4, 3)), "w": np.zeros((1, 3)), TARGET: np.array([0, 2, 2, 1])}
    (gradient,) = session(grad_model).run([GRADIENT], feeds)
    np.testing.assert_array_equal(gradient, [[1, 1, 2]])


def refused(case: Case, match: str, **kw: str) -> None:
    with pytest.raises(FailedPrecondition, match=match):
        build_gradient_graph(case.model(), **kw)


def test_weight_gradient_is_refused() -> None:
    model = make_model(
        [node("Conv", ["x", "w"], ["y"])],
        [
            helper.make_tensor_value_info("x", F32, ["b", 2, 4, 4]),
            helper.make_tensor_value_info("w", F32, [3, 2, 3, 3]),
        ],
        [helper.make_tensor_value_info("y", F32, ["b", 3, 2, 2])],
    )
    with pytest.raises(FailedPrecondition, match=r"Conv \(node .*input 1 \(w\)"):
        build_gradient_graph(model, wrt="w")


REFUSED = {
    "strided_slice": (
        Case(
            [node("Slice", ["x", "s", "e", "a", "step"], ["y"])],
            X34,
            {"s": ints(0), "e": ints(4), "a": ints(2), "step": ints(2)},
        ),
        "Slice .*steps other than 1",
    ),
    "dropout_training": (
        Case(
            [node("Dropout", ["x", "", "training"], ["y"], seed=1)],
            X34,
            {"training": np.array(True)},
        ),
        "Dropout .*training mode",
    ),
    "reflect_pad": (
        Case(
            [node("Pad", ["x", "pads"], ["y"], mode="reflect")],
            X34,
            {"pads": ints(0, 1, 1, 0, 1, 1)},
        ),
        "Pad .*modes other than constant",
    ),
    "clip_bound_that_varies": (
        Case(
            [
                node("RandomUniform", [], ["low"], shape=[1], dtype=F64),
                node("Squeeze", ["low"], ["lo"]),
                node("Clip", ["x", "lo"], ["y"]),
            ],
            X34,
        ),
        "Clip .*needs a constant min",
    ),
    "clip_bound_from_wrt": (
        Case(
            [node("ReduceMean", ["x"], ["lo"], keepdims=0), node("Clip", ["x", "lo"], ["y"])], X34
        ),
        r"Clip \(node y\) with respect to input 1 \(lo\)",
    ),
    "matmul_vector": (
        Case([node("MatMul", ["x", "w"], ["y"])], X34, {"w": const(4)}),
        "MatMul .*1-D operands",
    ),
}


@pytest.mark.parametrize(("case", "match"), list(REFUSED.values()), ids=list(REFUSED))
def test_unsupported_variants_are_refused(case: Case, match: str) -> None:
    refused(case, match)


def test_rules_cover_the_first_increment() -> None:
    wanted = {
        *("Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Gelu", "Erf"),
        *("Pow", "Sqrt", "Exp", "Log", "Neg", "Identity", "Dropout", "Cast"),
        *("Add", "Sub", "Mul", "Div", "MatMul", "Gemm", "Conv", "BatchNormalization"),
        *("MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum"),
        *("Flatten", "Reshape", "Transpose", "Concat", "Split", "Slice", "Squeeze", "Unsqueeze"),
        *("Softmax", "LogSoftmax"),
    }
    assert wanted <= SUPPORTED_OPS


def test_unknown_names_are_refused() -> None:
    case = Case([node("Tanh", ["x"], ["y"])], X34)
    refused(case, "'nope' is neither", wrt="nope")
    refused(case, "'nope' is not a model output", output="nope")


def test_output_independent_of_wrt_is_refused() -> None:
    case = Case(
        [node("Tanh", ["x"], ["t"]), node("Add", ["c", "c"], ["y"])], {"x": (3,), "c": (3,)}
    )
    refused(case, "'y' does not depend differentiably on 'x'")


def test_piecewise_constant_path_is_refused() -> None:
    """Round has a zero derivative: the gradient never reaches x, which is an error, not a zero."""
    case = Case([node("Round", ["x"], ["r"]), node("Mul", ["r", "x"], ["y"])], X34)
    check(case)  # through the Mul's second operand only
    refused(Case([node("Round", ["x"], ["y"])], X34), "does not depend differentiably")


def test_clashing_names_are_refused() -> None:
    refused(Case([node("Tanh", ["x"], ["target"]), node("Neg", ["target"], ["y"])], X34), "target")


def test_symbolic_non_batch_dims_are_refused() -> None:
    model = Case([node("Tanh", ["x"], ["y"])], X34).model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "width"
    with pytest.raises(FailedPrecondition, match="symbolic dim at axis 2"):
        build_gradient_graph(model)


def test_unknown_relu_rule_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="relu must be one of"):
        build_gradient_graph(Case([node("Relu", ["x"], ["y"])], X34).model(), relu="smooth")


def test_a_minus_one_batch_dim_is_dynamic_and_elsewhere_refused() -> None:
    def relu_model(dims: list[int]) -> onnx.ModelProto:
        return make_model(
            [node("Relu", ["x"], ["y"])],
            [helper.make_tensor_value_info("x", F64, dims)],
            [helper.make_tensor_value_info("y", F64, dims)],
        )

    grad_model = build_gradient_graph(relu_model([-1, 3]))
    feeds = {"x": np.array([[1.0, -1.0, 2.0]] * 2), TARGET: np.array([0, 2])}
    (gradient,) = session(grad_model).run([GRADIENT], feeds)
    np.testing.assert_array_equal(gradient, [[1, 0, 0], [0, 0, 1]])
    with pytest.raises(FailedPrecondition, match="symbolic dim at axis 1"):
        build_gradient_graph(relu_model([2, -1]))
