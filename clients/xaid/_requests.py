"""Request building shared by the sync and async clients: inputs, targets and method parameters.

Method names and their parameters come from the proto descriptors, so a field added to the
contract is usable here (and listed in error messages) without touching this module.
"""

from __future__ import annotations

import io
import numbers
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2

if TYPE_CHECKING:
    from google._upb import _message as _upb

    # Descriptors are typed as either implementation's; at run time both are the upb one.
    _Field: TypeAlias = FieldDescriptor | _upb.FieldDescriptor


@dataclass(frozen=True)
class Text:
    """Text for a text model, one string per batch row; the server tokenises it."""

    rows: tuple[str, ...]

    def __init__(self, *rows: str | Sequence[str]) -> None:
        flat = [r for row in rows for r in ([row] if isinstance(row, str) else row)]
        if not flat or not all(isinstance(r, str) for r in flat):
            raise ValueError("Text needs at least one string")
        object.__setattr__(self, "rows", tuple(flat))


#: Everything `predict` and `explain` accept as the model input.
ModelInput: TypeAlias = (
    Text
    | np.ndarray
    | Mapping[str, npt.ArrayLike]
    | Image.Image
    | bytes
    | bytearray
    | memoryview
    | str
    | os.PathLike[str]
)

_METHOD_ONEOF = xaid_pb2.ExplainRequest.DESCRIPTOR.oneofs_by_name["method"]
_METHOD_FIELDS: dict[str, FieldDescriptor] = {f.name: f for f in _METHOD_ONEOF.fields}
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_INT_TYPES = frozenset(
    {
        FieldDescriptor.CPPTYPE_INT32,
        FieldDescriptor.CPPTYPE_INT64,
        FieldDescriptor.CPPTYPE_UINT32,
        FieldDescriptor.CPPTYPE_UINT64,
    }
)
_FLOAT_TYPES = frozenset({FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT})


def explain_methods() -> dict[str, list[str]]:
    """Every explain method of the contract with its parameter names, in proto order."""
    return {
        name: [p.name for p in f.message_type.fields] if f.message_type else []
        for name, f in _METHOD_FIELDS.items()
    }


def normalize_method(method: str) -> str:
    """The proto field name for a method; `Integrated-Gradients` works as well."""
    name = method.strip().lower().replace("-", "_")
    if name not in _METHOD_FIELDS:
        valid = ", ".join(_METHOD_FIELDS)
        raise ValueError(f"unknown method {method!r}; valid methods: {valid}")
    return name


# ---- inputs ----


def encode_input(x: ModelInput) -> tuple[list[xaid_pb2.Tensor], bytes, list[str]]:
    """The request's `inputs` tensors and `image` bytes for any accepted input form.

    A bare array is the model's first input (name ""); a mapping names each input. Images,
    encoded bytes and PNG/JPEG paths go as `image` for the server's preprocessing; a `.npy`
    path is loaded and sent as an array. `Text` goes as `text` for the server's tokeniser.
    """
    if isinstance(x, Text):
        return [], b"", list(x.rows)
    if isinstance(x, np.ndarray):
        return [to_tensor(x)], b"", []
    if isinstance(x, Mapping):
        if not x:
            raise ValueError("the input mapping is empty; give at least one named array")
        return [to_tensor(np.asarray(v), str(k)) for k, v in x.items()], b"", []
    if isinstance(x, Image.Image):
        return [], encode_image(x), []
    if isinstance(x, bytes | bytearray | memoryview):
        data = bytes(x)
        if not data:
            raise ValueError("the encoded image is empty")
        return [], data, []
    if isinstance(x, str | os.PathLike):
        path = Path(x)
        if path.suffix.lower() == ".npy":
            return [to_tensor(np.load(path, allow_pickle=False))], b"", []
        return [], path.read_bytes(), []
    raise TypeError(
        "input must be xaid.Text, a numpy array, a mapping of input name to array, a PIL image, "
        f"encoded image bytes or a path to a PNG/JPEG/.npy file, not {type(x).__name__}"
    )


def encode_image(image: Image.Image) -> bytes:
    """PNG bytes: lossless, so the server sees exactly the caller's pixels."""
    if image.mode not in _PNG_MODES:
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- method parameters ----


