"""The backward graph's rewrites: a ReLU mask moved before the unpooling, BatchNorm scales folded
into the next convolution's kernel. Each keeps the gradient of the graph built without them
(whose rules test_gradient_rules checks) and removes the work it is for."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.unit.test_gradient_rules import F32, Case, const, session
from xaid_server.graphs.gradient import GRADIENT, PREFIX, TARGET, build_gradient_graph
from xaid_server.graphs.gradient import builder as gradient_builder

node = helper.make_node


def build_unoptimised(model: onnx.ModelProto) -> onnx.ModelProto:
    """The gradient graph as the rules emit it, without the rewrites."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradient_builder, "optimise", lambda *args: None)
        return build_gradient_graph(model)


def stem(batch_norm: bool) -> Case:
    """Conv (8 channels) -> [BatchNormalization] -> Relu -> 2x2 MaxPool -> Conv, float32."""
    channels = 8
    constants = {
        "w1": const(channels, 3, 3, 3, seed=1).astype(np.float32),
        "w2": const(4, channels, 3, 3, seed=2).astype(np.float32),
    }
    nodes = [node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1])]
    activation = "c1"
    if batch_norm:
        rng = np.random.default_rng(3)
        constants |= {
            "gamma": rng.uniform(0.5, 2.0, channels).astype(np.float32),
            "beta": rng.standard_normal(channels).astype(np.float32),
            "mean": rng.standard_normal(channels).astype(np.float32),
            "var": rng.uniform(0.5, 2.0, channels).astype(np.float32),
        }
        nodes.append(node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["bn"]))
        activation = "bn"
    nodes += [
        node("Relu", [activation], ["r"]),
        node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ]
    return Case(nodes, {"x": (3, 8, 8)}, constants, dtype=F32)


def backward_ops(model: onnx.ModelProto) -> collections.Counter[str]:
    return collections.Counter(
        n.op_type for n in model.graph.node if n.name.startswith(PREFIX) and n.op_type != "Shape"
    )


def gradients(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    outputs = int(np.prod(session(model).get_outputs()[0].shape[1:]))
    rows = np.repeat(x, outputs, axis=0)
    targets = np.arange(outputs, dtype=np.int64)
    (gradient,) = session(model).run([GRADIENT], {"x": rows, TARGET: targets})
    assert np.count_nonzero(gradient) > gradient.size // 10, "too few paths to compare"
    return np.asarray(gradient)


def inputs_with_ties() -> np.ndarray:
    """Whole-number pixels: many equal values in a window, and ReLU zeros."""
    return np.random.default_rng(4).integers(-2, 3, (1, 3, 8, 8)).astype(np.float32)


def test_the_relu_mask_moves_before_the_unpooling() -> None:
    model = stem(batch_norm=False).model()
    plain, rewritten = build_unoptimised(model), build_gradient_graph(model)
    unpool = next(n for n in rewritten.graph.node if n.op_type == "MaxUnpool")
    masked = next(n for n in rewritten.graph.node if unpool.input[0] in n.output)
    assert masked.op_type == "Mul", "the unpooling reads the masked pooled gradient"
    assert not any(unpool.output[0] in n.input and n.op_type == "Mul" for n in rewritten.graph.node)
    x = inputs_with_ties()
    np.testing.assert_array_equal(gradients(rewritten, x), gradients(plain, x))


def test_batch_norm_scales_fold_into_the_next_kernel() -> None:
    model = stem(batch_norm=True).model()
    plain, rewritten = build_unoptimised(model), build_gradient_graph(model)
    before, after = backward_ops(plain), backward_ops(rewritten)
    assert after["Mul"] == before["Mul"] - 1, "the BatchNorm's scale is gone"
    x = inputs_with_ties()
    np.testing.assert_allclose(gradients(rewritten, x), gradients(plain, x), rtol=1e-5, atol=1e-5)
