"""Gradient graphs: reverse-mode autodiff over an ONNX graph, emitted as standard ONNX ops.

Plain onnxruntime (CPU or CUDA) runs the result: one run returns the model's outputs and the
gradient of a selected score with respect to an input or any intermediate tensor (saliency,
integrated gradients, Grad-CAM, guided backprop). Design notes: docs/GRADIENTS.md.
"""

from xaid_server.graphs.gradient.builder import (
    GRADIENT,
    RELU_RULES,
    SUPPORTED_OPS,
    TARGET,
    WRT_VALUE,
    build_gradient_graph,
)
from xaid_server.graphs.gradient.emit import PREFIX

__all__ = [
    "GRADIENT",
    "PREFIX",
    "RELU_RULES",
    "SUPPORTED_OPS",
    "TARGET",
    "WRT_VALUE",
    "build_gradient_graph",
]
