"""The model-randomisation sanity check (Adebayo et al. 2018) on the shapes demo CNN.

An explanation that explains the model must change when the model does: re-drawing the
initializers of the top layers (the head and the last residual block, from the top down) must
leave saliency, integrated gradients and Grad-CAM maps rank-uncorrelated with the originals
(mean Spearman correlation over the example images below 0.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from scipy.stats import spearmanr  # type: ignore[import-untyped]

from tests.helpers import explain, load
from tests.unit.test_gradient_methods import DEMO, demo_model, shapes_inputs
from xaid_server.explainers.base import Explainer
from xaid_server.explainers.grad_cam import GradCamExplainer
from xaid_server.explainers.integrated_gradients import IntegratedGradientsExplainer
from xaid_server.explainers.saliency import SaliencyExplainer
from xaid_server.runtime.model import LoadedModel

PARAMETRIZED = ("Conv", "Gemm", "MatMul")
TOP_LAYERS = 4  # the head and the three convs of the last residual block
METHODS: tuple[Explainer[Any], ...] = (
    SaliencyExplainer(),
    IntegratedGradientsExplainer(),
    GradCamExplainer(),
)


def randomize_top_layers(model: onnx.ModelProto, layers: int, seed: int = 0) -> onnx.ModelProto:
    """A copy with the initializers of the last `layers` parametrized nodes re-drawn from a
    normal distribution with each tensor's own standard deviation (cascading randomisation)."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    initializers = {t.name: t for t in copy.graph.initializer}
    nodes = [n for n in copy.graph.node if n.op_type in PARAMETRIZED]
    for node in nodes[::-1][:layers]:
        for name in node.input[1:]:
            if name in initializers:
                value = numpy_helper.to_array(initializers[name])
                drawn = rng.normal(0, value.std() or 0.01, value.shape).astype(value.dtype)
                initializers[name].CopyFrom(numpy_helper.from_array(drawn, name))
    return copy


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho of two maps; 0 when either is constant (nothing of the original is left)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a.ravel(), b.ravel()).statistic)


def maps(model: LoadedModel, x: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """Per method, one 2-D map per image: |attribution| summed over channels, Grad-CAM as is."""
    result = {}
    for method in METHODS:
        method.prepare(model)
        explanation, _ = explain(method, model, x, classes=classes.tolist())
        attribution = explanation.attribution
        result[method.name] = (
            attribution[:, 0] if method.name == "grad_cam" else np.abs(attribution).sum(axis=1)
        )
    return result


def test_randomizing_the_top_layers_changes_every_gradient_map(tmp_path: Path) -> None:
    original = demo_model(tmp_path, "shapes")
    x = shapes_inputs(original)
    classes = original.session.run(None, {original.input.name: x})[0].argmax(axis=1)
    proto = onnx.load(DEMO / "models" / "shapes" / "1" / "model.onnx")
    randomized = load(
        tmp_path / "random", randomize_top_layers(proto, TOP_LAYERS), original.config, "shapes"
    )
    before, after = maps(original, x, classes), maps(randomized, x, classes)
    for name in before:
        rho = [rank_correlation(b, a) for b, a in zip(before[name], after[name], strict=True)]
        assert np.mean(rho) < 0.5, (name, rho)


def test_the_check_passes_an_unchanged_model(tmp_path: Path) -> None:
    """Control: with nothing re-drawn the maps correlate perfectly, so the bound can fail."""
    model = demo_model(tmp_path, "shapes")
    x = shapes_inputs(model)[:2]
    proto = onnx.load(DEMO / "models" / "shapes" / "1" / "model.onnx")
    same = load(tmp_path / "same", randomize_top_layers(proto, 0), model.config, "shapes")
    classes = np.array([0, 1])
    before, after = maps(model, x, classes), maps(same, x, classes)
    for name in before:
        for b, a in zip(before[name], after[name], strict=True):
            assert rank_correlation(b, a) == pytest.approx(1.0), name
