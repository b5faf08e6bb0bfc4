"""Occlusion (Zeiler & Fergus 2013), with the occluded copies built on the device.

Each batch row is explained with one run of the occlusion evaluation graph per chunk of window
positions: only the window starts cross the bus. The attribution of an element is the mean,
over the windows covering it, of F(x) - F(x with the window filled with the baseline), which is
Captum's `Occlusion` when the windows tile the input.

Window geometry: `window` and `stride` name the trailing dimensions of one example in the
tensor's own layout; leading per-example dimensions (channels for NCHW) are covered whole. For an
NHWC image model (config `image.layout`) a 2-value window means (H, W) and is completed to
(H, W, C) with the channels covered whole, so both layouts take the same request. Positions along
a dimension of size L are `range(0, L - w + 1, s)` as in Captum, plus one window flush with the
end when the last one stops short of it, so every element is covered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explainer, Explanation
from xaid_server.graphs.occlusion import (
    BASELINE,
    STARTS,
    TARGET,
    WINDOW,
    X,
    build_occlusion_graph,
)
from xaid_server.runtime.model import LoadedModel

log = logging.getLogger(__name__)

REFERENCE_SIZE = 224  # the image default: a 16-pixel window, stride 8, on 224 pixels
REFERENCE_WINDOW = 16


@dataclass(frozen=True)
class OcclusionParams:
    """The proto's `Occlusion` message; `resolve` fills every field."""

    window: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    baseline: float | None = None


