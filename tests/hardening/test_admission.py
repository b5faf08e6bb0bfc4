"""Admission limits: a call over its method's limit is refused at once with a retry hint."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from tests.hardening.processes import health_stub
from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

ROWS = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
LONG = xaid_pb2.ExplainRequest(
    model="shapes",
    inputs=[to_tensor(np.zeros((4, 3, 64, 64), np.float32))],
    occlusion=xaid_pb2.Occlusion(window=[1, 1], stride=[1, 1]),
)


SHORT = xaid_pb2.ExplainRequest(
    model="tabular", inputs=[to_tensor(ROWS)], occlusion=xaid_pb2.Occlusion()
)


def refusal(call: Callable[..., object]) -> grpc.RpcError:
    try:
        call(LONG, timeout=10)
    except grpc.RpcError as error:
        return error
    raise AssertionError("the call was admitted")


def admitted(call: Callable[..., object]) -> bool:
    try:
        call(SHORT, timeout=10)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    server = RunningServer(explain_limit=1, predict_limit=2)
    yield server
    server.stop()


def rejected(server: RunningServer, method: str) -> float:
    labels = {"method": method, "reason": "limit"}
    value = server.server.metrics.registry.get_sample_value("xaid_rejected_requests_total", labels)
    return value or 0.0


def test_explain_over_its_limit_fails_fast_while_predict_and_health_answer(
    server: RunningServer,
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = xaid_pb2_grpc.ExplainerStub(channel)
        health = health_stub(channel)
        before = rejected(server, "explain")
        running = stub.Explain.future(LONG, timeout=60)
        time.sleep(0.3)
        for call in (stub.Explain, lambda *a, **k: list(stub.ExplainStream(*a, **k))):
            began = time.monotonic()
            error = refusal(call)
            assert time.monotonic() - began < 0.25
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = {m.key: m.value for m in error.trailing_metadata()}
            assert int(trailing["retry-after-ms"]) >= 10
            status = rpc_status.from_call(error)  # type: ignore[arg-type]
            assert status is not None
            info = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(info)
            assert info.retry_delay.ToMilliseconds() == int(trailing["retry-after-ms"])
        began = time.monotonic()
        reply = stub.Predict(xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(ROWS)]))
        assert reply.top
        check = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        assert not running.done()
        running.cancel()
        assert rejected(server, "explain") == before + 2
    deadline = time.monotonic() + 5
    with grpc.insecure_channel(server.address) as channel:
        short = xaid_pb2_grpc.ExplainerStub(channel).Explain
        while not admitted(short):  # the slot is free again once the cancelled call has left
            assert time.monotonic() < deadline
            time.sleep(0.05)
