"""Per-model ModelInfer statistics in Triton's shape: counts and summed durations in ns."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from xaid.oip import grpc_service_pb2 as oip


@dataclass
class _Counts:
    success: int = 0
    success_ns: int = 0
    fail: int = 0
    fail_ns: int = 0
    rows: int = 0
    last_ms: int = 0


class InferStatistics:
    """Success and failure counts and durations per (model, version) since the server started."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._lock = threading.Lock()

    def record(self, model: str, version: str, ns: int, rows: int | None) -> None:
        """One finished request; `rows` None means it failed."""
        with self._lock:
            counts = self._counts.setdefault((model, version), _Counts())
            if rows is None:
                counts.fail += 1
                counts.fail_ns += ns
            else:
                counts.success += 1
                counts.success_ns += ns
                counts.rows += rows
                counts.last_ms = time.time_ns() // 1_000_000

    def message(self, model: str, version: str) -> oip.ModelStatistics:
        with self._lock:
            counts = self._counts.get((model, version), _Counts())
            return oip.ModelStatistics(
                name=model,
                version=version,
                last_inference=counts.last_ms,
                inference_count=counts.rows,
                execution_count=counts.success,
                inference_stats=oip.InferStatistics(
                    success=oip.StatisticDuration(count=counts.success, ns=counts.success_ns),
                    fail=oip.StatisticDuration(count=counts.fail, ns=counts.fail_ns),
                ),
            )
