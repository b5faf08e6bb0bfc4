"""Model files that try to read outside their folder, or to take the loader down, stay out.

No input is known that crashes onnxruntime 1.31 itself at load time (malformed protobufs, deep
subgraph nesting, bad sparse indices and out-of-range constants all raise cleanly), so the probe
process is exercised with a genuine onnxruntime failure that only the probe turns into a refusal:
a model whose constant folding materialises a 1 GiB tensor at session creation, loaded under the
probe's address-space cap, where onnxruntime fails with std::bad_alloc and the child exits 1.
The same file in the server process would have cost the server that gigabyte per load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.helpers import make_model
from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.errors import ModelLoadError
from xaid_server.model_files import check_location, read_model_file
from xaid_server.probe import Prober

X = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
Y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
WEIGHTS = np.arange(4, dtype=np.float32).reshape(1, 4)


def add_model() -> onnx.ModelProto:
    return make_model([helper.make_node("Add", ["x", "w"], ["y"])], [X], [Y], {"w": WEIGHTS})


def with_external_weights(location: str) -> bytes:
    """The Add model with its weights stored outside the file at `location`."""
    model = add_model()
    weights = model.graph.initializer[0]
    weights.ClearField("raw_data")
    weights.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weights.external_data.add(key=key, value=value)
    return model.SerializeToString()


def memory_bomb() -> bytes:
    """Tile folds into a 16000 x 16000 float constant (1 GiB) when the session is created."""
    nodes = [
        helper.make_node("Tile", ["one", "reps"], ["big"]),
        helper.make_node("ReduceSum", ["big", "axes"], ["s"], keepdims=1),
        helper.make_node("Add", ["x", "s"], ["y"]),
    ]
    constants: dict[str, np.ndarray] = {
        "one": np.ones((1, 1), np.float32),
        "reps": np.array([16000, 16000], np.int64),
        "axes": np.array([0, 1], np.int64),
    }
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])
    return make_model(nodes, [x], [y], constants).SerializeToString()


def place(root: Path, name: str, data: bytes) -> Path:
    path = root / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file beside the repository that no model may read."""
    secret = tmp_path_factory.mktemp("outside") / "secret.bin"
    secret.write_bytes(np.full(4, 7, np.float32).tobytes())
    return secret


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, outside: Path) -> Path:
    root = tmp_path_factory.mktemp("repository")
    place(root, "plain", add_model().SerializeToString())
    inside = place(root, "inside", with_external_weights("weights.bin"))
    (inside.parent / "weights.bin").write_bytes(WEIGHTS.tobytes())
    place(
        root, "relative", with_external_weights("../../../" + outside.parent.name + "/secret.bin")
    )
    place(root, "absolute", with_external_weights(str(outside)))
    linked = place(root, "linked_data", with_external_weights("weights.bin"))
    (linked.parent / "weights.bin").symlink_to(outside)
    (root / "linked_model" / "1").mkdir(parents=True)
    (root / "linked_model" / "1" / "model.onnx").symlink_to(root / "plain" / "1" / "model.onnx")
    place(root, "bomb", memory_bomb())
    return root


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[RunningServer]:
    server = RunningServer(repository, probe_memory_bytes=1 << 30)
    yield server
    server.stop()


def loads(server: RunningServer, name: str, result: str) -> float:
    value = server.server.metrics.registry.get_sample_value(
        "xaid_model_load_total", {"model": name, "result": result}
    )
    return value or 0.0


def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def predict(server: RunningServer, model: str) -> np.ndarray:
    with grpc.insecure_channel(server.address) as channel:
        stub = xaid_pb2_grpc.ExplainerStub(channel)
        x = np.zeros((1, 4), np.float32)
        reply = stub.Predict(xaid_pb2.PredictRequest(model=model, inputs=[to_tensor(x)]))
        return np.frombuffer(reply.outputs[0].data, np.float32)


@pytest.mark.parametrize("name", ["relative", "absolute", "linked_data", "linked_model", "bomb"])
def test_hostile_files_are_refused_and_the_server_keeps_serving(
    server: RunningServer, name: str
) -> None:
    assert loads(server, name, "failure") == 1
    assert loads(server, name, "success") == 0
    with pytest.raises(grpc.RpcError) as caught:
        predict(server, name)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    np.testing.assert_array_equal(predict(server, "plain"), WEIGHTS[0])


def test_external_data_inside_the_folder_is_served(server: RunningServer) -> None:
    np.testing.assert_array_equal(predict(server, "inside"), WEIGHTS[0])


def test_a_hostile_file_arriving_while_serving_is_refused(tmp_path: Path) -> None:
    place(tmp_path, "plain", add_model().SerializeToString())
    server = RunningServer(tmp_path, poll_interval=0.1)
    try:
        place(tmp_path, "late", with_external_weights("/proc/self/environ"))
        eventually(lambda: loads(server, "late", "failure") == 1)
        np.testing.assert_array_equal(predict(server, "plain"), WEIGHTS[0])
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("", "valid location"),
        ("/etc/passwd", "absolute"),
        ("C:\\secrets\\w.bin", "absolute"),
        ("..\\w.bin", "leaves"),
        ("sub/../../w.bin", "leaves"),
        ("missing.bin", "missing"),
    ],
)
def test_external_data_locations(tmp_path: Path, location: str, reason: str) -> None:
    with pytest.raises(ModelLoadError, match=reason):
        check_location(location, tmp_path)


def test_a_model_file_outside_the_repository_is_refused(tmp_path: Path) -> None:
    model = place(tmp_path, "m", add_model().SerializeToString())
    with pytest.raises(ModelLoadError, match="outside"):
        read_model_file(model, tmp_path / "elsewhere")
    assert read_model_file(model, tmp_path) == model.read_bytes()
    for junk in (b"not a model", numpy_helper.from_array(WEIGHTS).SerializeToString()[:5]):
        model.write_bytes(junk)
        with pytest.raises(ModelLoadError):
            read_model_file(model, tmp_path)


def test_the_probe_passes_a_sound_file_and_times_out_a_slow_one(tmp_path: Path) -> None:
    data = add_model().SerializeToString()
    assert Prober(("CPUExecutionProvider",)).probe(data, tmp_path) is None
    slow = Prober(("CPUExecutionProvider",), timeout=0.01).probe(data, tmp_path)
    assert slow is not None
    assert "longer than" in slow
