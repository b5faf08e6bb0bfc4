"""Shared fixtures: one real server on the bundled demo models for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.running_server import RunningServer
from xaid_server.settings import DEMO_MODELS


@pytest.fixture(scope="session")
def demo_server() -> Iterator[RunningServer]:
    server = RunningServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_address(demo_server: RunningServer) -> str:
    return demo_server.address


@pytest.fixture(scope="session")
def image_path() -> Path:
    """A bundled example picture for the shapes model."""
    pngs = sorted((DEMO_MODELS.parent / "examples").glob("*.png"))
    assert pngs, "no example PNGs bundled"
    return pngs[0]
