"""`xaid serve` in its own process, as users run it: start, wait for health, read metrics."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import urllib.request
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xaid_server import healthcheck

LISTENING = re.compile(r"xaid listening on [\d.]+:(\d+), metrics [\d.]+:(\d+)")
SERVING = health_pb2.HealthCheckResponse.SERVING


def health_stub(channel: grpc.Channel) -> Any:
    """The health stub (its generated module carries no method types)."""
    return health_pb2_grpc.HealthStub(channel)


class ServerProcess:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xaid", "serve", "--port", "0", "--metrics-port", "0", *args],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.log: list[str] = []
        self.port, self.metrics_port = self._ports()
        self.address = f"127.0.0.1:{self.port}"
        # keep reading the log, so a chatty server never blocks on a full pipe
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)

    def _ports(self) -> tuple[int, int]:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            match = LISTENING.search(line)
            if match:
                return int(match.group(1)), int(match.group(2))
        code = self.process.wait()
        self.process.stderr.close()
        raise AssertionError(f"server exited with {code} before listening: {self.log[-5:]}")

    def wait_serving(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthcheck.check(self.address, timeout=5):
                return
            time.sleep(0.05)
        raise AssertionError("server never became SERVING")

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample of the live /metrics scrape (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted((labels or {}).items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            metric, _, rest = key.partition("{")
            if metric == name and ",".join(sorted(rest.rstrip("}").split(","))) == wanted:
                return float(value)
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
