"""What a model version may read from disk: its own file and external data inside its folder.

ONNX external data names files by path; a crafted model can point them at any file the server
can read (CVE-2022-25882, CVE-2024-27318). Every such path must stay inside the version folder,
and neither the model file nor its data may be a symbolic link.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from xaid_server.errors import ModelLoadError


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds, in subgraphs and node attributes too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("sparse_tensor"):
                yield attribute.sparse_tensor.values
                yield attribute.sparse_tensor.indices
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The `location` of every tensor stored outside the model file."""
    found: set[str] = set()
    tensors = list(_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {e.key: e.value for e in tensor.external_data}
            found.add(entries.get("location", ""))
    return found


def check_location(location: str, folder: Path) -> None:
    """Refuse an external-data path that is empty, absolute, escapes `folder` or is a link."""
    if not location or "\0" in location:
        raise ModelLoadError("external data without a valid location")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or windows.root:
        raise ModelLoadError("external data path is absolute")
    if ".." in posix.parts or ".." in windows.parts:
        raise ModelLoadError("external data path leaves the model folder")
    path = folder / location
    if path.is_symlink():
        raise ModelLoadError("external data file is a symbolic link")
    base = folder.resolve()
    if not path.resolve().is_relative_to(base):
        raise ModelLoadError("external data path leaves the model folder")
    if not path.is_file():
        raise ModelLoadError("external data file is missing")


def read_model_file(path: Path, root: Path) -> bytes:
    """The model's bytes, once its file and every external-data path it names are checked.

    External data is read into the returned model (so it must fit protobuf's 2 GiB).
    """
    if path.is_symlink():
        raise ModelLoadError("model file is a symbolic link")
    if not path.resolve().is_relative_to(root.resolve()):
        raise ModelLoadError("model file lies outside the model repository")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"model file cannot be read: {type(exc).__name__}") from None
    try:
        model = onnx.load_from_string(data)
    except Exception:
        raise ModelLoadError("model file is not an ONNX model") from None
    locations = external_locations(model)
    if not locations:
        return data
    for location in sorted(locations):
        check_location(location, path.parent)
    try:  # inline it: every graph built from the model then stands alone
        onnx.load_external_data_for_model(model, str(path.parent))
        return model.SerializeToString()
    except Exception:
        raise ModelLoadError("external data cannot be read into the model") from None
