"""Admission per method: a bounded number of calls at once; the rest fail fast with a retry hint.

Predict-like and Explain-like calls have separate limits, so a burst of explanations never
starves predictions; health and model listing are never limited. A refused call gets
RESOURCE_EXHAUSTED at once, with `google.rpc.RetryInfo` in its status details and the same
delay in the `retry-after-ms` trailing metadata: the recent mean duration of an admitted call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from xaid_server.interceptors import Handler, Stream, Unary, WrapOnce, rewrap, split_method
from xaid_server.metrics import Metrics
from xaid_server.requestid import with_request_id

#: The method names (of every service on the server) that each limit covers.
KINDS = {
    "Predict": "predict",
    "ModelInfer": "predict",
    "Explain": "explain",
    "ExplainStream": "explain",
}
MIN_HINT, MAX_HINT = 0.01, 60.0
SMOOTHING = 0.2  # weight of the latest duration in the running mean


class Gate:
    """One method's limit, calls in progress and running mean duration (event-loop only)."""

    def __init__(self, kind: str, limit: int, metrics: Metrics) -> None:
        self.kind = kind
        self.limit = limit
        self.metrics = metrics
        self.active = 0
        self.mean_seconds = 0.1

    def retry_after(self) -> float:
        return min(MAX_HINT, max(MIN_HINT, self.mean_seconds))

    def enter(self) -> float | None:
        """The start time, or None when the call is refused."""
        if self.limit > 0 and self.active >= self.limit:
            self.metrics.rejected.labels(self.kind, "limit").inc()
            return None
        self.active += 1
        return time.perf_counter()

    def leave(self, began: float) -> None:
        self.active -= 1
        seconds = time.perf_counter() - began
        self.mean_seconds += SMOOTHING * (seconds - self.mean_seconds)


async def refuse(gate: Gate, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    delay = gate.retry_after()
    message = f"{gate.kind}: {gate.limit} calls in progress, the server's limit; retry later"
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    hint = duration_pb2.Duration()
    hint.FromNanoseconds(int(delay * 1e9))
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=hint))
    trailing = (
        *rpc_status.to_status(status).trailing_metadata,
        ("retry-after-ms", str(max(1, round(delay * 1000)))),
    )
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, with_request_id(trailing))


class AdmissionInterceptor(WrapOnce):
    def __init__(self, limits: Mapping[str, int], metrics: Metrics) -> None:
        super().__init__()
        self.gates = {kind: Gate(kind, limit, metrics) for kind, limit in limits.items()}

    def wrap(self, method: str, handler: Handler) -> Handler:
        gate = self.gates.get(KINDS.get(split_method(method)[1], ""))
        if gate is None:
            return handler
        return rewrap(handler, lambda b: _unary(b, gate), lambda b: _stream(b, gate))


def _unary(behavior: Unary, gate: Gate) -> Unary:
    async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        began = gate.enter()
        if began is None:
            await refuse(gate, context)
        try:
            return await behavior(request, context)
        finally:
            gate.leave(began)

    return run


def _stream(behavior: Stream, gate: Gate) -> Stream:
    async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        began = gate.enter()
        if began is None:
            await refuse(gate, context)
        try:
            async for item in behavior(request, context):
                yield item
        finally:
            gate.leave(began)

    return run
