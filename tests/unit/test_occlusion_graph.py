"""The occlusion evaluation graph gives the scores of host-built occluded copies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.helpers import make_model
from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.occlusion import build_occlusion_graph

RNG = np.random.default_rng(7)
CLASSES = 5


def conv_model(opset: int = 17) -> onnx.ModelProto:
    """Conv-ReLU-GAP-Gemm over [b, 3, h, w] with dynamic h, w, plus an unused second output."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "w", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, "h", "w"])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", CLASSES]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["b", CLASSES]),
        ],
        {
            "k": RNG.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "w": RNG.normal(size=(4, CLASSES)).astype(np.float32),
            "bias": RNG.normal(size=CLASSES).astype(np.float32),
        },
        opset=opset,
    )


def tabular_model() -> onnx.ModelProto:
    """tanh(x W) over [b, 6] features."""
    return make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
        {"w": RNG.normal(size=(6, 3)).astype(np.float32)},
    )


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def host_scores(
    plain: ort.InferenceSession,
    x: np.ndarray,
    starts: np.ndarray,
    window: tuple[int, ...],
    baseline: float,
    target: int,
) -> np.ndarray:
    """Occluded copies built with numpy, one plain batched run."""
    copies = np.repeat(x, len(starts), axis=0)
    lead = x.ndim - len(window)
    for copy, start in zip(copies, starts, strict=True):
        box = tuple(slice(int(s), int(s) + w) for s, w in zip(start, window, strict=True))
        copy[(slice(None),) * (lead - 1) + box] = baseline
    return np.asarray(plain.run(None, {"x": copies})[0])[:, target]


def graph_scores(
    graph: ort.InferenceSession,
    x: np.ndarray,
    starts: np.ndarray,
    window: tuple[int, ...],
    baseline: float,
    target: int,
) -> np.ndarray:
    feeds = {
        "xaid_x": x,
        "xaid_starts": starts.astype(np.int64),
        "xaid_window": np.asarray(window, dtype=np.int64),
        "xaid_baseline": np.asarray(baseline, dtype=x.dtype),
        "xaid_target": np.asarray(target, dtype=np.int64),
    }
    return np.asarray(graph.run(None, feeds)[0])


def grid(shape: tuple[int, ...], window: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """All window starts over the trailing dims of `shape`, row-major."""
    axes = [
        np.arange(0, size - w + 1, s)
        for size, w, s in zip(shape[len(shape) - len(window) :], window, stride, strict=True)
    ]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(window))


@pytest.mark.parametrize(
    ("window", "stride", "baseline"),
    [
        ((3, 3), (2, 2), 0.0),
        ((4, 5), (4, 3), 0.5),
        ((1, 1), (3, 5), -1.0),
        ((10, 12), (1, 1), 0.0),
        ((2, 4, 4), (1, 3, 3), 0.25),  # channels windowed too
        ((5,), (2,), 0.0),  # last dim only: every channel and row covered whole
    ],
)
def test_image_scores_match_host_occlusion(
    window: tuple[int, ...], stride: tuple[int, ...], baseline: float
) -> None:
    model = conv_model()
    graph = session(build_occlusion_graph(model, "x", "logits"))
    x = RNG.normal(size=(1, 3, 10, 12)).astype(np.float32)
    starts = grid(x.shape, window, stride)
    for target in (0, 3):
        expected = host_scores(session(model), x, starts, window, baseline, target)
        actual = graph_scores(graph, x, starts, window, baseline, target)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("window", "stride"), [((1,), (1,)), ((2,), (1,)), ((4,), (2,))])
def test_tabular_scores_match_host_occlusion(
    window: tuple[int, ...], stride: tuple[int, ...]
) -> None:
    model = tabular_model()
    graph = session(build_occlusion_graph(model, "x", "y"))
    x = RNG.normal(size=(1, 6)).astype(np.float32)
    starts = grid(x.shape, window, stride)
    expected = host_scores(session(model), x, starts, window, 0.3, 2)
    np.testing.assert_allclose(graph_scores(graph, x, starts, window, 0.3, 2), expected, rtol=1e-6)


def test_one_graph_serves_every_window_and_input_size() -> None:
    model = conv_model()
    plain, graph = session(model), session(build_occlusion_graph(model, "x", "logits"))
    for size, window, stride in [
        ((1, 3, 10, 12), (3, 4), (2, 2)),
        ((1, 3, 7, 9), (2, 2), (1, 3)),
        ((1, 3, 16, 16), (8, 8), (4, 4)),
    ]:
        x = RNG.normal(size=size).astype(np.float32)
        starts = grid(size, window, stride)
        expected = host_scores(plain, x, starts, window, 0.0, 1)
        actual = graph_scores(graph, x, starts, window, 0.0, 1)
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_graph_keeps_ir_and_opset_and_exposes_only_the_score() -> None:
    built = build_occlusion_graph(conv_model(), "x", "logits")
    assert built.ir_version == 8
    assert [(o.domain, o.version) for o in built.opset_import] == [("", 17)]
    assert [i.name for i in built.graph.input] == [
        "xaid_x",
        "xaid_starts",
        "xaid_window",
        "xaid_baseline",
        "xaid_target",
    ]
    assert [o.name for o in built.graph.output] == ["xaid_score"]
    # the second output (probabilities) is not needed and pruned
    assert "Softmax" not in {node.op_type for node in built.graph.node}


def test_old_opset_is_upgraded() -> None:
    model = conv_model(opset=11)
    model.ir_version = 6
    graph = build_occlusion_graph(model, "x", "logits")
    assert graph.opset_import[0].version == 13
    x = RNG.normal(size=(1, 3, 6, 6)).astype(np.float32)
    starts = grid(x.shape, (3, 3), (3, 3))
    expected = host_scores(session(model), x, starts, (3, 3), 0.0, 4)
    actual = graph_scores(session(graph), x, starts, (3, 3), 0.0, 4)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_several_inputs_are_refused() -> None:
    model = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    with pytest.raises(FailedPrecondition, match="single-input"):
        build_occlusion_graph(model, "a", "y")


def test_inputs_without_a_per_example_dimension_are_refused() -> None:
    model = make_model(
        [helper.make_node("Neg", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    with pytest.raises(FailedPrecondition, match="per-example dimension"):
        build_occlusion_graph(model, "x", "y")
