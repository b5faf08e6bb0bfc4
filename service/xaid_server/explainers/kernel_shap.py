"""KernelSHAP (Lundberg 2017): Shapley values of segments from a constrained kernel regression.

A hidden segment takes its values from a reference: for images the segment's mean colour or the
baseline, for text the pad id, for tabular rows the baseline, the feature means or each of up to
100 background rows of the model config (then every coalition is evaluated against every row and
the scores averaged, so `base_value` is E[F(background)]). The empty and the full coalition are
not sampled but enforced: the regression is constrained so that the weights add up to
F(x) - base value exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import (
    NO_LIMITS,
    ExplainContext,
    Explanation,
    Limits,
    SegmentResult,
)
from xaid_server.explainers.sampling import constrained_shapley, shapley_masks, weighted_r2
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
    segment_count,
    spread,
    text_segments,
)
from xaid_server.runtime.model import LoadedModel

EXTRA_SAMPLES = 2048  # the default samples: 2M + 2048, capped so that the request fits the server


@dataclass(frozen=True)
class KernelShapParams:
    """The proto's `KernelShap` message; `resolve` fills every field that applies to the model."""

    n_samples: int | None = None
    segmentation: SegmentationParams | None = None
    fill: str = ""


class KernelShapExplainer(SurrogateExplainer[KernelShapParams]):
    """Shapley-kernel coalitions, masked on the device, and an efficiency-constrained fit."""

    name = "kernel_shap"
    params_type = KernelShapParams

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> KernelShapParams:
        return self.resolve_within(model, x_shape, given, NO_LIMITS)

    def resolve_within(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any], limits: Limits
    ) -> KernelShapParams:
        params = self.merge(model, given)
        kind, segmentation = resolve_kind(model, x_shape, params.segmentation, "kernel_shap")
        if kind == "image":
            fills = IMAGE_FILLS
        else:
            fills = TEXT_FILLS if kind == "text" else tabular_fills(model, x_shape[1])
        fill = choose_fill(params.fill, fills, "kernel_shap")
        # Each sample and the empty coalition meet every fill row of every explained row.
        per_sample = x_shape[0] * _fill_rows(model, fill)
        fitting = limits.available // per_sample - 1
        if params.n_samples is None:  # too few to fit: the core refuses the whole request
            count = segment_count(model, x_shape, segmentation)
            n_samples = max(1, min(2 * count + EXTRA_SAMPLES, fitting))
            return KernelShapParams(n_samples=n_samples, segmentation=segmentation, fill=fill)
        n_samples = params.n_samples
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise InvalidArgument(
                f"kernel_shap.n_samples: expected a positive integer, got {n_samples!r}",
                field="kernel_shap.n_samples",
            )
        if n_samples > fitting:
            raise InvalidArgument(
                f"kernel_shap.n_samples: {n_samples} samples need {(n_samples + 1) * per_sample} "
                f"model evaluations ({per_sample} per sample), over the server cap of "
                f"{limits.max_evaluations}; at most {max(0, fitting)} samples fit",
                field="kernel_shap.n_samples",
            )
        return KernelShapParams(n_samples=n_samples, segmentation=segmentation, fill=fill)

    def cost(self, params: KernelShapParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        """The samples and the empty coalition, each against every fill row."""
        assert params.n_samples is not None
        return x_shape[0] * (params.n_samples + 1) * _fill_rows(model, params.fill)

    def explain(self, ctx: ExplainContext, params: KernelShapParams) -> Explanation:
        assert params.n_samples is not None
        x = ctx.x
        kind = kind_of(ctx.model, x.shape)
        attribution = np.empty(x.shape, dtype=np.float32)
        results = []
        for row in range(len(x)):
            segments = _segments(ctx, row, kind, params)
            if segments.count == 0:
                raise InvalidArgument(
                    f"kernel_shap: row {row} has no tokens besides padding", field="inputs"
                )
            masks, weights = shapley_masks(ctx.rng, params.n_samples, segments.count)
            coalitions = np.vstack([np.zeros((1, segments.count), dtype=bool), masks])
            k = len(segments.fill)
            scores = masked_scores(
                ctx,
                row,
                segments,
                np.repeat(coalitions, k, axis=0),
                np.tile(np.arange(k), len(coalitions)),
            )
            mean = scores.reshape(len(coalitions), k).mean(axis=1)
            base, full = float(mean[0]), float(ctx.scores[row])
            phi = constrained_shapley(masks, mean[1:], weights, base, full)
            attribution[row] = spread(phi, segments, x.shape[1:])
            results.append(
                SegmentResult(
                    segment_map=segments.segment_map,
                    weights=phi,
                    names=segments.names,
                    intercept=base,
                    score=weighted_r2(masks.astype(np.float64), mean[1:], weights, phi, base),
                    base_value=base,
                )
            )
        return Explanation(attribution=attribution, segments=results)


def tabular_fills(model: LoadedModel, count: int) -> tuple[str, ...]:
    """Background rows when the config has them, else the baseline; feature means on request."""
    config = model.config
    fills = ["background"] if config.background else []
    fills.append("baseline")
    if config.features is not None and len(config.features.mean) == count:
        fills.append("mean")
    return tuple(fills)


def _fill_rows(model: LoadedModel, fill: str) -> int:
    """The reference rows a hidden segment takes its values from, one evaluation each."""
    return len(model.config.background) if fill == "background" else 1


def _segments(ctx: ExplainContext, row: int, kind: str, params: KernelShapParams) -> Segments:
    model, x = ctx.model, ctx.x[row : row + 1]
    if kind == "image":
        assert params.segmentation is not None
        return image_segments(model, x, params.segmentation, params.fill)
    if kind == "text":
        return text_segments(model, x)
    count = x.shape[1]
    config = model.config
    if params.fill == "background":
        fill = np.asarray(config.background, dtype=np.float64)
        if fill.shape[1] != count:
            raise FailedPrecondition(
                f"kernel_shap: the config's background rows have {fill.shape[1]} features, "
                f"the input {count}"
            )
    elif params.fill == "mean" and config.features is not None:
        fill = np.asarray(config.features.mean, dtype=np.float64)[None]
    else:
        fill = np.full((1, count), config.baseline)
    return Segments(
        segment_map=np.arange(count, dtype=np.int32),
        count=count,
        fill=fill.astype(x.dtype),
        names=feature_names(model, count),
        feed_shape=(count,),
    )
