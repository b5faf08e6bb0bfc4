"""`xaid gradgraph`: writes a loadable gradient graph, or says which op and node stop it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xaid.cli import main as xaid_main
from xaid_server.gradgraph import main
from xaid_server.graphs.gradient import GRADIENT, TARGET, WRT_VALUE
from xaid_server.settings import DEMO_MODELS

MODELS = DEMO_MODELS


def outputs(path: Path) -> list[str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in session.get_outputs()]


def test_writes_the_demo_cnn_gradient_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "model.grad.onnx"
    assert main([str(MODELS / "shapes" / "1" / "model.onnx"), "-o", str(destination)]) == 0
    summary = capsys.readouterr().out.strip()
    assert "\n" not in summary
    assert str(destination) in summary
    assert "Conv 9" in summary
    assert "nodes added" in summary
    assert outputs(destination) == ["logits", GRADIENT]


def test_intermediate_wrt_and_guided_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    destination = tmp_path / "tabular.grad.onnx"
    argv = [
        str(MODELS / "tabular" / "1" / "model.onnx"),
        "-o",
        str(destination),
        "--wrt",
        "/net/net.1/Relu_output_0",
        "--output",
        "logits",
        "--relu",
        "guided",
    ]
    assert main(argv) == 0
    assert "guided" in capsys.readouterr().out
    session = ort.InferenceSession(str(destination), providers=["CPUExecutionProvider"])
    feeds = {"input": np.zeros((3, 30), np.float32), TARGET: np.array([0, 1, 0])}
    gradient, value = session.run([GRADIENT, WRT_VALUE], feeds)
    assert gradient.shape == value.shape == (3, value.shape[1])


def test_missing_rule_names_op_and_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Det", ["x"], ["d"], name="determinant"),
            helper.make_node("Unsqueeze", ["d", "axes"], ["y"]),
        ],
        "det",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    source, destination = tmp_path / "det.onnx", tmp_path / "det.grad.onnx"
    onnx.save(model, source)
    assert main([str(source), "-o", str(destination)]) == 1
    assert "no gradient rule for op Det (node determinant)" in capsys.readouterr().err
    assert not destination.exists()


def test_unreadable_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x0bnot a model at all")
    for source in (tmp_path / "missing.onnx", garbage):
        assert main([str(source), "-o", str(tmp_path / "out.onnx")]) == 2
        assert "cannot read" in capsys.readouterr().err


def test_unknown_relu_rule_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["model.onnx", "-o", str(tmp_path / "out.onnx"), "--relu", "smooth"])
    assert exit_info.value.code == 2


def test_the_xaid_command_runs_gradgraph(tmp_path: Path) -> None:
    out = tmp_path / "tabular.grad.onnx"
    model = MODELS / "tabular" / "1" / "model.onnx"
    assert xaid_main(["gradgraph", str(model), "-o", str(out)]) == 0
    assert out.stat().st_size > 0