def fill_message(message: Message, params: Mapping[str, object], where: str) -> None:
    """Set `message` fields by name; `where` names the message in errors ("occlusion")."""
    fields = message.DESCRIPTOR.fields_by_name
    for key, value in params.items():
        field = fields.get(key)
        if field is None:
            valid = ", ".join(fields) or "none"
            raise ValueError(f"unknown parameter {key!r} for {where}; valid parameters: {valid}")
        if value is None:
            continue
        label = f"{where}.{key}"
        if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if field.is_repeated:
                raise ValueError(f"{label}: repeated message fields are not supported")
            _fill_sub_message(getattr(message, key), value, label)
        elif field.is_repeated:
            items = _as_sequence(value)
            container = getattr(message, key)
            del container[:]
            container.extend(_coerce(field, item, label) for item in items)
        else:
            try:
                setattr(message, key, _coerce(field, value, label))
            except ValueError as err:
                raise ValueError(f"{label}: {err}") from None


def _fill_sub_message(target: Message, value: object, label: str) -> None:
    if isinstance(value, Message):
        if value.DESCRIPTOR is not target.DESCRIPTOR:
            expected = target.DESCRIPTOR.name
            raise ValueError(f"{label}: expected {expected}, not {type(value).__name__}")
        target.CopyFrom(value)
    elif isinstance(value, Mapping):
        target.SetInParent()
        fill_message(target, {str(k): v for k, v in value.items()}, label)
    else:
        raise ValueError(f"{label}: expected a dict of {target.DESCRIPTOR.name} fields")


def _as_sequence(value: object) -> list[object]:
    if isinstance(value, np.ndarray):
        return list(value.ravel().tolist())
    if isinstance(value, list | tuple | range):
        return list(value)
    return [value]


def _coerce(field: _Field, value: object, label: str) -> object:
    """A Python value of the field's type, refusing lossy or surprising conversions."""
    if isinstance(value, np.generic):
        value = value.item()
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{label}: expected true or false, not {value!r}")
    if kind in _INT_TYPES:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{label}: expected an integer, not {value!r}")
    if kind in _FLOAT_TYPES:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{label}: expected a number, not {value!r}")
    if kind == FieldDescriptor.CPPTYPE_STRING:
        if field.type == FieldDescriptor.TYPE_BYTES and isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value
        raise ValueError(f"{label}: expected a string, not {value!r}")
    if kind == FieldDescriptor.CPPTYPE_ENUM:
        names = field.enum_type.values_by_name if field.enum_type else {}
        if isinstance(value, str) and value in names:
            return names[value].number
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"{label}: expected one of {', '.join(names)}, not {value!r}")
    raise ValueError(f"{label}: unsupported field type")  # pragma: no cover - no such field yet


# ---- requests ----


def model_request(model: str, version: str = "") -> xaid_pb2.GetModelRequest:
    return xaid_pb2.GetModelRequest(model=model, version=version)


def predict_request(
    model: str, x: ModelInput, *, top_k: int = 5, version: str = ""
) -> xaid_pb2.PredictRequest:
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, not {top_k}")
    inputs, image, text = encode_input(x)
    return xaid_pb2.PredictRequest(
        model=model, version=version, inputs=inputs, image=image, text=text, top_k=top_k
    )


def explain_request(
    model: str,
    x: ModelInput,
    method: str = "occlusion",
    *,
    target: int | None = None,
    output: str = "",
    seed: int | None = None,
    render: bool = False,
    evaluate: bool = False,
    version: str = "",
    input: str = "",
    params: Mapping[str, object] | None = None,
) -> xaid_pb2.ExplainRequest:
    """The ExplainRequest; `params` fill the message of `method` in the request's oneof."""
    name = normalize_method(method)
    inputs, image, text = encode_input(x)
    request = xaid_pb2.ExplainRequest(
        model=model,
        version=version,
        inputs=inputs,
        image=image,
        text=text,
        render=render,
        evaluate=evaluate,
        input=input,
    )
    if target is not None or output:
        request.target.output = output
        if target is not None:
            request.target.class_index = int(target)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), not {seed}")
        request.seed = int(seed)
    method_message = getattr(request, name)
    method_message.SetInParent()  # selects the method even when every parameter is defaulted
    fill_message(method_message, params or {}, name)
    return request
