"""Gradient times input: x * dF/dx, the first-order Taylor contribution of each element."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.explainers.base import ExplainContext, Explanation
from xaid_server.explainers.gradients import GradientExplainer, run_gradients
from xaid_server.explainers.tokens import gradient_space
from xaid_server.runtime.model import LoadedModel


@dataclass(frozen=True)
class GradientXInputParams:
    """The proto's `GradientXInput` message: no parameters."""


class GradientXInputExplainer(GradientExplainer[GradientXInputParams]):
    """Captum's `InputXGradient`: one backward per row."""

    name = "gradient_x_input"
    params_type = GradientXInputParams

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> GradientXInputParams:
        return self.merge(model, given)

    def cost(
        self, params: GradientXInputParams, x_shape: tuple[int, ...], model: LoadedModel
    ) -> int:
        return x_shape[0]

    def explain(self, ctx: ExplainContext, params: GradientXInputParams) -> Explanation:
        space = gradient_space(ctx)
        gradient, _, _ = run_gradients(ctx, space.x, np.arange(len(ctx.x)))
        return space.explanation(ctx, space.x.astype(np.float64) * gradient)
