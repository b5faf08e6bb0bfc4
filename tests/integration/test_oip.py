"""The Open Inference Protocol on the xaid port, driven by a stock tritonclient.grpc client."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import make_model
from tests.running_server import RunningServer
from xaid import Client
from xaid_server.settings import DEMO_MODELS

grpcclient = pytest.importorskip("tritonclient.grpc")
service_pb2 = pytest.importorskip("tritonclient.grpc.service_pb2")
service_pb2_grpc = pytest.importorskip("tritonclient.grpc.service_pb2_grpc")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

TABULAR = "tabular"
COUNTS = "counts"  # an INT64-input model built here
BATCHING = "dynamic_batching:\n  max_queue_delay_microseconds: 50000\n  preferred_batch_size: [8]\n"


def counts_model() -> bytes:
    """y = 3 * ids + 1 (INT64) and its float mean per row: integer in, integer and float out."""
    nodes = [
        helper.make_node("Mul", ["ids", "three"], ["scaled"]),
        helper.make_node("Add", ["scaled", "one"], ["y"]),
        helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["ids_f"], ["mean"], keepdims=0, axes=[1]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", 4]),
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"]),
        ],
        {"three": np.array(3, dtype=np.int64), "one": np.array(1, dtype=np.int64)},
        opset=17,
        ir_version=8,
    )
    return model.SerializeToString()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("oip-models")
    shutil.copytree(DEMO_MODELS / TABULAR, root / TABULAR)
    config = root / TABULAR / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8") + BATCHING, encoding="utf-8")
    (root / COUNTS / "1").mkdir(parents=True)
    (root / COUNTS / "1" / "model.onnx").write_bytes(counts_model())
    running = RunningServer(root)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[Any]:
    triton = grpcclient.InferenceServerClient(server.address)
    yield triton
    triton.close()


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def tabular_rows(n: int) -> np.ndarray:
    rows = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")
    return np.asarray(np.resize(rows, (n, rows.shape[1])), dtype=np.float32)


def plain(model: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    path = DEMO_MODELS / model / "1" / "model.onnx" if model == TABULAR else None
    source = str(path) if path is not None else counts_model()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return [np.asarray(o) for o in session.run(None, feeds)]


def infer_input(name: str, array: np.ndarray, datatype: str) -> Any:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def status_of(exc: Any) -> str:
    return str(exc.status())


def test_liveness_readiness_and_server_metadata(client: Any) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(TABULAR)
    assert client.is_model_ready(COUNTS, "1")
    assert not client.is_model_ready("no_such_model")
    metadata = client.get_server_metadata()
    assert metadata.name == "xaid"
    assert metadata.version
    assert {"model_configuration", "statistics"} <= set(metadata.extensions)


def test_model_metadata_and_config(client: Any) -> None:
    metadata = client.get_model_metadata(TABULAR)
    assert metadata.platform == "onnxruntime_onnx"
    assert metadata.versions == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, 30])
    ]
    config = client.get_model_config(TABULAR, as_json=True)["config"]
    assert config["name"] == TABULAR
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 64
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": ["30"]}]
    assert config["dynamic_batching"] == {
        "preferred_batch_size": [8],
        "max_queue_delay_microseconds": "50000",
    }
    counts = client.get_model_config(COUNTS).config
    assert "dynamic_batching" not in str(counts)  # not configured: no batching
    assert [(i.name, i.data_type, list(i.dims)) for i in counts.input] == [("ids", 9, [4])]
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no_such_model")
    assert "NOT_FOUND" in status_of(info.value)


def test_infer_fp32_raw_equals_onnxruntime(client: Any) -> None:
    x = tabular_rows(3)
    result = client.infer(TABULAR, [infer_input("input", x, "FP32")], request_id="r1")
    (expected,) = plain(TABULAR, {"input": x})
    np.testing.assert_array_equal(result.as_numpy("logits"), expected)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (TABULAR, "1", "r1")


def test_infer_int64_raw_and_typed_contents_equal_onnxruntime(client: Any, stub: Any) -> None:
    ids = np.array([[1, 2, 3, 4], [-5, 0, 2**40, 7]], dtype=np.int64)
    y, mean = plain(COUNTS, {"ids": ids})
    result = client.infer(COUNTS, [infer_input("ids", ids, "INT64")])
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("mean"), mean)
    assert result.as_numpy("y").dtype == np.int64

    request = service_pb2.ModelInferRequest(model_name=COUNTS)
    tensor = request.inputs.add(name="ids", datatype="INT64", shape=[2, 4])
    tensor.contents.int64_contents.extend(ids.ravel().tolist())
    request.outputs.add(name="y")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["y"]
    typed = np.frombuffer(response.raw_output_contents[0], dtype="<i8").reshape(2, 4)
    np.testing.assert_array_equal(typed, y)


def test_typed_fp32_contents(stub: Any) -> None:
    x = tabular_rows(1)
    request = service_pb2.ModelInferRequest(model_name=TABULAR)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 30]).contents.fp32_contents.extend(
        x.ravel().tolist()
    )
    response = stub.ModelInfer(request)
    (expected,) = plain(TABULAR, {"input": x})
    got = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(expected.shape)
    np.testing.assert_array_equal(got, expected)


def test_explanation_through_request_parameters(client: Any, server: RunningServer) -> None:
    x = tabular_rows(2)
    parameters = {"explain": "occlusion", "explain.target": 1, "explain.baseline": 0.5}
    result = client.infer(TABULAR, [infer_input("input", x, "FP32")], parameters=parameters)
    attribution = result.as_numpy("input_attribution")
    assert attribution.shape == x.shape
    assert attribution.dtype == np.float32
    (expected_logits,) = plain(TABULAR, {"input": x})
    np.testing.assert_array_equal(result.as_numpy("logits"), expected_logits)
    reply = result.get_response().parameters
    assert reply["explain"].string_param == "occlusion"
    assert reply["explain.target"].string_param == "1,1"
    with Client(server.address) as xaid:
        same = xaid.explain(TABULAR, x, "occlusion", target=1, baseline=0.5)
    np.testing.assert_array_equal(attribution, same.attribution)


def test_repeated_and_seeded_method_parameters(client: Any) -> None:
    x = tabular_rows(1)
    parameters = {"explain": "smoothgrad", "explain.n_samples": 4, "explain.seed": 11}
    first = client.infer(TABULAR, [infer_input("input", x, "FP32")], parameters=parameters)
    again = client.infer(TABULAR, [infer_input("input", x, "FP32")], parameters=parameters)
    np.testing.assert_array_equal(
        first.as_numpy("input_attribution"), again.as_numpy("input_attribution")
    )
    assert first.get_response().parameters["explain.seed"].uint64_param == 11


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"bogus": 1}, "bogus"),
        ({"explain": "occlusion", "explain.windw": "1"}, "windw"),
        ({"explain.n_steps": 4}, "explain"),
        ({"explain": "no_such_method"}, "no_such_method"),
        ({"explain": "integrated_gradients", "explain.n_steps": "many"}, "n_steps"),
    ],
)
def test_unknown_or_bad_parameters_are_invalid_argument(
    client: Any, parameters: dict[str, Any], named: str
) -> None:
    x = tabular_rows(1)
    with pytest.raises(InferenceServerException) as info:
        client.infer(TABULAR, [infer_input("input", x, "FP32")], parameters=parameters)
    assert "INVALID_ARGUMENT" in status_of(info.value)
    assert named in str(info.value.message())


def test_malformed_raw_size_states_expected_and_actual(stub: Any) -> None:
    request = service_pb2.ModelInferRequest(model_name=TABULAR)
    request.inputs.add(name="input", datatype="FP32", shape=[2, 30])
    request.raw_input_contents.append(b"\0" * (4 * 30 * 2 - 4))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = str(info.value.details())
    assert "raw_input_contents[0]" in details
    assert "236 bytes" in details
    assert "expected 240" in details


@pytest.mark.parametrize(
    ("build", "named"),
    [
        (lambda r: r.raw_input_contents.extend([b"", b""]), "2 entries for 1 inputs"),
        (lambda r: r.inputs[0].contents.fp32_contents.extend([1.0] * 5), "5 values"),
        (lambda r: setattr(r.inputs[0], "datatype", "BYTES"), "BYTES"),
        (lambda r: r.inputs[0].parameters["shared_memory_region"].string_param, "parameters"),
    ],
)
def test_malformed_inputs_are_invalid_argument(stub: Any, build: Any, named: str) -> None:
    request = service_pb2.ModelInferRequest(model_name=TABULAR)
    request.inputs.add(name="input", datatype="FP32", shape=[1, 30])
    build(request)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in str(info.value.details())


def test_unsupported_rpcs_are_unimplemented(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        index = channel.unary_unary(
            "/inference.GRPCInferenceService/RepositoryIndex",
            request_serializer=service_pb2.RepositoryIndexRequest.SerializeToString,
            response_deserializer=service_pb2.RepositoryIndexResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            index(service_pb2.RepositoryIndexRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_inference_statistics(client: Any) -> None:
    before = client.get_inference_statistics(COUNTS).model_stats[0]
    ids = np.ones((3, 4), dtype=np.int64)
    client.infer(COUNTS, [infer_input("ids", ids, "INT64")])
    with pytest.raises(InferenceServerException):
        client.infer(COUNTS, [infer_input("ids", ids, "INT64")], parameters={"bogus": 1})
    after = client.get_inference_statistics(COUNTS).model_stats[0]
    assert (after.name, after.version) == (COUNTS, "1")
    stats, old = after.inference_stats, before.inference_stats
    assert stats.success.count == old.success.count + 1
    assert stats.success.ns > old.success.ns
    assert stats.fail.count == old.fail.count + 1
    assert after.inference_count == before.inference_count + 3
    assert after.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {COUNTS, TABULAR}


def batch_size_counts(server: RunningServer) -> tuple[float, float]:
    """(runs, rows) of TABULAR's xaid_batch_size histogram."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "xaid_batch_size"
        for sample in family.samples
        if sample.labels.get("model") == TABULAR and sample.name.endswith(("_count", "_sum"))
    }
    return values.get("xaid_batch_size_count", 0.0), values.get("xaid_batch_size_sum", 0.0)


def test_concurrent_requests_are_batched(client: Any, server: RunningServer) -> None:
    """16 concurrent single-row requests, Predict and ModelInfer mixed, share model runs."""
    runs_before, rows_before = batch_size_counts(server)
    x = tabular_rows(16)
    (expected,) = plain(TABULAR, {"input": x})

    def one(i: int) -> np.ndarray:
        row = x[i : i + 1]
        if i % 2:
            with Client(server.address) as xaid:
                return np.asarray(xaid.predict(TABULAR, row).outputs["logits"])
        result = client.infer(TABULAR, [infer_input("input", row, "FP32")])
        return np.asarray(result.as_numpy("logits"))

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, got in enumerate(results):
        np.testing.assert_array_equal(got, expected[i : i + 1])
    runs, rows = batch_size_counts(server)
    assert rows - rows_before == 16
    assert runs - runs_before < 16, "every request ran alone: nothing was batched"


def test_reflection_describes_the_protocol(server: RunningServer) -> None:
    from google.protobuf import descriptor_pool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        assert service.FindMethodByName("ModelInfer").input_type.name == "ModelInferRequest"
        assert pool.FindServiceByName("xaid.v1.Explainer").FindMethodByName("Explain")
