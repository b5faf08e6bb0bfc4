"""Deadlines and cancellation stop an explanation's work, not only its answer.

The server runs one evaluation worker, so a Predict answered promptly right after a long
explanation stops proves the worker was freed. A 16-image occlusion at window 1 is the long
explanation: 65,536 evaluations in chunks of 64, about ten seconds on two cores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

ROWS = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
LONG = xaid_pb2.ExplainRequest(
    model="shapes",
    inputs=[to_tensor(np.random.default_rng(0).standard_normal((16, 3, 64, 64), np.float32))],
    occlusion=xaid_pb2.Occlusion(window=[1, 1], stride=[1, 1]),
)
PREDICT = xaid_pb2.PredictRequest(model="tabular", inputs=[to_tensor(ROWS)])


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    server = RunningServer(workers=1, default_deadline=1.0)
    yield server
    server.stop()


@pytest.fixture
def stub(server: RunningServer) -> Iterator[xaid_pb2_grpc.ExplainerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield xaid_pb2_grpc.ExplainerStub(channel)


def cancelled(server: RunningServer, cause: str) -> float:
    labels = {"method": "explain", "cause": cause}
    value = server.server.metrics.registry.get_sample_value("xaid_cancelled_requests_total", labels)
    return value or 0.0


def worker_free_within(stub: xaid_pb2_grpc.ExplainerStub) -> float:
    """Seconds until the single worker answers a Predict."""
    began = time.monotonic()
    stub.Predict(PREDICT, timeout=30)
    return time.monotonic() - began


def test_a_cancelled_explanation_frees_its_worker(
    server: RunningServer, stub: xaid_pb2_grpc.ExplainerStub
) -> None:
    before = cancelled(server, "client")
    call = stub.Explain.future(LONG, timeout=60)
    time.sleep(1.0)
    assert not call.done(), "the explanation was meant to take about ten seconds"
    call.cancel()
    assert worker_free_within(stub) <= 0.5
    assert call.cancelled()
    deadline = time.monotonic() + 5
    while cancelled(server, "client") < before + 1:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.02)
    inflight = server.server.metrics.registry.get_sample_value(
        "xaid_inflight_requests", {"method": "explain"}
    )
    assert inflight == 0


def test_a_client_deadline_stops_the_work(
    server: RunningServer, stub: xaid_pb2_grpc.ExplainerStub
) -> None:
    before = cancelled(server, "deadline")
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(LONG, timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - began <= 1.1
    assert worker_free_within(stub) <= 0.5
    assert cancelled(server, "deadline") == before + 1


def test_the_server_default_deadline_answers_deadline_exceeded(
    server: RunningServer, stub: xaid_pb2_grpc.ExplainerStub
) -> None:
    """No client deadline: the server's default (1 s here) stops the work and answers."""
    before = cancelled(server, "deadline")
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Explain(LONG)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "deadline" in (caught.value.details() or "")
    assert time.monotonic() - began <= 1.1
    assert worker_free_within(stub) <= 0.5
    assert cancelled(server, "deadline") == before + 1


def test_a_streamed_explanation_cancelled_mid_way_stops(
    server: RunningServer, stub: xaid_pb2_grpc.ExplainerStub
) -> None:
    before = cancelled(server, "client")
    stream = stub.ExplainStream(LONG, timeout=60)
    began = time.monotonic()
    for message in stream:
        assert message.WhichOneof("kind") == "progress"
        if time.monotonic() - began > 0.5:
            stream.cancel()
            break
    assert worker_free_within(stub) <= 0.5
    deadline = time.monotonic() + 5
    while cancelled(server, "client") < before + 1:
        assert time.monotonic() < deadline, "the cancellation was not counted"
        time.sleep(0.02)
