"""KernelSHAP on known-answer models: efficiency, exact Shapley values, background rows."""

from __future__ import annotations

from itertools import combinations
from math import factorial
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.helpers import explain, load, make_model
from tests.unit.test_lime import GRID, IMAGE, ON, image, image_model, text_model
from xaid_server.errors import InvalidArgument
from xaid_server.explainers.base import Limits
from xaid_server.explainers.kernel_shap import KernelShapExplainer
from xaid_server.model_config import ModelConfig
from xaid_server.runtime.model import LoadedModel

FEATURES = 4
BACKGROUND = ((0.0, 0.5, -1.0, 2.0), (1.0, -0.5, 0.0, 0.0), (0.2, 0.2, 0.2, 0.2))


def tabular_model(tmp_path: Path, background: tuple[tuple[float, ...], ...] = ()) -> LoadedModel:
    """Interactions on purpose: logits = [tanh(x W) * x0 + x1 x2, 0]."""
    w = np.asarray([[0.5], [-1.0], [0.8], [0.3]], np.float32)
    proto = make_model(
        [
            helper.make_node("MatMul", ["x", "w"], ["m"]),
            helper.make_node("Tanh", ["m"], ["t"]),
            helper.make_node("Slice", ["x", "s0", "e0", "ax"], ["x0"]),
            helper.make_node("Slice", ["x", "s1", "e1", "ax"], ["x1"]),
            helper.make_node("Slice", ["x", "s2", "e2", "ax"], ["x2"]),
            helper.make_node("Mul", ["t", "x0"], ["a"]),
            helper.make_node("Mul", ["x1", "x2"], ["b"]),
            helper.make_node("Add", ["a", "b"], ["score"]),
            helper.make_node("Mul", ["score", "zero"], ["other"]),
            helper.make_node("Concat", ["score", "other"], ["logits"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])],
        {
            "w": w,
            "zero": np.asarray(0.0, np.float32),
            "ax": np.asarray([1], np.int64),
            **{f"s{i}": np.asarray([i], np.int64) for i in range(3)},
            **{f"e{i}": np.asarray([i + 1], np.int64) for i in range(3)},
        },
    )
    return load(tmp_path, proto, ModelConfig(kind="tabular", background=background))


def brute_force_shapley(model: LoadedModel, x: np.ndarray, references: np.ndarray) -> np.ndarray:
    """Shapley values of v(S) = mean over the references of F(x on S, reference elsewhere)."""

    def value(members: tuple[int, ...]) -> float:
        rows = references.copy()
        rows[:, list(members)] = x[list(members)]
        return float(model.session.run(None, {"x": rows.astype(np.float32)})[0][:, 0].mean())

    m = len(x)
    phi = np.zeros(m)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for size in range(m):
            for subset in combinations(others, size):
                weight = factorial(size) * factorial(m - size - 1) / factorial(m)
                phi[i] += weight * (value((*subset, i)) - value(subset))
    return phi


@pytest.mark.parametrize("background", [(), BACKGROUND])
def test_enumerated_coalitions_give_the_exact_shapley_values(
    tmp_path: Path, background: tuple[tuple[float, ...], ...]
) -> None:
    model = tabular_model(tmp_path, background)
    x = np.asarray([[1.5, -0.7, 0.9, 0.4]], np.float32)
    params = KernelShapExplainer().resolve(model, x.shape, {})
    assert params.fill == ("background" if background else "baseline")
    assert params.n_samples == 2 * FEATURES + 2048
    rows = len(background) or 1
    assert KernelShapExplainer().cost(params, x.shape, model) == (params.n_samples + 1) * rows
    result, ctx = explain(KernelShapExplainer(), model, x, classes=[0])
    (segments,) = result.segments
    references = np.asarray(background or [(0.0,) * FEATURES], np.float64)
    np.testing.assert_allclose(
        segments.weights, brute_force_shapley(model, x[0], references), rtol=1e-5, atol=1e-6
    )
    expected_base = model.session.run(None, {"x": references.astype(np.float32)})[0][:, 0].mean()
    assert segments.base_value == pytest.approx(float(expected_base), rel=1e-6)
    assert segments.weights.sum() == pytest.approx(ctx.scores[0] - segments.base_value, rel=1e-6)
    assert segments.names == [f"feature {i}" for i in range(FEATURES)]


@pytest.mark.parametrize(("background", "reserved"), [(BACKGROUND, 2), ((), 44)])
def test_default_samples_fit_the_server_limit(
    tmp_path: Path, background: tuple[tuple[float, ...], ...], reserved: int
) -> None:
    """Two rows against every fill row: 2M + 2048 samples shrink to what the cap leaves."""
    model = tabular_model(tmp_path, background)
    shape = (2, FEATURES)
    per_sample = 2 * (len(background) or 1)
    for cap in (1_000, 2_000, 10**6):
        limits = Limits(cap, reserved=reserved)
        fitting = (cap - reserved) // per_sample - 1
        params = KernelShapExplainer().resolve_within(model, shape, {}, limits)
        assert params.n_samples == min(2 * FEATURES + 2048, fitting)
        assert KernelShapExplainer().cost(params, shape, model) <= cap - reserved
        given = {"n_samples": fitting}
        assert (
            KernelShapExplainer().resolve_within(model, shape, given, limits).n_samples == fitting
        )
        with pytest.raises(InvalidArgument) as info:
            KernelShapExplainer().resolve_within(model, shape, {"n_samples": fitting + 1}, limits)
        assert info.value.field == "kernel_shap.n_samples"
        assert f"server cap of {cap}; at most {fitting} samples fit" in info.value.message


def test_known_answer_image_model(tmp_path: Path) -> None:
    """Additive in the grid segments: the Shapley value of a segment is its own contribution."""
    model = load(tmp_path, image_model(False), IMAGE)
    x = image()
    result, _ = explain(KernelShapExplainer(), model, x, {"segmentation": GRID, "fill": "baseline"})
    (segments,) = result.segments
    assert segments.weights.shape == (16,)  # 2^16 - 2 coalitions: sampled, not enumerated
    assert sorted(np.argsort(-segments.weights)[: len(ON)].tolist()) == list(ON)
    ids = segments.segment_map
    own = np.asarray([x[0][:, ids == s].sum() if s in ON else 0.0 for s in range(16)])
    np.testing.assert_allclose(segments.weights, own, rtol=1e-5, atol=1e-4)
    assert segments.base_value == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("fill", ["mean", "baseline"])
def test_efficiency_holds_exactly_on_a_nonlinear_model(tmp_path: Path, fill: str) -> None:
    model = load(tmp_path, image_model(True), IMAGE)
    x = np.concatenate([image(5), image(6)])
    result, ctx = explain(
        KernelShapExplainer(), model, x, {"segmentation": GRID, "fill": fill, "n_samples": 64}
    )
    for row, segments in enumerate(result.segments):
        delta = ctx.scores[row] - segments.base_value
        assert abs(segments.weights.sum() - delta) <= 1e-6 * abs(delta)
    assert result.attribution.shape == x.shape


def test_text_tokens(tmp_path: Path) -> None:
    model = text_model(tmp_path)
    ids = np.asarray([[2, 3, 4, 5, 0, 0]], np.int64)
    result, _ = explain(KernelShapExplainer(), model, ids, classes=[0])
    (segments,) = result.segments
    # additive in the tokens: each token's Shapley value is its own score
    np.testing.assert_allclose(segments.weights, [0.1, 5.0, 0.2, -0.3], atol=1e-6)
    assert segments.names == ["a", "good", "film", "bad"]
    assert segments.base_value == pytest.approx(0.0, abs=1e-6)
