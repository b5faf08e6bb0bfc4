"""Saliency: the gradient of the target score with respect to the input, one backward per row."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explanation
from xaid_server.explainers.gradients import GradientExplainer, run_gradients
from xaid_server.explainers.tokens import gradient_space
from xaid_server.runtime.model import LoadedModel


@dataclass(frozen=True)
class SaliencyParams:
    """The proto's `Saliency` message."""

    abs: bool = False


class SaliencyExplainer(GradientExplainer[SaliencyParams]):
    """dF/dx, optionally its absolute value (Captum's `Saliency` takes abs by default; we don't)."""

    name = "saliency"
    params_type = SaliencyParams

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> SaliencyParams:
        params = self.merge(model, given)
        if not isinstance(params.abs, bool | np.bool_):
            raise InvalidArgument(
                f"saliency.abs: expected true or false, got {params.abs!r}", field="saliency.abs"
            )
        return SaliencyParams(abs=bool(params.abs))

    def cost(self, params: SaliencyParams, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        return x_shape[0]

    def explain(self, ctx: ExplainContext, params: SaliencyParams) -> Explanation:
        space = gradient_space(ctx)
        gradient, _, _ = run_gradients(ctx, space.x, np.arange(len(ctx.x)))
        if params.abs:  # for tokens: the L1 norm over the embedding dimension
            gradient = np.abs(gradient)
        return space.explanation(ctx, gradient)
