"""Static shapes and constant values of every tensor, probed by running the model twice.

ONNX shape inference gives up on many exported graphs (pads computed by Shape/Slice/Concat
chains, `torch.chunk` lowered to Shape/Gather/Div/Slice), and it cannot say which symbolic dims
follow the batch. Running the model at two batch sizes with every intermediate exposed answers
both: dims that differ between the runs follow the batch, and tensors that do not depend on an
input's values (weights reshaped by the graph, sizes computed from `Shape`) and agree between the
runs are constants the rules may read (slice bounds, pads, conv weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.compose import subgraph_inputs

Dims = tuple[int | None, ...]

BATCHES = (2, 3)
RANDOM_OPS = frozenset(
    {
        "Bernoulli",
        "Multinomial",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
    }
)


@dataclass
class Tensors:
    """Per tensor name: dims (None where the dim follows the batch), element type, and value
    when the tensor is the same for every run."""

    dims: dict[str, Dims]
    dtypes: dict[str, int]
    values: dict[str, np.ndarray]


def probe(model: onnx.ModelProto) -> Tensors:
    """Shapes, element types and constants of every tensor of the main graph."""
    graph = model.graph
    initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    tensors = Tensors(
        dims={name: tuple(v.shape) for name, v in initializers.items()},
        dtypes={t.name: t.data_type for t in graph.initializer},
        values=dict(initializers),
    )
    names = [o for node in graph.node for o in node.output if o and o not in tensors.dims]
    runs = [_run(model, inputs, names, batch) for batch in BATCHES]
    varying = _varying(graph, {i.name for i in inputs})
    for value_info in inputs:
        tensor_type = value_info.type.tensor_type
        tensors.dtypes[value_info.name] = tensor_type.elem_type
        tensors.dims[value_info.name] = _input_dims(value_info)
    for name in names:
        first, second = runs[0][name], runs[1][name]
        tensors.dtypes[name] = helper.np_dtype_to_tensor_dtype(first.dtype)
        if first.ndim == second.ndim:
            tensors.dims[name] = tuple(
                a if a == b else None for a, b in zip(first.shape, second.shape, strict=True)
            )
        else:
            tensors.dims[name] = (None,) * first.ndim
        if name not in varying and first.shape == second.shape and np.array_equal(first, second):
            tensors.values[name] = first
    return tensors


def _input_dims(value_info: onnx.ValueInfoProto) -> Dims:
    shape = value_info.type.tensor_type.shape
    return tuple(
        None if axis == 0 and not _static(d) else d.dim_value for axis, d in enumerate(shape.dim)
    )


def _static(dim: onnx.TensorShapeProto.Dimension) -> bool:
    """A dim with a known size; exporters sometimes write -1 for an unknown one."""
    return dim.HasField("dim_value") and dim.dim_value >= 0


def _run(
    model: onnx.ModelProto, inputs: list[onnx.ValueInfoProto], names: list[str], batch: int
) -> dict[str, np.ndarray]:
    """Every node output of one run on random inputs of the given batch size."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    outputs = {o.name for o in exposed.graph.output}
    exposed.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    rng = np.random.default_rng(batch)
    feeds = {i.name: _example(i, batch, rng) for i in inputs}
    try:
        session = ort.InferenceSession(
            exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        values = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise FailedPrecondition(f"the model could not be run to probe its shapes: {exc}") from exc
    names_out = [o.name for o in session.get_outputs()]
    return {name: np.asarray(value) for name, value in zip(names_out, values, strict=True)}


def _example(value_info: onnx.ValueInfoProto, batch: int, rng: np.random.Generator) -> np.ndarray:
    """A random feed; only the first dim may be symbolic, and it is the batch."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise FailedPrecondition(f"input {value_info.name!r} has no shape")
    shape = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if _static(dim):
            shape.append(dim.dim_value)
        elif axis == 0:
            shape.append(batch)
        else:
            raise FailedPrecondition(
                f"input {value_info.name!r} has a symbolic dim at axis {axis}: the gradient "
                "graph supports a dynamic batch and static other dims"
            )
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
    if tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def _varying(graph: onnx.GraphProto, inputs: set[str]) -> set[str]:
    """Tensors whose values may change between runs of the same batch size: those computed from
    an input's values or from random draws (a fresh session repeats the draws, so two probe runs
    cannot tell). Shape and Size read only the shape, which the two batch sizes do vary."""
    varying = set(inputs)
    for node in graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        reads = [*node.input, *subgraph_inputs(node)]
        if node.op_type in RANDOM_OPS or any(name in varying for name in reads):
            varying.update(node.output)
    return varying
