"""The client without a real server: request building, error mapping, public API, and the
sync/async clients and CLI against an in-process fake Explainer service."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from PIL import Image

import xaid
from xaid import _requests, cli
from xaid._codec import from_tensor, to_tensor
from xaid.errors import XaidError, from_rpc_error
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
METHOD_FIELDS = list(xaid_pb2.ExplainRequest.DESCRIPTOR.oneofs_by_name["method"].fields)
METHODS = [f.name for f in METHOD_FIELDS]


def _method_parameters(method: str) -> list[Any]:
    message_type = xaid_pb2.ExplainRequest.DESCRIPTOR.fields_by_name[method].message_type
    assert message_type is not None
    return list(message_type.fields)


def _png(width: int = 6, height: int = 4, colour: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- inputs ----


def test_array_is_sent_as_the_first_unnamed_input() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = _requests.predict_request("m", x, top_k=3, version="2")
    assert (request.model, request.version, request.top_k, request.image) == ("m", "2", 3, b"")
    assert len(request.inputs) == 1
    assert request.inputs[0].name == ""
    assert request.inputs[0].datatype == "FP32"
    np.testing.assert_array_equal(from_tensor(request.inputs[0]), x)


def test_mapping_names_every_input() -> None:
    request = _requests.predict_request(
        "m", {"ids": np.array([[1, 2]], dtype=np.int64), "mask": [[True, False]]}
    )
    assert [t.name for t in request.inputs] == ["ids", "mask"]
    assert [t.datatype for t in request.inputs] == ["INT64", "BOOL"]
    np.testing.assert_array_equal(from_tensor(request.inputs[1]), [[True, False]])


def test_pil_image_is_sent_as_png_bytes() -> None:
    image = Image.new("RGB", (5, 3), (1, 2, 3))
    request = _requests.predict_request("m", image)
    assert not request.inputs
    decoded = Image.open(io.BytesIO(request.image))
    assert decoded.format == "PNG"
    assert decoded.size == (5, 3)
    assert decoded.getpixel((0, 0)) == (1, 2, 3)


def test_image_modes_png_cannot_hold_are_converted() -> None:
    request = _requests.predict_request("m", Image.new("CMYK", (2, 2)))
    assert Image.open(io.BytesIO(request.image)).mode == "RGB"


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encoded_bytes_are_sent_unchanged(kind: type[Any]) -> None:
    data = _png()
    request = _requests.explain_request("m", kind(data))
    assert request.image == data
    assert not request.inputs


def test_paths_are_read(tmp_path: Path) -> None:
    data = _png()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert _requests.predict_request("m", path).image == data
    assert _requests.predict_request("m", str(path)).image == data


def test_npy_path_is_sent_as_an_array(tmp_path: Path) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    request = _requests.predict_request("m", tmp_path / "x.npy")
    assert request.image == b""
    np.testing.assert_array_equal(from_tensor(request.inputs[0]), x)


def test_missing_file_raises() -> None:
    with pytest.raises(FileNotFoundError):
        _requests.predict_request("m", "/no/such/image.png")


@pytest.mark.parametrize("bad", [b"", {}])
def test_empty_inputs_are_refused(bad: bytes | dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="empty"):
        _requests.predict_request("m", bad)


def test_unsupported_input_type() -> None:
    with pytest.raises(TypeError, match="numpy array"):
        _requests.predict_request("m", 3.5)  # type: ignore[arg-type]


def test_negative_top_k() -> None:
    with pytest.raises(ValueError, match="top_k"):
        _requests.predict_request("m", b"x", top_k=-1)


# ---- explain: target, seed, flags ----


def test_explain_request_fields() -> None:
    request = _requests.explain_request(
        "m",
        b"img",
        "occlusion",
        target=3,
        output="logits",
        seed=7,
        render=True,
        evaluate=True,
        version="1",
        input="pixels",
    )
    assert request.target.output == "logits"
    assert request.target.HasField("class_index")
    assert request.target.class_index == 3
    assert request.HasField("seed")
    assert request.seed == 7
    assert (request.render, request.evaluate, request.version, request.input) == (
        True,
        True,
        "1",
        "pixels",
    )


def test_explain_defaults_leave_optional_fields_unset() -> None:
    request = _requests.explain_request("m", b"img")
    assert not request.HasField("target")
    assert not request.HasField("seed")
    assert request.WhichOneof("method") == "occlusion"
    assert not request.occlusion.HasField("baseline")


def test_target_zero_is_sent() -> None:
    request = _requests.explain_request("m", b"img", target=0)
    assert request.target.HasField("class_index")
    assert request.target.class_index == 0


def test_seed_out_of_range() -> None:
    with pytest.raises(ValueError, match="seed"):
        _requests.explain_request("m", b"img", seed=-1)


# ---- explain: method parameters, driven by the descriptors ----

_SAMPLES: dict[int, object] = {
    FieldDescriptor.CPPTYPE_INT32: 3,
    FieldDescriptor.CPPTYPE_INT64: 5,
    FieldDescriptor.CPPTYPE_UINT32: 3,
    FieldDescriptor.CPPTYPE_UINT64: 5,
    FieldDescriptor.CPPTYPE_DOUBLE: 0.25,
    FieldDescriptor.CPPTYPE_FLOAT: 0.5,
    FieldDescriptor.CPPTYPE_BOOL: True,
    FieldDescriptor.CPPTYPE_STRING: "grid",
}


def _sample(field: Any) -> object:
    """A non-default value for any field; nested messages as dicts, as callers write them."""
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return {sub.name: _sample(sub) for sub in field.message_type.fields}
    value = _SAMPLES[field.cpp_type]
    return [value, value] if field.is_repeated else value


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, unquote_int64_if_possible=True
    )


def test_method_list_comes_from_the_proto() -> None:
    assert list(xaid.explain_methods()) == METHODS
    for method in METHODS:
        assert xaid.explain_methods()[method] == [f.name for f in _method_parameters(method)]


@pytest.mark.parametrize("method", METHODS)
def test_every_parameter_of_every_method_is_mapped(method: str) -> None:
    params = {f.name: _sample(f) for f in _method_parameters(method)}
    request = _requests.explain_request("m", b"img", method, params=params)
    assert request.WhichOneof("method") == method
    assert _as_dict(getattr(request, method)) == params


@pytest.mark.parametrize("method", METHODS)
def test_a_method_without_parameters_is_still_selected(method: str) -> None:
    request = _requests.explain_request("m", b"img", method)
    assert request.WhichOneof("method") == method


def test_method_names_are_normalized() -> None:
    request = _requests.explain_request("m", b"img", "Integrated-Gradients")
    assert request.WhichOneof("method") == "integrated_gradients"


def test_parameter_value_forms() -> None:
    request = _requests.explain_request(
        "m",
        b"img",
        "occlusion",
        params={"window": np.array([8, 8]), "stride": 4, "baseline": np.float32(1)},
    )
    assert list(request.occlusion.window) == [8, 8]
    assert list(request.occlusion.stride) == [4]
    assert request.occlusion.baseline == 1.0


def test_none_leaves_a_parameter_unset() -> None:
    request = _requests.explain_request("m", b"img", "occlusion", params={"baseline": None})
    assert not request.occlusion.HasField("baseline")


def test_nested_message_accepts_a_message() -> None:
    segmentation = xaid_pb2.Segmentation(algorithm="grid", cell_size=8)
    request = _requests.explain_request(
        "m", b"img", "lime", params={"segmentation": segmentation, "n_samples": 10}
    )
    assert request.lime.segmentation == segmentation
    with pytest.raises(ValueError, match=r"lime\.segmentation"):
        _requests.explain_request("m", b"img", "lime", params={"segmentation": "grid"})


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown method 'magic'") as info:
        _requests.explain_request("m", b"img", "magic")
    for method in METHODS:
        assert method in str(info.value)


@pytest.mark.parametrize("method", METHODS)
def test_unknown_parameter_lists_the_valid_ones(method: str) -> None:
    with pytest.raises(ValueError, match=f"unknown parameter 'bogus' for {method}") as info:
        _requests.explain_request("m", b"img", method, params={"bogus": 1})
    for name in xaid.explain_methods()[method]:
        assert name in str(info.value)


def test_unknown_nested_parameter() -> None:
    with pytest.raises(ValueError, match=r"for lime\.segmentation; valid parameters: algorithm"):
        _requests.explain_request("m", b"img", "lime", params={"segmentation": {"sides": 3}})


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("occlusion", {"window": [8.5]}, "integer"),
        ("occlusion", {"window": ["8"]}, "integer"),
        ("occlusion", {"window": [True]}, "integer"),
        ("occlusion", {"baseline": "zero"}, "number"),
        ("saliency", {"abs": 1}, "true or false"),
        ("grad_cam", {"layer": 3}, "string"),
        ("integrated_gradients", {"n_steps": 2**40}, "n_steps"),
    ],
)
def test_wrongly_typed_parameters(method: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _requests.explain_request("m", b"img", method, params=params)


def test_client_explain_passes_params_through() -> None:
    """`Client.explain(**params)` must reach the same mapping (checked without a server)."""
    captured: list[xaid_pb2.ExplainRequest] = []

    class Stub:
        def Explain(  # noqa: N802 - gRPC method name
            self, request: xaid_pb2.ExplainRequest, timeout: float | None = None
        ) -> xaid_pb2.ExplainResponse:
            captured.append(request)
            return xaid_pb2.ExplainResponse(attribution=to_tensor(np.zeros(2, np.float32)))

    client = xaid.Client("127.0.0.1:1")
    client._stub = Stub()  # type: ignore[assignment]
    with client:
        client.explain("m", b"img", "integrated_gradients", n_steps=16, baseline=0.5)
    assert captured[0].integrated_gradients.n_steps == 16
    assert captured[0].integrated_gradients.baseline == 0.5


# ---- errors ----

EXPECTED_CLASSES: dict[grpc.StatusCode, type[XaidError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: xaid.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: xaid.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: xaid.FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: xaid.Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: xaid.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: xaid.DeadlineExceeded,
    grpc.StatusCode.CANCELLED: xaid.Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: xaid.Unimplemented,
    grpc.StatusCode.UNAUTHENTICATED: xaid.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: xaid.PermissionDenied,
    grpc.StatusCode.INTERNAL: xaid.Internal,
}


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        super().__init__()
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c != grpc.StatusCode.OK])
def test_every_status_code_maps(code: grpc.StatusCode) -> None:
    error = from_rpc_error(FakeRpcError(code, "what went wrong"))
    assert type(error) is EXPECTED_CLASSES.get(code, XaidError)
    assert isinstance(error, XaidError)
    assert error.code is code
    assert error.details == "what went wrong"
    assert str(error) == f"{code.name}: what went wrong"


def test_aio_errors_map() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), details="no model"
    )
    error = from_rpc_error(err)
    assert isinstance(error, xaid.NotFound)
    assert error.details == "no model"


def test_error_without_status() -> None:
    error = from_rpc_error(grpc.RpcError())
    assert type(error) is XaidError
    assert error.code is grpc.StatusCode.UNKNOWN
    assert FakeRpcError(grpc.StatusCode.INTERNAL, None).details() is None
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, None)).details == ""


def test_error_classes_can_be_raised_directly() -> None:
    error = xaid.NotFound("model 'x' not found")
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert error.details == "model 'x' not found"


# ---- public API ----


def test_all_names_exist_and_are_public() -> None:
    assert len(set(xaid.__all__)) == len(xaid.__all__)
    for name in xaid.__all__:
        assert hasattr(xaid, name), name
        assert not name.startswith("_") or name == "__version__", name
    for name in ("Client", "AsyncClient", "Prediction", "Explanation", "ModelInfo", "XaidError"):
        assert name in xaid.__all__
    assert isinstance(xaid.__version__, str)
    assert xaid.__version__


def test_nothing_private_leaks() -> None:
    public = {
        name
        for name, value in vars(xaid).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(xaid.__all__) - {"__version__"}
    for name in xaid.__all__:
        value = getattr(xaid, name)
        if isinstance(value, type) or callable(value):
            assert value.__module__.startswith("xaid"), name


def test_error_hierarchy() -> None:
    for cls in EXPECTED_CLASSES.values():
        assert issubclass(cls, XaidError)
        assert getattr(xaid, cls.__name__) is cls
    assert issubclass(XaidError, Exception)


def _env_with_sources() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT / "clients"), str(ROOT / "service"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def test_import_xaid_does_not_import_the_server_runtime() -> None:
    code = (
        "import sys, xaid, xaid.cli; "
        "assert 'onnxruntime' not in sys.modules; assert 'xaid_server' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env_with_sources())


# ---- results ----


def test_explanation_parameters_are_native_values() -> None:
    response = xaid_pb2.ExplainResponse(
        attribution=to_tensor(np.zeros((1, 2), np.float32)),
        occlusion=xaid_pb2.Occlusion(window=[8, 8], stride=[4, 4], baseline=0.0),
        heatmap_png=[_png(6, 4)],
        target=xaid_pb2.ResolvedTarget(output="logits", class_indices=[2], labels=["two"]),
        seed=2**63 + 1,
    )
    explanation = xaid.Explanation.from_proto(response)
    assert explanation.method == "occlusion"
    assert explanation.parameters == {"window": [8, 8], "stride": [4, 4], "baseline": 0.0}
    assert explanation.heatmaps[0].size == (6, 4)
    assert explanation.target == xaid.Target("logits", (2,), ("two",))
    assert explanation.seed == 2**63 + 1
    assert explanation.faithfulness is None
    assert explanation.response is response


def test_prediction_groups_top_classes_by_row() -> None:
    scores = [
        xaid_pb2.ClassScore(row=r, index=i, label=f"c{i}", score=1.0, probability=0.5)
        for r in (0, 1)
        for i in (3, 1)
    ]
    prediction = xaid.Prediction.from_proto(
        xaid_pb2.PredictResponse(
            outputs=[to_tensor(np.zeros((2, 4), np.float32), "logits")], top=scores
        )
    )
    assert [[s.index for s in row] for row in prediction.top] == [[3, 1], [3, 1]]
    assert prediction.top[1][0].row == 1
    assert prediction.outputs["logits"].shape == (2, 4)


# ---- sync and async clients and the CLI against a fake service ----

LABELS = ["circle", "square", "triangle"]
MODEL = xaid_pb2.ModelInfo(
    name="toy",
    version="1",
    versions=["1"],
    kind="image",
    inputs=[xaid_pb2.TensorSpec(name="pixels", datatype="FP32", shape=[-1, 3, 4, 6])],
    outputs=[xaid_pb2.TensorSpec(name="logits", datatype="FP32", shape=[-1, 3])],
    labels=LABELS,
    methods=["occlusion", "saliency"],
    execution_provider="CPUExecutionProvider",
    ready=True,
    image=xaid_pb2.ImagePreprocessing(height=4, width=6, channels=3, layout="NCHW", scale=255.0),
)


def _rows_of(inputs: list[xaid_pb2.Tensor]) -> int:
    return int(inputs[0].shape[0]) if inputs else 1


class FakeExplainer(xaid_pb2_grpc.ExplainerServicer):
    """Answers like a server would for one model, "toy"; records every request."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.stream_cancelled = threading.Event()

    def _check(self, model: str, context: grpc.ServicerContext) -> None:
        if model != "toy":
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {model!r} not found")

    def ListModels(  # noqa: N802 - gRPC method name
        self, request: xaid_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> xaid_pb2.ListModelsResponse:
        return xaid_pb2.ListModelsResponse(models=[MODEL])

    def GetModel(  # noqa: N802 - gRPC method name
        self, request: xaid_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> xaid_pb2.ModelInfo:
        self._check(request.model, context)
        return MODEL

    def Predict(  # noqa: N802 - gRPC method name
        self, request: xaid_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> xaid_pb2.PredictResponse:
        self.requests.append(request)
        self._check(request.model, context)
        rows = _rows_of(list(request.inputs))
        logits = np.tile(np.array([0.5, 2.0, 1.0], np.float32), (rows, 1))
        top = [
            xaid_pb2.ClassScore(row=r, index=i, label=LABELS[i], score=logits[r, i], probability=p)
            for r in range(rows)
            for i, p in ((1, 0.63), (2, 0.23), (0, 0.14))[: request.top_k or 5]
        ]
        return xaid_pb2.PredictResponse(
            model="toy", version="1", outputs=[to_tensor(logits, "logits")], top=top
        )

    def _explain(self, request: xaid_pb2.ExplainRequest) -> xaid_pb2.ExplainResponse:
        rows = _rows_of(list(request.inputs))
        response = xaid_pb2.ExplainResponse(
            model="toy",
            version="1",
            attribution=to_tensor(np.ones((rows, 3, 4, 6), np.float32)),
            target=xaid_pb2.ResolvedTarget(
                output="logits", class_indices=[1] * rows, labels=["square"] * rows
            ),
            seed=request.seed if request.HasField("seed") else 42,
            model_evaluations=7,
            timing=xaid_pb2.Timing(total_seconds=0.5, compute_seconds=0.25),
            heatmap_png=[_png() for _ in range(rows)] if request.render else [],
        )
        method = request.WhichOneof("method") or "occlusion"
        echoed = getattr(response, method)
        echoed.CopyFrom(getattr(request, method))
        if method == "occlusion" and not echoed.window:
            echoed.window.extend([2, 2])
        return response

    def Explain(  # noqa: N802 - gRPC method name
        self, request: xaid_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> xaid_pb2.ExplainResponse:
        self.requests.append(request)
        self._check(request.model, context)
        return self._explain(request)

    def ExplainStream(  # noqa: N802 - gRPC method name
        self, request: xaid_pb2.ExplainRequest, context: grpc.ServicerContext
    ) -> Iterator[xaid_pb2.ExplainStreamResponse]:
        self.requests.append(request)
        first = xaid_pb2.ExplainStreamResponse(progress=xaid_pb2.Progress(done=1, total=9))
        if request.model == "no-result":
            yield first
            return
        if request.model == "slow":
            context.add_callback(self.stream_cancelled.set)
            yield first
            self.stream_cancelled.wait(10)
            return
        self._check(request.model, context)
        for done in (1, 2, 3):
            progress = xaid_pb2.Progress(done=done, total=3, elapsed_seconds=0.1 * done)
            yield xaid_pb2.ExplainStreamResponse(progress=progress)
        yield xaid_pb2.ExplainStreamResponse(result=self._explain(request))


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeExplainer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = FakeExplainer()
    xaid_pb2_grpc.add_ExplainerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(None)


@pytest.fixture
def fake_address(fake: tuple[str, FakeExplainer]) -> str:
    return fake[0]


@pytest.fixture
def servicer(fake: tuple[str, FakeExplainer]) -> FakeExplainer:
    return fake[1]


def test_sync_client(fake_address: str, servicer: FakeExplainer) -> None:
    with xaid.Client(fake_address, timeout=10) as client:
        assert [m.name for m in client.models()] == ["toy"]
        info = client.model("toy")
        assert info.inputs[0].shape == (-1, 3, 4, 6)
        assert str(info.inputs[0]) == "pixels:FP32[?,3,4,6]"
        assert info.image is not None
        assert info.image.width == 6
        assert info.proto == MODEL

        prediction = client.predict("toy", np.zeros((2, 3, 4, 6), np.float32), top_k=2)
        assert [[s.label for s in row] for row in prediction.top] == [["square", "triangle"]] * 2
        assert prediction.outputs["logits"].shape == (2, 3)

        explanation = client.explain("toy", _png(), render=True, window=(2, 3), seed=5)
        assert servicer.requests[-1].occlusion.window == [2, 3]
        assert explanation.parameters["window"] == [2, 3]
        assert explanation.attribution.shape == (1, 3, 4, 6)
        assert explanation.heatmaps[0].size == (6, 4)
        assert explanation.seed == 5
        assert explanation.timing.total_seconds == 0.5


def test_sync_client_progress(fake_address: str) -> None:
    calls: list[tuple[int, int]] = []
    with xaid.Client(fake_address) as client:
        explanation = client.explain("toy", _png(), "saliency", abs=True, progress=_append(calls))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert explanation.method == "saliency"
    assert explanation.parameters == {"abs": True}


def _append(calls: list[tuple[int, int]]) -> Any:
    return lambda done, total: calls.append((done, total))


def test_progress_callback_errors_propagate(fake_address: str) -> None:
    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with xaid.Client(fake_address) as client, pytest.raises(KeyboardInterrupt):
        client.explain("toy", _png(), progress=stop)


def test_a_failing_progress_callback_cancels_the_call(
    fake_address: str, servicer: FakeExplainer
) -> None:
    def fail(done: int, total: int) -> None:
        raise RuntimeError("stop")

    with xaid.Client(fake_address) as client, pytest.raises(RuntimeError, match="stop"):
        client.explain("slow", _png(), progress=fail)
    assert servicer.stream_cancelled.wait(10)


def test_a_stream_without_result(fake_address: str) -> None:
    with (
        xaid.Client(fake_address) as client,
        pytest.raises(xaid.Internal, match="without a result"),
    ):
        client.explain("no-result", _png(), progress=lambda done, total: None)

    async def run() -> None:
        async with xaid.AsyncClient(fake_address) as client:
            await client.explain("no-result", _png(), progress=lambda done, total: None)

    with pytest.raises(xaid.Internal):
        asyncio.run(run())


def test_sync_client_errors_keep_the_cause(fake_address: str) -> None:
    with xaid.Client(fake_address) as client:
        with pytest.raises(xaid.NotFound, match="'nope' not found") as info:
            client.model("nope")
        assert isinstance(info.value.__cause__, grpc.RpcError)
        with pytest.raises(xaid.NotFound):
            client.explain("nope", _png(), progress=lambda done, total: None)


def test_unreachable_server_is_unavailable() -> None:
    with xaid.Client("127.0.0.1:1", timeout=5) as client, pytest.raises(xaid.Unavailable):
        client.models()


def test_caller_channel_is_not_closed(fake_address: str) -> None:
    channel = grpc.insecure_channel(fake_address)
    with xaid.Client(channel=channel) as client:
        client.models()
    with xaid.Client(channel=channel) as client:
        assert client.models()[0].name == "toy"
    channel.close()


def test_async_client(fake_address: str, servicer: FakeExplainer) -> None:
    calls: list[tuple[int, int]] = []

    async def on_progress(done: int, total: int) -> None:
        calls.append((done, total))

    async def run() -> None:
        async with xaid.AsyncClient(fake_address, timeout=10) as client:
            assert [m.name for m in await client.models()] == ["toy"]
            assert (await client.model("toy")).labels == tuple(LABELS)
            prediction = await client.predict("toy", {"pixels": np.zeros((1, 3, 4, 6), "f4")})
            assert prediction.top[0][0].label == "square"
            explanation = await client.explain("toy", _png(), render=True, progress=on_progress)
            assert explanation.heatmap_png
            plain = await client.explain("toy", _png(), "grad_cam", layer="conv")
            assert plain.parameters["layer"] == "conv"
            with pytest.raises(xaid.NotFound) as info:
                await client.predict("nope", _png())
            assert isinstance(info.value.__cause__, grpc.RpcError)
            with pytest.raises(ValueError, match="unknown parameter"):
                await client.explain("toy", _png(), windw=3)

    asyncio.run(run())
    assert calls == [(1, 3), (2, 3), (3, 3)]


# ---- CLI ----


def test_param_parsing() -> None:
    assert cli.parse_param("n_steps=32") == (["n_steps"], 32)
    assert cli.parse_param("baseline=0.5") == (["baseline"], 0.5)
    assert cli.parse_param("abs=true") == (["abs"], True)
    assert cli.parse_param("relu=False") == (["relu"], False)
    assert cli.parse_param("window=8,8") == (["window"], [8, 8])
    assert cli.parse_param("variant=vargrad") == (["variant"], "vargrad")
    assert cli.parse_param("segmentation.n_segments=50") == (["segmentation", "n_segments"], 50)


def test_cli_models(fake_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--server", fake_address, "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "KIND", "PROVIDER", "INPUTS", "METHODS"]
    assert lines[1].split() == [
        "toy",
        "1",
        "image",
        "CPU",
        "pixels:FP32[?,3,4,6]",
        "occlusion,saliency",
    ]


def test_cli_server_from_environment(
    fake_address: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XAID_SERVER", fake_address)
    assert cli.main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "toy"


def test_cli_predict(fake_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    assert cli.main(["--server", fake_address, "predict", "--model", "toy", str(image)]) == 0
    out = capsys.readouterr().out
    assert "square" in out
    assert "0.6300" in out

    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 6), np.float32))
    argv = ["--server", fake_address, "predict", "--model", "toy", "--npy", str(tmp_path / "x.npy")]
    assert cli.main([*argv, "--json", "--top-k", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [[s["label"] for s in row] for row in result["top"]] == [["square"], ["square"]]
    assert result["outputs"]["logits"]["shape"] == [2, 3]


def test_cli_explain(
    fake_address: str,
    servicer: FakeExplainer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    out = tmp_path / "heat.png"
    argv = ["--server", fake_address, "explain", str(image), "--model", "toy"]
    argv += ["--out", str(out), "--window", "2", "3", "--param", "baseline=0.5", "--seed", "9"]
    argv += ["--save-attribution", str(tmp_path / "a.npy")]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    request = servicer.requests[-1]
    assert request.render
    assert list(request.occlusion.window) == [2, 3]
    assert request.occlusion.baseline == 0.5
    assert request.seed == 9
    with Image.open(out) as heatmap:
        assert heatmap.format == "PNG"
    assert np.load(tmp_path / "a.npy").shape == (1, 3, 4, 6)
    assert "target class 1 (square)" in captured.out
    assert "model evaluations: 7" in captured.out
    assert "3/3" in captured.err
    assert "[" + "#" * 30 + "]" in captured.err


def test_cli_explain_several_rows_and_json(
    fake_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((2, 3, 4, 6), np.float32))
    argv = ["--server", fake_address, "explain", "--model", "toy", "--npy", str(tmp_path / "x.npy")]
    argv += ["--method", "saliency", "--out", str(tmp_path / "h.png"), "--json", "--no-progress"]
    argv += ["--param", "abs=true"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    result = json.loads(captured.out)
    assert result["parameters"] == {"abs": True}
    assert result["heatmaps"] == [str(tmp_path / "h_0.png"), str(tmp_path / "h_1.png")]
    assert (tmp_path / "h_1.png").read_bytes().startswith(b"\x89PNG")


def test_cli_missing_input_file(
    fake_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "missing.npy")
    assert cli.main(["--server", fake_address, "predict", "--model", "toy", "--npy", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert "missing.npy" in err
    assert "Traceback" not in err


def test_cli_not_found(
    fake_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(_png())
    assert cli.main(["--server", fake_address, "predict", "--model", "nope", str(image)]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: NOT_FOUND: model 'nope' not found"


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "toy"],
        ["explain", "--model", "toy", "x.png", "--method", "magic"],
        ["explain", "--model", "toy", "x.png", "--method", "saliency", "--window", "3"],
        ["explain", "--model", "toy", "x.png", "--param", "novalue"],
        ["explain", "--model", "toy", "x.png", "--param", "window=1.5"],
        ["frobnicate"],
    ],
)
def test_cli_usage_errors(
    fake_address: str, tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "x.png").write_bytes(_png())
    argv = [str(tmp_path / a) if a == "x.png" else a for a in argv]
    assert cli.main(["--server", fake_address, *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err
    assert "Traceback" not in err


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["explain", "--help"]) == 0
    assert "kernel_shap" in capsys.readouterr().out


def test_serve_delegates_every_argument(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []

    def serve_main(argv: list[str]) -> int:
        received.append(argv)
        return 3

    module = types.ModuleType("xaid_server.__main__")
    module.main = serve_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xaid_server.__main__", module)
    assert cli.main(["serve", "--help"]) == 3
    assert cli.main(["--server", "h:1", "--timeout=3", "serve", "--port", "0", "models"]) == 3
    assert received == [["--help"], ["--port", "0", "models"]]


def test_serve_without_the_server_extra(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "xaid_server.__main__", None)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "xaid serve needs the server extra: pip install 'xaid[server]'"
    )


def test_progress_bar_draws_and_finishes() -> None:
    stream = io.StringIO()
    bar = cli.ProgressBar(stream, width=10)
    bar(0, 4)
    bar(4, 4)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r[----------] 0/4 ")
    assert "\r[##########] 4/4 " in text
    assert text.endswith("s\n")
