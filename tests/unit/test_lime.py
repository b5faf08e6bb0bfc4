"""LIME on known-answer models: ranks, the ridge against scikit-learn, text and tabular rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import CPU, explain, load, make_model
from xaid_server.errors import InvalidArgument
from xaid_server.explainers.lime import LimeExplainer
from xaid_server.explainers.sampling import lime_masks
from xaid_server.explainers.segmentation import SegmentationParams, resolve_segmentation, segment
from xaid_server.model_config import ImageConfig, ModelConfig, TextConfig, load_config
from xaid_server.runtime.model import LoadedModel, load_model
from xaid_server.settings import DEMO_MODELS

SIZE = 16
CELL = 4  # a 4 x 4 grid: 16 segments
ON = (5, 6, 10)  # the segments the known-answer model reads
GRID = {"algorithm": "grid", "cell_size": CELL}
IMAGE = ModelConfig(kind="image", image=ImageConfig(height=SIZE, width=SIZE, scale=1.0))


def cell_weights() -> np.ndarray:
    """1 on every pixel (all channels) of the segments in ON, else 0: [3 * SIZE * SIZE]."""
    ids = segment(np.zeros((SIZE, SIZE, 3)), SegmentationParams("grid", None, CELL))
    return np.broadcast_to(np.isin(ids, ON), (3, SIZE, SIZE)).astype(np.float32).reshape(-1)


def image_model(squash: bool) -> onnx.ModelProto:
    """logits = [g(sum of the ON segments' pixels), 0]; g is tanh(s / 20) when squashed."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["s"]),
    ]
    if squash:
        nodes += [
            helper.make_node("Mul", ["s", "scale"], ["scaled"]),
            helper.make_node("Tanh", ["scaled"], ["logits"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["logits"]))
    w = np.stack([cell_weights(), np.zeros(3 * SIZE * SIZE, np.float32)], axis=1)
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])],
        {"w": w, "scale": np.asarray(0.05, np.float32)},
    )


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load(tmp_path_factory.mktemp("linear"), image_model(False), IMAGE)


