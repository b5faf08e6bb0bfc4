"""Grad-CAM (Selvaraju et al. 2017) over a convolutional feature map of the model.

One gradient run per row w.r.t. the feature map A (a gradient graph whose `wrt` is the layer,
which also returns A): alpha_k = spatial mean of dF/dA_k, map = ReLU(sum_k alpha_k A_k), upsampled
bilinearly (half-pixel centres, as torch's `interpolate(mode="bilinear")`) to the input's height
and width. Attributions have the shape of the explained input, so the map is repeated over the
input's channels; every channel carries the same map.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explanation
from xaid_server.explainers.gradients import (
    GradientExplainer,
    gradient_session,
    log,
    output_name,
    run_gradients,
)
from xaid_server.graphs.gradient import WRT_VALUE
from xaid_server.runtime.model import LoadedModel


@dataclass(frozen=True)
class GradCamParams:
    """The proto's `GradCam` message; `resolve` fills every field."""

    layer: str = ""
    relu: bool | None = None


@dataclass(frozen=True)
class _Layers:
    """What the model offers Grad-CAM: its computed tensors and the default layer."""

    computed: frozenset[str]
    default: str | None


def _spatial(value_info: onnx.ValueInfoProto | None) -> bool:
    """A feature map with more than one spatial position (unknown dims count as extent)."""
    if value_info is None or not value_info.type.tensor_type.HasField("shape"):
        return True
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) < 3:
        return False
    sizes = [d.dim_value if d.HasField("dim_value") else None for d in dims[2:]]
    return any(s is None or s > 1 for s in sizes)


def find_layers(proto: onnx.ModelProto) -> _Layers:
    """The graph's computed tensors and the output of its last Conv with spatial extent."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes are a hint; without them every Conv output counts
        inferred = proto
    infos = {v.name: v for v in inferred.graph.value_info}
    infos.update({v.name: v for v in inferred.graph.output})
    default = None
    for node in inferred.graph.node:
        conv = node.op_type == "Conv" and node.domain in ("", "ai.onnx")
        if conv and _spatial(infos.get(node.output[0])):
            default = node.output[0]
    computed = frozenset(o for node in proto.graph.node for o in node.output if o)
    return _Layers(computed, default)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of [B, h, w] to [B, height, width] with align_corners=False."""

    def axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scale = size_in / size_out
        source = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, source - low

    y0, y1, wy = axis(maps.shape[1], height)
    x0, x1, wx = axis(maps.shape[2], width)
    top = maps[:, y0][:, :, x0] * (1 - wx) + maps[:, y0][:, :, x1] * wx
    bottom = maps[:, y1][:, :, x0] * (1 - wx) + maps[:, y1][:, :, x1] * wx
    result: np.ndarray = top * (1 - wy)[None, :, None] + bottom * wy[None, :, None]
    return result


class GradCamExplainer(GradientExplainer[GradCamParams]):
    """One backward per row to a conv feature map; image-like (rank-4) inputs only."""

    name = "grad_cam"
    params_type = GradCamParams

    def __init__(self) -> None:
        self._layers: dict[str, _Layers] = {}  # by model sha256: the same bytes, the same layers

    def layers(self, model: LoadedModel) -> _Layers:
        found = self._layers.get(model.sha256)
        if found is None:
            found = find_layers(onnx.load_from_string(model.model_bytes))
            self._layers[model.sha256] = found
        return found

    def _reason(self, model: LoadedModel) -> str | None:
        if model.input.rank != 4:
            return f"grad_cam needs an image-like rank-4 input; {model.input.name!r} is not"
        if self.layers(model).default is None:
            return "the model has no Conv layer with spatial extent"
        return None

    def prepare(self, model: LoadedModel) -> None:
        if self._reason(model) is not None:
            return
        layer = self.layers(model).default
        assert layer is not None
        try:
            gradient_session(model, output_name(model), wrt=layer)
        except FailedPrecondition as exc:
            log.warning("%s %s: no grad_cam graph: %s", model.name, model.version, exc.message)

    def applicable(self, model: LoadedModel) -> str | None:
        reason = self._reason(model)
        if reason is not None:
            return reason
        layer = self.layers(model).default
        assert layer is not None
        try:
            gradient_session(model, output_name(model), wrt=layer)
        except FailedPrecondition as exc:
            return f"the gradient graph to {layer!r} cannot be built: {exc.message}"
        return None

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> GradCamParams:
        params = self.merge(model, given)
        layers = self.layers(model)
        layer = params.layer or layers.default
        if not isinstance(layer, str) or layer not in layers.computed:
            raise InvalidArgument(
                f"grad_cam.layer: {layer!r} is not a tensor the model computes",
                field="grad_cam.layer",
            )
        relu = True if params.relu is None else params.relu
        if not isinstance(relu, bool | np.bool_):
            raise InvalidArgument(
                f"grad_cam.relu: expected true or false, got {relu!r}", field="grad_cam.relu"
            )
        return GradCamParams(layer=layer, relu=bool(relu))

    def cost(self, params: GradCamParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        return x_shape[0]

    def explain(self, ctx: ExplainContext, params: GradCamParams) -> Explanation:
        x = ctx.x
        gradient, _, (activation,) = run_gradients(
            ctx, x, np.arange(len(x)), wrt=params.layer, extra=(WRT_VALUE,)
        )
        if activation.ndim < 3:
            raise FailedPrecondition(
                f"grad_cam.layer: {params.layer!r} has shape {list(activation.shape)}; "
                "a feature map [batch, channels, spatial...] is needed",
                field="grad_cam.layer",
            )
        gradient = gradient.astype(np.float64).reshape(*activation.shape[:2], -1)
        values = activation.astype(np.float64).reshape(*activation.shape[:2], -1)
        alpha = gradient.mean(axis=2, keepdims=True)
        cam = (alpha * values).sum(axis=1).reshape(len(x), *activation.shape[2:])
        if params.relu:
            cam = np.maximum(cam, 0.0)
        image = ctx.model.config.image
        nhwc = image is not None and image.layout == "NHWC"
        height, width = x.shape[1:3] if nhwc else x.shape[2:4]
        if cam.ndim != 3:
            raise FailedPrecondition(
                f"grad_cam.layer: {params.layer!r} is not a 2-D feature map",
                field="grad_cam.layer",
            )
        resized = upsample(cam, height, width)
        channel_axis = 3 if nhwc else 1
        attribution = np.broadcast_to(np.expand_dims(resized, channel_axis), x.shape)
        return Explanation(attribution=np.ascontiguousarray(attribution, dtype=np.float32))
