"""The method registry: every explanation method registered once, by name."""

from __future__ import annotations

from typing import Any

from xaid_server.explainers.base import Explainer
from xaid_server.explainers.grad_cam import GradCamExplainer
from xaid_server.explainers.gradient_x_input import GradientXInputExplainer
from xaid_server.explainers.guided_backprop import GuidedBackpropExplainer
from xaid_server.explainers.integrated_gradients import IntegratedGradientsExplainer
from xaid_server.explainers.kernel_shap import KernelShapExplainer
from xaid_server.explainers.lime import LimeExplainer
from xaid_server.explainers.occlusion import OcclusionExplainer
from xaid_server.explainers.saliency import SaliencyExplainer
from xaid_server.explainers.smoothgrad import SmoothGradExplainer

EXPLAINERS: tuple[Explainer[Any], ...] = (
    OcclusionExplainer(),
    SaliencyExplainer(),
    GradientXInputExplainer(),
    IntegratedGradientsExplainer(),
    SmoothGradExplainer(),
    GuidedBackpropExplainer(),
    GradCamExplainer(),
    LimeExplainer(),
    KernelShapExplainer(),
)


def _index(explainers: tuple[Explainer[Any], ...]) -> dict[str, Explainer[Any]]:
    index: dict[str, Explainer[Any]] = {}
    for explainer in explainers:
        if explainer.name in index:
            raise RuntimeError(f"explanation method {explainer.name!r} registered twice")
        index[explainer.name] = explainer
    return index


REGISTRY: dict[str, Explainer[Any]] = _index(EXPLAINERS)