class OcclusionExplainer(Explainer[OcclusionParams]):
    """One forward per window position, the copies built by the occlusion evaluation graph."""

    name = "occlusion"
    params_type = OcclusionParams

    def applicable(self, model: LoadedModel) -> str | None:
        if len(model.inputs) != 1:
            return (
                "occlusion supports single-input models; this model takes "
                f"{[spec.name for spec in model.inputs]}"
            )
        if model.input.rank < 2:
            return "occlusion needs an input with a batch and a per-example dimension"
        return None

    def prepare(self, model: LoadedModel) -> None:
        """Build the graph at load time; a model it cannot serve still loads for other methods."""
        if self.applicable(model) is not None:
            return
        try:
            _session(model, model.config.output)
        except FailedPrecondition as exc:  # cached by the model: occlusion requests get it
            log.warning("%s %s: no occlusion graph: %s", model.name, model.version, exc.message)

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> OcclusionParams:
        params = self.merge(model, given)
        window, stride = _geometry(model, x_shape[1:], params)
        _check(window, stride, x_shape)
        baseline = model.config.baseline if params.baseline is None else params.baseline
        if isinstance(baseline, bool) or not isinstance(baseline, int | float):
            raise InvalidArgument(
                f"occlusion.baseline: expected a number, got {baseline!r}",
                field="occlusion.baseline",
            )
        return OcclusionParams(window=window, stride=stride, baseline=float(baseline))

    def cost(self, params: OcclusionParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        positions = _positions(x_shape[1:], params)
        return x_shape[0] * math.prod(len(p) for p in positions)

    def explain(self, ctx: ExplainContext, params: OcclusionParams) -> Explanation:
        model = ctx.model
        session = _session(model, ctx.target.output)
        x = ctx.x
        windowed = _windowed(x.shape[1:], params.window)
        positions = _positions(x.shape[1:], params)
        starts = np.stack(np.meshgrid(*positions, indexing="ij"), axis=-1).reshape(
            -1, len(positions)
        )
        # coverage[d][j, i]: window position j along dim d covers index i
        coverage = [
            ((p[:, None] <= np.arange(size)) & (np.arange(size) < p[:, None] + w)).astype(
                np.float64
            )
            for p, w, size in zip(positions, params.window, windowed, strict=True)
        ]
        count = _outer([c.sum(axis=0) for c in coverage])
        fixed = {
            WINDOW: np.asarray(params.window, dtype=np.int64),
            BASELINE: np.asarray(params.baseline, dtype=x.dtype),
        }
        chunk = ctx.runner.balanced_chunk(len(starts), model.config.max_batch_size, x[0].nbytes)
        attribution = np.empty(x.shape, dtype=np.float32)
        for row in range(len(x)):
            fixed[X] = np.ascontiguousarray(x[row : row + 1])
            fixed[TARGET] = np.asarray(ctx.target.classes[row], dtype=np.int64)
            (occluded,) = ctx.runner.run(
                session,
                {STARTS: starts},
                ctx.job,
                fixed=fixed,
                max_batch=chunk,
                item_bytes=x[0].nbytes,
            )
            total = (ctx.scores[row] - occluded.astype(np.float64)).reshape(
                [len(p) for p in positions]
            )
            for c in coverage:  # separable windows: sum over covering windows, one dim at a time
                total = np.tensordot(total, c, axes=(0, 0))
            attribution[row] = total / count
        return Explanation(attribution=attribution)


def _session(model: LoadedModel, output: str) -> ort.InferenceSession:
    """The cached occlusion graph for `output` of this model."""

    def build(proto: onnx.ModelProto) -> onnx.ModelProto:
        return build_occlusion_graph(proto, model.input.name, output)

    return model.evaluation_graph(f"occlusion:{output}", build)


def _geometry(
    model: LoadedModel, dims: tuple[int, ...], params: OcclusionParams
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window and stride with defaults: images 16x16 / 8 scaled from 224 px, others 1 / 1.

    A stride left out is half the window for images (as in the default) and 1 otherwise
    (Captum's default); a single stride value applies to every windowed dimension.
    """
    image = model.config.kind == "image" and len(dims) == 3
    nhwc = image and model.config.image is not None and model.config.image.layout == "NHWC"
    window = _ints(params.window, "window")
    stride = _ints(params.stride, "stride")
    if not window and image:
        height, width = dims[:2] if nhwc else dims[1:]
        side = max(1, round(min(height, width) * REFERENCE_WINDOW / REFERENCE_SIZE))
        window = (side, side)
    elif not window:
        window = (1,)
    if not stride:
        stride = tuple(max(1, w // 2) if image else 1 for w in window)
    if len(stride) == 1:
        stride = stride * len(window)
    if len(stride) != len(window):
        raise InvalidArgument(
            f"occlusion.stride: {len(stride)} values for a {len(window)}-value window",
            field="occlusion.stride",
        )
    if nhwc and len(window) == 2:
        return (*window, dims[2]), (*stride, dims[2])
    return window, stride


def _check(window: tuple[int, ...], stride: tuple[int, ...], x_shape: tuple[int, ...]) -> None:
    """Refuse geometries that leave elements without a covering window.

    A stride longer than its window would step over elements, which then have no attribution.
    """
    if len(window) > len(x_shape) - 1:
        raise InvalidArgument(
            f"occlusion.window: {len(window)} values, but one example has {len(x_shape) - 1} "
            "dimensions",
            field="occlusion.window",
        )
    for name, values in (("window", window), ("stride", stride)):
        if min(values) < 1:
            raise InvalidArgument(
                f"occlusion.{name}: values must be positive, got {list(values)}",
                field=f"occlusion.{name}",
            )
    if any(s > w for w, s in zip(window, stride, strict=True)):
        raise InvalidArgument(
            f"occlusion.stride: {list(stride)} steps over elements of window {list(window)}; "
            "each stride must be at most the window",
            field="occlusion.stride",
        )
    first = len(x_shape) - len(window)
    for axis, (w, size) in enumerate(zip(window, x_shape[first:], strict=True), start=first):
        if w > size:
            raise InvalidArgument(
                f"occlusion.window: {w} is larger than input dim {axis} ({size})",
                field="occlusion.window",
            )


def _ints(value: Any, name: str) -> tuple[int, ...]:
    values = value if isinstance(value, Sequence) else (value,)
    if any(isinstance(v, bool) or not isinstance(v, int | np.integer) for v in values):
        raise InvalidArgument(
            f"occlusion.{name}: expected integers, got {value!r}", field=f"occlusion.{name}"
        )
    return tuple(int(v) for v in values)


def _windowed(dims: Sequence[int], window: Sequence[int]) -> Sequence[int]:
    """The sizes of the trailing dimensions the window names."""
    return dims[len(dims) - len(window) :]


def _positions(dims: Sequence[int], params: OcclusionParams) -> list[np.ndarray]:
    """Window starts along each windowed dimension, the last one flush with the end."""
    positions = []
    windowed = _windowed(dims, params.window)
    for size, w, s in zip(windowed, params.window, params.stride, strict=True):
        starts = np.arange(0, size - w + 1, s, dtype=np.int64)
        if starts[-1] + w < size:
            starts = np.append(starts, size - w)
        positions.append(starts)
    return positions


def _outer(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """The outer product of 1-D arrays, one axis per array."""
    result = vectors[0]
    for vector in vectors[1:]:
        result = np.multiply.outer(result, vector)
    return result
