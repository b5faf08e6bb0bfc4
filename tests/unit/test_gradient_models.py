"""Gradient graphs of the demo models: torch float64 autograd agrees, one graph serves every batch
size, the original outputs are untouched, and unsupported models are refused by name."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.gradient import (
    GRADIENT,
    RELU_RULES,
    TARGET,
    WRT_VALUE,
    build_gradient_graph,
)

MODELS = Path(__file__).parents[2] / "service" / "xaid_server" / "demo" / "models"
SHAPES = {"shapes": (3, 64, 64), "tabular": (30,)}
CLASSES = {"shapes": 7, "tabular": 2}
# the CNN's Grad-CAM layer, and a block output read by two branches (conv and shortcut)
CAM_LAYER = "/blocks/blocks.2/Relu_1_output_0"
BRANCHING = "/blocks/blocks.0/Relu_1_output_0"
DECISION_MARGIN = 1e-6  # rows closer than this to a ReLU kink or a max-pool tie are not compared


@cache
def demo(name: str) -> onnx.ModelProto:
    return onnx.load(MODELS / name / "1" / "model.onnx")


@cache
def gradient_session(
    name: str, wrt: str | None = None, relu: str = "standard"
) -> ort.InferenceSession:
    return session(build_gradient_graph(demo(name), wrt=wrt, relu=relu))


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def examples(name: str, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((batch, *SHAPES[name]), dtype=np.float32)
    if name == "tabular":
        x = x * 4 - 2
    return x, rng.integers(0, CLASSES[name], batch)


class TorchReference:
    """The demo graphs evaluated op by op in torch float64, with ReLU rules swappable.

    Also records, per row, how close the float64 run came to a decision a float32 run could
    take differently (a ReLU input near 0, a max-pool window with a near tie).
    """

    def __init__(self, model: onnx.ModelProto, relu: str = "standard") -> None:
        self.torch: Any = pytest.importorskip("torch")
        self.model = model
        self.relu = relu
        self.weights = {
            t.name: self.torch.from_numpy(numpy_helper.to_array(t).astype(np.float64))
            for t in model.graph.initializer
        }

    def run(self, x: np.ndarray, keep: str | None = None) -> tuple[Any, dict[str, Any], np.ndarray]:
        """Logits, the tensors by name, and the per-row decision margin."""
        torch = self.torch
        functional = torch.nn.functional
        env: dict[str, Any] = dict(self.weights)
        env[self.model.graph.input[0].name] = torch.from_numpy(
            x.astype(np.float64)
        ).requires_grad_()
        margin = np.full(len(x), np.inf)
        for node in self.model.graph.node:
            a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
            args = [env[name] for name in node.input]
            if node.op_type == "Conv":
                top, left, bottom, right = a["pads"]
                padded = functional.pad(args[0], (left, right, top, bottom))
                y = functional.conv2d(padded, *args[1:], stride=a["strides"])
            elif node.op_type == "Relu":
                y = self._relu(args[0])
                near = args[0].detach().abs().flatten(1).min(dim=1).values.numpy()
                margin = np.minimum(margin, near)
            elif node.op_type == "MaxPool":
                assert not any(a["pads"])
                y = functional.max_pool2d(args[0], a["kernel_shape"], a["strides"])
                margin = np.minimum(margin, self._pool_gap(args[0], a))
            elif node.op_type == "Add":
                y = args[0] + args[1]
            elif node.op_type == "Sub":
                y = args[0] - args[1]
            elif node.op_type == "Div":
                y = args[0] / args[1]
            elif node.op_type == "ReduceMean":
                y = args[0].mean(dim=a["axes"], keepdim=bool(a["keepdims"]))
            elif node.op_type == "Gemm":
                assert a == {"alpha": 1.0, "beta": 1.0, "transB": 1}
                y = args[0] @ args[1].T + args[2]
            else:
                raise AssertionError(f"the reference lacks {node.op_type}")
            if node.output[0] == keep:
                y.retain_grad()
            env[node.output[0]] = y
        return env[self.model.graph.output[0].name], env, margin

    def _relu(self, x: Any) -> Any:
        torch = self.torch
        if self.relu == "standard":
            return torch.relu(x)
        # deconvnet: identity backward, then only positive gradient; guided: also the mask
        y = torch.relu(x) if self.relu == "guided" else x + (torch.relu(x) - x).detach()
        y.register_hook(lambda g: g.clamp(min=0))
        return y

    def _pool_gap(self, x: Any, a: dict[str, Any]) -> np.ndarray:
        """Per row, the smallest gap between the largest and second-largest value of a window."""
        k = a["kernel_shape"]
        windows = self.torch.nn.functional.unfold(x.detach(), k, stride=a["strides"])
        windows = windows.reshape(len(x), x.shape[1], k[0] * k[1], -1)
        top = windows.topk(2, dim=2).values
        gap = top[:, :, 0] - top[:, :, 1]
        gap[top[:, :, 0] <= 0] = np.inf  # ties among zeros after a ReLU get no gradient anyway
        return np.asarray(gap.flatten(1).min(dim=1).values.numpy())

    def gradient(
        self, x: np.ndarray, target: np.ndarray, wrt: str | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """d logits[row, target[row]] / d wrt, the value of wrt, and the decision margin."""
        logits, env, margin = self.run(x, keep=wrt)
        logits[np.arange(len(x)), target].sum().backward()
        tensor = env[wrt or self.model.graph.input[0].name]
        return tensor.grad.numpy(), tensor.detach().numpy(), margin


def assert_close_rows(actual: np.ndarray, expected: np.ndarray, margin: np.ndarray) -> None:
    """Rows agree to 1e-5 of the largest magnitude, except rows near a decision flip."""
    rows = margin > DECISION_MARGIN
    assert rows.sum() >= len(rows) // 2, f"too many rows near a decision: {margin}"
    scale = np.abs(expected[rows]).max()
    np.testing.assert_allclose(actual[rows], expected[rows], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("relu", RELU_RULES)
@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_torch_float64(name: str, relu: str) -> None:
    reference = TorchReference(demo(name), relu)
    x, target = examples(name, 7)
    (gradient,) = gradient_session(name, relu=relu).run([GRADIENT], {"input": x, TARGET: target})
    expected, _, margin = reference.gradient(x, target)
    assert_close_rows(gradient, expected, margin)


@pytest.mark.parametrize(
    ("name", "wrt"), [("shapes", CAM_LAYER), ("shapes", BRANCHING), ("tabular", "/Div_output_0")]
)
def test_intermediate_wrt_returns_its_value_and_gradient(name: str, wrt: str) -> None:
    reference = TorchReference(demo(name))
    x, target = examples(name, 7, seed=1)
    run = gradient_session(name, wrt=wrt).run
    gradient, value = run([GRADIENT, WRT_VALUE], {"input": x, TARGET: target})
    expected, expected_value, margin = reference.gradient(x, target, wrt)
    assert gradient.shape == value.shape == expected.shape
    np.testing.assert_allclose(
        value, expected_value, rtol=0, atol=1e-5 * np.abs(expected_value).max()
    )
    assert_close_rows(gradient, expected, margin)


@pytest.mark.parametrize("name", list(SHAPES))
def test_one_graph_serves_every_batch_size(name: str) -> None:
    """Rows are independent: each row's gradient is the same alone or among 6 or 31 others."""
    forward, backward = session(demo(name)), gradient_session(name)
    x, target = examples(name, 32, seed=2)
    results = {
        batch: backward.run(None, {"input": x[:batch], TARGET: target[:batch]})
        for batch in (1, 7, 32)
    }
    full = results[32][1]
    for batch, (logits, gradient) in results.items():
        assert gradient.shape == (batch, *SHAPES[name])
        np.testing.assert_allclose(gradient, full[:batch], rtol=0, atol=1e-6 * np.abs(full).max())
        # the original outputs come from the original nodes, bit for bit
        np.testing.assert_array_equal(logits, forward.run(None, {"input": x[:batch]})[0])


