"""The one batched evaluation runner: every model evaluation of an explanation goes through here.

It owns chunking (by the model's max batch and a memory budget), the cancellation and deadline
checks between chunks, stopping the chunk in flight, the evaluation counter, and the answer to an
out-of-memory run: one retry with half the chunk, then RESOURCE_EXHAUSTED for that request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from xaid_server.errors import Cancelled, DeadlineExceeded, ResourceExhausted

log = logging.getLogger(__name__)

#: How onnxruntime reports an allocation failure: its arenas (CPU and CUDA), CUDA itself, C++.
OUT_OF_MEMORY = (
    "is smaller than requested bytes",
    "Failed to allocate memory",
    "out of memory",
    "std::bad_alloc",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)

ProgressCallback = Callable[[int, int], None]


@dataclass
class Job:
    """One request's share of the runner: its deadline, cancellation, progress and cost."""

    deadline: float | None = None  # time.monotonic() value
    progress: ProgressCallback | None = None
    total: int = 0
    evaluations: int = 0
    compute_seconds: float = 0.0
    _cancelled: str | None = None
    _in_flight: set[ort.RunOptions] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self, cause: str = "client") -> None:
        """Stop the job: the chunk in flight is terminated and no further chunk starts."""
        with self._lock:
            self._cancelled = cause
            for options in self._in_flight:
                options.terminate = True

    @property
    def cancel_cause(self) -> str | None:
        return self._cancelled

    def check(self) -> None:
        if self._cancelled == "deadline" or (
            self.deadline is not None and time.monotonic() >= self.deadline
        ):
            raise DeadlineExceeded("the explanation did not finish before the deadline")
        if self._cancelled is not None:
            raise Cancelled("the request was cancelled")

    def _start(self) -> ort.RunOptions:
        options = ort.RunOptions()
        with self._lock:
            options.terminate = self._cancelled is not None
            self._in_flight.add(options)
        return options

    def _finish(self, options: ort.RunOptions, count: int, seconds: float) -> None:
        with self._lock:
            self._in_flight.discard(options)
            self.evaluations += count
            self.compute_seconds += seconds
        if self.progress is not None:
            self.progress(self.evaluations, max(self.total, self.evaluations))

    def _spent(self, seconds: float) -> None:
        """Wall time of runs side by side, counted once rather than per lane."""
        with self._lock:
            self.compute_seconds += seconds


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or any(marker in text for marker in OUT_OF_MEMORY)


@dataclass(frozen=True)
class Lanes:
    """A single-threaded session of a graph and how many of its runs go side by side.

    onnxruntime splits work inside each operator; a gradient graph holds operators that do not
    split (a MaxPool that returns indices, MaxUnpool) and many small ones whose split costs more
    than it saves. On two cores, 51 integrated-gradients points on the benchmarks' small ResNet
    took 66 ms through one session on both cores and 53 ms as two single-threaded runs side by
    side. One run alone (saliency of one input) stays on the session that uses every core.
    """

    session: ort.InferenceSession
    count: int
    chunk: int  # rows per run, measured for this session


_lanes: ThreadPoolExecutor | None = None
_lane_threads = 0
_lanes_lock = threading.Lock()


def _lane_pool(count: int) -> ThreadPoolExecutor:
    """The lanes' threads, one process-wide pool: at most `count` runs side by side in all."""
    global _lanes, _lane_threads
    with _lanes_lock:
        if _lanes is None or _lane_threads < count:
            if _lanes is not None:
                _lanes.shutdown(wait=False)
            _lanes = ThreadPoolExecutor(count, thread_name_prefix="xaid-lane")
            _lane_threads = count
        return _lanes


def run_together(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], count: int = 1
) -> None:
    """`count` runs of the same feeds at once on the lanes' threads (one: on this thread)."""
    if count == 1:
        session.run(None, feeds)
        return
    pool = _lane_pool(count)
    for future in [pool.submit(session.run, None, feeds) for _ in range(count)]:
        future.result()


