"""A real xaid server on 127.0.0.1:0, running its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from pathlib import Path

from xaid_server.server import XaidServer
from xaid_server.settings import Settings


class RunningServer:
    def __init__(self, models: Path | None = None, **overrides: object) -> None:
        settings = Settings(port=0, metrics_port=0, poll_interval=0.0)
        if models is not None:
            settings = replace(settings, models=models)
        self.settings = replace(settings, **overrides)  # type: ignore[arg-type]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="xaid-test-server", daemon=True
        )
        self.thread.start()
        self.server = XaidServer(self.settings)
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(timeout=300)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def stop(self, grace: float = 1.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(timeout=60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
