"""Gradient graphs in a served repository: a shipped `model.grad.onnx`, the disk cache, and a
model with an op without a backward rule, through gRPC and the `xaid` command line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import make_model
from tests.running_server import RunningServer
from xaid._codec import from_tensor, to_tensor
from xaid.cli import main
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.explainers.gradients import gradient_key, output_name
from xaid_server.graphs.gradient import GRADIENT, TARGET

X = np.array([[0.3, -1.2, 2.0], [1.5, 0.1, -0.4]], dtype=np.float32)


def sine_model() -> onnx.ModelProto:
    """y = sin(x): Sin has no backward rule, so the server cannot build this gradient graph."""
    return make_model(
        [helper.make_node("Sin", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )


def sine_gradient_graph() -> onnx.ModelProto:
    """What a user ships for it: y and d y[target] / dx = cos(x) * one_hot(target)."""
    nodes = [
        helper.make_node("Sin", ["x"], ["y"]),
        helper.make_node("Cos", ["x"], ["cos"]),
        helper.make_node("Unsqueeze", [TARGET, "one"], ["column"]),
        helper.make_node("Equal", ["column", "columns"], ["hit"]),
        helper.make_node("Cast", ["hit"], ["seed"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["cos", "seed"], [GRADIENT]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info(TARGET, TensorProto.INT64, ["batch"]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info(GRADIENT, TensorProto.FLOAT, ["batch", 3]),
        ],
        {"one": np.array([1], np.int64), "columns": np.arange(3, dtype=np.int64)},
    )


def tanh_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Tanh", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )


def add_model(root: Path, name: str, model: onnx.ModelProto, config: str = "") -> Path:
    folder = root / name / "1"
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    (root / name / "config.yaml").write_text(f"kind: tabular\n{config}")
    return folder


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    add_model(root, "sine", sine_model())
    onnx.save(sine_gradient_graph(), add_model(root, "shipped", sine_model()) / "model.grad.onnx")
    # a file that is not a gradient graph (the model itself): refused, the server builds one
    onnx.save(tanh_model(), add_model(root, "misshipped", tanh_model()) / "model.grad.onnx")
    add_model(root, "tanh", tanh_model(), "precision: tf32\n")
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    running = RunningServer(repository, gradient_cache=repository.parent / "cache")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[xaid_pb2_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield xaid_pb2_grpc.ExplainerStub(channel)


def support(stub: xaid_pb2_grpc.ExplainerStub, name: str) -> xaid_pb2.GradientSupport:
    return stub.GetModel(xaid_pb2.GetModelRequest(model=name), timeout=30).gradients


def saliency(stub: xaid_pb2_grpc.ExplainerStub, name: str, target: int = 1) -> np.ndarray:
    request = xaid_pb2.ExplainRequest(
        model=name,
        inputs=[to_tensor(X, "x")],
        saliency=xaid_pb2.Saliency(),
        target=xaid_pb2.Target(class_index=target),
    )
    return from_tensor(stub.Explain(request, timeout=60).attribution)


def test_an_op_without_a_rule_is_reported_by_get_model(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    gradients = support(stub, "sine")
    assert not gradients.available
    assert "Sin" in gradients.reason
    assert gradients.source == ""


def test_explain_names_the_op_without_a_rule(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        saliency(stub, "sine")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no gradient rule for op Sin" in str(info.value.details())


def test_the_cli_prints_the_op_without_a_rule(
    server: RunningServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = tmp_path / "rows.npy"
    np.save(rows, X)
    argv = ["--server", server.address, "explain", "--model", "sine", "--method", "saliency"]
    assert main([*argv, "--npy", str(rows), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: FAILED_PRECONDITION: ")
    assert "no gradient rule for op Sin" in err
    assert "Traceback" not in err


def test_a_shipped_gradient_graph_is_used(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    gradients = support(stub, "shipped")
    assert gradients.available, gradients.reason
    assert gradients.source == "shipped"
    expected = np.zeros_like(X)
    expected[:, 2] = np.cos(X[:, 2])
    np.testing.assert_allclose(saliency(stub, "shipped", target=2), expected, rtol=1e-6)


def test_a_shipped_file_without_the_gradient_is_refused_and_the_graph_built(
    stub: xaid_pb2_grpc.ExplainerStub,
) -> None:
    gradients = support(stub, "misshipped")
    assert gradients.available, gradients.reason
    expected = np.zeros_like(X)
    expected[:, 1] = 1 - np.tanh(X[:, 1]) ** 2
    np.testing.assert_allclose(saliency(stub, "misshipped"), expected, rtol=1e-5, atol=1e-7)


def test_precision_is_reported(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    assert support(stub, "tanh").precision == "tf32"
    assert support(stub, "misshipped").precision == "strict"


def test_built_graphs_are_cached_by_the_model_hash(
    stub: xaid_pb2_grpc.ExplainerStub, repository: Path
) -> None:
    """`misshipped` and `tanh` are the same bytes: the first one loaded (in name order) builds,
    the second reads the first's graphs from the cache."""
    assert support(stub, "misshipped").source == "built"
    assert support(stub, "tanh").source == "cache"
    cached = sorted((repository.parent / "cache").iterdir())
    assert cached
    assert all(p.suffix == ".onnx" for p in cached)  # no temporary file left behind


def test_loading_a_model_measures_its_gradient_chunk(demo_server: RunningServer) -> None:
    repository = demo_server.server.repository
    assert repository is not None
    for name in ("shapes", "tabular"):
        model = repository.get(name)
        key = gradient_key(output_name(model), "standard", model.input.name)
        size = model.chunks[key]
        assert 1 <= size <= model.config.max_batch_size
        assert size & (size - 1) == 0
