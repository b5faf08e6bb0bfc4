"""Occlusion on linear models, where every occluded score and so every attribution is exact."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import explain, explain_context, load, make_model, target_scores
from xaid_server.errors import Cancelled, InvalidArgument
from xaid_server.explainers.occlusion import OcclusionExplainer, OcclusionParams
from xaid_server.model_config import ImageConfig, ModelConfig
from xaid_server.runtime.model import LoadedModel
from xaid_server.runtime.runner import Job

OCCLUSION = OcclusionExplainer()
RNG = np.random.default_rng(3)


def linear_model(example: tuple[int, ...], weights: np.ndarray) -> onnx.ModelProto:
    """y = flatten(x) @ weights over examples of shape `example`: F(x) is a weighted sum."""
    return make_model(
        [
            helper.make_node("Flatten", ["x"], ["f"], axis=1),
            helper.make_node("MatMul", ["f", "w"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *example])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", weights.shape[1]])],
        {"w": weights.astype(np.float32)},
    )


def region_weights(example: tuple[int, ...], region: tuple[slice, ...]) -> np.ndarray:
    """Class 0 scores 1.5 times the sum of x over `region`; class 1 has random weights."""
    first = np.zeros(example)
    first[region] = 1.5
    return np.stack([first.ravel(), RNG.normal(size=first.size)], axis=1)


def image_model(
    tmp_path: Path, example: tuple[int, ...] = (2, 8, 8), config: ModelConfig | None = None
) -> tuple[LoadedModel, np.ndarray]:
    weights = region_weights(example, (slice(None), slice(2, 6), slice(1, 7)))
    return load(tmp_path, linear_model(example, weights), config), weights


def reference(
    x: np.ndarray,
    weights: np.ndarray,
    window: Sequence[int],
    positions: Sequence[Sequence[int]],
    baseline: float,
) -> np.ndarray:
    """Mean over the covering windows of F(x) - F(occluded) = sum over the window of w*(x - b)."""
    contribution = weights.reshape(x.shape) * (x.astype(np.float64) - baseline)
    lead = x.ndim - len(window)
    total = np.zeros(x.shape[lead:])
    count = np.zeros(x.shape[lead:])
    for start in itertools.product(*positions):
        box = tuple(slice(s, s + w) for s, w in zip(start, window, strict=True))
        total[box] += contribution[(slice(None),) * lead + box].sum()
        count[box] += 1
    assert count.min() > 0
    return np.broadcast_to(total / count, x.shape)


def test_tiling_window_attributes_the_region_sum_of_each_block(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path)
    x = RNG.normal(size=(1, 2, 8, 8)).astype(np.float32)
    explanation, _ = explain(OCCLUSION, model, x, {"window": (4, 4), "stride": (4, 4)}, [0])
    # each element lies in exactly one 4x4 block: its attribution is 1.5 * (sum of x over the
    # block's part of the region, all channels)
    inside = np.zeros((8, 8))
    inside[2:6, 1:7] = 1.5
    blocks = (x[0].sum(axis=0) * inside).reshape(2, 4, 2, 4).sum(axis=(1, 3))
    expected = np.broadcast_to(np.kron(blocks, np.ones((4, 4))), x.shape)
    np.testing.assert_allclose(explanation.attribution, expected, atol=1e-5)
    assert explanation.attribution.dtype == np.float32


@pytest.mark.parametrize(
    ("window", "stride", "baseline", "target"),
    [((3, 3), (1, 1), 0.0, 0), ((4, 5), (2, 3), 0.5, 1), ((2, 4, 4), (1, 2, 2), -0.25, 1)],
)
def test_overlapping_windows_average_the_covering_differences(
    tmp_path: Path, window: tuple[int, ...], stride: tuple[int, ...], baseline: float, target: int
) -> None:
    model, weights = image_model(tmp_path)
    x = RNG.normal(size=(1, 2, 8, 8)).astype(np.float32)
    given = {"window": window, "stride": stride, "baseline": baseline}
    explanation, _ = explain(OCCLUSION, model, x, given, [target])
    dims = x.shape[x.ndim - len(window) :]
    positions = [range(0, d - w + 1, s) for d, w, s in zip(dims, window, stride, strict=True)]
    assert all(p[-1] + w == d for p, w, d in zip(positions, window, dims, strict=True))
    expected = reference(x[0], weights[:, target], window, positions, baseline)
    np.testing.assert_allclose(explanation.attribution[0], expected, atol=1e-5)


def test_whole_input_window_gives_the_total_difference(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path)
    x = RNG.normal(size=(1, 2, 8, 8)).astype(np.float32)
    explanation, ctx = explain(OCCLUSION, model, x, {"window": (8, 8), "baseline": 0.5}, [1])
    filled = target_scores(model, np.full_like(x, 0.5))[0, 1]
    np.testing.assert_allclose(explanation.attribution, ctx.scores[0] - filled, rtol=1e-5)


def test_batch_rows_are_explained_separately(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path)
    x = RNG.normal(size=(3, 2, 8, 8)).astype(np.float32)
    given = {"window": (3, 3), "stride": (2, 2)}
    batch, _ = explain(OCCLUSION, model, x, given, [0, 1, 0])
    for row, target in enumerate([0, 1, 0]):
        single, _ = explain(OCCLUSION, model, x[row : row + 1], given, [target])
        np.testing.assert_allclose(batch.attribution[row], single.attribution[0], atol=1e-6)
    assert not np.allclose(batch.attribution[0], batch.attribution[2])


def test_edge_window_covers_a_stride_that_does_not_divide(tmp_path: Path) -> None:
    model, weights = image_model(tmp_path, example=(1, 7, 9))
    x = RNG.normal(size=(2, 1, 7, 9)).astype(np.float32)
    given = {"window": (3, 4), "stride": (3, 3)}
    explanation, _ = explain(OCCLUSION, model, x, given, [1, 1])
    positions = [[0, 3, 4], [0, 3, 5]]  # Captum's starts, then one flush with the end
    for row in range(2):
        expected = reference(x[row], weights[:, 1], (3, 4), positions, 0.0)
        np.testing.assert_allclose(explanation.attribution[row], expected, atol=1e-5)
    params = OCCLUSION.resolve(model, x.shape, given)
    assert OCCLUSION.cost(params, x.shape, model) == 2 * 9


def test_tabular_default_window_is_one_feature(tmp_path: Path) -> None:
    weights = RNG.normal(size=(6, 3))
    model = load(tmp_path, linear_model((6,), weights), ModelConfig(baseline=0.2))
    x = RNG.normal(size=(2, 6)).astype(np.float32)
    explanation, _ = explain(OCCLUSION, model, x, {}, [2, 0])
    expected = np.stack([weights[:, 2], weights[:, 0]]) * (x - 0.2)
    np.testing.assert_allclose(explanation.attribution, expected, atol=1e-5)


def test_nhwc_window_covers_the_channels(tmp_path: Path) -> None:
    config = ModelConfig(image=ImageConfig(height=8, width=8, channels=3, layout="NHWC"))
    model, weights = image_model(tmp_path, example=(8, 8, 3), config=config)
    x = RNG.normal(size=(1, 8, 8, 3)).astype(np.float32)
    params = OCCLUSION.resolve(model, x.shape, {"window": (4, 4), "stride": (2,)})
    assert params == OcclusionParams(window=(4, 4, 3), stride=(2, 2, 3), baseline=0.0)
    explanation, _ = explain(OCCLUSION, model, x, {"window": (4, 4), "stride": (2,)}, [1])
    expected = reference(x[0], weights[:, 1], (4, 4, 3), [[0, 2, 4], [0, 2, 4], [0]], 0.0)
    np.testing.assert_allclose(explanation.attribution[0], expected, atol=1e-5)


def test_defaults(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path, example=(3, 224, 112))
    assert OCCLUSION.resolve(model, (1, 3, 224, 112), {}) == OcclusionParams((8, 8), (4, 4), 0.0)
    assert OCCLUSION.resolve(model, (1, 3, 224, 224), {}) == OcclusionParams((16, 16), (8, 8), 0.0)
    configured = ModelConfig(baseline=0.5, defaults={"occlusion": {"window": [5, 5]}})
    model = load(tmp_path, linear_model((2, 8, 8), np.ones((128, 1))), configured, name="other")
    assert OCCLUSION.resolve(model, (1, 2, 8, 8), {"stride": [1]}) == OcclusionParams(
        (5, 5), (1, 1), 0.5
    )


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"window": (9, 4)}, "occlusion.window"),
        ({"window": (3, 4, 4, 4)}, "occlusion.window"),
        ({"window": (0, 4)}, "occlusion.window"),
        ({"window": (4, 4), "stride": (1, 1, 1)}, "occlusion.stride"),
        ({"window": (4, 4), "stride": (0,)}, "occlusion.stride"),
        ({"window": (2, 2), "stride": (3, 1)}, "occlusion.stride"),
        ({"window": (4.5, 4)}, "occlusion.window"),
    ],
)
def test_invalid_geometry_names_the_field(
    tmp_path: Path, given: dict[str, object], field: str
) -> None:
    model, _ = image_model(tmp_path)
    with pytest.raises(InvalidArgument) as caught:
        OCCLUSION.resolve(model, (1, 2, 8, 8), given)
    assert caught.value.field == field
    assert field in caught.value.message


def test_window_larger_than_the_input_is_refused(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path)
    with pytest.raises(InvalidArgument, match=r"occlusion\.window: 9 is larger than input dim 2"):
        OCCLUSION.resolve(model, (1, 2, 8, 8), {"window": (9, 4)})


def test_cost_counts_every_evaluation(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path, example=(3, 64, 64))
    x = RNG.normal(size=(2, 3, 64, 64)).astype(np.float32)
    params = OCCLUSION.resolve(model, x.shape, {"window": (8, 8), "stride": (4, 4)})
    assert OCCLUSION.cost(params, x.shape, model) == 2 * 15 * 15
    ctx = explain_context(model, x)
    OCCLUSION.explain(ctx, params)
    assert ctx.job.evaluations == OCCLUSION.cost(params, x.shape, model)


def test_cancelled_job_stops_before_any_run(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path)
    x = RNG.normal(size=(1, 2, 8, 8)).astype(np.float32)
    job = Job()
    job.cancel()
    ctx = explain_context(model, x, job=job)
    with pytest.raises(Cancelled):
        OCCLUSION.explain(ctx, OCCLUSION.resolve(model, x.shape, {}))
    assert job.evaluations == 0


def test_models_with_several_inputs_are_not_applicable(tmp_path: Path) -> None:
    two = make_model(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = load(tmp_path, two)
    reason = OCCLUSION.applicable(model)
    assert reason is not None
    assert "single-input" in reason
    OCCLUSION.prepare(model)  # quietly skipped


def test_chunks_are_even_and_within_the_max_batch(tmp_path: Path) -> None:
    model, _ = image_model(tmp_path, example=(3, 64, 64), config=ModelConfig(max_batch_size=64))
    x = RNG.normal(size=(1, 3, 64, 64)).astype(np.float32)
    done: list[int] = []
    job = Job(progress=lambda evaluations, _total: done.append(evaluations))
    explain(OCCLUSION, model, x, {"window": (8, 8), "stride": (4, 4)}, job=job)
    assert np.diff([0, *done]).tolist() == [57, 57, 57, 54]  # 225 positions, not 64+64+64+33
