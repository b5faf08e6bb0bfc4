"""The writer: one thread owns the SQLite connection and commits whatever has queued up as one
transaction (group commit), so the event loop never waits on the disk and many concurrent
requests share one fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xaid_server.audit import store
from xaid_server.errors import Unavailable
from xaid_server.metrics import Metrics

log = logging.getLogger(__name__)

MAX_GROUP = 1024  # records per transaction at most
NOT_DURABLE = (
    "audit trail unavailable: the record of this request could not be written, so no answer "
    "is returned"
)
Done = Callable[[BaseException | None], None]


@dataclass
class _Pending:
    body: dict[str, Any]
    done: Done | None


class AuditLog:
    """Append records from any thread; `record` awaits durability when the log is fail-closed."""

    def __init__(self, path: Path, metrics: Metrics, fail_closed: bool = False) -> None:
        self.path = path
        self.metrics = metrics
        self.fail_closed = fail_closed
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._connection: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._write, name="xaid-audit", daemon=True)
        self._thread.start()

    def append(self, body: dict[str, Any], done: Done | None = None) -> None:
        """Queue a record; `done` is called on the writer thread once it is durable or failed."""
        self._queue.put(_Pending(body, done))

    async def record(self, body: dict[str, Any]) -> None:
        """Fail-closed: return once the record is durable, else raise UNAVAILABLE.
        Fail-open: queue it and return at once."""
        if not self.fail_closed:
            self.append(body)
            return
        loop = asyncio.get_running_loop()
        durable: asyncio.Future[BaseException | None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, durable, error)

        self.append(body, done)
        if await asyncio.shield(durable) is not None:
            raise Unavailable(NOT_DURABLE)

    def close(self) -> None:
        """Write everything queued, then stop the writer (blocking: call it off the event loop)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _write(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            group: list[_Pending] = []
            if first is None:
                stopping = True
            else:
                group.append(first)
            while len(group) < MAX_GROUP:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    group.append(item)
            if group:
                self._commit(group)
        if self._connection is not None:
            self._connection.close()

    def _commit(self, group: list[_Pending]) -> None:
        error: BaseException | None = None
        try:
            if self._connection is None:
                self._connection = store.connect(self.path)
            store.append(self._connection, [p.body for p in group])
        except (sqlite3.Error, OSError) as exc:
            error = exc
            self.metrics.audit_write_failures.inc(len(group))
            log.error("audit log %s: %d record(s) not written: %s", self.path, len(group), exc)
            if self._connection is not None:
                self._connection.close()
                self._connection = None  # reopen on the next group
        else:
            self.metrics.audit_records.inc(len(group))
        for pending in group:
            if pending.done is not None:
                pending.done(error)


def _settle(future: asyncio.Future[BaseException | None], error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
