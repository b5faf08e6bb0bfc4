"""Every RPC of a real server on 127.0.0.1:0, as a client sees it."""

from __future__ import annotations

import hashlib
import io
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import threadpoolctl
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.running_server import RunningServer
from xaid._codec import from_tensor, to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.model_config import load_config
from xaid_server.preprocess import decode_image
from xaid_server.settings import DEMO_MODELS

EXAMPLES = DEMO_MODELS.parent / "examples"


@pytest.fixture(scope="module")
def channel(server_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> xaid_pb2_grpc.ExplainerStub:
    return xaid_pb2_grpc.ExplainerStub(channel)


def example_image() -> bytes:
    return sorted(EXAMPLES.glob("*.png"))[0].read_bytes()


def tabular_rows(n: int = 2) -> np.ndarray:
    return np.asarray(np.load(EXAMPLES / "tabular.npy")[:n], dtype=np.float32)


def image_tensor() -> np.ndarray:
    config = load_config(DEMO_MODELS / "shapes" / "config.yaml")
    assert config.image is not None
    return decode_image(example_image(), config.image)[0]


def plain_session(model: str) -> ort.InferenceSession:
    path = DEMO_MODELS / model / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_health_is_serving(channel: grpc.Channel) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type it loosely
    for service in ("", "xaid.v1.Explainer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_numpy_blas_is_single_threaded_once_serving(channel: grpc.Channel) -> None:
    """The server runs in this process: its BLAS threads would spin beside onnxruntime's."""
    blas = [info for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"]
    assert blas, "numpy's BLAS was not found"
    assert {library["num_threads"] for library in blas} == {1}


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"xaid.v1.Explainer", "grpc.health.v1.Health"} <= names


def test_a_generic_client_calls_through_reflection_alone(channel: grpc.Channel) -> None:
    """No generated code: descriptors come from the server, messages are built dynamically."""
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName("xaid.v1.Explainer")

    def call(method_name: str, fields: dict[str, object]) -> object:
        method = service.FindMethodByName(method_name)
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        rpc = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        return rpc(request_cls(**fields))

    models = call("ListModels", {})
    assert {m.name for m in models.models} >= {"shapes", "tabular"}  # type: ignore[attr-defined]
    tensor_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("xaid.v1.Tensor"))
    rows = tabular_rows(1)
    tensor = tensor_cls(datatype="FP32", shape=list(rows.shape), data=rows.tobytes())
    occlusion_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("xaid.v1.Occlusion"))
    reply = call("Explain", {"model": "tabular", "inputs": [tensor], "occlusion": occlusion_cls()})
    assert list(reply.attribution.shape) == [1, 30]  # type: ignore[attr-defined]
    assert reply.model_evaluations == 31  # type: ignore[attr-defined]


def test_list_and_get_model(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    models = {m.name: m for m in stub.ListModels(xaid_pb2.ListModelsRequest()).models}
    shapes = models["shapes"]
    assert shapes.kind == "image"
    assert shapes.execution_provider in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert "occlusion" in shapes.methods
    assert shapes.gradients.available
    assert shapes.gradients.reason == ""
    assert list(shapes.inputs[0].shape)[1:] == [3, 64, 64]
    data = (DEMO_MODELS / "shapes" / "1" / "model.onnx").read_bytes()
    assert shapes.sha256 == hashlib.sha256(data).hexdigest()
    tabular = stub.GetModel(xaid_pb2.GetModelRequest(model="tabular"))
    assert tabular.kind == "tabular"
    assert len(tabular.feature_names) == 30
    assert list(tabular.labels) == ["malignant", "benign"]


def test_predict_raw_tensor_equals_plain_onnxruntime(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    rows = tabular_rows(3)
    reply = stub.Predict(
        xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(rows)], top_k=1)
    )
    (expected,) = plain_session("tabular").run(None, {"input": rows})
    np.testing.assert_array_equal(from_tensor(reply.outputs[0]), expected)
    assert [t.index for t in reply.top] == list(expected.argmax(axis=1))
    assert [t.row for t in reply.top] == [0, 1, 2]


