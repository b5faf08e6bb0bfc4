"""`xaid serve` as a process: start-up, health, SIGTERM, and a fatal --require-gpu."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xaid_server.runtime.providers import CUDA, probe_providers

LISTENING = re.compile(r"xaid listening on [\d.]+:(\d+)")


@pytest.fixture
def serve() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def start(started: list[subprocess.Popen[str]], *args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "xaid", "serve", "--port", "0", "--metrics-port", "-1", *args],
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(process)
    return process


def wait_for_port(process: subprocess.Popen[str]) -> int:
    assert process.stderr is not None
    for line in process.stderr:
        match = LISTENING.search(line)
        if match:
            return int(match.group(1))
    raise AssertionError(f"server exited with {process.wait()} before listening")


def test_sigterm_drains_and_exits_zero(serve: list[subprocess.Popen[str]]) -> None:
    process = start(serve, "--grace-period", "2")
    port = wait_for_port(process)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health: object = health_pb2_grpc.HealthStub(channel)
        check = health.Check  # type: ignore[attr-defined]
        deadline = time.monotonic() + 120
        status: int = health_pb2.HealthCheckResponse.UNKNOWN
        while time.monotonic() < deadline and status != health_pb2.HealthCheckResponse.SERVING:
            status = check(health_pb2.HealthCheckRequest(), timeout=5).status
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.SERVING
    began = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - began < 2 + 2


@pytest.mark.skipif(probe_providers(False)[0] == CUDA, reason="CUDA works on this machine")
def test_require_gpu_is_fatal_without_cuda(serve: list[subprocess.Popen[str]]) -> None:
    process = start(serve, "--require-gpu")
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "--require-gpu" in err
    assert "Traceback" not in err


def test_bad_settings_are_a_usage_error(serve: list[subprocess.Popen[str]]) -> None:
    process = start(serve, "--workers", "many")
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2
    assert "workers" in err


def test_a_missing_repository_is_a_clear_error(
    serve: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    process = start(serve, "--models", str(tmp_path / "absent"))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert "is not a folder" in err
    assert "Traceback" not in err
    assert "never awaited" not in err
