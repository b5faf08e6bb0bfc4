"""Out of memory during a request: one retry with half the chunk, then RESOURCE_EXHAUSTED.

On the CPU the same onnxruntime arena error a full GPU gives is produced for real by capping the
shared CPU arena (`--arena-max-bytes`); the model materialises 1 MiB per row inside the graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
from onnx import helper

import xaid
from tests.hardening.processes import ServerProcess
from tests.helpers import make_model

FEATURES, FAN_OUT = 256, 1024  # 1 MiB of float32 per row inside the graph
ARENA = 48 << 20  # 32 rows fit, 64 do not


def wide_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", FEATURES])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", FEATURES])
    nodes = [
        helper.make_node("Unsqueeze", ["x", "last"], ["x3"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Concat", ["xs", "fan"], ["shape"], axis=0),
        helper.make_node("Expand", ["x3", "shape"], ["wide"]),
        helper.make_node("ReduceMean", ["wide", "last"], ["y"], keepdims=0),
    ]
    constants = {"last": np.array([2], np.int64), "fan": np.array([FAN_OUT], np.int64)}
    return make_model(nodes, [x], [y], constants, opset=18)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("repository")
    for name, batch in (("halves", 64), ("never", 256)):
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(wide_model().SerializeToString())
        (root / name / "config.yaml").write_text(f"kind: tabular\nmax_batch_size: {batch}\n")
    with ServerProcess(
        "--models", str(root), "--arena-max-bytes", str(ARENA), "--poll-interval", "0"
    ) as server:
        server.wait_serving()
        yield server


def rows(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, FEATURES)).astype(np.float32)


def test_a_chunk_that_runs_out_of_memory_is_retried_at_half(server: ServerProcess) -> None:
    with xaid.Client(server.address) as client:
        x = rows(64)
        prediction = client.predict("halves", x)
        np.testing.assert_allclose(prediction.outputs["y"], x, rtol=1e-5, atol=1e-6)
        explanation = client.explain("halves", x[:1], "occlusion", window=[1], stride=[1])
        assert explanation.attribution.shape == (1, FEATURES)
        assert explanation.model_evaluations == 1 + FEATURES
    assert (
        server.metric("xaid_rejected_requests_total", {"method": "predict", "reason": "oom"}) == 0
    )


def test_out_of_memory_even_at_half_is_resource_exhausted_and_serving_goes_on(
    server: ServerProcess,
) -> None:
    with xaid.Client(server.address) as client:
        with pytest.raises(xaid.ResourceExhausted, match="out of memory"):
            client.predict("never", rows(256))
        with pytest.raises(xaid.ResourceExhausted, match="out of memory"):
            client.explain("never", rows(1), "occlusion", window=[1], stride=[1])
        assert client.predict("never", rows(8)).outputs["y"].shape == (8, FEATURES)
    labels = {"method": "predict", "reason": "oom"}
    assert server.metric("xaid_rejected_requests_total", labels) == 1
    labels = {"method": "explain", "reason": "oom"}
    assert server.metric("xaid_rejected_requests_total", labels) == 1
