"""The bundled demo models and their data: the generator is reproducible, the models still classify
fresh data well, the examples are what their names say and the configs parse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from xaid_server.demo import shapes
from xaid_server.model_config import ImageConfig, ModelConfig, load_config

DEMO = Path(shapes.__file__).resolve().parent
MODELS = DEMO / "models"
EXAMPLES = DEMO / "examples"
FRESH_SEED = 90210  # not one of the seeds tools/train_demo_models.py trains or tests on


def session(name: str) -> ort.InferenceSession:
    path = MODELS / name / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def config(name: str) -> ModelConfig:
    return load_config(MODELS / name / "config.yaml")


def image_inputs(images: npt.NDArray[np.uint8], image: ImageConfig) -> npt.NDArray[np.float32]:
    """uint8 NHWC RGB -> float32 NCHW: pixels / scale, then (x - mean) / std per channel."""
    mean = np.asarray(image.mean, np.float32)
    std = np.asarray(image.std, np.float32)
    x = (images.astype(np.float32) / np.float32(image.scale) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def logits(name: str, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    (out,) = session(name).run(["logits"], {"input": x})
    return np.asarray(out, dtype=np.float32)


def test_generator_is_deterministic() -> None:
    first = shapes.generate(np.random.default_rng(7), 12)
    second = shapes.generate(np.random.default_rng(7), 12)
    other = shapes.generate(np.random.default_rng(8), 12)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("size", [64, 48])
def test_generator_shapes_dtypes_and_masks(size: int) -> None:
    images, labels, masks = shapes.generate(np.random.default_rng(3), 40, size)
    assert images.shape == (40, size, size, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (40,)
    assert labels.dtype == np.int64
    assert masks.shape == (40, size, size)
    assert masks.dtype == np.bool_
    assert labels.min() >= 0
    assert labels.max() < len(shapes.CLASSES)
    assert 6 <= len(shapes.CLASSES) <= 8
    area = masks.sum(axis=(1, 2))
    assert (area >= 0.02 * size * size).all()  # a visible object in every image
    assert (area <= 0.5 * size * size).all()
    # The whole object lies inside the image: nothing on the border rows and columns.
    assert not masks[:, [0, -1], :].any()
    assert not masks[:, :, [0, -1]].any()
    # The object stands out: its mean colour differs from the rest of the image.
    for image, mask in zip(images.astype(np.float64), masks, strict=True):
        assert np.linalg.norm(image[mask].mean(0) - image[~mask].mean(0)) > 10


def test_model_files_are_small_and_loadable() -> None:
    total = 0
    for name in ("shapes", "tabular"):
        path = MODELS / name / "1" / "model.onnx"
        total += path.stat().st_size
        proto = onnx.load(str(path))
        assert proto.ir_version <= 10
        assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
        inputs = session(name).get_inputs()
        assert [i.name for i in inputs] == ["input"]
        assert not isinstance(inputs[0].shape[0], int)  # dynamic batch
    assert total < 5 * 1024 * 1024


def test_configs_parse_and_match_the_models() -> None:
    image = config("shapes")
    assert image.kind == "image"
    assert (image.input, image.output) == ("input", "logits")
    assert image.labels == shapes.CLASSES
    assert image.image is not None
    assert (image.image.height, image.image.width, image.image.layout) == (64, 64, "NCHW")
    assert image.input_range is not None
    assert image.input_range[0] < image.baseline < image.input_range[1]
    assert image.defaults["occlusion"] == {"window": [8, 8], "stride": [4, 4]}

    tabular = config("tabular")
    assert tabular.kind == "tabular"
    assert tabular.labels == ("malignant", "benign")
    assert tabular.features is not None
    assert len(tabular.features.names) == 30
    for values in (tabular.features.mean, tabular.features.std, tabular.features.quartiles):
        assert len(values) == 30
    assert all(lo <= mid <= hi for lo, mid, hi in tabular.features.quartiles)
    assert tabular.defaults["occlusion"] == {"window": [1], "stride": [1]}


def test_shapes_model_classifies_fresh_images() -> None:
    images, labels, _ = shapes.generate(np.random.default_rng(FRESH_SEED), 200)
    image = config("shapes").image
    assert image is not None
    predicted = logits("shapes", image_inputs(images, image)).argmax(axis=1)
    accuracy = float((predicted == labels).mean())
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f} on fresh images"


def test_example_images_are_classified_as_named() -> None:
    image = config("shapes").image
    assert image is not None
    paths = sorted(EXAMPLES.glob("*.png"))
    assert len(paths) >= 4
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])
    assert pixels.shape[1:] == (64, 64, 3)
    predicted = logits("shapes", image_inputs(pixels, image)).argmax(axis=1)
    assert [shapes.CLASSES[k] for k in predicted] == [p.stem for p in paths]


def test_tabular_model_on_the_whole_dataset() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_breast_cancer()
    x = np.asarray(data.data, dtype=np.float32)  # raw units: scaling is inside the graph
    predicted = logits("tabular", x).argmax(axis=1)
    accuracy = float((predicted == data.target).mean())
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f} on the breast-cancer data"
    features = config("tabular").features
    assert features is not None
    assert list(features.names) == list(data.feature_names)


def test_tabular_examples_run() -> None:
    rows = np.load(EXAMPLES / "tabular.npy")
    assert rows.dtype == np.float32
    assert rows.ndim == 2
    assert rows.shape[1] == 30
    out = logits("tabular", rows)
    assert out.shape == (len(rows), 2)
    assert np.isfinite(out).all()
