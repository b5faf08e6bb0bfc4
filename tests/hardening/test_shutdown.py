"""SIGTERM with six explanations in flight: NOT_SERVING at once, the six finish, exit 0."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from tests.hardening.processes import ServerProcess, health_stub
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

GRACE = 20.0
IN_FLIGHT = 6
EXPLAIN = xaid_pb2.ExplainRequest(
    model="shapes",
    inputs=[to_tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64), np.float32))],
    occlusion=xaid_pb2.Occlusion(window=[2, 2], stride=[2, 2]),
)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def watch(
    address: str, changes: list[tuple[float, int]], ready: threading.Event, done: threading.Event
) -> None:
    """Health changes as a watching probe sees them; a watch left open would hold the drain."""
    with grpc.insecure_channel(address) as channel:
        stream = health_stub(channel).Watch(health_pb2.HealthCheckRequest())
        threading.Thread(target=lambda: done.wait() and stream.cancel(), daemon=True).start()
        try:
            for reply in stream:
                changes.append((time.monotonic(), reply.status))
                ready.set()
        except grpc.RpcError:
            pass  # the server ends the stream when it stops


def test_sigterm_drains_in_flight_explanations() -> None:
    with ServerProcess("--grace-period", str(GRACE), "--poll-interval", "0") as server:
        server.wait_serving()
        changes: list[tuple[float, int]] = []
        ready, done = threading.Event(), threading.Event()
        watcher = threading.Thread(target=watch, args=(server.address, changes, ready, done))
        watcher.start()
        assert ready.wait(30)
        with grpc.insecure_channel(server.address) as channel:
            stub = xaid_pb2_grpc.ExplainerStub(channel)
            calls = [stub.Explain.future(EXPLAIN, timeout=60) for _ in range(IN_FLIGHT)]
            deadline = time.monotonic() + 30
            while server.metric("xaid_inflight_requests", {"method": "explain"}) < IN_FLIGHT:
                assert time.monotonic() < deadline, "the explanations never got in flight"
                time.sleep(0.01)
            assert not any(call.done() for call in calls)
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not any(status == NOT_SERVING for _, status in changes):
                assert time.monotonic() < deadline, "health never said NOT_SERVING"
                time.sleep(0.005)
            noticed = next(t for t, status in changes if status == NOT_SERVING)
            assert noticed - sent <= 0.5
            done.set()
            assert not all(call.done() for call in calls)
            with grpc.insecure_channel(server.address) as fresh:
                try:
                    xaid_pb2_grpc.ExplainerStub(fresh).ListModels(
                        xaid_pb2.ListModelsRequest(), timeout=5
                    )
                    refused = None
                except grpc.RpcError as error:
                    refused = error.code()
            assert refused == grpc.StatusCode.UNAVAILABLE
            for call in calls:
                assert call.result().model_evaluations == 1 + 32 * 32
        assert server.process.wait(timeout=GRACE + 2) == 0
        assert time.monotonic() - sent <= GRACE + 2
        watcher.join(timeout=10)
