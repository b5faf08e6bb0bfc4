"""The model repository on disk: layout, version choice, lookups and hot reload."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from xaid_server.errors import ModelLoadError, NotFound
from xaid_server.metrics import Metrics
from xaid_server.model_config import ModelConfig
from xaid_server.repository import ModelRepository
from xaid_server.runtime.model import LoadedModel, SessionFactory

CPU = SessionFactory(("CPUExecutionProvider",))
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def _model_bytes(factor: float) -> bytes:
    """y = x * factor over x [N, 4] with a dynamic batch."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "factor"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [onnx.numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Repo:
    """A repository folder with its ModelRepository and metrics."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)
        self.metrics = Metrics()
        self.repository = ModelRepository(root, CPU, self.metrics)
        self._tick = 1_700_000_000_000_000_000

    def write(self, name: str, version: str, content: bytes | float) -> Path:
        """Write a model file with an mtime distinct from every earlier write."""
        path = self.root / name / version / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_model_bytes(content) if isinstance(content, float) else content)
        self.touch(path)
        return path

    def config(self, name: str, text: str | bytes) -> Path:
        path = self.root / name / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        self.touch(path)
        return path

    def touch(self, path: Path) -> None:
        self._tick += 1_000_000_000
        os.utime(path, ns=(self._tick, self._tick))

    def scan(self) -> ModelRepository:
        self.repository.scan()
        return self.repository

    def names(self) -> list[str]:
        return [m.name for m in self.repository.models()]

    def sample(self, metric: str, labels: dict[str, str]) -> float | None:
        value = self.metrics.registry.get_sample_value(metric, labels)
        return None if value is None else float(value)

    def loads(self, name: str, result: str) -> float:
        return self.sample("xaid_model_load_total", {"model": name, "result": result}) or 0.0

    def ready(self, name: str) -> float | None:
        return self.sample("xaid_model_ready", {"model": name})

    def info(self, model: LoadedModel) -> float | None:
        return self.sample(
            "xaid_model_info",
            {
                "model": model.name,
                "version": model.version,
                "sha256": model.sha256[:12],
                "provider": model.provider,
            },
        )


def _run(model: LoadedModel) -> np.ndarray:
    return np.asarray(model.session.run(None, {"x": X})[0])


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    return Repo(tmp_path / "models")


def test_only_a_model_file_is_served_with_defaults(repo: Repo) -> None:
    repo.write("plain", "1", 2.0)
    model = repo.scan().get("plain")
    assert (model.name, model.version) == ("plain", "1")
    assert model.path == repo.root / "plain" / "1" / "model.onnx"
    assert model.config.kind == "tabular"
    assert model.config.input == "x"
    assert model.config.output == "y"
    assert model.config.max_batch_size == ModelConfig().max_batch_size
    assert model.config.labels == ()
    np.testing.assert_array_equal(_run(model), X * 2)
    assert repo.loads("plain", "success") == 1.0
    assert repo.ready("plain") == 1.0
    assert repo.info(model) == 1.0


def test_config_yaml_is_applied(repo: Repo) -> None:
    repo.write("m", "1", 2.0)
    repo.config("m", "labels: [a, b, c, d]\nmax_batch_size: 8\n")
    model = repo.scan().get("m")
    assert model.config.labels == ("a", "b", "c", "d")
    assert model.config.max_batch_size == 8


def test_newest_version_is_served(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("m", "2", 2.0)
    model = repo.scan().get("m")
    assert model.version == "2"
    np.testing.assert_array_equal(_run(model), X * 2)


def test_versions_are_compared_as_numbers(repo: Repo) -> None:
    repo.write("m", "9", 9.0)
    repo.write("m", "10", 10.0)
    assert repo.scan().get("m").version == "10"


def test_non_numeric_folders_and_stray_files_are_ignored(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("m", "latest", 5.0)
    repo.write("m", "v7", 7.0)
    (repo.root / "m" / "8").mkdir()  # a version folder without a model file
    (repo.root / "m" / "9").write_text("not a folder", encoding="utf-8")
    (repo.root / "README.txt").write_text("not a model", encoding="utf-8")
    (repo.root / "m" / "model.onnx").write_bytes(_model_bytes(3.0))
    repo.scan()
    assert repo.names() == ["m"]
    assert repo.repository.get("m").version == "1"


def test_folders_without_versions_are_ignored(repo: Repo) -> None:
    (repo.root / "empty").mkdir()
    repo.write("m", "1", 1.0)
    repo.scan()
    assert repo.names() == ["m"]


@pytest.mark.parametrize("name", [".hidden", "_private", "-dash", "bad name", "x" * 129])
def test_invalid_model_names_are_ignored(repo: Repo, name: str) -> None:
    repo.write(name, "1", 1.0)
    repo.write("ok", "1", 1.0)
    repo.scan()
    assert repo.names() == ["ok"]
    assert repo.loads(name, "failure") == 0.0


def test_valid_model_names(repo: Repo) -> None:
    for name in ("resnet-50", "a.b_c", "9lives", "X" * 128):
        repo.write(name, "1", 1.0)
    repo.scan()
    assert repo.names() == sorted(["resnet-50", "a.b_c", "9lives", "X" * 128])


def test_models_are_sorted_by_name(repo: Repo) -> None:
    for name in ("zeta", "alpha", "mid"):
        repo.write(name, "1", 1.0)
    repo.scan()
    assert repo.names() == ["alpha", "mid", "zeta"]


def test_get_unknown_model(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.scan()
    with pytest.raises(NotFound) as info:
        repo.repository.get("other")
    assert info.value.field == "model"
    assert "other" in info.value.message


def test_get_wrong_version(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("m", "2", 2.0)
    repo.scan()
    with pytest.raises(NotFound) as info:
        repo.repository.get("m", "1")
    assert info.value.field == "version"
    assert repo.repository.get("m", "2").version == "2"
    assert repo.repository.get("m", "").version == "2"


def test_empty_repository(repo: Repo) -> None:
    repo.scan()
    assert repo.repository.models() == []


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "absent", CPU, Metrics())
    with pytest.raises(ModelLoadError):
        repository.scan()


def test_unchanged_files_are_not_reloaded(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    first = repo.scan().get("m")
    assert repo.scan().get("m") is first
    assert repo.loads("m", "success") == 1.0


def test_new_version_is_switched_in(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("m", "2", 2.0)
    old = repo.scan().get("m")
    repo.write("m", "3", 3.0)
    assert repo.repository.get("m") is old  # nothing changes before the next scan
    new = repo.scan().get("m")
    assert new.version == "3"
    np.testing.assert_array_equal(_run(new), X * 3)
    assert repo.loads("m", "success") == 2.0
    assert repo.info(new) == 1.0
    assert repo.info(old) is None
    with pytest.raises(NotFound):
        repo.repository.get("m", "2")


def test_changed_model_file_is_reloaded(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    old = repo.scan().get("m")
    repo.write("m", "1", 4.0)
    new = repo.scan().get("m")
    assert new is not old
    assert new.sha256 != old.sha256
    np.testing.assert_array_equal(_run(new), X * 4)


def test_changed_config_is_reloaded(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.config("m", "labels: [a, b, c, d]\n")
    old = repo.scan().get("m")
    repo.config("m", "labels: [e, f, g, h]\n")
    new = repo.scan().get("m")
    assert new is not old
    assert new.config.labels == ("e", "f", "g", "h")


def test_garbage_replacement_keeps_the_old_version_serving(repo: Repo) -> None:
    path = repo.write("m", "1", 2.0)
    old = repo.scan().get("m")
    repo.write("m", "1", b"garbage, not a model" * 10)
    assert repo.scan().get("m") is old
    np.testing.assert_array_equal(_run(old), X * 2)
    assert repo.loads("m", "failure") == 1.0
    assert repo.ready("m") == 1.0
    assert repo.info(old) == 1.0

    # The same broken file is not retried (nor counted) on every scan.
    assert repo.scan().get("m") is old
    assert repo.loads("m", "failure") == 1.0

    # Fixing the file loads it.
    repo.write("m", "1", 5.0)
    fixed = repo.scan().get("m")
    assert fixed is not old
    assert fixed.path == path
    np.testing.assert_array_equal(_run(fixed), X * 5)
    assert repo.loads("m", "success") == 2.0
    assert repo.loads("m", "failure") == 1.0


def test_served_model_builds_graphs_from_its_own_bytes(repo: Repo) -> None:
    repo.write("m", "1", 2.0)
    old = repo.scan().get("m")
    repo.write("m", "1", b"garbage, not a model" * 10)
    assert repo.scan().get("m") is old
    session = old.evaluation_graph("identity", lambda proto: proto)
    np.testing.assert_array_equal(session.run(None, {"x": X})[0], X * 2)


def test_broken_new_version_keeps_the_previous_one(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    old = repo.scan().get("m")
    repo.write("m", "2", b"\x00\x01\x02 not onnx")
    assert repo.scan().get("m") is old
    assert repo.loads("m", "failure") == 1.0
    repo.write("m", "2", 2.0)
    assert repo.scan().get("m").version == "2"


def test_broken_first_version_is_not_served(repo: Repo) -> None:
    repo.write("m", "1", b"garbage")
    repo.write("ok", "1", 1.0)
    repo.scan()
    assert repo.names() == ["ok"]
    assert repo.loads("m", "failure") == 1.0
    with pytest.raises(NotFound):
        repo.repository.get("m")


def test_symlinked_model_file_is_refused(repo: Repo, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(_model_bytes(2.0))
    link = repo.root / "linked" / "1" / "model.onnx"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    repo.scan()
    assert repo.names() == []
    assert repo.loads("linked", "failure") == 1.0


def test_symlinked_new_version_keeps_the_old_one(repo: Repo, tmp_path: Path) -> None:
    repo.write("m", "1", 1.0)
    old = repo.scan().get("m")
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(_model_bytes(2.0))
    link = repo.root / "m" / "2" / "model.onnx"
    link.parent.mkdir()
    link.symlink_to(outside)
    assert repo.scan().get("m") is old


def test_removed_model_is_unloaded(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("keep", "1", 1.0)
    model = repo.scan().get("m")
    shutil.rmtree(repo.root / "m")
    repo.scan()
    assert repo.names() == ["keep"]
    with pytest.raises(NotFound) as info:
        repo.repository.get("m")
    assert info.value.field == "model"
    assert repo.ready("m") == 0.0
    assert repo.info(model) is None


def test_removed_newest_version_falls_back(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.write("m", "2", 2.0)
    assert repo.scan().get("m").version == "2"
    shutil.rmtree(repo.root / "m" / "2")
    assert repo.scan().get("m").version == "1"


def test_readded_model_is_served_again(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.scan()
    shutil.rmtree(repo.root / "m")
    repo.scan()
    repo.write("m", "1", 1.0)
    assert repo.scan().get("m").version == "1"
    assert repo.ready("m") == 1.0


@pytest.mark.parametrize(
    "text",
    [
        "kind: [unclosed\n",  # not YAML
        "- a list\n- not a mapping\n",
        "colour: blue\n",  # unknown key
        "kind: audio\n",
        "output: logits\n",  # not a model output
        "image: {height: 8, width: 8, layout: CHW}\n",
    ],
    ids=["yaml", "list", "unknown-key", "kind", "output", "layout"],
)
def test_broken_config_keeps_a_new_model_out(repo: Repo, text: str) -> None:
    repo.write("m", "1", 1.0)
    repo.config("m", text)
    repo.scan()
    assert repo.names() == []
    assert repo.loads("m", "failure") == 1.0


def test_broken_config_keeps_the_old_version_serving(repo: Repo) -> None:
    repo.write("m", "1", 1.0)
    repo.config("m", "labels: [a, b, c, d]\n")
    old = repo.scan().get("m")
    repo.config("m", "labels: [a, b, c, d]\nnot_a_setting: 1\n")
    assert repo.scan().get("m") is old
    assert repo.loads("m", "failure") == 1.0
    repo.config("m", "labels: [w, x, y, z]\n")
    assert repo.scan().get("m").config.labels == ("w", "x", "y", "z")


def test_non_utf8_config_keeps_only_that_model_out(repo: Repo) -> None:
    repo.write("a", "1", 1.0)
    repo.config("a", b"\xff\xfe labels: [a]\n")
    repo.write("b", "1", 1.0)
    repo.scan()
    assert repo.names() == ["b"]
    assert repo.loads("a", "failure") == 1.0


def test_prepare_failure_keeps_the_model_out(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(_model_bytes(1.0))
    prepared: list[str] = []

    def prepare(model: LoadedModel) -> None:
        prepared.append(model.name)
        raise ModelLoadError("cannot prepare")

    metrics = Metrics()
    repository = ModelRepository(root, CPU, metrics, prepare)
    repository.scan()
    assert repository.models() == []
    assert prepared == ["m"]
    value = metrics.registry.get_sample_value(
        "xaid_model_load_total", {"model": "m", "result": "failure"}
    )
    assert value == 1.0


def test_prepare_runs_before_publishing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "1" / "model.onnx").write_bytes(_model_bytes(1.0))
    repository: ModelRepository
    seen: list[bool] = []

    def prepare(model: LoadedModel) -> None:
        seen.append(model.name in {m.name for m in repository.models()})

    repository = ModelRepository(root, CPU, Metrics(), prepare)
    repository.scan()
    assert seen == [False]
    assert [m.name for m in repository.models()] == ["m"]
