"""Graphs for models over token ids: gradients are taken at the embedding lookup's output.

Token ids are not differentiable, so gradient methods work in embedding space: the output of the
Gather that looks the token input up in the embedding table. Two graphs serve them:

- the lookup graph: token ids in, their embeddings out (the model cut after the Gather);
- the embedding gradient graph: the model's gradient graph with respect to the Gather's output,
  with that Gather removed and its output turned into a graph input, so that any point in
  embedding space (integrated-gradient steps, noisy copies) can be fed. The token ids stay an
  input for whatever else reads them (padding masks, positions).
"""

from __future__ import annotations

import logging

import onnx
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition
from xaid_server.graphs.gradient import GRADIENT, WRT_VALUE, build_gradient_graph

log = logging.getLogger(__name__)

PASS_THROUGH = ("Cast", "Identity")  # ops allowed between the token input and the lookup


def embedding_output(model: onnx.ModelProto, input_name: str) -> str:
    """The output of the first Gather whose indices are the token input (through Cast/Identity)."""
    ids = {input_name}
    for node in model.graph.node:
        if node.op_type in PASS_THROUGH and node.input and node.input[0] in ids:
            ids.update(node.output)
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ids:
            return str(node.output[0])
    raise FailedPrecondition(
        f"token attributions need an embedding lookup (a Gather indexed by {input_name!r}); "
        "this model has none"
    )


def build_lookup_graph(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """Token ids -> their embeddings: the part of the model that computes the lookup."""
    embedding = embedding_output(model, input_name)
    graph = model.graph
    needed = {embedding}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for tensor in [t for t in graph.initializer if t.name not in needed]:
        graph.initializer.remove(tensor)
    inputs = [i for i in graph.input if i.name == input_name]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.append(_value_info(model, embedding, len(inputs[0].type.tensor_type.shape.dim)))
    del graph.value_info[:]
    onnx.checker.check_model(model)
    return model


def _value_info(model: onnx.ModelProto, name: str, ids_rank: int) -> onnx.ValueInfoProto:
    """The inferred type of the embedding; float with one axis more than the ids if unknown."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError):
        inferred = model
    for value in inferred.graph.value_info:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return value
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * (ids_rank + 1))


def build_embedding_gradient_graph(
    model: onnx.ModelProto, input_name: str, output: str, relu: str = "standard"
) -> onnx.ModelProto:
    """The gradient graph w.r.t. the embedding, which it takes as an input named like the tensor.

    Inputs: the model's inputs, the embedding (float [batch, tokens, dim]) and `target`; outputs:
    the model's outputs and `gradient`, shaped like the embedding.
    """
    embedding = embedding_output(model, input_name)
    graded = build_gradient_graph(model, wrt=embedding, output=output, relu=relu)
    graph = graded.graph
    kept = [n for n in graph.node if embedding not in n.output and list(n.output) != [WRT_VALUE]]
    del graph.node[:]
    graph.node.extend(kept)
    gradient = next(o for o in graph.output if o.name == GRADIENT)
    outputs = [o for o in graph.output if o.name != WRT_VALUE]
    del graph.output[:]
    graph.output.extend(outputs)
    graph.input.append(helper.make_value_info(embedding, gradient.type))
    used = {name for node in graph.node for name in node.input}
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    try:
        onnx.checker.check_model(graded)
    except onnx.checker.ValidationError as exc:
        log.warning("the embedding gradient graph failed the ONNX checker: %s", exc)
        raise FailedPrecondition("the embedding gradient graph failed validation") from exc
    return graded