class BatchRunner:
    """Runs N evaluations of a session in chunks, concatenating each output along axis 0."""

    def __init__(self, max_chunk_bytes: int = 256 << 20) -> None:
        self.max_chunk_bytes = max_chunk_bytes

    def chunk_size(self, max_batch: int, item_bytes: int) -> int:
        """Largest chunk within the model's max batch and the memory budget (at least one)."""
        return max(1, min(max_batch, self.max_chunk_bytes // max(1, item_bytes)))

    def balanced_chunk(self, n: int, max_batch: int, item_bytes: int) -> int:
        """Equal chunks instead of full ones and a short tail: as many runs, each one smaller."""
        runs = -(-n // self.chunk_size(max_batch, item_bytes))
        return self.chunk_size(-(-n // runs), item_bytes)

    def run(
        self,
        session: ort.InferenceSession,
        batched: Mapping[str, np.ndarray],
        job: Job,
        *,
        fixed: Mapping[str, np.ndarray] | None = None,
        outputs: Sequence[str] | None = None,
        max_batch: int = 64,
        item_bytes: int = 0,
        lanes: Lanes | None = None,
    ) -> list[np.ndarray]:
        """Evaluate `batched` (same leading length N) in chunks, with `fixed` feeds in every run.

        `item_bytes` is the memory one evaluation materialises (e.g. one perturbed input), which
        bounds the chunk for inputs built on the device from small descriptions. With `lanes`,
        more than one row is split into that many contiguous parts, evaluated side by side on
        the lanes' session, each part in chunks of the lanes' size.
        """
        sizes = {len(v) for v in batched.values()}
        if len(sizes) != 1:
            raise ValueError("batched feeds must share their leading dimension")
        (n,) = sizes
        per_item = max(item_bytes, sum(v[:1].nbytes for v in batched.values()))
        names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
        if lanes is None or lanes.count < 2 or n < 2:
            parts = self._chunks(session, batched, job, fixed, names, max_batch, per_item)
        else:
            parts = self._side_by_side(lanes, batched, job, fixed, names, per_item)
        job.check()
        return [np.concatenate(p, axis=0) if p else np.empty((0,)) for p in parts]

    def _side_by_side(
        self,
        lanes: Lanes,
        batched: Mapping[str, np.ndarray],
        job: Job,
        fixed: Mapping[str, np.ndarray] | None,
        names: list[str],
        per_item: int,
    ) -> list[list[np.ndarray]]:
        """Each lane evaluates one contiguous part; the first failure is raised after all end."""
        n = len(next(iter(batched.values())))
        bounds = np.linspace(0, n, min(lanes.count, n) + 1).round().astype(int)
        pool = _lane_pool(lanes.count)
        began = time.perf_counter()
        futures = [
            pool.submit(
                self._chunks,
                lanes.session,
                {k: v[start:end] for k, v in batched.items()},
                job,
                fixed,
                names,
                lanes.chunk,
                per_item,
                timed=False,
            )
            for start, end in itertools.pairwise(bounds.tolist())
        ]
        wait(futures)
        job._spent(time.perf_counter() - began)
        results = [future.result() for future in futures]
        return [[piece for part in results for piece in part[i]] for i in range(len(names))]

    def _chunks(
        self,
        session: ort.InferenceSession,
        batched: Mapping[str, np.ndarray],
        job: Job,
        fixed: Mapping[str, np.ndarray] | None,
        names: list[str],
        max_batch: int,
        per_item: int,
        *,
        timed: bool = True,
    ) -> list[list[np.ndarray]]:
        """The rows in order, chunk by chunk: one list of pieces per output. `timed` adds each
        run's time to the job's compute seconds."""
        (n,) = {len(v) for v in batched.values()}
        step = self.chunk_size(max_batch, per_item)
        parts: list[list[np.ndarray]] = [[] for _ in names]
        start, retried = 0, False
        while start < n:
            job.check()
            feeds = {k: v[start : start + step] for k, v in batched.items()}
            if fixed:
                feeds.update(fixed)
            options = job._start()
            began = time.perf_counter()
            try:
                results = session.run(names, feeds, options)
            except Exception as exc:
                job._finish(options, 0, time.perf_counter() - began)
                job.check()  # a terminated run surfaces as the cancellation or deadline
                if not is_out_of_memory(exc):
                    raise
                if retried or step == 1:
                    raise ResourceExhausted(
                        "the model ran out of memory on this request even in smaller chunks"
                    ) from None
                log.warning("out of memory at %d rows per run; retrying with half", step)
                retried, step = True, -(-step // 2)  # once, with half the chunk from here on
                continue
            seconds = time.perf_counter() - began if timed else 0.0
            job._finish(options, len(next(iter(feeds.values()))), seconds)
            for part, result in zip(parts, results, strict=True):
                part.append(np.asarray(result))
            start += step
        return parts
