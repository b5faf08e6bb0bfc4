"""Guided backpropagation (Springenberg et al. 2014) and deconvnet, via the graph's ReLU rule.

Guided: each ReLU passes gradient only where its forward input and the incoming gradient are
both positive; deconvnet: only where the incoming gradient is positive. Each rule is its own
cached gradient graph; a model is served when both can be built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaid_server.errors import FailedPrecondition
from xaid_server.explainers.base import ExplainContext, Explanation
from xaid_server.explainers.gradients import (
    GradientExplainer,
    choice,
    gradient_session,
    log,
    output_name,
    run_gradients,
)
from xaid_server.explainers.tokens import gradient_space
from xaid_server.runtime.model import LoadedModel

RULES = ("guided", "deconvnet")


@dataclass(frozen=True)
class GuidedBackpropParams:
    """The proto's `GuidedBackprop` message; `resolve` fills the rule."""

    rule: str = ""


class GuidedBackpropExplainer(GradientExplainer[GuidedBackpropParams]):
    """One modified backward per row (Captum's `GuidedBackprop` / `Deconvolution`)."""

    name = "guided_backprop"
    params_type = GuidedBackpropParams

    def prepare(self, model: LoadedModel) -> None:
        for rule in RULES:
            try:
                gradient_session(model, output_name(model), relu=rule)
            except FailedPrecondition as exc:
                log.warning("%s %s: no %s graph: %s", model.name, model.version, rule, exc.message)

    def applicable(self, model: LoadedModel) -> str | None:
        for rule in RULES:
            try:
                gradient_session(model, output_name(model), relu=rule)
            except FailedPrecondition as exc:
                return f"the {rule} gradient graph cannot be built: {exc.message}"
        return None

    def resolve(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]
    ) -> GuidedBackpropParams:
        params = self.merge(model, given)
        return GuidedBackpropParams(rule=choice(params.rule, "guided_backprop.rule", RULES))

    def cost(
        self, params: GuidedBackpropParams, x_shape: tuple[int, ...], model: LoadedModel
    ) -> int:
        return x_shape[0]

    def explain(self, ctx: ExplainContext, params: GuidedBackpropParams) -> Explanation:
        space = gradient_space(ctx)
        gradient, _, _ = run_gradients(ctx, space.x, np.arange(len(ctx.x)), relu=params.rule)
        return space.explanation(ctx, gradient)
