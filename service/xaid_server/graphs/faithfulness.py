"""The faithfulness evaluation graph: the masking graph, scoring the target class's probability.

A deletion or insertion curve point keeps some units of the input (pixels across channels, or
single elements) and takes the others from a fill row (the baseline, or the blurred input): the
masking graph's job (graphs/masking.py), with one segment per unit. Deletion and insertion AUCs
are taken over the softmax probability of the target class, so a Softmax over the flattened
output is added behind the model and becomes the output the masking graph selects from.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.masking import build_masking_graph

PROBABILITIES = "faithfulness_probabilities"


def build_faithfulness_graph(
    model: onnx.ModelProto, input_name: str, output_name: str
) -> onnx.ModelProto:
    """The masking graph over `model` whose score is softmax(output flattened per row)[target]."""
    graph = model.graph
    if not any(o.name == output_name for o in graph.output):
        raise FailedPrecondition(f"faithfulness: {output_name!r} is not a model output")
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    if any(name.startswith(PROBABILITIES) for name in names):
        raise FailedPrecondition(f"faithfulness: the model already uses the name {PROBABILITIES}")
    flat, floats = f"{PROBABILITIES}_flat", f"{PROBABILITIES}_float"
    graph.node.extend(
        [
            helper.make_node("Flatten", [output_name], [flat], f"{PROBABILITIES}_1", axis=1),
            helper.make_node("Cast", [flat], [floats], f"{PROBABILITIES}_2", to=TensorProto.FLOAT),
            helper.make_node("Softmax", [floats], [PROBABILITIES], f"{PROBABILITIES}_3", axis=1),
        ]
    )
    graph.output.append(
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, ["batch", "classes"])
    )
    return build_masking_graph(model, input_name, PROBABILITIES)
