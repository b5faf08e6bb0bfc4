"""Tensor codec shared by client and server: numpy arrays <-> xaid.v1.Tensor.

Datatype names are the Open Inference Protocol's; data is row-major little-endian.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xaid.v1 import xaid_pb2

DATATYPES: dict[str, np.dtype[np.generic]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_NAMES = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}


class TensorCodecError(ValueError):
    """A tensor whose datatype, shape or byte size is inconsistent; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def datatype_of(dtype: np.dtype[np.generic]) -> str:
    """The Open Inference Protocol name of a numpy dtype."""
    try:
        return _NAMES[dtype.newbyteorder("=")]
    except KeyError:
        raise TensorCodecError("datatype", f"numpy dtype {dtype} has no tensor datatype") from None


def dtype_of(datatype: str, field: str = "datatype") -> np.dtype[np.generic]:
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise TensorCodecError(
            field, f"unknown datatype {datatype!r}; expected one of {known}"
        ) from None


def to_tensor(array: np.ndarray, name: str = "") -> xaid_pb2.Tensor:
    array = np.asarray(array)
    datatype = datatype_of(array.dtype)
    data = np.ascontiguousarray(array, dtype=DATATYPES[datatype]).tobytes()
    return xaid_pb2.Tensor(name=name, datatype=datatype, shape=list(array.shape), data=data)


def from_tensor(tensor: xaid_pb2.Tensor, field: str = "tensor") -> np.ndarray:
    """Decode a tensor, checking datatype, shape and byte size; the array is a writable copy."""
    dtype = dtype_of(tensor.datatype, f"{field}.datatype")
    shape = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in shape):
        raise TensorCodecError(f"{field}.shape", f"negative dimension in {list(shape)}")
    count = 1
    for d in shape:
        count *= d
    expected = count * dtype.itemsize
    if len(tensor.data) != expected:
        raise TensorCodecError(
            f"{field}.data",
            f"{len(tensor.data)} bytes for shape {list(shape)} {tensor.datatype}, "
            f"expected {expected}",
        )
    try:
        array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    except ValueError:  # even an empty array has a largest shape numpy can address
        raise TensorCodecError(f"{field}.shape", f"shape {list(shape)} is too large") from None
    return array.astype(dtype.newbyteorder("="), copy=True)


def to_tensors(arrays: Sequence[np.ndarray], names: Sequence[str]) -> list[xaid_pb2.Tensor]:
    return [to_tensor(a, n) for a, n in zip(arrays, names, strict=True)]
