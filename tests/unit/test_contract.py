"""The contract between proto, generated stubs, servicer, registry, errors and metrics."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from tools.gen_protos import generate
from xaid.v1 import xaid_pb2
from xaid_server import errors
from xaid_server.core.requests import ExplainResult
from xaid_server.explainers import REGISTRY
from xaid_server.metrics import REJECT_REASONS, REQUEST_KINDS, Metrics
from xaid_server.servicer import (
    METHOD_FIELDS,
    explain_response,
    parameters_from_proto,
    parameters_to_proto,
)

ROOT = Path(__file__).resolve().parents[2]
CLIENTS = ROOT / "clients"


def _method_oneof(message: Descriptor) -> list[FieldDescriptor]:
    return list(message.oneofs_by_name["method"].fields)


def _message_of(field: FieldDescriptor) -> Descriptor:
    assert field.message_type is not None, f"{field.name} is not a message field"
    return field.message_type


def _method_message(name: str) -> Descriptor:
    return _message_of(xaid_pb2.ExplainRequest.DESCRIPTOR.fields_by_name[name])


# ---- (a) the committed stubs are what protoc generates ----


def test_generated_stubs_match_the_committed_ones(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools is not installed (a dev dependency)")
    bindir = Path(sys.executable).parent
    if not (bindir / "protoc-gen-mypy").exists():
        pytest.skip("protoc-gen-mypy (mypy-protobuf, a dev dependency) is not installed")
    written = generate(tmp_path)
    assert written, "no proto files found"
    for path in written:
        relative = path.relative_to(tmp_path)
        committed = CLIENTS / relative
        assert committed.is_file(), f"{relative} is generated but not committed; run make protos"
        assert path.read_bytes() == committed.read_bytes(), (
            f"{relative} differs from the generated file; run make protos"
        )


# ---- (b) the response echoes the request's method oneof ----


def _signature(fields: list[FieldDescriptor]) -> list[tuple[str, int, str]]:
    return [(f.name, f.number, _message_of(f).full_name) for f in fields]


def test_response_method_oneof_mirrors_the_request() -> None:
    request = _method_oneof(xaid_pb2.ExplainRequest.DESCRIPTOR)
    response = _method_oneof(xaid_pb2.ExplainResponse.DESCRIPTOR)
    assert _signature(response) == _signature(request)


def test_method_fields_are_the_request_oneof() -> None:
    names = [f.name for f in _method_oneof(xaid_pb2.ExplainRequest.DESCRIPTOR)]
    assert list(METHOD_FIELDS) == names
    assert len(set(METHOD_FIELDS)) == len(METHOD_FIELDS)


# ---- (c) the registry and the proto agree ----


def test_the_registry_serves_every_method_of_the_contract() -> None:
    assert REGISTRY, "no explanation method is registered"
    assert set(REGISTRY) == set(METHOD_FIELDS)  # every method of the contract is served
    for name, explainer in REGISTRY.items():
        assert explainer.name == name


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_params_dataclass_matches_the_proto_message(name: str) -> None:
    explainer = REGISTRY[name]
    message = _method_message(name)
    assert dataclasses.is_dataclass(explainer.params_type)
    params = {f.name for f in dataclasses.fields(explainer.params_type)}
    assert params == {f.name for f in message.fields}
    # Every field has a default: an empty request message is a valid request.
    explainer.params_type()


# ---- (d) parameters to and from the proto ----


def test_unset_fields_are_left_out() -> None:
    assert parameters_from_proto(xaid_pb2.Occlusion()) == {}
    assert parameters_from_proto(xaid_pb2.Saliency(abs=False)) == {}
    assert parameters_from_proto(xaid_pb2.Lime()) == {}
    assert parameters_from_proto(xaid_pb2.GradientXInput()) == {}


def test_optional_scalars_are_kept_when_set_even_to_zero() -> None:
    assert parameters_from_proto(xaid_pb2.Occlusion(baseline=0.0)) == {"baseline": 0.0}
    assert parameters_from_proto(xaid_pb2.GradCam(relu=False)) == {"relu": False}
    assert parameters_from_proto(xaid_pb2.SmoothGrad(n_samples=0)) == {"n_samples": 0}


def test_plain_scalars_are_kept_when_not_default() -> None:
    assert parameters_from_proto(xaid_pb2.Saliency(abs=True)) == {"abs": True}
    assert parameters_from_proto(xaid_pb2.GuidedBackprop(rule="deconvnet")) == {"rule": "deconvnet"}


def test_repeated_fields_when_not_empty() -> None:
    message = xaid_pb2.Occlusion(window=[3, 4], stride=[])
    given = parameters_from_proto(message)
    assert given == {"window": [3, 4]}
    assert type(given["window"]) is list


def test_nested_messages_become_dicts() -> None:
    message = xaid_pb2.Lime(
        n_samples=50,
        segmentation=xaid_pb2.Segmentation(algorithm="grid", cell_size=8),
        fill="mean",
    )
    assert parameters_from_proto(message) == {
        "n_samples": 50,
        "segmentation": {"algorithm": "grid", "cell_size": 8},
        "fill": "mean",
    }
    empty = xaid_pb2.KernelShap()
    empty.segmentation.SetInParent()
    assert parameters_from_proto(empty) == {"segmentation": {}}


@dataclasses.dataclass(frozen=True)
class SegmentationParams:
    algorithm: str = ""
    n_segments: int | None = None
    cell_size: int | None = None


@dataclasses.dataclass(frozen=True)
class LimeParams:
    n_samples: int | None = None
    segmentation: SegmentationParams | None = None
    kernel_width: float | None = None
    ridge_alpha: float | None = None
    fill: str = ""


def _from_dict(kind: type[Any], given: dict[str, Any]) -> Any:
    values: dict[str, Any] = {}
    for key, value in given.items():
        if isinstance(value, dict):
            values[key] = _from_dict(SegmentationParams, value)
        elif isinstance(value, list):
            values[key] = tuple(value)
        else:
            values[key] = value
    return kind(**values)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_registered_params_round_trip(name: str) -> None:
    explainer = REGISTRY[name]
    message = _method_message(name)
    values: dict[str, Any] = {}
    for f in message.fields:
        if f.is_repeated:
            values[f.name] = (3, 5)
        elif f.cpp_type == FieldDescriptor.CPPTYPE_DOUBLE:
            values[f.name] = 0.25
        elif f.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64):
            values[f.name] = 7
        elif f.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
            values[f.name] = True
        elif f.cpp_type == FieldDescriptor.CPPTYPE_STRING:
            values[f.name] = "grid"
        else:  # nested messages: test_nested_params_round_trip
            assert f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE, f"{name}.{f.name}"
    params = explainer.params_type(**values)
    request = xaid_pb2.ExplainRequest()
    parameters_to_proto(params, getattr(request, name))
    assert request.WhichOneof("method") == name
    given = parameters_from_proto(getattr(request, name))
    assert given == {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    back = explainer.params_type(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()}
    )
    assert back == params


def test_nested_params_round_trip() -> None:
    params = LimeParams(
        n_samples=100,
        segmentation=SegmentationParams(algorithm="slic", n_segments=40),
        kernel_width=0.25,
        fill="baseline",
    )
    message = xaid_pb2.Lime()
    parameters_to_proto(params, message)
    assert message.HasField("n_samples")
    assert not message.HasField("ridge_alpha")
    assert message.segmentation.algorithm == "slic"
    assert not message.segmentation.HasField("cell_size")
    given = parameters_from_proto(message)
    assert given == {
        "n_samples": 100,
        "segmentation": {"algorithm": "slic", "n_segments": 40},
        "kernel_width": 0.25,
        "fill": "baseline",
    }
    assert _from_dict(LimeParams, given) == params


def test_none_values_stay_unset() -> None:
    message = xaid_pb2.Lime()
    parameters_to_proto(LimeParams(), message)
    assert parameters_from_proto(message) == {}
    assert not message.HasField("n_samples")
    assert not message.HasField("segmentation")


@dataclasses.dataclass(frozen=True)
class NoParams:
    pass


def test_response_names_the_method_even_without_parameters() -> None:
    result = ExplainResult(
        model="m",
        version="1",
        method="gradient_x_input",
        parameters=NoParams(),
        attribution=np.zeros((1, 2), dtype=np.float32),
        prediction=[],
        target_output="y",
        target_classes=[0],
        target_labels=[""],
        seed=1,
        model_evaluations=1,
        total_seconds=0.0,
        compute_seconds=0.0,
    )
    assert explain_response(result).WhichOneof("method") == "gradient_x_input"


# ---- (e) errors carry distinct, specific status codes ----

EXPECTED_CODES = {
    "InvalidArgument": grpc.StatusCode.INVALID_ARGUMENT,
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "FailedPrecondition": grpc.StatusCode.FAILED_PRECONDITION,
    "Unavailable": grpc.StatusCode.UNAVAILABLE,
    "ResourceExhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "Cancelled": grpc.StatusCode.CANCELLED,
    "Unimplemented": grpc.StatusCode.UNIMPLEMENTED,
}


def _error_classes() -> dict[str, type[errors.XaidError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.XaidError) and cls is not errors.XaidError
    }


def test_every_error_has_its_expected_code() -> None:
    classes = _error_classes()
    assert set(classes) == set(EXPECTED_CODES)
    for name, cls in classes.items():
        assert cls.code == EXPECTED_CODES[name], name


def test_error_codes_are_distinct_and_specific() -> None:
    codes = [cls.code for cls in _error_classes().values()]
    assert len(set(codes)) == len(codes)
    assert grpc.StatusCode.UNKNOWN not in codes
    assert grpc.StatusCode.OK not in codes
    assert errors.XaidError.code == grpc.StatusCode.INTERNAL
    assert errors.XaidError.code not in codes


def test_errors_carry_message_and_field() -> None:
    error = errors.InvalidArgument("occlusion.window: too large", field="occlusion.window")
    assert error.message == "occlusion.window: too large"
    assert error.field == "occlusion.window"
    assert str(error) == error.message
    assert errors.NotFound("gone").field is None


def test_model_load_error_never_maps_to_a_status() -> None:
    assert not issubclass(errors.ModelLoadError, errors.XaidError)


# ---- (f) metrics ----


def test_fresh_metrics_expose_zero_series() -> None:
    metrics = Metrics()
    for method in ("predict", "explain"):
        assert method in REQUEST_KINDS
        value = metrics.registry.get_sample_value("xaid_inflight_requests", {"method": method})
        assert value == 0.0
        for reason in REJECT_REASONS:
            labels = {"method": method, "reason": reason}
            assert metrics.registry.get_sample_value("xaid_rejected_requests_total", labels) == 0.0


def test_metrics_instances_do_not_share_a_registry() -> None:
    first = Metrics()
    second = Metrics()
    assert first.registry is not second.registry
    first.rejected.labels("predict", "limit").inc()
    first.inflight.labels("explain").inc(2)
    labels = {"method": "predict", "reason": "limit"}
    assert first.registry.get_sample_value("xaid_rejected_requests_total", labels) == 1.0
    assert second.registry.get_sample_value("xaid_rejected_requests_total", labels) == 0.0
    assert second.registry.get_sample_value("xaid_inflight_requests", {"method": "explain"}) == 0.0


def test_known_rpc_exports_zero_series() -> None:
    metrics = Metrics()
    metrics.known_rpc("xaid.v1.Explainer", "Explain", "unary")
    labels = {"grpc_service": "xaid.v1.Explainer", "grpc_method": "Explain", "grpc_type": "unary"}
    assert metrics.registry.get_sample_value("grpc_server_started_total", labels) == 0.0
    handled = {**labels, "grpc_code": "OK"}
    assert metrics.registry.get_sample_value("grpc_server_handled_total", handled) == 0.0
