"""What every scored evaluation graph shares: a prelude that builds the model's input from small
feeds, the model itself, then the selection of one class score per row.

The prelude writes the explained input's name, so the model's own nodes read the perturbed batch
as if it had been fed; only the prelude's feeds and one float per row cross the bus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import onnx
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.opsets import with_min_opset

log = logging.getLogger(__name__)

PREFIX = "xaid_"
TARGET = "xaid_target"
SCORE = "xaid_score"

#: Builds the prelude from the explained input's type: its nodes (the last one writes the
#: input's name), its graph inputs and its constant initializers.
Prelude = Callable[
    [onnx.TypeProto],
    tuple[Sequence[onnx.NodeProto], Sequence[onnx.ValueInfoProto], Sequence[onnx.TensorProto]],
]


def compose_scored(
    model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    what: str,
    prelude: Prelude,
    min_opset: int,
) -> onnx.ModelProto:
    """`model` fed by `prelude`, with output `xaid_score` float [N]: the `xaid_target` column.

    `xaid_target` (int64 scalar) is added to the prelude's inputs. The model must have a single
    input of known rank (batch plus at least one dimension) and a numeric type.
    """
    ir_version = model.ir_version
    model = with_min_opset(model, min_opset, min_opset, what)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    others = [i.name for i in inputs if i.name != input_name]
    if others:
        raise FailedPrecondition(
            f"{what} supports single-input models; this model also takes {others}"
        )
    if not inputs:
        raise FailedPrecondition(f"{what}: {input_name!r} is not a model input")
    source = inputs[0].type.tensor_type
    output = next((o for o in graph.output if o.name == output_name), None)
    if output is None:
        raise FailedPrecondition(f"{what}: {output_name!r} is not a model output")
    if not source.HasField("shape") or len(source.shape.dim) < 2:
        raise FailedPrecondition(
            f"{what} needs an input of known rank with a batch and a per-example dimension"
        )
    if source.elem_type in (TensorProto.BOOL, TensorProto.STRING):
        raise FailedPrecondition(f"{what} needs a numeric input")
    if any(name.startswith(PREFIX) for name in _names(graph)):
        raise FailedPrecondition(f"{what}: the model already uses names starting {PREFIX!r}")

    nodes, feeds, constants = prelude(inputs[0].type)
    flat = f"{PREFIX}score_flat"
    tail = [helper.make_node("Flatten", [output_name], [flat], f"{PREFIX}flatten", axis=1)]
    if output.type.tensor_type.elem_type == TensorProto.FLOAT:
        tail.append(helper.make_node("Gather", [flat, TARGET], [SCORE], f"{PREFIX}pick", axis=1))
    else:
        picked = f"{PREFIX}score_picked"
        tail.append(helper.make_node("Gather", [flat, TARGET], [picked], f"{PREFIX}pick", axis=1))
        tail.append(
            helper.make_node("Cast", [picked], [SCORE], f"{PREFIX}cast", to=TensorProto.FLOAT)
        )
    model_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *model_nodes, *tail])
    graph.initializer.extend(constants)
    del graph.input[:]
    graph.input.extend([*feeds, helper.make_tensor_value_info(TARGET, TensorProto.INT64, [])])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, ["xaid_n"]))
    prune(graph)
    # recorded shapes hold for the model's own batch, not for N perturbed rows: infer them anew
    del graph.value_info[:]
    model.ir_version = max(ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        log.warning("the %s graph failed the ONNX checker: %s", what, exc)
        raise FailedPrecondition(f"{what}: this model could not be composed with it") from exc
    return model


def example_type(source: onnx.TypeProto, batch: int | str) -> onnx.TypeProto:
    """The input's type with its batch dimension replaced (1 for one example, a name for N)."""
    copy = onnx.TypeProto()
    copy.CopyFrom(source)
    dim = copy.tensor_type.shape.dim[0]
    dim.Clear()
    if isinstance(batch, int):
        dim.dim_value = batch
    else:
        dim.dim_param = batch
    return copy


def prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers the score does not need (onnxruntime runs dead nodes)."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)


def subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    """Every name read inside the node's subgraphs (If/Loop/Scan bodies see outer tensors)."""
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                yield from inner.input
                yield from subgraph_inputs(inner)


def _names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(v.name for v in [*graph.input, *graph.output, *graph.value_info])
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names
