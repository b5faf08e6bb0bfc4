"""24 reloads, good and broken versions alternating, under a steady 50 RPS Predict load."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np
from onnx import helper

from tests.hardening.test_model_files import with_external_weights
from tests.helpers import make_model
from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

ROWS = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
RATE = 50.0
RELOADS = 24
X = helper.make_tensor_value_info("x", 1, ["n", 30])
Y = helper.make_tensor_value_info("y", 1, ["n", 30])


def unknown_op() -> bytes:
    """Parses as ONNX, fails in onnxruntime (the probe process refuses it)."""
    x = helper.make_tensor_value_info("x", 1, ["n", 30])
    y = helper.make_tensor_value_info("y", 1, ["n", 2])
    node = helper.make_node("NoSuchOp", ["x"], ["y"], domain="xaid.test")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("xaid.test", 1)],
    )
    model.ir_version = 8
    return model.SerializeToString()


BROKEN: list[Callable[[], bytes]] = [
    lambda: b"not an onnx model" * 64,
    lambda: with_external_weights("../../../../etc/hostname"),
    unknown_op,
    lambda: make_model([helper.make_node("Neg", ["x"], ["y"])], [X], [Y]).SerializeToString()[:-9],
]


class Load:
    """Predict at a steady rate from a thread, keeping every answer's version and every error."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.versions: set[str] = set()
        self.failures: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        request = xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(ROWS)])
        with grpc.insecure_channel(self.address) as channel:
            predict = xaid_pb2_grpc.ExplainerStub(channel).Predict
            began = time.monotonic()
            while not self.stop.is_set():
                time.sleep(max(0.0, began + self.sent / RATE - time.monotonic()))
                self.sent += 1
                try:
                    self.versions.add(predict(request, timeout=10).version)
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")


def test_reloads_under_load_fail_no_request(tmp_path: Path) -> None:
    shutil.copytree(DEMO_MODELS / "tabular", tmp_path / "tabular")
    model = tmp_path / "tabular" / "1" / "model.onnx"
    good = model.read_bytes()
    server = RunningServer(tmp_path, poll_interval=0.05)
    metric = server.server.metrics.registry.get_sample_value
    load = Load(server.address)
    load.thread.start()
    broken_versions, good_versions = set(), {"1"}
    began = time.monotonic()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = xaid_pb2_grpc.ExplainerStub(channel)
            for version in range(2, 2 + RELOADS):
                folder = tmp_path / "tabular" / str(version)
                folder.mkdir()
                failures = metric(
                    "xaid_model_load_total", {"model": "tabular", "result": "failure"}
                )
                if version % 2:
                    (folder / "model.onnx").write_bytes(BROKEN[version // 2 % len(BROKEN)]())
                    broken_versions.add(str(version))
                    until(partial(failed_since, metric, failures or 0.0))
                else:
                    (folder / "model.onnx").write_bytes(good)
                    good_versions.add(str(version))
                    until(partial(serves, stub, str(version)))
    finally:
        load.stop.set()
        load.thread.join()
        server.stop()
    seconds = time.monotonic() - began
    assert load.failures == []
    assert load.sent >= 0.8 * RATE * seconds
    assert load.versions <= good_versions
    assert not load.versions & broken_versions
    assert len(load.versions) > RELOADS // 4  # the load really saw the versions switch


def failed_since(metric: Callable[..., float | None], before: float) -> bool:
    labels = {"model": "tabular", "result": "failure"}
    return (metric("xaid_model_load_total", labels) or 0.0) > before


def serves(stub: xaid_pb2_grpc.ExplainerStub, version: str) -> bool:
    return str(stub.GetModel(xaid_pb2.GetModelRequest(model="tabular")).version) == version


def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
