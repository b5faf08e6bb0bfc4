"""Digests of tensors and the inline top-k of an attribution.

A tensor digest is sha256 over, for each tensor in order of name: the name in UTF-8, a NUL byte,
the numpy dtype name (`float32`), a NUL byte, the shape as comma-separated decimals, a NUL byte,
then the C-order little-endian bytes. Anyone with numpy can recompute it from a request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

TOP_K = 10


def tensor_digest(tensors: Iterable[tuple[str, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name, array in sorted(tensors, key=lambda item: item[0]):
        data = np.ascontiguousarray(array)
        little = data.astype(data.dtype.newbyteorder("<"), copy=False)
        shape = ",".join(str(n) for n in data.shape)
        digest.update(f"{name}\0{data.dtype.name}\0{shape}\0".encode())
        digest.update(little.tobytes())
    return digest.hexdigest()


def top_attributions(attribution: np.ndarray, k: int = TOP_K) -> list[list[float]]:
    """The k largest |attribution| elements as [flat index, value], largest first, ties by index."""
    flat = attribution.reshape(-1).astype(np.float64)
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
    return [[int(i), float(flat[i])] for i in order]
