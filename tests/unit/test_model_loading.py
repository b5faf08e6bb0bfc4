"""load_model and infer_config: kind and image inference, config checks, hashing, graph cache."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from xaid_server.errors import FailedPrecondition, ModelLoadError
from xaid_server.model_config import ImageConfig, ModelConfig
from xaid_server.runtime.model import (
    LoadedModel,
    SessionFactory,
    infer_config,
    infer_image_config,
    load_model,
)
from xaid_server.runtime.tensors import TensorSpec

CPU = SessionFactory(("CPUExecutionProvider",))


def _flatten_model(
    shape: Sequence[int | str], dtype: int = TensorProto.FLOAT, *, name: str = "x"
) -> onnx.ModelProto:
    """out = Flatten(float(x)): any rank, any element type, a dynamic batch dimension."""
    nodes = []
    source = name
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [name], ["as_float"], to=TensorProto.FLOAT))
        source = "as_float"
    nodes.append(helper.make_node("Flatten", [source], ["out"], axis=1))
    graph = helper.make_graph(
        nodes,
        "loading",
        [helper.make_tensor_value_info(name, dtype, list(shape))],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", None])],
    )
    return _finish(graph)


def _two_input_model() -> onnx.ModelProto:
    """sum = a + Cast(ids) over [N, 5]; mask = ids; two inputs of different types."""
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["ids"], ["ids_f"], to=TensorProto.FLOAT),
            helper.make_node("Add", ["a", "ids_f"], ["sum"]),
            helper.make_node("Identity", ["ids"], ["mask"]),
        ],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["N", 5]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 5]),
        ],
    )
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _write(tmp_path: Path, model: onnx.ModelProto | bytes) -> Path:
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def _load(
    tmp_path: Path, model: onnx.ModelProto | bytes, config: ModelConfig | None = None
) -> LoadedModel:
    return load_model("m", "1", _write(tmp_path, model), config or ModelConfig(), CPU)


def test_nchw_float_model_is_an_image(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 3, 32, 24]))
    assert model.config.kind == "image"
    assert model.config.image == ImageConfig(
        height=32, width=24, channels=3, layout="NCHW", scale=255.0
    )
    assert model.config.input == "x"
    assert model.config.output == "out"


def test_single_channel_nchw(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 1, 28, 28]))
    assert model.config.kind == "image"
    assert model.config.image == ImageConfig(
        height=28, width=28, channels=1, layout="NCHW", scale=255.0
    )


def test_nhwc_float_model_is_an_image(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 16, 20, 3]))
    assert model.config.kind == "image"
    assert model.config.image == ImageConfig(
        height=16, width=20, channels=3, layout="NHWC", scale=255.0
    )


def test_single_channel_nhwc(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 10, 12, 1]))
    assert model.config.image is not None
    assert model.config.image.layout == "NHWC"
    assert (model.config.image.height, model.config.image.width) == (10, 12)
    assert model.config.image.channels == 1


def test_two_d_model_is_tabular(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 7]))
    assert model.config.kind == "tabular"
    assert model.config.image is None


def test_int64_model_is_text(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 12], TensorProto.INT64, name="ids"))
    assert model.config.kind == "text"
    assert model.config.input == "ids"
    assert model.config.image is None


def test_int32_model_is_text(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 12], TensorProto.INT32))
    assert model.config.kind == "text"


def test_loaded_model_describes_the_graph(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 3, 4, 5]))
    assert model.name == "m"
    assert model.version == "1"
    assert model.inputs == (TensorSpec("x", "FP32", (-1, 3, 4, 5)),)
    assert model.outputs[0].name == "out"
    assert model.outputs[0].datatype == "FP32"
    assert model.input == model.inputs[0]
    assert model.output_index("") == 0
    assert model.provider == "CPUExecutionProvider"


def test_config_values_are_kept(tmp_path: Path) -> None:
    image = ImageConfig(height=4, width=5, channels=3, layout="NCHW", scale=1.0, mean=(0.5,) * 3)
    config = ModelConfig(kind="image", labels=("a", "b"), image=image, max_batch_size=8)
    model = _load(tmp_path, _flatten_model(["N", 3, 4, 5]), config)
    assert model.config.image == image
    assert model.config.labels == ("a", "b")
    assert model.config.max_batch_size == 8


def test_config_kind_overrides_inference(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 7]), ModelConfig(kind="text"))
    assert model.config.kind == "text"


def test_config_input_drives_inference(tmp_path: Path) -> None:
    model = _load(tmp_path, _two_input_model(), ModelConfig(input="ids", output="mask"))
    assert model.config.input == "ids"
    assert model.config.output == "mask"
    assert model.config.kind == "text"
    assert model.input.name == "ids"
    assert model.output_index("") == 1


def test_first_input_and_output_by_default(tmp_path: Path) -> None:
    model = _load(tmp_path, _two_input_model())
    assert model.config.input == "a"
    assert model.config.output == "sum"
    assert model.config.kind == "tabular"


def test_config_input_not_in_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'pixels'"):
        _load(tmp_path, _flatten_model(["N", 7]), ModelConfig(input="pixels"))


def test_config_output_not_in_model(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="'logits'"):
        _load(tmp_path, _flatten_model(["N", 7]), ModelConfig(output="logits"))


@pytest.mark.parametrize(
    "content",
    [b"this is not an onnx model", b"", bytes(range(256)) * 4],
    ids=["text", "empty", "binary"],
)
def test_garbage_file(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ModelLoadError):
        _load(tmp_path, content)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_model("m", "1", tmp_path / "absent.onnx", ModelConfig(), CPU)


def test_sha256_matches_hashlib(tmp_path: Path) -> None:
    proto = _flatten_model(["N", 7])
    path = _write(tmp_path, proto)
    model = load_model("m", "1", path, ModelConfig(), CPU)
    assert model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.sha256 == hashlib.sha256(proto.SerializeToString()).hexdigest()


def test_session_runs(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 3, 2, 2]))
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
    (out,) = model.session.run(None, {"x": x})
    np.testing.assert_array_equal(out, x.reshape(2, -1))


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((-1, 3, 8, 6), ImageConfig(height=8, width=6, channels=3, layout="NCHW", scale=255.0)),
        ((-1, 8, 6, 3), ImageConfig(height=8, width=6, channels=3, layout="NHWC", scale=255.0)),
        ((-1, 1, 8, 6), ImageConfig(height=8, width=6, channels=1, layout="NCHW", scale=255.0)),
        ((-1, 3, -1, -1), None),  # dynamic spatial size: nothing to resize to
        ((-1, 5, 8, 8), None),  # no channel dimension of 1 or 3
        ((-1, 3, 8), None),
    ],
)
def test_infer_image_config(shape: tuple[int, ...], expected: ImageConfig | None) -> None:
    assert infer_image_config(TensorSpec("x", "FP32", shape)) == expected


def test_infer_config_without_a_session() -> None:
    inputs = (TensorSpec("x", "FP32", (-1, 3, 8, 8)),)
    outputs = (TensorSpec("y", "FP32", (-1, 10)),)
    config = infer_config(ModelConfig(), inputs, outputs)
    assert (config.kind, config.input, config.output) == ("image", "x", "y")
    assert config.image is not None
    assert config.image.layout == "NCHW"
    with pytest.raises(ModelLoadError):
        infer_config(ModelConfig(input="z"), inputs, outputs)
    with pytest.raises(ModelLoadError):
        infer_config(ModelConfig(output="z"), inputs, outputs)


def test_evaluation_graph_is_cached(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 7]))
    calls: list[onnx.ModelProto] = []

    def build(proto: onnx.ModelProto) -> onnx.ModelProto:
        calls.append(proto)
        return proto

    first = model.evaluation_graph("same", build)
    second = model.evaluation_graph("same", build)
    assert first is second
    assert len(calls) == 1
    assert [i.name for i in calls[0].graph.input] == ["x"]
    x = np.ones((2, 7), dtype=np.float32)
    np.testing.assert_array_equal(first.run(None, {"x": x})[0], x)

    other = model.evaluation_graph("other", build)
    assert other is not first
    assert len(calls) == 2


def test_evaluation_graph_failure_is_remembered(tmp_path: Path) -> None:
    model = _load(tmp_path, _flatten_model(["N", 7]))
    calls: list[str] = []

    def build(proto: onnx.ModelProto) -> onnx.ModelProto:
        calls.append("built")
        raise FailedPrecondition("this model cannot be explained that way")

    with pytest.raises(FailedPrecondition, match="cannot be explained"):
        model.evaluation_graph("broken", build)
    with pytest.raises(FailedPrecondition, match="cannot be explained"):
        model.evaluation_graph("broken", build)
    assert calls == ["built"]

    def fine(proto: onnx.ModelProto) -> onnx.ModelProto:
        return proto

    # The failure belongs to its key only.
    assert model.evaluation_graph("fine", fine) is model.evaluation_graph("fine", fine)