@pytest.fixture(scope="module")
def squashed(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load(tmp_path_factory.mktemp("squashed"), image_model(True), IMAGE)


def image(seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.5, 1.0, (1, 3, SIZE, SIZE)).astype(np.float32)


def test_lime_ranks_the_segments_the_model_reads_first(linear: LoadedModel) -> None:
    result, _ = explain(
        LimeExplainer(), linear, image(), {"segmentation": GRID, "fill": "baseline"}
    )
    (segments,) = result.segments
    assert sorted(np.argsort(-segments.weights)[: len(ON)].tolist()) == list(ON)
    assert segments.segment_map.shape == (SIZE, SIZE)
    assert segments.score > 0.99  # the model is linear in the segments
    # every pixel carries its segment's weight
    assert np.allclose(result.attribution[0, 1], segments.weights[segments.segment_map])


def test_lime_coefficients_equal_a_weighted_ridge_fitted_independently(
    squashed: LoadedModel,
) -> None:
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    n, x = 300, image(4)
    result, _ = explain(LimeExplainer(), squashed, x, {"segmentation": GRID, "n_samples": n})
    (segments,) = result.segments
    ids = segments.segment_map
    m = int(ids.max()) + 1
    masks = lime_masks(np.random.default_rng(0), n, m)  # the explainer's draws for seed 0
    means = np.stack([x[0][:, ids == s].mean(axis=1) for s in range(m)])  # [M, C]
    fill = means[ids].transpose(2, 0, 1)
    keep = masks[:, ids][:, None]
    masked = np.where(keep, x, fill[None]).astype(np.float32)
    y = squashed.session.run(None, {"x": masked})[0][:, 0].astype(np.float64)
    distances = pairwise_distances(masks, np.ones((1, m)), metric="cosine").ravel()
    weights = np.sqrt(np.exp(-(distances**2) / 0.25**2))
    ridge = Ridge(alpha=1.0).fit(masks.astype(float), y, sample_weight=weights)
    np.testing.assert_allclose(segments.weights, ridge.coef_, rtol=1e-4, atol=1e-6)
    assert segments.intercept == pytest.approx(ridge.intercept_, rel=1e-5, abs=1e-6)
    assert segments.score == pytest.approx(
        ridge.score(masks.astype(float), y, sample_weight=weights), rel=1e-5
    )


def test_same_seed_same_answer(squashed: LoadedModel) -> None:
    given = {"segmentation": GRID, "n_samples": 50}
    first, _ = explain(LimeExplainer(), squashed, image(), given)
    again, _ = explain(LimeExplainer(), squashed, image(), given)
    np.testing.assert_array_equal(first.segments[0].weights, again.segments[0].weights)


def test_defaults_follow_the_method_table(squashed: LoadedModel) -> None:
    params = LimeExplainer().resolve(squashed, (2, 3, SIZE, SIZE), {})
    assert params.n_samples == 1000
    assert params.segmentation == SegmentationParams("slic", 50, None)
    assert (params.kernel_width, params.ridge_alpha, params.fill) == (0.25, 1.0, "mean")
    assert LimeExplainer().cost(params, (2, 3, SIZE, SIZE), squashed) == 2000


@pytest.mark.parametrize(
    ("given", "field"),
    [
        ({"n_samples": 1}, "lime.n_samples"),
        ({"kernel_width": 0.0}, "lime.kernel_width"),
        ({"ridge_alpha": -1.0}, "lime.ridge_alpha"),
        ({"fill": "blur"}, "lime.fill"),
        ({"segmentation": {"algorithm": "watershed"}}, "lime.segmentation.algorithm"),
        ({"segmentation": {"algorithm": "grid", "cell_size": 99}}, "lime.segmentation.cell_size"),
        ({"segmentation": {"algorithm": "grid", "n_segments": 9}}, "lime.segmentation.n_segments"),
        ({"segmentation": {"sides": 3}}, "lime.segmentation.sides"),
    ],
)
def test_bad_parameters_name_their_field(
    squashed: LoadedModel, given: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        LimeExplainer().resolve(squashed, (1, 3, SIZE, SIZE), given)
    assert info.value.field == field


def test_segmentations() -> None:
    picture = np.zeros((32, 48, 3))
    picture[:, 24:] = 1.0  # two halves of different colour
    grid = segment(picture, resolve_segmentation({"algorithm": "grid"}, (32, 48), "s"))
    assert grid.max() + 1 == 8 * 12  # cells of 4 px
    assert grid.dtype == np.int32
    for algorithm in ("slic", "quickshift"):
        ids = segment(picture, resolve_segmentation({"algorithm": algorithm}, (32, 48), "s"))
        assert ids.shape == (32, 48)
        assert ids.min() == 0
        assert set(np.unique(ids)) == set(range(int(ids.max()) + 1))
        # segments follow the colour edge: none spans both halves
        assert not set(np.unique(ids[:, :24])) & set(np.unique(ids[:, 24:]))


def text_model(tmp_path: Path) -> LoadedModel:
    """logits = [sum of the tokens' scores, 0]: only "good" (id 3) scores much."""
    embedding = np.zeros((6, 2), np.float32)
    embedding[2:, 0] = [0.1, 5.0, 0.2, -0.3]
    proto = make_model(
        [
            helper.make_node("Gather", ["e", "ids"], ["rows"]),
            helper.make_node("ReduceSum", ["rows", "axes"], ["logits"], keepdims=0),
        ],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])],
        {"e": embedding, "axes": np.asarray([1], np.int64)},
    )
    vocabulary = ["<pad>", "<unk>", "a", "good", "film", "bad"]
    config = ModelConfig(kind="text", text=TextConfig(vocabulary=vocabulary, pad_id=0))
    return load(tmp_path, proto, config)


def test_text_tokens_are_removed_with_the_pad_id(tmp_path: Path) -> None:
    model = text_model(tmp_path)
    ids = np.asarray([[2, 3, 4, 5, 0, 0]], np.int64)
    result, _ = explain(LimeExplainer(), model, ids, {"n_samples": 500}, classes=[0])
    (segments,) = result.segments
    assert segments.names == ["a", "good", "film", "bad"]
    assert segments.segment_map.tolist() == [0, 1, 2, 3, -1, -1]
    assert int(np.argmax(segments.weights)) == 1
    assert result.attribution[0, 4:].tolist() == [0.0, 0.0]


def test_tabular_conditions_come_from_the_config_quartiles() -> None:
    folder = DEMO_MODELS / "tabular"
    config = load_config(folder / "config.yaml")
    model = load_model("tabular", "1", folder / "1" / "model.onnx", config, CPU)
    x = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
    result, _ = explain(LimeExplainer(), model, x, {"n_samples": 400})
    names = result.segments[0].names
    assert config.features is not None
    for value, name, feature, (q1, _, q3) in zip(
        x[0], names, config.features.names, config.features.quartiles, strict=True
    ):
        assert feature in name
        if value <= q1:
            assert name == f"{feature} <= {q1:.4g}"
        elif value > q3:
            assert name == f"{feature} > {q3:.4g}"
        else:
            assert f"< {feature} <=" in name
    assert result.attribution.shape == x.shape
    assert np.isfinite(result.segments[0].weights).all()
