"""Deletion and insertion AUCs on models whose curves can be computed by hand."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import explain_context, load, make_model
from xaid_server.core.faithfulness import cost, evaluate, steps_of, unavailable
from xaid_server.errors import InvalidArgument
from xaid_server.model_config import ImageConfig, ModelConfig
from xaid_server.runtime.model import LoadedModel


def sum_model(shape: list[int]) -> onnx.ModelProto:
    """logits = [sum(x), 0] per row: the target probability is sigmoid(sum(x))."""
    return make_model(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
            helper.make_node("Unsqueeze", ["s", "one"], ["col"]),
            helper.make_node("Mul", ["col", "zero"], ["z"]),
            helper.make_node("Concat", ["col", "z"], ["y"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        {
            "axes": np.arange(1, len(shape) + 1, dtype=np.int64),
            "one": np.array([1], dtype=np.int64),
            "zero": np.zeros((1, 1), dtype=np.float32),
        },
    )


def sigmoid(v: np.ndarray) -> np.ndarray:
    result: np.ndarray = 1 / (1 + np.exp(-v))
    return result


def trapezoid(curve: Sequence[float] | np.ndarray) -> float:
    """Area under points spaced evenly over [0, 1]."""
    h = 1 / (len(curve) - 1)
    return float(sum((a + b) * h / 2 for a, b in itertools.pairwise(curve)))


def test_tabular_curves_by_hand(tmp_path: Path) -> None:
    model = load(tmp_path, sum_model([4]), ModelConfig(baseline=0.0))
    x = np.array([[1.0, 4.0, 2.0, 3.0]], dtype=np.float32)
    ctx = explain_context(model, x, [0])
    scores = evaluate(ctx, x.copy(), steps=4)  # attribution = x: remove 4, 3, 2, then 1
    # deletion: sums 10, 6, 3, 1, 0; insertion (from the baseline): 0, 4, 7, 9, 10
    assert scores.deletion_auc == pytest.approx([trapezoid(sigmoid(np.array([10, 6, 3, 1, 0])))])
    assert scores.insertion_auc == pytest.approx([trapezoid(sigmoid(np.array([0, 4, 7, 9, 10])))])
    assert scores.model_evaluations == cost(4, 1) == 10


def test_a_better_ranking_deletes_faster(tmp_path: Path) -> None:
    model = load(tmp_path, sum_model([6]), ModelConfig(baseline=-1.0))
    x = np.array([[3.0, -2.0, 0.5, 1.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    ctx = explain_context(model, x, [0, 0])
    good, bad = evaluate(ctx, x - (-1.0), 6), evaluate(ctx, -(x - (-1.0)), 6)
    assert good.deletion_auc[0] < bad.deletion_auc[0]
    assert good.insertion_auc[0] > bad.insertion_auc[0]
    # deleting with the baseline -1: sums by hand for row 0 ranked 3, 2, 1, 0.5, -1, -2
    deleted = [3.5, 3.5 - 4, 3.5 - 7, 3.5 - 9, 3.5 - 10.5, 3.5 - 10.5, 3.5 - 9.5]
    assert good.deletion_auc[0] == pytest.approx(trapezoid(sigmoid(np.array(deleted))))


def first_half_model(count: int) -> onnx.ModelProto:
    """logits = [sum of the first count/2 elements, 0]: only that half of the row matters."""
    weights = np.zeros((count, 2), dtype=np.float32)
    weights[: count // 2, 0] = 1.0
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        {"w": weights},
    )


def test_ties_are_removed_in_a_seeded_random_order(tmp_path: Path) -> None:
    """A flat map (a plateau, as in one occlusion window or LIME segment) removed in index order
    would take the important first half first; a random order spreads it over the curve."""
    model = load(tmp_path, first_half_model(64), ModelConfig(baseline=0.0))
    x = np.full((1, 64), 0.1, dtype=np.float32)
    flat = np.zeros_like(x)
    # index order: after k of 8 steps, min(8k, 32) of the 32 weighted elements are gone
    by_index = trapezoid(sigmoid(0.1 * np.array([32, 24, 16, 8, 0, 0, 0, 0, 0])))
    aucs = []
    for seed in (0, 0, 1, 2):
        (deletion,) = evaluate(explain_context(model, x, [0], seed=seed), flat, 8).deletion_auc
        assert deletion > by_index + 0.01
        aucs.append(deletion)
    assert aucs[0] == aucs[1]  # the same seed, the same order
    assert len(set(aucs)) > 1


def test_image_units_are_pixels_and_insertion_starts_blurred(tmp_path: Path) -> None:
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    image = ImageConfig(height=12, width=12, channels=3)
    model = load(tmp_path, sum_model([3, 12, 12]), ModelConfig(kind="image", image=image))
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.02, (1, 3, 12, 12)).astype(np.float32)
    attribution = rng.standard_normal((1, 3, 12, 12))
    ctx = explain_context(model, x, [0])
    steps = 6
    scores = evaluate(ctx, attribution, steps)
    # independently: rank pixels by the channel sum, blur with scipy (kernel 11 = sigma 5 and a
    # radius of 5: truncate 1.0; numpy's reflect padding is scipy's "mirror")
    order = np.argsort(-attribution[0].sum(0).ravel(), kind="stable")
    blurred = scipy_ndimage.gaussian_filter(
        x[0].astype(np.float64), sigma=(0, 5, 5), truncate=1.0, mode="mirror"
    )
    deletion: list[float] = []
    insertion: list[float] = []
    for k in np.rint(np.arange(steps + 1) / steps * 144).astype(int):
        flat = np.zeros(144, dtype=bool)
        flat[order[:k]] = True
        top = flat.reshape(1, 12, 12)
        deletion.append(float(sigmoid(np.where(top, 0.0, x[0]).sum())))
        insertion.append(float(sigmoid(np.where(top, x[0], blurred).sum())))
    assert scores.deletion_auc == pytest.approx([trapezoid(deletion)], abs=1e-6)
    assert scores.insertion_auc == pytest.approx([trapezoid(insertion)], abs=1e-6)


def test_steps_come_from_the_model_config(tmp_path: Path) -> None:
    model = load(tmp_path, sum_model([2]))
    assert steps_of(model) == 20
    configured = replace(
        model, config=replace(model.config, defaults={"faithfulness": {"steps": 7}})
    )
    assert steps_of(configured) == 7
    broken = replace(model, config=replace(model.config, defaults={"faithfulness": {"steps": 0}}))
    with pytest.raises(InvalidArgument, match="steps"):
        steps_of(broken)


def test_multi_input_models_are_refused(tmp_path: Path) -> None:
    proto = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 2]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
    )
    model: LoadedModel = load(tmp_path, proto)
    assert unavailable(model) is not None
