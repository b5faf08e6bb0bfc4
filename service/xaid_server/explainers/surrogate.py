"""The surrogate family (LIME, KernelSHAP): segments, fills, and masked scores from the device.

An example is cut into M interpretable segments: image regions, tabular features or tokens.
A coalition switches segments on (input values kept) or off (values taken from a fill row), and
the masking evaluation graph turns a chunk of coalitions into target scores without the masked
copies ever crossing the bus. Subclasses sample the coalitions and fit their surrogate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explainer
from xaid_server.explainers.segmentation import (
    SegmentationParams,
    expected_segments,
    resolve_segmentation,
    segment,
)
from xaid_server.graphs.compose import TARGET
from xaid_server.graphs.masking import (
    FILL,
    FILL_INDEX,
    MASKS,
    SEGMENTS,
    X,
    build_masking_graph,
)
from xaid_server.preprocess import tensor_to_image
from xaid_server.runtime.model import LoadedModel
from xaid_server.tokens import names as token_names

log = logging.getLogger(__name__)

P = TypeVar("P")

#: Fills every kind of model accepts, the first one being the default.
IMAGE_FILLS: tuple[str, ...] = ("mean", "baseline")
TEXT_FILLS: tuple[str, ...] = ("pad",)


@dataclass
class Segments:
    """One example cut into M segments, and what the elements of a hidden segment become.

    `segment_map` is what the response reports ([H, W], [features] or [tokens]); -1 marks
    elements no coalition hides (padding). `fill` holds K rows of the input's shape and type.
    """

    segment_map: np.ndarray  # int32
    count: int
    fill: np.ndarray  # [K, ...]
    names: list[str] = field(default_factory=list)
    feed_shape: tuple[int, ...] = ()  # the segment map as the graph reads it: per example dims


def kind_of(model: LoadedModel, x_shape: tuple[int, ...]) -> str:
    """image, tabular or text: how this input is cut into segments."""
    if model.input.datatype in ("INT64", "INT32"):
        return "text"
    if len(x_shape) == 4 and model.config.image is not None:
        return "image"
    if len(x_shape) == 2:
        return "tabular"
    raise FailedPrecondition(
        f"no segmentation for input shape {list(x_shape)}: surrogate methods take images "
        "(NCHW/NHWC with preprocessing in the config), feature rows [N, F] or token ids [N, L]"
    )


def choose_fill(given: str, allowed: tuple[str, ...], where: str) -> str:
    fill = given or allowed[0]
    if fill not in allowed:
        raise InvalidArgument(
            f"{where}.fill: {fill!r} is not one of {list(allowed)} for this model",
            field=f"{where}.fill",
        )
    return fill


def resolve_kind(
    model: LoadedModel, x_shape: tuple[int, ...], given: Any, where: str
) -> tuple[str, SegmentationParams | None]:
    """The input's kind and, for images, the segmentation asked for with its defaults filled;
    features and tokens are the segments of the other kinds, which refuse a segmentation."""
    kind = kind_of(model, x_shape)
    if kind == "image":
        size = image_size(model, x_shape)
        return kind, resolve_segmentation(given, size, f"{where}.segmentation")
    if given:
        raise InvalidArgument(
            f"{where}.segmentation: only image models are segmented; features and tokens are "
            "the segments of tabular and text models",
            field=f"{where}.segmentation",
        )
    return kind, None


def image_size(model: LoadedModel, x_shape: tuple[int, ...]) -> tuple[int, int]:
    nhwc = model.config.image is not None and model.config.image.layout == "NHWC"
    return (x_shape[1], x_shape[2]) if nhwc else (x_shape[2], x_shape[3])


def segment_count(
    model: LoadedModel, x_shape: tuple[int, ...], seg: SegmentationParams | None
) -> int:
    """M for cost estimates: the expected image segments, or the features or tokens."""
    if seg is not None:
        return expected_segments(seg, image_size(model, x_shape))
    return int(np.prod(x_shape[1:]))


def image_segments(
    model: LoadedModel, x: np.ndarray, seg: SegmentationParams, fill: str
) -> Segments:
    """One image [1, ...] segmented in display space; hidden segments get their mean or baseline."""
    image = model.config.image
    assert image is not None
    nhwc = image.layout == "NHWC"
    picture = np.asarray(tensor_to_image(x[0], image, image.layout), dtype=np.float64) / 255.0
    if image.channels == 1:
        picture = picture[:, :, :1]
    segment_map = segment(picture, seg)
    count = int(segment_map.max()) + 1
    feed_shape = (*segment_map.shape, 1) if nhwc else (1, *segment_map.shape)
    if fill == "baseline":
        filled = np.full_like(x, model.config.baseline)
    else:
        channels = x[0] if nhwc else np.moveaxis(x[0], 0, -1)  # [H, W, C]
        flat = segment_map.ravel()
        sizes = np.bincount(flat, minlength=count).astype(np.float64)
        means = np.stack(
            [
                np.bincount(flat, channels[..., c].ravel().astype(np.float64), count) / sizes
                for c in range(channels.shape[-1])
            ],
            axis=-1,
        )  # [M, C]
        per_pixel = means[segment_map]  # [H, W, C]
        filled = (per_pixel if nhwc else np.moveaxis(per_pixel, -1, 0))[None].astype(x.dtype)
    names = [f"segment {i}" for i in range(count)]
    return Segments(segment_map, count, filled, names, feed_shape)


def text_segments(model: LoadedModel, x: np.ndarray) -> Segments:
    """Every token but padding is a segment; a hidden token becomes the pad id."""
    text = model.config.text
    pad = text.pad_id if text is not None else 0
    ids = x[0]
    if ids.ndim != 1:
        raise FailedPrecondition(f"text models take token ids [N, L], not {list(x.shape)}")
    kept = ids != pad
    segment_map = np.where(kept, np.cumsum(kept) - 1, -1).astype(np.int32)
    tokens = token_names(x, text)[0]
    names = [token for token, keep in zip(tokens, kept, strict=True) if keep]
    return Segments(segment_map, int(kept.sum()), np.full_like(x, pad), names, ids.shape)


def feature_names(model: LoadedModel, count: int) -> list[str]:
    features = model.config.features
    if features is not None and len(features.names) == count:
        return list(features.names)
    return [f"feature {i}" for i in range(count)]


def masked_scores(
    ctx: ExplainContext, row: int, segments: Segments, masks: np.ndarray, fill_index: np.ndarray
) -> np.ndarray:
    """F of row `row` with each coalition's hidden segments filled: float64 [N].

    Elements outside every segment (-1) read a last segment that is always on.
    """
    model = ctx.model
    session = masking_session(model, ctx.target.output)
    x = ctx.x[row : row + 1]
    ids = np.where(segments.segment_map < 0, segments.count, segments.segment_map)
    on = np.ones((len(masks), 1), dtype=bool)
    fixed = {
        X: np.ascontiguousarray(x),
        FILL: np.ascontiguousarray(segments.fill, dtype=x.dtype),
        SEGMENTS: ids.reshape(segments.feed_shape).astype(np.int64),
        TARGET: np.asarray(ctx.target.classes[row], dtype=np.int64),
    }
    chunk = ctx.runner.balanced_chunk(len(masks), model.config.max_batch_size, x.nbytes)
    (scores,) = ctx.runner.run(
        session,
        {MASKS: np.concatenate([masks, on], axis=1), FILL_INDEX: fill_index.astype(np.int64)},
        ctx.job,
        fixed=fixed,
        max_batch=chunk,
        item_bytes=x.nbytes,
    )
    return scores.astype(np.float64)


def spread(weights: np.ndarray, segments: Segments, example_shape: tuple[int, ...]) -> np.ndarray:
    """One example's attribution: every element gets its segment's weight (0 outside them)."""
    per_segment = np.append(weights, 0.0)
    ids = np.where(segments.segment_map < 0, segments.count, segments.segment_map)
    values = per_segment[ids.reshape(segments.feed_shape)]
    return np.broadcast_to(values, example_shape).astype(np.float32)


def masking_session(model: LoadedModel, output: str) -> ort.InferenceSession:
    """The cached masking graph for `output` of this model."""

    def build(proto: onnx.ModelProto) -> onnx.ModelProto:
        return build_masking_graph(proto, model.input.name, output)

    return model.evaluation_graph(f"masking:{output}", build)


class SurrogateExplainer(Explainer[P]):
    """Shared by LIME and KernelSHAP: which models they take, and the graph built at load."""

    signed: ClassVar[bool] = True

    def applicable(self, model: LoadedModel) -> str | None:
        if len(model.inputs) != 1:
            return (
                f"{self.name} supports single-input models; this model takes "
                f"{[spec.name for spec in model.inputs]}"
            )
        if model.input.rank < 2:
            return f"{self.name} needs an input with a batch and a per-example dimension"
        return None

    def prepare(self, model: LoadedModel) -> None:
        """Build the graph at load time; a model it cannot serve still loads for other methods."""
        if self.applicable(model) is not None:
            return
        try:
            masking_session(model, model.config.output)
        except FailedPrecondition as exc:  # cached by the model: requests get it
            log.warning("%s %s: no masking graph: %s", model.name, model.version, exc.message)
