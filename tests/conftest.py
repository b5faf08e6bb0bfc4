"""Shared fixtures: one real server on the bundled demo models for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.running_server import RunningServer


@pytest.fixture(scope="session")
def demo_server() -> Iterator[RunningServer]:
    server = RunningServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def server_address(demo_server: RunningServer) -> str:
    return demo_server.address