def test_tabular_matches_finite_differences_in_float64() -> None:
    """Without torch: the MLP in float64 against central differences along random directions."""
    model = as_float64(demo("tabular"))
    forward, backward = session(model), session(build_gradient_graph(model))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 30))
    target = rng.integers(0, 2, 5)
    (gradient,) = backward.run([GRADIENT], {"input": x, TARGET: target})
    for _ in range(3):
        u = rng.standard_normal(x.shape)
        step = 1e-6
        plus, minus = (forward.run(None, {"input": x + s * u})[0] for s in (step, -step))
        rows = np.arange(len(x))
        directional = (plus[rows, target] - minus[rows, target]) / (2 * step)
        np.testing.assert_allclose((gradient * u).sum(axis=1), directional, rtol=1e-6)


def as_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    double = onnx.ModelProto()
    double.CopyFrom(model)
    graph = double.graph
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(
                numpy_helper.from_array(
                    numpy_helper.to_array(tensor).astype(np.float64), tensor.name
                )
            )
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return double


def test_relu_rules_change_only_relu_backward_nodes() -> None:
    """The variants differ from the standard graph only in the nodes emitted for ReLUs."""
    graphs = {relu: build_gradient_graph(demo("shapes"), relu=relu) for relu in RELU_RULES}
    kinds = {relu: [n.op_type for n in g.graph.node] for relu, g in graphs.items()}
    relu_free = {op for op in kinds["standard"] if op not in ("Relu", "Greater", "Cast", "Mul")}
    for relu in ("guided", "deconvnet"):
        assert [op for op in kinds[relu] if op in relu_free] == [
            op for op in kinds["standard"] if op in relu_free
        ]
        assert kinds[relu] != kinds["standard"]


def unsupported_model(op: str, domain: str = "") -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node(op, ["r"], ["d"], name="odd_one", domain=domain),
        helper.make_node("Unsqueeze", ["d", "axes"], ["y"], name="unsqueeze"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


@pytest.mark.parametrize(
    ("op", "domain", "named"), [("Det", "", "Det"), ("Swish", "custom.ops", "custom.ops.Swish")]
)
def test_unsupported_op_is_refused_by_name(op: str, domain: str, named: str) -> None:
    with pytest.raises(
        FailedPrecondition, match=f"no gradient rule for op {named} \\(node odd_one\\)"
    ):
        build_gradient_graph(unsupported_model(op, domain))
