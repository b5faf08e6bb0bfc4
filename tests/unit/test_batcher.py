"""The dynamic batcher: one run for concurrent requests, each getting back its own rows."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from xaid_server.errors import Cancelled, DeadlineExceeded, InvalidArgument, ModelLoadError
from xaid_server.model_config import DynamicBatchingConfig, parse_config
from xaid_server.runtime.batcher import Batchers, DynamicBatcher
from xaid_server.runtime.runner import Job


class Model:
    """A stand-in for a model run: y = 2x + row sum, failing on NaN; records every batch."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.batches: list[int] = []
        self.block = block

    def run(self, feeds: Mapping[str, np.ndarray], job: Job) -> list[np.ndarray]:
        if self.block is not None:
            self.block.wait(5)
        x = feeds["x"]
        self.batches.append(len(x))
        if np.isnan(x).any():
            raise ValueError("NaN in the batch")
        return [2 * x, x.sum(axis=1)]


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def rows(start: int, n: int, width: int = 3) -> np.ndarray:
    return np.arange(start * width, (start + n) * width, dtype=np.float32).reshape(n, width)


def batcher(
    executor: ThreadPoolExecutor, max_batch: int = 64, delay_us: int = 0, preferred: int = 0
) -> DynamicBatcher:
    config = DynamicBatchingConfig(delay_us, (preferred,) if preferred else ())
    return DynamicBatcher(executor, max_batch, config)


def test_concurrent_requests_share_a_run_and_get_their_own_rows(
    executor: ThreadPoolExecutor,
) -> None:
    model = Model()

    async def main() -> list[list[np.ndarray]]:
        b = batcher(executor, delay_us=200_000, preferred=10)
        inputs = [rows(i, 1 + i % 3) for i in range(5)]  # 1+2+3+1+2 = 9 rows, then one more
        futures = [b.submit({"x": x}, Job(), model.run, "m") for x in inputs]
        futures.append(b.submit({"x": rows(9, 1)}, Job(), model.run, "m"))
        return list(await asyncio.gather(*futures))

    results = asyncio.run(main())
    assert model.batches == [10]
    expected = [rows(i, 1 + i % 3) for i in range(5)] + [rows(9, 1)]
    for (doubled, summed), x in zip(results, expected, strict=True):
        np.testing.assert_array_equal(doubled, 2 * x)
        np.testing.assert_array_equal(summed, x.sum(axis=1))


def test_batches_respect_the_max_batch_size_in_arrival_order(
    executor: ThreadPoolExecutor,
) -> None:
    model = Model()

    async def main() -> list[list[np.ndarray]]:
        b = batcher(executor, max_batch=4, delay_us=100_000)
        futures = [b.submit({"x": rows(i, 1)}, Job(), model.run, "m") for i in range(10)]
        return list(await asyncio.gather(*futures))

    results = asyncio.run(main())
    assert model.batches == [4, 4, 2]
    for i, (doubled, _) in enumerate(results):
        np.testing.assert_array_equal(doubled, 2 * rows(i, 1))


def test_a_lone_request_waits_at_most_the_queue_delay(executor: ThreadPoolExecutor) -> None:
    model = Model()

    async def main() -> float:
        b = batcher(executor, delay_us=50_000)
        began = time.perf_counter()
        await b.submit({"x": rows(0, 1)}, Job(), model.run, "m")
        return time.perf_counter() - began

    waited = asyncio.run(main())
    assert model.batches == [1]
    assert 0.045 <= waited < 2.0  # the delay, plus a margin for a busy machine


def test_a_full_batch_does_not_wait_for_the_delay(executor: ThreadPoolExecutor) -> None:
    model = Model()

    async def main() -> float:
        b = batcher(executor, max_batch=4, delay_us=30_000_000)
        began = time.perf_counter()
        await asyncio.gather(
            *(b.submit({"x": rows(i, 1)}, Job(), model.run, "m") for i in range(4))
        )
        return time.perf_counter() - began

    assert asyncio.run(main()) < 10.0
    assert model.batches == [4]


def test_the_request_that_fills_a_waiting_batch_dispatches_it(
    executor: ThreadPoolExecutor,
) -> None:
    model = Model()

    async def main() -> float:
        b = batcher(executor, max_batch=4, delay_us=30_000_000)
        first = b.submit({"x": rows(0, 1)}, Job(), model.run, "m")
        await asyncio.sleep(0.05)  # the batch is now waiting for more rows
        assert not first.done()
        assert model.batches == []
        began = time.perf_counter()
        rest = [b.submit({"x": rows(i, 1)}, Job(), model.run, "m") for i in range(1, 4)]
        await asyncio.gather(first, *rest)
        return time.perf_counter() - began

    assert asyncio.run(main()) < 10.0
    assert model.batches == [4]


