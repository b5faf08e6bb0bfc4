"""Open Inference Protocol tensors <-> numpy: raw contents, typed contents and the response.

Raw contents go through the shared tensor codec, so a wrong byte size is reported the same way
on both protocols: field, actual and expected sizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xaid._codec import TensorCodecError, dtype_of, from_tensor, to_tensor
from xaid.oip import grpc_service_pb2 as oip
from xaid.v1 import xaid_pb2
from xaid_server.core.requests import Tensors
from xaid_server.errors import InvalidArgument

#: The typed `contents` field of each datatype; FP16 and BF16 travel only raw.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _codec_error(exc: TensorCodecError) -> InvalidArgument:
    return InvalidArgument(str(exc), field=exc.field)


def decode_inputs(request: oip.ModelInferRequest) -> Tensors:
    """The request's input tensors, from `raw_input_contents` or from typed `contents`."""
    raw = request.raw_input_contents
    if raw:
        if len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"raw_input_contents: {len(raw)} entries for {len(request.inputs)} inputs; "
                "send one per input, in input order",
                field="raw_input_contents",
            )
        mixed = [t.name for t in request.inputs if t.HasField("contents")]
        if mixed:
            raise InvalidArgument(
                f"inputs: {mixed} carry typed contents while the request has raw_input_contents; "
                "use one or the other",
                field="raw_input_contents",
            )
    tensors: Tensors = []
    for i, tensor in enumerate(request.inputs):
        field = f"inputs[{i}]"
        if tensor.parameters:
            raise InvalidArgument(
                f"{field}.parameters: unknown parameters {sorted(tensor.parameters)}; "
                "input tensors take none",
                field=f"{field}.parameters",
            )
        try:
            if raw:
                message = xaid_pb2.Tensor(
                    name=tensor.name, datatype=tensor.datatype, shape=tensor.shape, data=raw[i]
                )
                array = from_tensor(message, f"raw_input_contents[{i}]")
            else:
                array = _from_contents(tensor, field)
        except TensorCodecError as exc:
            raise _codec_error(exc) from None
        tensors.append((tensor.name, array))
    return tensors


def _from_contents(tensor: oip.ModelInferRequest.InferInputTensor, field: str) -> np.ndarray:
    dtype = dtype_of(tensor.datatype, f"{field}.datatype")
    name = CONTENTS_FIELD.get(tensor.datatype)
    if name is None:
        raise TensorCodecError(
            f"{field}.contents", f"{tensor.datatype} travels only in raw_input_contents"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"{field}.shape", f"negative dimension in {list(shape)}")
    values = getattr(tensor.contents, name)
    expected = int(np.prod(shape, dtype=np.int64))
    if len(values) != expected:
        raise TensorCodecError(
            f"{field}.contents.{name}",
            f"{len(values)} values for shape {list(shape)}, expected {expected}",
        )
    array = np.asarray(values, dtype=np.float64 if dtype.kind == "f" else None)
    if dtype.kind in "iu" and array.size:
        limits = np.iinfo(dtype.name)
        if array.min() < limits.min or array.max() > limits.max:
            raise TensorCodecError(
                f"{field}.contents.{name}",
                f"values outside the {tensor.datatype} range [{limits.min}, {limits.max}]",
            )
    return array.astype(dtype.newbyteorder("=")).reshape(shape)


def encode_outputs(
    response: oip.ModelInferResponse, outputs: Sequence[tuple[str, np.ndarray]]
) -> None:
    """Every output as metadata plus `raw_output_contents`, which tritonclient's as_numpy reads."""
    for name, array in outputs:
        tensor = to_tensor(array, name)
        response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.data)
