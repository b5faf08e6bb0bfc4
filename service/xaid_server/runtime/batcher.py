"""Dynamic batching: concurrent requests of one model share one model run, as in Triton.

Requests queue per model. One batch runs at a time; while it runs, new requests queue, so the
busier the model the bigger its batches. A batch is dispatched once its rows reach the largest
preferred batch size (else the model's max batch size) or once its oldest request has waited the
configured queue delay. Only requests with the same model version and the same input names,
datatypes and non-batch dimensions share a batch. Each request gets back its own rows; when a
batch fails, its requests are run one by one so that one bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from xaid_server.errors import XaidError
from xaid_server.model_config import DynamicBatchingConfig
from xaid_server.runtime.runner import Job

Feeds = Mapping[str, np.ndarray]
Outputs = list[np.ndarray]
#: Runs one batch (blocking, on the executor): the feeds of every request concatenated.
RunBatch = Callable[[Feeds, Job], Outputs]


def signature(feeds: Feeds) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """What requests must share to be concatenated: input names, dtypes and non-batch dims."""
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in feeds.items()))


@dataclass
class _Request:
    feeds: Feeds
    job: Job
    run: RunBatch
    group: Hashable
    future: asyncio.Future[Outputs]
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def rows(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


class DynamicBatcher:
    """The queue and dispatch loop of one model; the loop runs only while requests wait."""

    def __init__(
        self,
        executor: Executor,
        max_batch_size: int,
        config: DynamicBatchingConfig,
        observe_queue: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.config = config
        self.delay = config.max_queue_delay_microseconds / 1e6
        self.target = min(max(config.preferred_batch_size, default=max_batch_size), max_batch_size)
        self.observe_queue = observe_queue
        self._queue: deque[_Request] = deque()
        # resolved by the request that fills the batch being gathered
        self._full: asyncio.Future[None] | None = None
        self._loop_task: asyncio.Task[None] | None = None

    def submit(
        self, feeds: Feeds, job: Job, run: RunBatch, group: Hashable
    ) -> asyncio.Future[Outputs]:
        """Queue one request; the future resolves to its own rows of every output.

        `group` names what the feeds are run by (the model version): only requests with equal
        groups and equal input signatures share a batch. A request whose job is cancelled or
        past its deadline before its batch starts fails with the job's error, without running.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outputs] = loop.create_future()
        # a caller that went away never reads the outcome; read it so asyncio does not log it
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        self._queue.append(_Request(feeds, job, run, (group, signature(feeds)), future))
        full = self._full
        if full is not None and not full.done() and self._waiting_rows() >= self.target:
            full.set_result(None)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._dispatch())
        return future

    async def _dispatch(self) -> None:
        while self._queue:
            await self._gather()
            batch = self._take()
            if batch:
                await self._execute(batch)

    def _waiting_rows(self) -> int:
        head = self._queue[0].group
        return sum(r.rows for r in self._queue if r.group == head and not r.future.done())

    async def _gather(self) -> None:
        """Wait for more requests until the batch is full or its oldest one waited the delay.

        One future and one timer per batch: arrivals before the batch fills wake nothing.
        """
        remaining = self._queue[0].arrived + self.delay - time.perf_counter()
        if remaining <= 0 or self._waiting_rows() >= self.target:
            return
        loop = asyncio.get_running_loop()
        self._full = full = loop.create_future()
        timer = loop.call_later(remaining, _resolve, full)
        try:
            await full
        finally:
            timer.cancel()
            self._full = None

    def _take(self) -> list[_Request]:
        """The next batch: the oldest live request and the compatible ones after it that fit."""
        batch: list[_Request] = []
        rows = 0
        left: deque[_Request] = deque()
        for request in self._queue:
            if request.future.done():
                continue
            try:
                request.job.check()
            except XaidError as exc:
                request.future.set_exception(exc)
                continue
            fits = not batch or (
                request.group == batch[0].group and rows + request.rows <= self.max_batch_size
            )
            if fits:
                batch.append(request)
                rows += request.rows
            else:
                left.append(request)
        self._queue = left
        return batch

    async def _execute(self, batch: list[_Request]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for request in batch:
            self.observe_queue(started - request.arrived)
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {
                name: np.concatenate([r.feeds[name] for r in batch]) for name in batch[0].feeds
            }
        # the batch's own job: one request's cancellation must not stop the others' run
        try:
            outputs = await loop.run_in_executor(self.executor, batch[0].run, feeds, Job())
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0], exc)
                return
            outputs = None
        rows = [r.rows for r in batch]
        total = sum(rows)
        if outputs is None or any(o.ndim == 0 or o.shape[0] != total for o in outputs):
            for request in batch:  # alone, so that a failure stays with its own request
                await self._execute([request])
            return
        start = 0
        for request, n in zip(batch, rows, strict=True):
            _settle(request, [o[start : start + n] for o in outputs])
            start += n


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(request: _Request, outcome: Outputs | BaseException) -> None:
    if request.future.done():  # the caller went away meanwhile
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)


class Batchers:
    """One batcher per model name, replaced when a reload brings another batching config."""

    def __init__(self, executor: Executor, observe_queue: Callable[[str, float], None]) -> None:
        self.executor = executor
        self.observe_queue = observe_queue
        self._by_model: dict[str, DynamicBatcher] = {}

    def get(self, model: str, max_batch_size: int, config: DynamicBatchingConfig) -> DynamicBatcher:
        batcher = self._by_model.get(model)
        if batcher is None or (batcher.max_batch_size, batcher.config) != (max_batch_size, config):
            batcher = DynamicBatcher(
                self.executor,
                max_batch_size,
                config,
                lambda seconds: self.observe_queue(model, seconds),
            )
            self._by_model[model] = batcher
        return batcher
