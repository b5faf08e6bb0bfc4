"""SmoothGrad (Smilkov et al. 2017): the gradient averaged over noisy copies of the input.

The noise standard deviation is `noise_fraction` times the model's input range (config
`input_range`), else times each row's own max - min, so one fraction suits any input scale. The
noise comes from the request's generator: the same seed gives the same explanation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explanation
from xaid_server.explainers.gradients import (
    GradientExplainer,
    choice,
    count,
    number,
    run_gradients,
)
from xaid_server.explainers.tokens import gradient_space
from xaid_server.runtime.model import LoadedModel

DEFAULT_SAMPLES = 25
DEFAULT_NOISE = 0.15
VARIANTS = ("mean", "squared", "vargrad")


@dataclass(frozen=True)
class SmoothGradParams:
    """The proto's `SmoothGrad` message; `resolve` fills every field."""

    n_samples: int | None = None
    noise_fraction: float | None = None
    variant: str = ""


def noise_scale(
    x: np.ndarray, input_range: tuple[float, float] | None, fraction: float
) -> np.ndarray:
    """The noise standard deviation per row: a fraction of the input range, else of the row's."""
    if input_range is not None:
        return np.full(len(x), fraction * (input_range[1] - input_range[0]))
    flat = x.reshape(len(x), -1).astype(np.float64)
    scale: np.ndarray = fraction * (flat.max(axis=1) - flat.min(axis=1))
    return scale


def noisy_copies(ctx: ExplainContext, n_samples: int, fraction: float) -> np.ndarray:
    """[B * n_samples, ...]: row-major noisy copies of each row, drawn from ctx.rng (of the
    token embeddings for token-id inputs)."""
    space = gradient_space(ctx)
    x = space.x
    # the config's range is that of the input; token embeddings use each row's own range
    input_range = None if space.tokens else ctx.model.config.input_range
    sigma = noise_scale(x, input_range, fraction).reshape(-1, 1, *(1,) * (x.ndim - 1))
    noise = ctx.rng.standard_normal((len(x), n_samples, *x.shape[1:])) * sigma
    points: np.ndarray = (x[:, None].astype(np.float64) + noise).astype(x.dtype)
    return points.reshape(-1, *x.shape[1:])


class SmoothGradExplainer(GradientExplainer[SmoothGradParams]):
    """n_samples gradient evaluations per row."""

    name = "smoothgrad"
    params_type = SmoothGradParams

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> SmoothGradParams:
        params = self.merge(model, given)
        fraction = DEFAULT_NOISE if params.noise_fraction is None else params.noise_fraction
        fraction = number(fraction, "smoothgrad.noise_fraction")
        if fraction < 0:
            raise InvalidArgument(
                f"smoothgrad.noise_fraction: must not be negative, got {fraction}",
                field="smoothgrad.noise_fraction",
            )
        return SmoothGradParams(
            n_samples=count(params.n_samples, "smoothgrad.n_samples", DEFAULT_SAMPLES),
            noise_fraction=fraction,
            variant=choice(params.variant, "smoothgrad.variant", VARIANTS),
        )

    def cost(self, params: SmoothGradParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        assert params.n_samples is not None
        return x_shape[0] * params.n_samples

    def explain(self, ctx: ExplainContext, params: SmoothGradParams) -> Explanation:
        if params.n_samples is None or params.noise_fraction is None:
            raise InvalidArgument("smoothgrad: unresolved parameters")
        space = gradient_space(ctx)
        x = space.x
        points = noisy_copies(ctx, params.n_samples, params.noise_fraction)
        rows = np.repeat(np.arange(len(x)), params.n_samples)
        gradient, _, _ = run_gradients(ctx, points, rows)
        grads = gradient.reshape(len(x), params.n_samples, *x.shape[1:]).astype(np.float64)
        if params.variant == "mean":
            attribution = grads.mean(axis=1)
        elif params.variant == "squared":
            attribution = (grads**2).mean(axis=1)
        else:
            attribution = (grads**2).mean(axis=1) - grads.mean(axis=1) ** 2
        return space.explanation(ctx, attribution)
