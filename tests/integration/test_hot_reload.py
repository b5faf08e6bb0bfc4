"""Hot reload through a real server: new versions switch in, broken files never do."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

ROWS = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    return tmp_path


@pytest.fixture
def server(repository: Path) -> Iterator[RunningServer]:
    server = RunningServer(repository, poll_interval=0.1)
    yield server
    server.stop()


def eventually(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def test_garbage_keeps_the_old_version_and_a_new_version_switches_in(
    server: RunningServer, repository: Path
) -> None:
    stub = xaid_pb2_grpc.ExplainerStub(grpc.insecure_channel(server.address))
    before = stub.GetModel(xaid_pb2.GetModelRequest(model="tabular"))
    failures: list[grpc.StatusCode] = []
    served = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                stub.Predict(xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(ROWS)]))
                served += 1
            except grpc.RpcError as error:
                failures.append(error.code())

    client = threading.Thread(target=load)
    client.start()
    try:
        good = (repository / "tabular" / "1" / "model.onnx").read_bytes()
        (repository / "tabular" / "1" / "model.onnx").write_bytes(b"not an onnx model" * 100)
        failed = server.server.metrics.registry.get_sample_value
        eventually(
            lambda: (
                (failed("xaid_model_load_total", {"model": "tabular", "result": "failure"}) or 0)
                >= 1
            )
        )
        still = stub.GetModel(xaid_pb2.GetModelRequest(model="tabular"))
        assert (still.version, still.sha256) == (before.version, before.sha256)

        (repository / "tabular" / "2").mkdir()
        (repository / "tabular" / "2" / "model.onnx").write_bytes(good)
        eventually(lambda: stub.GetModel(xaid_pb2.GetModelRequest(model="tabular")).version == "2")
    finally:
        stop.set()
        client.join()
    assert failures == []
    assert served > 0
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetModel(xaid_pb2.GetModelRequest(model="tabular", version="1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_config_less_model_is_served_with_inferred_defaults(
    server: RunningServer, repository: Path
) -> None:
    (repository / "bare" / "1").mkdir(parents=True)
    shutil.copy(
        repository / "tabular" / "1" / "model.onnx", repository / "bare" / "1" / "model.onnx"
    )
    stub = xaid_pb2_grpc.ExplainerStub(grpc.insecure_channel(server.address))

    def listed() -> bool:
        return "bare" in {m.name for m in stub.ListModels(xaid_pb2.ListModelsRequest()).models}

    eventually(listed)
    info = stub.GetModel(xaid_pb2.GetModelRequest(model="bare"))
    assert info.kind == "tabular"
    assert list(info.labels) == []
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(
            model="bare", inputs=[to_tensor(ROWS)], occlusion=xaid_pb2.Occlusion()
        )
    )
    assert list(reply.occlusion.window) == [1]
    assert list(reply.target.labels) == [str(reply.target.class_indices[0])]


def test_a_model_without_gradient_rules_serves_the_other_methods(
    server: RunningServer, repository: Path
) -> None:
    """GetModel says why gradients are missing; gradient methods answer FAILED_PRECONDITION."""
    from onnx import TensorProto, helper, save

    nodes = [
        helper.make_node("Reshape", ["x", "square"], ["matrix"]),
        helper.make_node("Det", ["matrix"], ["det"], name="determinant"),
        helper.make_node("Unsqueeze", ["det", "axis"], ["score"]),
    ]
    graph = helper.make_graph(
        nodes,
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            helper.make_tensor("square", TensorProto.INT64, [3], [-1, 2, 2]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (repository / "odd" / "1").mkdir(parents=True)
    save(model, repository / "odd" / "1" / "model.onnx")
    stub = xaid_pb2_grpc.ExplainerStub(grpc.insecure_channel(server.address))
    eventually(
        lambda: "odd" in {m.name for m in stub.ListModels(xaid_pb2.ListModelsRequest()).models}
    )
    info = stub.GetModel(xaid_pb2.GetModelRequest(model="odd"))
    assert not info.gradients.available
    assert "Det" in info.gradients.reason
    assert "determinant" in info.gradients.reason
    assert "occlusion" in info.methods
    assert "saliency" not in info.methods
    x = to_tensor(np.array([[1.0, 2.0, 3.0, 4.0]], np.float32))
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(xaid_pb2.ExplainRequest(model="odd", inputs=[x], saliency=xaid_pb2.Saliency()))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Det" in (caught.value.details() or "")
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(model="odd", inputs=[x], occlusion=xaid_pb2.Occlusion())
    )
    assert list(reply.attribution.shape) == [1, 4]
