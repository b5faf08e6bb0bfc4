"""`python -m xaid_server.healthcheck`, the image's HEALTHCHECK, against a real server."""

from __future__ import annotations

import pytest

from tests.running_server import RunningServer
from xaid_server.healthcheck import check, main


def test_serving_server_passes(demo_server: RunningServer) -> None:
    assert main(["--address", demo_server.address]) == 0
    assert check(demo_server.address, "xaid.v1.Explainer")


def test_default_address_follows_the_configured_port(
    demo_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XAID_PORT", str(demo_server.server.port))
    assert main([]) == 0


def test_unknown_service_and_unreachable_server_fail(
    demo_server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not check(demo_server.address, "no.such.Service")
    assert main(["--address", "127.0.0.1:1", "--timeout", "1"]) == 1
    assert "not serving" in capsys.readouterr().err


def test_bad_settings_are_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XAID_PORT", "fifty")
    assert main([]) == 2


def test_default_address_prefers_the_health_port(
    demo_server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XAID_PORT", "1")
    monkeypatch.setenv("XAID_HEALTH_PORT", str(demo_server.server.port))
    assert main([]) == 0