def test_predict_image_uses_the_model_preprocessing(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    reply = stub.Predict(xaid_pb2.PredictRequest(model="shapes", image=example_image(), top_k=3))
    (expected,) = plain_session("shapes").run(None, {"input": image_tensor()})
    np.testing.assert_allclose(from_tensor(reply.outputs[0]), expected, rtol=1e-5, atol=1e-5)
    assert len(reply.top) == 3
    assert sum(t.probability for t in reply.top) <= 1.0 + 1e-9
    assert reply.top[0].label == Path(sorted(EXAMPLES.glob("*.png"))[0]).stem


def test_explain_occlusion_with_heatmap(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    image = example_image()
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(
            model="shapes", image=image, occlusion=xaid_pb2.Occlusion(), render=True, seed=7
        )
    )
    attribution = from_tensor(reply.attribution)
    assert attribution.shape == (1, 3, 64, 64)
    assert list(reply.occlusion.window) == [8, 8]
    assert list(reply.occlusion.stride) == [4, 4]
    assert reply.occlusion.baseline == 0.0
    assert reply.model_evaluations == 1 + 15 * 15
    assert reply.seed == 7
    heatmap = Image.open(io.BytesIO(reply.heatmap_png[0]))
    assert heatmap.format == "PNG"
    assert heatmap.size == Image.open(io.BytesIO(image)).size
    assert reply.aggregation == "sum over channels"
    assert reply.target.labels[0] == Path(sorted(EXAMPLES.glob("*.png"))[0]).stem


def test_explain_a_batch_gives_one_attribution_per_row(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    rows = tabular_rows(2)
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(
            model="tabular", inputs=[to_tensor(rows)], occlusion=xaid_pb2.Occlusion()
        )
    )
    attribution = from_tensor(reply.attribution)
    assert attribution.shape == (2, 30)
    assert not np.allclose(attribution[0], attribution[1])
    assert reply.model_evaluations == 2 + 2 * 30


def test_explain_stream_sends_progress_then_the_result(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    request = xaid_pb2.ExplainRequest(
        model="shapes",
        inputs=[to_tensor(image_tensor())],
        occlusion=xaid_pb2.Occlusion(window=[4, 4], stride=[2, 2]),
    )
    messages = list(stub.ExplainStream(request))
    progress = [m.progress for m in messages if m.HasField("progress")]
    assert messages[-1].HasField("result")
    assert progress, "no progress message before the result"
    done = [p.done for p in progress]
    assert done == sorted(done)
    assert progress[-1].done == progress[-1].total == messages[-1].result.model_evaluations
    unary = stub.Explain(request)
    np.testing.assert_array_equal(
        from_tensor(unary.attribution), from_tensor(messages[-1].result.attribution)
    )


def bad_requests() -> Iterator[tuple[str, xaid_pb2.ExplainRequest, grpc.StatusCode, str]]:
    rows = tabular_rows(1)
    occlusion = xaid_pb2.Occlusion()
    yield (
        "unknown model",
        xaid_pb2.ExplainRequest(model="nope", inputs=[to_tensor(rows)], occlusion=occlusion),
        grpc.StatusCode.NOT_FOUND,
        "model",
    )
    yield (
        "unknown version",
        xaid_pb2.ExplainRequest(
            model="tabular", version="99", inputs=[to_tensor(rows)], occlusion=occlusion
        ),
        grpc.StatusCode.NOT_FOUND,
        "version",
    )
    yield (
        "wrong dtype",
        xaid_pb2.ExplainRequest(
            model="tabular", inputs=[to_tensor(rows.astype(np.float64))], occlusion=occlusion
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].datatype",
    )
    yield (
        "wrong shape",
        xaid_pb2.ExplainRequest(
            model="tabular", inputs=[to_tensor(rows[:, :29])], occlusion=occlusion
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].shape",
    )
    short = to_tensor(rows)
    short.data = short.data[:-4]
    yield (
        "wrong byte size",
        xaid_pb2.ExplainRequest(model="tabular", inputs=[short], occlusion=occlusion),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].data",
    )
    unknown = to_tensor(rows)
    unknown.datatype = "FP128"
    yield (
        "unknown datatype",
        xaid_pb2.ExplainRequest(model="tabular", inputs=[unknown], occlusion=occlusion),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].datatype",
    )
    nan = rows.copy()
    nan[0, 3] = np.nan
    yield (
        "NaN input",
        xaid_pb2.ExplainRequest(model="tabular", inputs=[to_tensor(nan)], occlusion=occlusion),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].data",
    )
    yield (
        "corrupt image",
        xaid_pb2.ExplainRequest(
            model="shapes", image=b"\x89PNG\r\n\x1a\nbroken", occlusion=occlusion
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image",
    )
    yield (
        "window larger than the input",
        xaid_pb2.ExplainRequest(
            model="shapes", image=example_image(), occlusion=xaid_pb2.Occlusion(window=[65, 65])
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "occlusion.window",
    )
    many = np.repeat(image_tensor(), 25, axis=0)
    yield (
        "evaluations over the cap",
        xaid_pb2.ExplainRequest(
            model="shapes",
            inputs=[to_tensor(many)],
            occlusion=xaid_pb2.Occlusion(window=[1, 1], stride=[1, 1]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "occlusion",
    )
    yield (
        "no method",
        xaid_pb2.ExplainRequest(model="tabular", inputs=[to_tensor(rows)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "method",
    )
    yield (
        "class out of range",
        xaid_pb2.ExplainRequest(
            model="tabular",
            inputs=[to_tensor(rows)],
            occlusion=occlusion,
            target=xaid_pb2.Target(class_index=2),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "target.class_index",
    )
    yield (
        "image and tensors together",
        xaid_pb2.ExplainRequest(
            model="shapes",
            image=example_image(),
            inputs=[to_tensor(image_tensor())],
            occlusion=occlusion,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "image",
    )
    yield (
        "heatmap of a tabular model",
        xaid_pb2.ExplainRequest(
            model="tabular", inputs=[to_tensor(rows)], occlusion=occlusion, render=True
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "render",
    )
    yield (
        "segmentation of a tabular model",
        xaid_pb2.ExplainRequest(
            model="tabular",
            inputs=[to_tensor(rows)],
            lime=xaid_pb2.Lime(segmentation=xaid_pb2.Segmentation(algorithm="slic")),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lime.segmentation",
    )


@pytest.mark.parametrize(
    ("request_", "code", "field"),
    [b[1:] for b in bad_requests()],
    ids=[b[0] for b in bad_requests()],
)
def test_bad_requests_get_a_clear_status(
    stub: xaid_pb2_grpc.ExplainerStub,
    request_: xaid_pb2.ExplainRequest,
    code: grpc.StatusCode,
    field: str,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(request_)
    error = caught.value
    details = error.details() or ""
    assert error.code() == code, details
    assert field in details
    assert "/" not in details
    assert "Traceback" not in details
    # the server still answers normally afterwards
    assert stub.GetModel(xaid_pb2.GetModelRequest(model="tabular")).ready


def test_invalid_argument_carries_the_field_in_rich_details(
    stub: xaid_pb2_grpc.ExplainerStub,
) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    rows = tabular_rows(1).astype(np.float64)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(rows)]))
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "inputs[0].datatype"


def test_metrics_scrape_parses_and_has_the_catalogue(
    demo_server: RunningServer, stub: xaid_pb2_grpc.ExplainerStub
) -> None:
    stub.Predict(xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(tabular_rows(2))]))
    with pytest.raises(grpc.RpcError):
        stub.GetModel(xaid_pb2.GetModelRequest(model="missing"))
    text = urllib.request.urlopen(demo_server.metrics_url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "grpc_server_started",
        "grpc_server_handled",
        "grpc_server_handling_seconds",
        "xaid_inference_duration_seconds",
        "xaid_explain_duration_seconds",
        "xaid_model_evaluations",
        "xaid_inflight_requests",
        "xaid_model_info",
        "xaid_model_ready",
        "xaid_rejected_requests",
        "xaid_cancelled_requests",
        "process_resident_memory_bytes",
    ):
        assert name in families, name
    handled = {
        (s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for s in families["grpc_server_handled"].samples
    }
    assert handled[("GetModel", "NOT_FOUND")] >= 1, "aborted RPCs must be counted"
    assert handled[("Predict", "OK")] >= 1
    info = [s for s in families["xaid_model_info"].samples if s.labels["model"] == "shapes"]
    assert info
    assert info[0].labels["provider"].endswith("ExecutionProvider")
    ready = {s.labels["model"]: s.value for s in families["xaid_model_ready"].samples}
    assert ready["shapes"] == ready["tabular"] == 1
    evaluations = {
        (s.labels["model"], s.labels["method"]): s.value
        for s in families["xaid_model_evaluations"].samples
        if s.name.endswith("_total")
    }
    assert evaluations[("tabular", "predict")] >= 2
    inflight = {s.labels["method"]: s.value for s in families["xaid_inflight_requests"].samples}
    assert inflight == {"predict": 0.0, "explain": 0.0}
