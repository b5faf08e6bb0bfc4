"""Explanations land on the object: the pointing game on freshly generated shapes images."""

from __future__ import annotations

import io

import grpc
import numpy as np
from PIL import Image

from xaid._codec import from_tensor, to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.demo.shapes import generate
from xaid_server.model_config import load_config
from xaid_server.preprocess import decode_image
from xaid_server.settings import DEMO_MODELS

IMAGES = 100
BATCH = 20


def model_inputs(images: np.ndarray) -> np.ndarray:
    config = load_config(DEMO_MODELS / "shapes" / "config.yaml")
    assert config.image is not None
    tensors = []
    for image in images:
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        tensors.append(decode_image(png.getvalue(), config.image)[0])
    return np.concatenate(tensors)


def test_occlusion_points_at_the_shape(server_address: str) -> None:
    images, _, masks = generate(np.random.default_rng(20261128), IMAGES)
    x = model_inputs(images)
    stub = xaid_pb2_grpc.ExplainerStub(grpc.insecure_channel(server_address))
    hits = 0
    for start in range(0, IMAGES, BATCH):
        reply = stub.Explain(
            xaid_pb2.ExplainRequest(
                model="shapes",
                inputs=[to_tensor(x[start : start + BATCH])],
                occlusion=xaid_pb2.Occlusion(),
            )
        )
        maps = from_tensor(reply.attribution).sum(axis=1)
        for row, heat in enumerate(maps):
            y, x_ = np.unravel_index(np.argmax(heat), heat.shape)
            hits += bool(masks[start + row][y, x_])
    assert hits >= 0.9 * IMAGES, f"pointing game: {hits}/{IMAGES}"
