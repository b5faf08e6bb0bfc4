"""The client without a server: request building, parameter mapping, error mapping, result
decoding, the public API, and the CLI's pure helpers. Calls against a real server are in
tests/integration/test_client.py and tests/integration/test_cli.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import types
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
from xaid.v1 import xaid_pb2

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


# ---- CLI helpers ----


def test_param_parsing() -> None:
    assert cli.parse_param("n_steps=32") == (["n_steps"], 32)
    assert cli.parse_param("baseline=0.5") == (["baseline"], 0.5)
    assert cli.parse_param("abs=true") == (["abs"], True)
    assert cli.parse_param("relu=False") == (["relu"], False)
    assert cli.parse_param("window=8,8") == (["window"], [8, 8])
    assert cli.parse_param("variant=vargrad") == (["variant"], "vargrad")
    assert cli.parse_param("segmentation.n_segments=50") == (["segmentation", "n_segments"], 50)


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