def test_a_failing_request_fails_alone(executor: ThreadPoolExecutor) -> None:
    model = Model()
    bad = rows(1, 2)
    bad[1, 0] = np.nan

    async def main() -> list[object]:
        b = batcher(executor, delay_us=100_000, preferred=4)
        inputs = [rows(0, 1), bad, rows(3, 1)]
        futures = [b.submit({"x": x}, Job(), model.run, "m") for x in inputs]
        return list(await asyncio.gather(*futures, return_exceptions=True))

    good, failed, other = asyncio.run(main())
    assert model.batches == [4, 1, 2, 1]  # the shared run failed, then each ran alone
    assert isinstance(failed, ValueError)
    assert isinstance(good, list)
    assert isinstance(other, list)
    np.testing.assert_array_equal(good[0], 2 * rows(0, 1))
    np.testing.assert_array_equal(other[0], 2 * rows(3, 1))


def test_incompatible_requests_run_in_separate_batches(executor: ThreadPoolExecutor) -> None:
    model = Model()

    async def main() -> list[list[np.ndarray]]:
        b = batcher(executor, delay_us=50_000)
        futures = [
            b.submit({"x": rows(0, 1)}, Job(), model.run, "m"),
            b.submit({"x": rows(0, 1, width=5)}, Job(), model.run, "m"),  # other feature size
            b.submit({"x": rows(1, 1)}, Job(), model.run, "another version"),
            b.submit({"x": rows(2, 1)}, Job(), model.run, "m"),
        ]
        return list(await asyncio.gather(*futures))

    results = asyncio.run(main())
    assert sorted(model.batches) == [1, 1, 2]
    assert results[1][0].shape == (1, 5)
    np.testing.assert_array_equal(results[3][0], 2 * rows(2, 1))


def test_cancelled_and_expired_requests_do_not_run(executor: ThreadPoolExecutor) -> None:
    block = threading.Event()
    model = Model(block)

    async def main() -> list[object]:
        b = batcher(executor, max_batch=1)
        first = b.submit({"x": rows(0, 1)}, Job(), model.run, "m")  # occupies the model
        cancelled, expired = Job(), Job(deadline=time.monotonic() + 0.01)
        futures = [
            first,
            b.submit({"x": rows(1, 1)}, cancelled, model.run, "m"),
            b.submit({"x": rows(2, 1)}, expired, model.run, "m"),
            b.submit({"x": rows(3, 1)}, Job(), model.run, "m"),
        ]
        cancelled.cancel("client")
        await asyncio.sleep(0.05)
        block.set()
        return list(await asyncio.gather(*futures, return_exceptions=True))

    first, cancelled, expired, last = asyncio.run(main())
    assert isinstance(cancelled, Cancelled)
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(first, list)
    assert isinstance(last, list)
    assert model.batches == [1, 1]


def test_queue_time_is_observed_per_request(executor: ThreadPoolExecutor) -> None:
    seen: list[tuple[str, float]] = []
    batchers = Batchers(executor, lambda model, seconds: seen.append((model, seconds)))
    config = DynamicBatchingConfig(20_000)
    model = Model()

    async def main() -> None:
        b = batchers.get("m", 8, config)
        assert batchers.get("m", 8, config) is b
        assert batchers.get("m", 8, DynamicBatchingConfig(0)) is not b  # a reload changed it
        await asyncio.gather(*(b.submit({"x": rows(i, 1)}, Job(), model.run, 1) for i in range(3)))

    asyncio.run(main())
    assert [m for m, _ in seen] == ["m"] * 3
    assert all(0.0 <= s < 5.0 for _, s in seen)


def test_config_parses_dynamic_batching() -> None:
    config = parse_config(
        {
            "max_batch_size": 16,
            "dynamic_batching": {
                "max_queue_delay_microseconds": 500,
                "preferred_batch_size": [4, 8],
            },
        }
    )
    assert config.dynamic_batching == DynamicBatchingConfig(500, (4, 8))
    assert parse_config({"dynamic_batching": {}}).dynamic_batching == DynamicBatchingConfig()
    assert parse_config({}).dynamic_batching is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_batch_size": 1, "dynamic_batching": {}}, "max_batch_size of 2"),
        ({"dynamic_batching": {"max_queue_delay_us": 5}}, "unknown keys"),
        ({"dynamic_batching": {"preferred_batch_size": [128]}}, "preferred_batch_size"),
        ({"dynamic_batching": {"max_queue_delay_microseconds": -1}}, "negative"),
        ({"dynamic_batching": [1]}, "mapping"),
    ],
)
def test_config_rejects_bad_dynamic_batching(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_config(raw)


def test_errors_keep_their_type(executor: ThreadPoolExecutor) -> None:
    def refuse(feeds: Mapping[str, np.ndarray], job: Job) -> list[np.ndarray]:
        raise InvalidArgument("no", field="x")

    async def main() -> None:
        await batcher(executor).submit({"x": rows(0, 1)}, Job(), refuse, "m")

    with pytest.raises(InvalidArgument):
        asyncio.run(main())
