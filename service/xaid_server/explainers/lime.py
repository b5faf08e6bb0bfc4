"""LIME (Ribeiro 2016): a weighted ridge regression on random coalitions of segments.

As the `lime` package does it: images hide segments (mean colour by default) and weigh samples
by the cosine distance to the full coalition, text removes tokens (100 x cosine distance), and
tabular rows are discretised at the training quartiles from the model config: a sample draws a
quartile bin per feature, a feature is "on" when it stays in the explained row's bin, and its
name is the bin's condition ("worst radius > 18.77"); samples are weighed by the Euclidean
distance of their on/off pattern. Where `lime` draws values within a bin from a truncated normal
with the bin's training mean and spread, xaid draws them uniformly between the bin's edges (the
quartiles, and the training min and max), since those are what the config holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explanation, SegmentResult
from xaid_server.explainers.sampling import (
    cosine_distance_to_ones,
    lime_kernel,
    lime_masks,
    weighted_ridge,
)
from xaid_server.explainers.segmentation import SegmentationParams
from xaid_server.explainers.surrogate import (
    IMAGE_FILLS,
    TEXT_FILLS,
    Segments,
    SurrogateExplainer,
    choose_fill,
    feature_names,
    image_segments,
    kind_of,
    masked_scores,
    resolve_kind,
    spread,
    text_segments,
)
from xaid_server.runtime.model import LoadedModel

IMAGE_SAMPLES = 1000
OTHER_SAMPLES = 5000
IMAGE_WIDTH = 0.25
TEXT_WIDTH = 25.0
TEXT_DISTANCE_SCALE = 100.0  # `lime` measures text distances as 100 x cosine distance
TABULAR_WIDTH_FACTOR = 0.75  # times sqrt(features)
RIDGE_ALPHA = 1.0


@dataclass(frozen=True)
class LimeParams:
    """The proto's `Lime` message; `resolve` fills every field that applies to the model."""

    n_samples: int | None = None
    segmentation: SegmentationParams | None = None
    kernel_width: float | None = None
    ridge_alpha: float | None = None
    fill: str = ""


