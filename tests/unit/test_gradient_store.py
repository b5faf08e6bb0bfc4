"""Where gradient graphs come from: the disk cache (atomic, keyed by the model's sha256, rebuilt
when unreadable, skipped when unwritable) and the per-model precision setting."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.helpers import CPU, load, make_model
from xaid_server.errors import ModelLoadError
from xaid_server.explainers.gradients import gradient_session, gradient_source, output_name
from xaid_server.graphs.gradient import GRADIENT, TARGET
from xaid_server.graphs.gradient.store import cache_path, gradient_graph, shipped_problem
from xaid_server.model_config import parse_config
from xaid_server.runtime.model import LoadedModel

X = np.array([[0.5, -2.0]], dtype=np.float32)


def tanh_model() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Tanh", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
    )


def cached_model(tmp_path: Path, name: str = "model") -> LoadedModel:
    model = load(tmp_path, tanh_model(), name=name)
    return replace(model, factory=replace(CPU, gradient_cache=tmp_path / "cache"))


def gradient(model: LoadedModel) -> np.ndarray:
    session = gradient_session(model, output_name(model))
    (result,) = session.run([GRADIENT], {"x": X, TARGET: np.array([1])})
    return np.asarray(result)


def test_a_built_graph_is_cached_and_read_back(tmp_path: Path) -> None:
    first = cached_model(tmp_path, "first")
    expected = gradient(first)
    assert gradient_source(first) == "built"
    np.testing.assert_allclose(expected, [[0.0, 1 - np.tanh(-2.0) ** 2]], rtol=1e-6)
    path = cache_path(
        first.factory.gradient_cache or Path(), first.sha256, wrt="x", output="y", relu="standard"
    )
    assert path.is_file()
    second = cached_model(tmp_path, "second")  # same bytes, same sha256
    np.testing.assert_array_equal(gradient(second), expected)
    assert gradient_source(second) == "cache"


def test_an_unreadable_cache_file_is_rebuilt(tmp_path: Path) -> None:
    model = cached_model(tmp_path)
    path = cache_path(tmp_path / "cache", model.sha256, wrt="x", output="y", relu="standard")
    path.parent.mkdir()
    path.write_bytes(b"half a file")
    gradient(model)
    assert gradient_source(model) == "built"
    assert shipped_problem(path.read_bytes(), tanh_model()) is None


def test_an_unwritable_cache_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "cache").write_text("a file where the folder should be")
    model = cached_model(tmp_path)
    with caplog.at_level(logging.WARNING):
        gradient(model)
    assert gradient_source(model) == "built"
    assert "gradient graph cache not written" in caplog.text


def test_the_cache_key_separates_the_build_parameters(tmp_path: Path) -> None:
    keys = {
        cache_path(tmp_path, "0" * 64, wrt=wrt, output=output, relu=relu)
        for wrt in ("x", "h")
        for output in ("y", "z")
        for relu in ("standard", "guided")
    }
    assert len(keys) == 8


def test_a_shipped_graph_must_have_target_and_gradient(tmp_path: Path) -> None:
    model = tanh_model()
    shipped = tmp_path / "model.grad.onnx"
    onnx.save(model, shipped)
    built = gradient_graph(
        model.SerializeToString(), "0" * 64, wrt="x", output="y", relu="standard", shipped=shipped
    )
    assert built.source == "built"
    assert shipped_problem(shipped.read_bytes(), model) == (
        "its inputs are ['x'], expected ['target', 'x']"
    )
    assert shipped_problem(b"\xff\xff", model) == "it is not an ONNX model"
    shipped.write_bytes(built.data)
    again = gradient_graph(
        model.SerializeToString(), "0" * 64, wrt="x", output="y", relu="standard", shipped=shipped
    )
    assert again.source == "shipped"


def test_precision_is_strict_by_default_and_validated(tmp_path: Path) -> None:
    assert parse_config({}).precision == "strict"
    assert parse_config({"precision": "tf32"}).precision == "tf32"
    with pytest.raises(ModelLoadError, match="precision 'fast'"):
        parse_config({"precision": "fast"})
    # on the CPU the setting changes nothing: the session builds and answers the same
    strict = gradient(cached_model(tmp_path, "strict"))
    model = cached_model(tmp_path, "tf32")
    model = replace(model, config=replace(model.config, precision="tf32"))
    np.testing.assert_array_equal(gradient(model), strict)
