"""The Open Inference Protocol stubs are wire-compatible with tritonclient's own."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor

from xaid.oip import grpc_service_pb2 as oip

triton = pytest.importorskip("tritonclient.grpc.service_pb2")  # in the same process, too
triton_config = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def _messages(message: Descriptor) -> list[Descriptor]:
    nested = [d for m in message.nested_types for d in _messages(m)]
    return [message, *nested]


def _triton(full_name: str) -> Descriptor:
    for module in (triton, triton_config):
        try:
            return module.DESCRIPTOR.pool.FindMessageTypeByName(full_name)  # type: ignore[no-any-return]
        except KeyError:
            continue
    raise AssertionError(f"tritonclient has no message {full_name}")


OURS = [d for m in oip.DESCRIPTOR.message_types_by_name.values() for d in _messages(m)]


@pytest.mark.parametrize("message", OURS, ids=lambda m: m.full_name)
def test_every_field_matches_tritonclient(message: Descriptor) -> None:
    theirs = _triton(message.full_name)
    for field in message.fields:
        other = theirs.fields_by_number.get(field.number)
        assert other is not None, f"{message.full_name}.{field.name}: no field {field.number}"
        assert (other.name, other.type, other.is_repeated) == (
            field.name,
            field.type,
            field.is_repeated,
        ), f"{message.full_name}.{field.name} differs from tritonclient's"
        if field.message_type is not None:
            assert other.message_type is not None
            assert other.message_type.full_name == field.message_type.full_name


def test_data_type_enum_matches_tritonclient() -> None:
    ours: EnumDescriptor = oip.DESCRIPTOR.enum_types_by_name["DataType"]
    theirs: EnumDescriptor = triton_config.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in ours.values} == {v.name: v.number for v in theirs.values}


def test_every_rpc_matches_tritonclient() -> None:
    ours = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert other.input_type.full_name == method.input_type.full_name
        assert other.output_type.full_name == method.output_type.full_name
