"""Request parameters of ModelInfer: `explain` and its method parameters, checked by name.

`explain` (string) names the method; `explain.<field>` sets a field of that method's xaid.v1
parameter message (nested fields with dots, repeated ones as a comma-separated string), so both
protocols share one set of names, types and defaults. `explain.target`, `explain.output`,
`explain.input` and `explain.seed` choose what is explained and the seed; `timeout` (in
microseconds, as Triton's) shortens the deadline. Anything else is an error, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from xaid.oip import grpc_service_pb2 as oip
from xaid.v1 import xaid_pb2
from xaid_server.errors import InvalidArgument
from xaid_server.servicer import METHOD_FIELDS, parameters_from_proto

EXPLAIN = "explain"
PREFIX = "explain."
#: Parameters that choose what is explained rather than how.
CALL_FIELDS = ("target", "output", "input", "seed")
TIMEOUT = "timeout"
_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)


@dataclass
class InferParameters:
    method: str = ""
    method_parameters: dict[str, Any] = field(default_factory=dict)
    target: int | None = None
    output: str = ""
    input: str = ""
    seed: int | None = None
    timeout: float | None = None  # seconds


def value_of(parameter: oip.InferParameter) -> bool | int | float | str:
    choice = parameter.WhichOneof("parameter_choice")
    if choice is None:
        return ""
    value: bool | int | float | str = getattr(parameter, choice)
    return value


def parse_parameters(parameters: Mapping[str, oip.InferParameter]) -> InferParameters:
    known = ", ".join([EXPLAIN, f"{PREFIX}<parameter>", TIMEOUT])
    result = InferParameters()
    values = {key: value_of(p) for key, p in parameters.items()}
    for key in values:
        if key not in (EXPLAIN, TIMEOUT) and not key.startswith(PREFIX):
            raise InvalidArgument(
                f"parameters: unknown parameter {key!r}; known: {known}", field=f"parameters.{key}"
            )
    if TIMEOUT in values:
        result.timeout = _int(values[TIMEOUT], TIMEOUT) / 1e6
    method = values.get(EXPLAIN, "")
    if not isinstance(method, str):
        raise InvalidArgument(
            "parameters.explain: a method name string", field="parameters.explain"
        )
    given = {k[len(PREFIX) :]: v for k, v in values.items() if k.startswith(PREFIX)}
    if given and not method:
        raise InvalidArgument(
            f"parameters: {sorted(PREFIX + k for k in given)} need the explain parameter",
            field="parameters.explain",
        )
    if not method:
        return result
    if method not in METHOD_FIELDS:
        raise InvalidArgument(
            f"parameters.explain: unknown method {method!r}; known: {', '.join(METHOD_FIELDS)}",
            field="parameters.explain",
        )
    result.method = method
    if "target" in given:
        result.target = _int(given.pop("target"), "explain.target")
    if "seed" in given:
        result.seed = _int(given.pop("seed"), "explain.seed")
    for name in ("output", "input"):
        if name in given:
            setattr(result, name, str(given.pop(name)))
    message = getattr(xaid_pb2.ExplainRequest(), method)
    for path, value in given.items():
        _set(message, path, value)
    result.method_parameters = parameters_from_proto(message)
    return result


def _int(value: bool | int | float | str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(
            f"parameters.{name}: an integer, got {value!r}", field=f"parameters.{name}"
        )
    return value


def _set(message: Message, path: str, value: bool | int | float | str) -> None:
    """Set `explain.<path>` on the method's parameter message, with protobuf's type checks."""
    key = f"parameters.{PREFIX}{path}"
    head, _, rest = path.partition(".")
    fields = message.DESCRIPTOR.fields_by_name
    if head not in fields:
        known = sorted([*fields, *CALL_FIELDS])
        raise InvalidArgument(
            f"{key}: unknown parameter of {message.DESCRIPTOR.name}; known: {known}", field=key
        )
    descriptor = fields[head]
    try:
        if descriptor.message_type is not None and not descriptor.is_repeated:
            if not rest:
                raise InvalidArgument(f"{key}: set its fields as {key}.<field>", field=key)
            _set(getattr(message, head), rest, value)
        elif rest:
            raise InvalidArgument(f"{key}: {head} has no fields", field=key)
        elif descriptor.is_repeated:
            items = str(value).split(",") if isinstance(value, str) else [value]
            kind = float if descriptor.cpp_type in _FLOAT_TYPES else int
            getattr(message, head).extend(kind(item) for item in items)
        else:
            setattr(message, head, value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{key}: {exc}", field=key) from None
