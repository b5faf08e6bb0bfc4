"""Where a gradient graph comes from: a shipped `model.grad.onnx`, the disk cache, or a build.

Building probes the model with onnxruntime and can take seconds on a large network, so built
graphs are kept on disk, named by the model's sha256 and the build parameters, and a repository
may ship the graph beside the model. A shipped graph is checked before it is trusted: it must
take the model's inputs plus `target` and return the model's outputs plus `gradient`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from xaid_server.graphs.gradient.builder import GRADIENT, TARGET, build_gradient_graph

log = logging.getLogger(__name__)

SHIPPED = "model.grad.onnx"


@dataclass(frozen=True)
class GradientGraph:
    """A serialized gradient graph and where it came from (`shipped`, `cache` or `built`)."""

    data: bytes
    source: str


@cache
def rewriter_digest() -> str:
    """A digest of the rewriter's own source: a cached graph built by other rules is stale."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_path(folder: Path, sha256: str, *, wrt: str, output: str, relu: str) -> Path:
    key = "\0".join((rewriter_digest(), wrt, output, relu)).encode()
    return folder / f"{sha256}-{hashlib.sha256(key).hexdigest()[:16]}.onnx"


def shipped_problem(graph: bytes, model: onnx.ModelProto) -> str | None:
    """None when `graph` has the model's inputs plus `target` and its outputs plus `gradient`."""
    try:
        proto = onnx.load_from_string(graph)
    except (DecodeError, ValueError):
        return "it is not an ONNX model"
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name for i in model.graph.input if i.name not in initializers} | {TARGET}
    given = {i.name for i in proto.graph.input} - {t.name for t in proto.graph.initializer}
    if given != inputs:
        return f"its inputs are {sorted(given)}, expected {sorted(inputs)}"
    outputs = {o.name for o in proto.graph.output}
    missing = sorted(({o.name for o in model.graph.output} | {GRADIENT}) - outputs)
    if missing:
        return f"it lacks the outputs {missing}"
    return None


def unloadable(graph: bytes) -> str | None:
    """None when onnxruntime loads `graph` (a shipped file may use ops it does not know)."""
    try:
        ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    except Exception as exc:
        return f"onnxruntime cannot load it ({type(exc).__name__})"
    return None


def gradient_graph(
    model_bytes: bytes,
    sha256: str,
    *,
    wrt: str,
    output: str,
    relu: str,
    shipped: Path | None = None,
    cache_folder: Path | None = None,
) -> GradientGraph:
    """The gradient graph for these parameters: `shipped` if it passes the check, else the cached
    build, else a fresh build (written to the cache; a cache that cannot be written is skipped).
    Raises FailedPrecondition when the model cannot be differentiated."""
    model = onnx.load_from_string(model_bytes)
    if shipped is not None and shipped.is_file():
        data = shipped.read_bytes()
        problem = shipped_problem(data, model) or unloadable(data)
        if problem is None:
            return GradientGraph(data, "shipped")
        log.error("ignoring %s: %s; building the gradient graph instead", shipped, problem)
    path = (
        cache_path(cache_folder, sha256, wrt=wrt, output=output, relu=relu)
        if cache_folder is not None
        else None
    )
    if path is not None and path.is_file():
        data = path.read_bytes()
        if shipped_problem(data, model) is None:
            return GradientGraph(data, "cache")
        log.warning("rebuilding the unreadable cached gradient graph %s", path.name)
    data = build_gradient_graph(model, wrt=wrt, output=output, relu=relu).SerializeToString()
    if path is not None:
        write_atomically(path, data)
    return GradientGraph(data, "built")


def write_atomically(path: Path, data: bytes) -> None:
    """Write beside the destination, then rename: readers see no file or the whole new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError as exc:
        log.warning("gradient graph cache not written: %s", exc)
        return
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except OSError as exc:
        log.warning("gradient graph cache not written: %s", exc)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
