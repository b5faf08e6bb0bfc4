"""The Python client, sync and async, against a real server on the bundled demo models."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import xaid

EXAMPLES = Path(__file__).resolve().parents[2] / "service" / "xaid_server" / "demo" / "examples"
# Coarse windows keep occlusion at a few dozen model evaluations.
WINDOW = (16, 16)


@pytest.fixture(scope="module")
def image_path() -> Path:
    pngs = sorted(EXAMPLES.glob("*.png"))
    assert pngs, f"no example PNGs in {EXAMPLES}"
    return pngs[0]


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[xaid.Client]:
    with xaid.Client(server_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def shapes(client: xaid.Client) -> xaid.ModelInfo:
    return client.model("shapes")


def _tabular(rows: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, 30), dtype=np.float32)


def _check_top(prediction: xaid.Prediction, rows: int, labels: tuple[str, ...]) -> None:
    assert len(prediction.top) == rows
    for row, scores in enumerate(prediction.top):
        assert scores
        probabilities = [s.probability for s in scores]
        assert probabilities == sorted(probabilities, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probabilities)
        for score in scores:
            assert score.row == row
            if labels:
                assert score.label == labels[score.index]


def test_models(client: xaid.Client) -> None:
    names = {m.name for m in client.models()}
    assert {"shapes", "tabular"} <= names


def test_model(shapes: xaid.ModelInfo, client: xaid.Client) -> None:
    assert shapes.name == "shapes"
    assert shapes.kind == "image"
    assert shapes.ready
    assert shapes.version in shapes.versions
    assert shapes.inputs[0].shape[-3:] == (3, 64, 64)
    assert shapes.image is not None
    assert (shapes.image.height, shapes.image.width) == (64, 64)
    assert shapes.labels
    assert "occlusion" in shapes.methods
    assert shapes.execution_provider

    tabular = client.model("tabular")
    assert tabular.inputs[0].shape[-1] == 30
    assert tabular.inputs[0].datatype == "FP32"


def test_predict_image_path(client: xaid.Client, shapes: xaid.ModelInfo, image_path: Path) -> None:
    for x in (image_path, str(image_path), image_path.read_bytes()):
        prediction = client.predict("shapes", x, top_k=3)
        assert prediction.model == "shapes"
        assert prediction.version == shapes.version
        _check_top(prediction, 1, shapes.labels)
        assert len(prediction.top[0]) == 3
        assert next(iter(prediction.outputs.values())).shape[0] == 1


def test_predict_pil_image_matches_the_file(client: xaid.Client, image_path: Path) -> None:
    with Image.open(image_path) as image:
        from_pil = client.predict("shapes", image.convert("RGB"))
    from_file = client.predict("shapes", image_path)
    assert from_pil.top[0][0].index == from_file.top[0][0].index


def test_predict_numpy(client: xaid.Client) -> None:
    tabular = client.model("tabular")
    prediction = client.predict("tabular", _tabular(2))
    assert next(iter(prediction.outputs.values())).shape[0] == 2
    _check_top(prediction, 2, tabular.labels)

    named = client.predict("tabular", {tabular.inputs[0].name: _tabular(2)})
    for name, value in prediction.outputs.items():
        np.testing.assert_allclose(named.outputs[name], value, rtol=1e-5)


def test_explain_occlusion_with_render(
    client: xaid.Client, shapes: xaid.ModelInfo, image_path: Path
) -> None:
    explanation = client.explain(
        "shapes", image_path, "occlusion", render=True, window=WINDOW, stride=WINDOW, baseline=0.0
    )
    assert explanation.method == "occlusion"
    assert explanation.attribution.shape == (1, 3, 64, 64)
    assert explanation.attribution.dtype == np.float32
    assert explanation.model_evaluations > 0
    assert explanation.parameters["window"] == list(WINDOW)
    assert explanation.parameters["stride"] == list(WINDOW)
    assert explanation.parameters["baseline"] == 0.0

    assert len(explanation.heatmap_png) == 1
    assert explanation.heatmap_png[0].startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(image_path) as original:
        assert explanation.heatmaps[0].size == original.size
    assert Image.open(io.BytesIO(explanation.heatmap_png[0])).format == "PNG"

    target = explanation.target
    assert len(target.class_indices) == 1
    assert 0 <= target.class_indices[0] < shapes.outputs[0].shape[-1]
    if shapes.labels:
        assert target.labels[0] == shapes.labels[target.class_indices[0]]
    assert explanation.prediction
    assert explanation.timing.total_seconds > 0


def test_explain_target_and_seed_are_honoured(client: xaid.Client, image_path: Path) -> None:
    explanation = client.explain(
        "shapes", image_path, target=2, seed=1234, window=WINDOW, stride=WINDOW
    )
    assert explanation.target.class_indices == (2,)
    assert explanation.seed == 1234
    assert explanation.heatmap_png == []


def test_explain_with_progress(client: xaid.Client, image_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    explanation = client.explain(
        "shapes",
        image_path,
        window=WINDOW,
        stride=WINDOW,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls
    dones = [done for done, _ in calls]
    assert dones == sorted(dones)
    assert calls[-1][0] == calls[-1][1] > 0
    assert explanation.attribution.shape == (1, 3, 64, 64)


def test_unknown_model(client: xaid.Client, image_path: Path) -> None:
    with pytest.raises(xaid.NotFound) as info:
        client.model("no-such-model")
    assert info.value.details
    with pytest.raises(xaid.NotFound):
        client.predict("no-such-model", image_path)
    with pytest.raises(xaid.NotFound):
        client.explain("no-such-model", image_path, progress=lambda done, total: None)


def test_wrong_shape_array(client: xaid.Client) -> None:
    with pytest.raises(xaid.InvalidArgument) as info:
        client.predict("tabular", np.zeros((1, 7), dtype=np.float32))
    assert info.value.details
    with pytest.raises(xaid.InvalidArgument):
        client.explain("tabular", np.zeros((1, 7), dtype=np.float32))


def test_unknown_parameter_fails_before_the_call(client: xaid.Client, image_path: Path) -> None:
    with pytest.raises(ValueError, match="valid parameters: window, stride, baseline"):
        client.explain("shapes", image_path, "occlusion", windw=8)


def test_async_client(server_address: str, image_path: Path) -> None:
    calls: list[tuple[int, int]] = []

    async def run() -> None:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            assert {"shapes", "tabular"} <= {m.name for m in await client.models()}
            shapes = await client.model("shapes")
            assert shapes.kind == "image"

            prediction = await client.predict("shapes", image_path)
            _check_top(prediction, 1, shapes.labels)
            tabular = await client.predict("tabular", _tabular(3))
            assert len(tabular.top) == 3

            explanation = await client.explain(
                "shapes",
                image_path,
                render=True,
                window=WINDOW,
                stride=WINDOW,
                progress=lambda done, total: calls.append((done, total)),
            )
            assert explanation.attribution.shape == (1, 3, 64, 64)
            assert explanation.heatmap_png
            assert explanation.parameters["window"] == list(WINDOW)

            with pytest.raises(xaid.NotFound):
                await client.model("no-such-model")
            with pytest.raises(xaid.InvalidArgument):
                await client.predict("tabular", np.zeros((1, 7), dtype=np.float32))

    asyncio.run(run())
    assert calls
    assert calls[-1][0] == calls[-1][1] > 0
