"""LIME and KernelSHAP through the server: gRPC, the client, the CLI, the pointing game and the
`lime` package on the shapes model."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import xaid
from tests.integration.test_pointing_game import model_inputs
from tests.running_server import RunningServer
from xaid.cli import main
from xaid_server.demo.shapes import generate
from xaid_server.model_config import load_config
from xaid_server.settings import DEMO_MODELS

EXAMPLES = DEMO_MODELS.parent / "examples"
SAMPLES = 1000  # per image, for xaid and for the `lime` package alike (its default)


@pytest.fixture(scope="module")
def client(server_address: str) -> xaid.Client:
    return xaid.Client(server_address, timeout=300)


def test_lime_over_grpc_with_a_heatmap(client: xaid.Client) -> None:
    star = EXAMPLES / "star.png"
    slic = {"algorithm": "slic", "n_segments": 30}
    first = client.explain(
        "shapes", star, "lime", seed=7, render=True, n_samples=300, segmentation=slic
    )
    again = client.explain("shapes", star, "lime", seed=7, n_samples=300, segmentation=slic)
    (segments,) = first.segments
    assert segments.segment_map.shape == (64, 64)
    assert len(segments.weights) == segments.segment_map.max() + 1
    assert segments.weights == again.segments[0].weights  # seeded: the same answer
    assert 0.0 < segments.score <= 1.0
    assert first.parameters["n_samples"] == 300
    assert first.parameters["kernel_width"] == 0.25
    assert first.parameters["fill"] == "mean"
    assert first.model_evaluations == 1 + 300
    top = int(np.argmax(segments.weights))
    np.testing.assert_allclose(
        first.attribution[0, 0][segments.segment_map == top], segments.weights[top], rtol=1e-6
    )
    with Image.open(star) as picture:
        assert first.heatmaps[0].size == picture.size


def test_kernel_shap_efficiency_over_grpc(client: xaid.Client) -> None:
    rows = np.load(EXAMPLES / "tabular.npy")[:3].astype(np.float32)
    explanation = client.explain("tabular", rows, "kernel_shap", target=1, fill="baseline")
    logits = explanation.prediction["logits"][:, 1].astype(np.float64)
    assert len(explanation.segments) == 3
    for row, segments in enumerate(explanation.segments):
        delta = logits[row] - segments.base_value
        assert abs(sum(segments.weights) - delta) <= 1e-6 * abs(delta)
        assert segments.names[20] == "worst radius"
    assert explanation.parameters["n_samples"] == 2 * 30 + 2048
    assert explanation.model_evaluations == 3 + 3 * (2 * 30 + 2048 + 1)


def test_kernel_shap_base_value_is_the_mean_over_the_shipped_background(
    client: xaid.Client, demo_server: RunningServer
) -> None:
    """The demo tabular model ships 100 training rows: the default fill, and E[F] the base.

    2M + 2048 samples against 100 rows would be 210 900 evaluations: the default is capped so
    that the request, its forward included, fits the server's cap."""
    folder = DEMO_MODELS / "tabular"
    background = np.load(folder / "background.npy")
    session = ort.InferenceSession(folder / "1" / "model.onnx", providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": background})
    row = np.load(EXAMPLES / "tabular.npy")[:1].astype(np.float32)
    explanation = client.explain("tabular", row, "kernel_shap", target=1)
    (segments,) = explanation.segments
    assert explanation.parameters["fill"] == "background"
    assert background.shape == (100, 30)
    cap = demo_server.settings.max_evaluations
    samples = (cap - 1) // 100 - 1
    assert explanation.parameters["n_samples"] == samples < 2 * 30 + 2048
    assert explanation.model_evaluations == 1 + (samples + 1) * 100 <= cap
    assert segments.base_value == pytest.approx(float(np.mean(logits[:, 1], dtype=np.float64)))
    delta = explanation.prediction["logits"][0, 1] - segments.base_value
    assert abs(sum(segments.weights) - delta) <= 1e-6 * abs(delta)


def test_kernel_shap_default_leaves_room_for_the_faithfulness_scores(
    client: xaid.Client, demo_server: RunningServer
) -> None:
    row = np.load(EXAMPLES / "tabular.npy")[:1].astype(np.float32)
    explanation = client.explain("tabular", row, "kernel_shap", target=1, evaluate=True)
    assert explanation.faithfulness is not None
    scoring = explanation.faithfulness.model_evaluations
    assert scoring == 2 * (20 + 1)
    cap = demo_server.settings.max_evaluations
    assert explanation.parameters["n_samples"] == (cap - 1 - scoring) // 100 - 1
    assert explanation.model_evaluations + scoring <= cap


@pytest.mark.parametrize("fill", ["background", "baseline"])
def test_kernel_shap_explicit_samples_over_the_cap_are_refused(
    client: xaid.Client, demo_server: RunningServer, fill: str
) -> None:
    rows = np.load(EXAMPLES / "tabular.npy")[:2].astype(np.float32)
    cap = demo_server.settings.max_evaluations
    per_sample = 2 * (100 if fill == "background" else 1)
    fitting = (cap - 2) // per_sample - 1
    explained = client.explain(
        "tabular", rows[:1], "kernel_shap", target=1, n_samples=10, fill=fill
    )
    assert explained.parameters["n_samples"] == 10
    with pytest.raises(xaid.InvalidArgument) as info:
        client.explain("tabular", rows, "kernel_shap", target=1, n_samples=fitting + 1, fill=fill)
    assert "kernel_shap.n_samples" in info.value.details
    assert f"server cap of {cap}" in info.value.details
    assert f"at most {fitting} samples fit" in info.value.details


def test_async_client_lime_on_tabular(server_address: str) -> None:
    import asyncio

    rows = np.load(EXAMPLES / "tabular.npy")[:1].astype(np.float32)

    async def run() -> xaid.Explanation:
        async with xaid.AsyncClient(server_address, timeout=120) as client:
            return await client.explain("tabular", rows, "lime", n_samples=500)

    explanation = asyncio.run(run())
    names = explanation.segments[0].names
    assert any(" > " in n or " <= " in n for n in names)
    assert explanation.parameters["fill"] == "quartiles"


def test_cli_explains_with_lime(
    server_address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "lime.png"
    heart = EXAMPLES / "heart.png"
    argv = ["--server", server_address, "explain", "--model", "shapes", "--method", "lime"]
    argv += [str(heart), "--samples", "100", "--no-progress"]
    assert main([*argv, "--segmentation", "grid", "--out", str(out), "--json", "--seed", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"]["segmentation"] == {"algorithm": "grid", "cell_size": 8}
    assert len(printed["segments"][0]["weights"]) == 64
    with Image.open(out) as written, Image.open(heart) as picture:
        assert written.size == picture.size
    assert main([*argv, "--param", "fill=blur"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


#: Zhang et al. (2016) count a hit within 15 px of the object at 224 px: 4 px at 64 px.
POINTING_TOLERANCE = round(15 * 64 / 224)


def pointed_pixel(attribution: np.ndarray) -> tuple[int, int]:
    """The maximum of a map with plateaus: the pixel of the top plateau nearest its centroid.

    Every pixel of a segment carries the segment's weight, so the maximum is a whole segment;
    its centroid may lie outside it (a ring, a crescent), the nearest pixel of it does not.
    """
    rows, cols = np.nonzero(attribution == attribution.max())
    nearest = np.argmin((rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2)
    return int(rows[nearest]), int(cols[nearest])


def on_object(mask: np.ndarray, point: tuple[int, int]) -> bool:
    rows, cols = np.nonzero(mask)
    distance2 = (rows - point[0]) ** 2 + (cols - point[1]) ** 2
    return bool(distance2.min() <= POINTING_TOLERANCE**2)


def test_pointed_pixel_and_tolerance() -> None:
    ring = np.zeros((9, 9))
    ring[1:8, 1:8] = 2.0
    ring[3:6, 3:6] = 1.0  # the top plateau surrounds its own centroid
    point = pointed_pixel(ring)
    assert ring[point] == 2.0
    assert point in {(2, 4), (4, 2), (4, 6), (6, 4)}
    mask = np.zeros((64, 64), dtype=bool)
    mask[30:34, 10:14] = True
    assert on_object(mask, (31, 10 - POINTING_TOLERANCE))
    assert not on_object(mask, (31, 9 - POINTING_TOLERANCE))


def test_lime_points_at_the_shape(client: xaid.Client) -> None:
    """The pointing game (Zhang et al. 2016) on 100 fresh images: >= 90 hits.

    The attribution map is scored as any other map: its maximum (see `pointed_pixel`) must lie
    on the object, within the tolerance. An 8 px grid keeps segments small, so pointing at the
    right one lands on the object; the baseline fill hides a segment whole, which its mean
    colour does not for a segment inside a solid shape.
    """
    images, _, masks = generate(np.random.default_rng(20261129), 100)
    x = model_inputs(images)
    hits = 0
    for start in range(0, 100, 20):
        explanation = client.explain(
            "shapes",
            x[start : start + 20],
            "lime",
            seed=start,
            n_samples=300,
            fill="baseline",
            segmentation={"algorithm": "grid", "cell_size": 8},
        )
        for row, attribution in enumerate(explanation.attribution):
            hits += on_object(masks[start + row], pointed_pixel(attribution.sum(axis=0)))
    assert hits >= 90, f"pointing game: {hits}/100"
    print(f"LIME pointing game: {hits}/100")


def test_agrees_with_the_lime_package(client: xaid.Client) -> None:
    """Same segments, same number of samples, mean-colour fill: top-5 segments agree on average."""
    from lime import lime_image

    config = load_config(DEMO_MODELS / "shapes" / "config.yaml")
    assert config.image is not None
    mean = np.asarray(config.image.mean, np.float32)
    std = np.asarray(config.image.std, np.float32)
    session = ort.InferenceSession(
        str(DEMO_MODELS / "shapes" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )

    def logits(pictures: np.ndarray) -> np.ndarray:
        batch = ((pictures.astype(np.float32) - mean) / std).transpose(0, 3, 1, 2)
        return np.asarray(session.run(None, {"input": batch})[0])

    images, _, _ = generate(np.random.default_rng(31), 20)
    agreement = []
    for index, picture in enumerate(images):
        png = io.BytesIO()
        Image.fromarray(picture).save(png, format="PNG")
        ours = client.explain(
            "shapes", png.getvalue(), "lime", seed=index, n_samples=SAMPLES
        ).segments[0]
        target = int(np.argmax(logits(picture[None] / 255.0)[0]))
        theirs = lime_image.LimeImageExplainer(random_state=index).explain_instance(
            picture / 255.0,
            logits,
            labels=(target,),
            top_labels=None,
            hide_color=None,
            num_samples=SAMPLES,
            batch_size=100,
            segmentation_fn=lambda _, ids=ours.segment_map: ids,
            random_seed=index,
        )
        weights = np.zeros(len(ours.weights))
        for segment, weight in theirs.local_exp[target]:
            weights[segment] = weight
        top_ours = set(np.argsort(-np.asarray(ours.weights))[:5].tolist())
        top_theirs = set(np.argsort(-weights)[:5].tolist())
        agreement.append(len(top_ours & top_theirs))
    assert np.mean(agreement) >= 4, agreement
    print(f"top-5 agreement with lime: {np.mean(agreement):.2f} of 5 ({agreement})")
