"""A sweep of malformed requests: only documented status codes, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import grpc
import numpy as np

from xaid._codec import DATATYPES
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

EXPECTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
REQUESTS = 300
DATATYPE_NAMES = [*DATATYPES, "FP128", "", "BYTES", "fp32"]


def random_tensor(rng: np.random.Generator) -> xaid_pb2.Tensor:
    rank = int(rng.integers(0, 5))
    shape = [int(d) for d in rng.choice([0, 1, 2, 3, 30, 64, -1, 2**40], size=rank)]
    datatype = str(rng.choice(DATATYPE_NAMES))
    size = int(rng.choice([0, 4, 120, 240, 49152, int(rng.integers(0, 5000))]))
    data = rng.standard_normal(size // 4 + 1).astype(np.float32).tobytes()[:size]
    if rng.random() < 0.2:
        data = np.full(size // 4, np.nan, np.float32).tobytes()
    return xaid_pb2.Tensor(
        name=str(rng.choice(["", "input", "other"])), datatype=datatype, shape=shape, data=data
    )


def random_request(rng: np.random.Generator) -> xaid_pb2.ExplainRequest:
    request = xaid_pb2.ExplainRequest(model=str(rng.choice(["shapes", "tabular", "", "x" * 300])))
    if rng.random() < 0.7:
        request.inputs.extend(random_tensor(rng) for _ in range(int(rng.integers(1, 3))))
    if rng.random() < 0.3:
        request.image = rng.bytes(int(rng.integers(0, 200)))
        if rng.random() < 0.5:
            request.image = b"\x89PNG\r\n\x1a\n" + request.image
    method = str(rng.choice(["occlusion", "occlusion", "saliency", "lime", ""]))
    if method == "occlusion":
        window = [
            int(v) for v in rng.choice([-1, 0, 1, 8, 65, 2**62], size=int(rng.integers(0, 4)))
        ]
        stride = [int(v) for v in rng.choice([-3, 0, 1, 4, 2**40], size=int(rng.integers(0, 4)))]
        request.occlusion.CopyFrom(xaid_pb2.Occlusion(window=window, stride=stride))
        if rng.random() < 0.3:
            request.occlusion.baseline = float(rng.choice([np.nan, np.inf, -1e308, 0.5]))
    elif method:
        getattr(request, method).SetInParent()
    if rng.random() < 0.3:
        request.target.class_index = int(rng.choice([-1, 0, 1, 9, 2**62]))
    if rng.random() < 0.2:
        request.target.output = str(rng.choice(["logits", "nope"]))
    request.render = bool(rng.random() < 0.3)
    request.evaluate = bool(rng.random() < 0.1)
    return request


def test_malformed_requests_get_documented_codes(server_address: str) -> None:
    rng = np.random.default_rng(7)
    codes: dict[grpc.StatusCode, int] = {}
    unexpected: list[tuple[grpc.StatusCode, str | None, xaid_pb2.ExplainRequest]] = []
    with grpc.insecure_channel(server_address) as channel:
        stub = xaid_pb2_grpc.ExplainerStub(channel)
        for _ in range(REQUESTS):
            request = random_request(rng)
            try:
                stub.Explain(request, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                if code not in EXPECTED:
                    unexpected.append((code, error.details(), request))
            codes[code] = codes.get(code, 0) + 1
        rows = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
        tensor = xaid_pb2.Tensor(datatype="FP32", shape=list(rows.shape), data=rows.tobytes())
        reply = stub.Predict(xaid_pb2.PredictRequest(model="tabular", inputs=[tensor]))
        assert reply.top
    assert unexpected == []
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > REQUESTS // 3
