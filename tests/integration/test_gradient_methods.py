"""The gradient methods through a real server's Explain on the demo models."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from xaid._codec import from_tensor, to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

EXAMPLES = DEMO_MODELS.parent / "examples"

# method -> (request message, the echoed parameters with defaults, evaluations per row)
METHODS: dict[str, tuple[Any, dict[str, Any], int]] = {
    "saliency": (xaid_pb2.Saliency(), {"abs": False}, 1),
    "gradient_x_input": (xaid_pb2.GradientXInput(), {}, 1),
    "integrated_gradients": (
        xaid_pb2.IntegratedGradients(),
        {"n_steps": 50, "integration_method": "gausslegendre", "baseline": 0.0},
        51,
    ),
    "smoothgrad": (
        xaid_pb2.SmoothGrad(),
        {"n_samples": 25, "noise_fraction": 0.15, "variant": "mean"},
        25,
    ),
    "guided_backprop": (xaid_pb2.GuidedBackprop(), {"rule": "guided"}, 1),
    "grad_cam": (xaid_pb2.GradCam(), {"relu": True}, 1),
}


@pytest.fixture(scope="module")
def stub(server_address: str) -> Iterator[xaid_pb2_grpc.ExplainerStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield xaid_pb2_grpc.ExplainerStub(channel)


def image() -> bytes:
    return sorted(EXAMPLES.glob("*.png"))[0].read_bytes()


def rows() -> np.ndarray:
    return np.asarray(np.load(EXAMPLES / "tabular.npy")[:2])


def echoed(reply: xaid_pb2.ExplainResponse, method: str) -> dict[str, Any]:
    assert reply.WhichOneof("method") == method
    message = getattr(reply, method)
    return {f.name: getattr(message, f.name) for f in message.DESCRIPTOR.fields}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_through_grpc(stub: xaid_pb2_grpc.ExplainerStub, method: str) -> None:
    message, defaults, per_row = METHODS[method]
    request = xaid_pb2.ExplainRequest(model="shapes", image=image(), render=True, seed=3)
    getattr(request, method).CopyFrom(message)
    reply = stub.Explain(request, timeout=120)
    attribution = from_tensor(reply.attribution)
    assert attribution.shape == (1, 3, 64, 64)
    assert np.isfinite(attribution).all()
    parameters = echoed(reply, method)
    for name, value in defaults.items():
        assert parameters[name] == pytest.approx(value), name
    if method == "grad_cam":
        assert parameters["layer"]
    assert reply.model_evaluations == 1 + per_row
    heatmap = Image.open(io.BytesIO(reply.heatmap_png[0]))
    assert heatmap.format == "PNG"
    assert heatmap.size == (64, 64)
    if method == "integrated_gradients":
        assert len(reply.convergence_delta) == 1


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"grad_cam"}))
def test_tabular_through_grpc(stub: xaid_pb2_grpc.ExplainerStub, method: str) -> None:
    message, defaults, per_row = METHODS[method]
    x = rows()
    request = xaid_pb2.ExplainRequest(model="tabular", inputs=[to_tensor(x)], seed=3)
    getattr(request, method).CopyFrom(message)
    reply = stub.Explain(request, timeout=120)
    assert from_tensor(reply.attribution).shape == x.shape
    parameters = echoed(reply, method)
    for name, value in defaults.items():
        assert parameters[name] == pytest.approx(value), name
    assert reply.model_evaluations == len(x) * (1 + per_row)
    if method == "integrated_gradients":
        assert len(reply.convergence_delta) == len(x)


def test_grad_cam_is_refused_for_the_tabular_model(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    request = xaid_pb2.ExplainRequest(
        model="tabular", inputs=[to_tensor(rows())], grad_cam=xaid_pb2.GradCam()
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_integrated_gradients_parameters_are_echoed_and_validated(
    stub: xaid_pb2_grpc.ExplainerStub,
) -> None:
    x = rows()
    given = xaid_pb2.IntegratedGradients(
        n_steps=10, integration_method="riemann_middle", baseline=0.5
    )
    request = xaid_pb2.ExplainRequest(
        model="tabular", inputs=[to_tensor(x)], integrated_gradients=given
    )
    reply = stub.Explain(request, timeout=60)
    assert reply.integrated_gradients == given
    assert reply.model_evaluations == len(x) * 12
    request.integrated_gradients.integration_method = "simpson"
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "integrated_gradients.integration_method" in (info.value.details() or "")


def test_smoothgrad_same_seed_same_answer(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    def run(seed: int) -> np.ndarray:
        request = xaid_pb2.ExplainRequest(
            model="shapes",
            image=image(),
            seed=seed,
            smoothgrad=xaid_pb2.SmoothGrad(n_samples=4),
        )
        reply = stub.Explain(request, timeout=60)
        assert reply.seed == seed
        return from_tensor(reply.attribution)

    first = run(11)
    np.testing.assert_array_equal(first, run(11))
    assert not np.array_equal(first, run(12))
