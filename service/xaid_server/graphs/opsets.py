"""Opset handling shared by the graph builders: the rules they emit need a minimum opset."""

from __future__ import annotations

import onnx
from onnx import version_converter

from xaid_server.errors import FailedPrecondition


def default_opset(model: onnx.ModelProto) -> int:
    """The model's `ai.onnx` opset version (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def with_min_opset(model: onnx.ModelProto, minimum: int, target: int, what: str) -> onnx.ModelProto:
    """A copy of `model` at opset `minimum` or later, converted to `target` when below it."""
    opset = default_opset(model)
    if opset >= minimum:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    try:
        return version_converter.convert_version(model, target)
    except (RuntimeError, onnx.checker.ValidationError) as exc:
        raise FailedPrecondition(
            f"{what}: the model's opset {opset} could not be upgraded to {target}"
        ) from exc
