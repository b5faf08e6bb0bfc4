"""The grpc_server_* series count every call of a method, whatever its status, call after call.

The interceptors look up each method's series once and reuse them; these checks make sure the
reused series still count every call, with the right status code, on a real server.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

PREDICT = "/xaid.v1.Explainer/Predict"
Counts = dict[tuple[str, str], float]


@pytest.fixture(scope="module")
def channel(server_address: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_address) as channel:
        yield channel


def predict_series(server: RunningServer) -> Counts:
    """(series, code) -> value for the Predict method: started, handled by code, timed."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    found: Counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("grpc_method") != "Predict":
                continue
            if sample.name in ("grpc_server_started_total", "grpc_server_handling_seconds_count"):
                found[(sample.name, "")] = sample.value
            elif sample.name == "grpc_server_handled_total":
                found[(sample.name, sample.labels["grpc_code"])] = sample.value
    return found


def test_every_predict_is_counted_once_with_its_code(
    demo_server: RunningServer, channel: grpc.Channel
) -> None:
    stub = xaid_pb2_grpc.ExplainerStub(channel)
    x = np.zeros((1, 3, 64, 64), dtype=np.float32)
    good = xaid_pb2.PredictRequest(model="shapes", inputs=[to_tensor(x)])
    # bytes in, bytes out: a request that cannot parse
    garbage: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(PREDICT)
    before = predict_series(demo_server)
    for _ in range(3):
        stub.Predict(good, timeout=30)
    codes = []
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as missing:
            stub.Predict(xaid_pb2.PredictRequest(model="no-such-model"), timeout=30)
        codes.append(missing.value.code())
    with pytest.raises(grpc.RpcError) as undecodable:
        garbage(b"\xff\xff\xff", timeout=30)
    codes.append(undecodable.value.code())
    after = predict_series(demo_server)

    assert codes == [
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
    ]
    delta = {key: after[key] - before.get(key, 0.0) for key in after}
    assert delta[("grpc_server_started_total", "")] == 6
    assert delta[("grpc_server_handling_seconds_count", "")] == 6
    assert delta[("grpc_server_handled_total", "OK")] == 3
    assert delta[("grpc_server_handled_total", "NOT_FOUND")] == 2
    assert delta[("grpc_server_handled_total", "INVALID_ARGUMENT")] == 1
    assert sum(v for (name, _), v in delta.items() if name == "grpc_server_handled_total") == 6
