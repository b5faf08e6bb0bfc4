"""The chunk size at which a session evaluates rows fastest, measured once when a model loads.

A gradient graph keeps every activation of its forward pass. On a CPU, large chunks spill out of
the caches and cost more per row (the benchmarks' small ResNet: about 2.0 ms per row in chunks of
8 against 2.5 ms in chunks of 50), while a GPU is fastest at the largest chunk. Measuring on the
serving device settles both without a rule of thumb per provider.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import onnxruntime as ort

from xaid_server.runtime.runner import run_together

#: A larger chunk within this share of the fastest per-row time wins: fewer runs, same speed.
TOLERANCE = 0.05
#: Measuring stops at the first chunk size that takes the total past this many seconds.
BUDGET_S = 0.3

Feeds = Callable[[int], dict[str, np.ndarray]]


def fastest_chunk(
    session: ort.InferenceSession,
    feeds: Feeds,
    limit: int,
    budget_s: float = BUDGET_S,
    *,
    side_by_side: int = 1,
) -> tuple[int, float] | None:
    """(chunk size, seconds per row) among the powers of two up to `limit`.

    Each size runs once untimed (allocations) and twice timed, keeping the faster run, so a
    moment of other work on the machine does not decide the size. A size that fails (out of
    memory, typically) ends the search; None when not even one row runs. With `side_by_side`,
    each run is that many runs at once, as a lane session runs (runner.Lanes): they share the
    caches and the memory bus, which favours smaller chunks (the small ResNet on two cores: 4
    rows per lane, where one lane alone is fastest at 8).
    """
    per_row: dict[int, float] = {}
    began = time.perf_counter()
    size = 1
    while size <= max(1, limit):
        batch = feeds(size)
        try:
            run_together(session, batch, side_by_side)
            runs = []
            for _ in range(2):
                start = time.perf_counter()
                run_together(session, batch, side_by_side)
                runs.append(time.perf_counter() - start)
        except Exception:  # onnxruntime raises its own unexported exception types
            break
        per_row[size] = min(runs) / (size * side_by_side)
        if time.perf_counter() - began > budget_s:
            break
        size *= 2
    if not per_row:
        return None
    best = min(per_row.values())
    chosen = max(s for s, cost in per_row.items() if cost <= best * (1 + TOLERANCE))
    return chosen, per_row[chosen]
