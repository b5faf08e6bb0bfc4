"""A real scrape of the demo server after a Predict and an Explain, shared by the deploy checks."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

import xaid
from tests.running_server import RunningServer


@pytest.fixture(scope="session")
def scrape(demo_server: RunningServer) -> str:
    image = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    with xaid.Client(demo_server.address, timeout=120) as client:
        client.predict("shapes", image)
        client.explain("shapes", image, "occlusion")
    with urllib.request.urlopen(demo_server.metrics_url, timeout=10) as reply:
        text: str = reply.read().decode()
    return text