class LimeExplainer(SurrogateExplainer[LimeParams]):
    """Random coalitions, masked on the device, and LIME's kernel-weighted ridge surrogate."""

    name = "lime"
    params_type = LimeParams

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> LimeParams:
        params = self.merge(model, given)
        kind, segmentation = resolve_kind(model, x_shape, params.segmentation, "lime")
        if kind == "image":
            fills, samples, width = IMAGE_FILLS, IMAGE_SAMPLES, IMAGE_WIDTH
        else:
            samples = OTHER_SAMPLES
            if kind == "text":
                fills, width = TEXT_FILLS, TEXT_WIDTH
            else:
                fills = tabular_fills(model, x_shape[1])
                width = TABULAR_WIDTH_FACTOR * math.sqrt(x_shape[1])
        n_samples = samples if params.n_samples is None else params.n_samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 2:
            raise InvalidArgument(
                f"lime.n_samples: expected an integer of at least 2, got {n_samples!r}",
                field="lime.n_samples",
            )
        kernel_width = _number(params.kernel_width, width, "kernel_width")
        ridge_alpha = _number(params.ridge_alpha, RIDGE_ALPHA, "ridge_alpha")
        if kernel_width <= 0 or ridge_alpha < 0:
            bad = "kernel_width" if kernel_width <= 0 else "ridge_alpha"
            raise InvalidArgument(
                f"lime.{bad}: must be {'positive' if bad == 'kernel_width' else 'non-negative'}",
                field=f"lime.{bad}",
            )
        return LimeParams(
            n_samples=n_samples,
            segmentation=segmentation,
            kernel_width=kernel_width,
            ridge_alpha=ridge_alpha,
            fill=choose_fill(params.fill, fills, "lime"),
        )

    def cost(self, params: LimeParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        assert params.n_samples is not None
        return x_shape[0] * params.n_samples

    def explain(self, ctx: ExplainContext, params: LimeParams) -> Explanation:
        assert params.n_samples is not None
        assert params.kernel_width is not None
        assert params.ridge_alpha is not None
        x = ctx.x
        kind = kind_of(ctx.model, x.shape)
        attribution = np.empty(x.shape, dtype=np.float32)
        results = []
        for row in range(len(x)):
            segments, masks, fill_index, distances = _sample(ctx, row, kind, params)
            scores = masked_scores(ctx, row, segments, masks, fill_index)
            weights = lime_kernel(distances, params.kernel_width)
            fit = weighted_ridge(masks, scores, weights, params.ridge_alpha)
            attribution[row] = spread(fit.coefficients, segments, x.shape[1:])
            results.append(
                SegmentResult(
                    segment_map=segments.segment_map,
                    weights=fit.coefficients,
                    names=segments.names,
                    intercept=fit.intercept,
                    score=fit.score,
                )
            )
        return Explanation(attribution=attribution, segments=results)


def tabular_fills(model: LoadedModel, count: int) -> tuple[str, ...]:
    """Quartile discretisation when the config has the quartiles, else feature means or baseline."""
    features = model.config.features
    fills: list[str] = []
    if features is not None and len(features.quartiles) == count:
        fills.append("quartiles")
    if features is not None and len(features.mean) == count:
        fills.append("mean")
    return (*fills, "baseline")


def _sample(
    ctx: ExplainContext, row: int, kind: str, params: LimeParams
) -> tuple[Segments, np.ndarray, np.ndarray, np.ndarray]:
    """The row's segments, its coalitions, the fill row of each and their distances to x."""
    assert params.n_samples is not None
    n = params.n_samples
    model, x = ctx.model, ctx.x[row : row + 1]
    if kind == "image":
        assert params.segmentation is not None
        segments = image_segments(model, x, params.segmentation, params.fill)
        masks = lime_masks(ctx.rng, n, segments.count)
        return segments, masks, np.zeros(n), cosine_distance_to_ones(masks)
    if kind == "text":
        segments = text_segments(model, x)
        if segments.count == 0:
            raise InvalidArgument(f"lime: row {row} has no tokens besides padding", field="inputs")
        masks = lime_masks(ctx.rng, n, segments.count)
        return (
            segments,
            masks,
            np.zeros(n),
            TEXT_DISTANCE_SCALE * cosine_distance_to_ones(masks),
        )
    count = x.shape[1]
    names = feature_names(model, count)
    if params.fill == "quartiles":
        masks, values, names = _quartile_samples(ctx.rng, x[0], model, names, n)
        fill_index: np.ndarray = np.arange(n)
    else:
        masks = lime_masks(ctx.rng, n, count)
        features = model.config.features
        value = (
            np.asarray(features.mean)
            if params.fill == "mean" and features is not None
            else np.full(count, model.config.baseline)
        )
        values, fill_index = value[None], np.zeros(n)
    segments = Segments(
        segment_map=np.arange(count, dtype=np.int32),
        count=count,
        fill=values.astype(x.dtype),
        names=names,
        feed_shape=(count,),
    )
    distances = np.sqrt(count - masks.sum(axis=1).astype(np.float64))
    return segments, masks, fill_index, distances


def _quartile_samples(
    rng: np.random.Generator, x: np.ndarray, model: LoadedModel, names: list[str], n: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """LIME's quartile sampling: a bin per feature and sample, a value in it, x's bin conditions.

    Returns the coalitions (feature in x's bin), the sampled rows [n, F] and a readable
    condition per feature. The first sample is x itself.
    """
    features = model.config.features
    assert features is not None
    quartiles = np.asarray(features.quartiles, dtype=np.float64)  # [F, 3]
    spread_ = quartiles[:, 2] - quartiles[:, 0]
    low = np.asarray(features.min) if len(features.min) == len(x) else quartiles[:, 0] - spread_
    high = np.asarray(features.max) if len(features.max) == len(x) else quartiles[:, 2] + spread_
    edges = np.column_stack(
        [np.minimum(low, quartiles[:, 0]), quartiles, np.maximum(high, quartiles[:, 2])]
    )
    own = np.array([np.searchsorted(q, v, side="left") for q, v in zip(quartiles, x, strict=True)])
    bins = rng.integers(0, 4, size=(n, len(x)))
    bins[0] = own
    columns = np.arange(len(x))
    values = rng.uniform(edges[columns, bins], edges[columns, bins + 1])
    conditions = [
        _condition(name, q, int(b)) for name, q, b in zip(names, quartiles, own, strict=True)
    ]
    return bins == own, values, conditions


def _condition(name: str, quartiles: np.ndarray, bin_: int) -> str:
    q = [f"{v:.4g}" for v in quartiles]
    if bin_ == 0:
        return f"{name} <= {q[0]}"
    if bin_ == 3:
        return f"{name} > {q[2]}"
    return f"{q[bin_ - 1]} < {name} <= {q[bin_]}"


def _number(value: Any, default: float, name: str) -> float:
    if value is None:
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(
            f"lime.{name}: expected a number, got {value!r}", field=f"lime.{name}"
        )
    return float(value)
