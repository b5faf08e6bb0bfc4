"""A cap on onnxruntime's CPU memory: one arena shared by every session of the process.

An evaluation chunk that would pass the cap fails with onnxruntime's arena error, which the batch
runner answers by retrying with smaller chunks and then RESOURCE_EXHAUSTED, as on a GPU whose
memory is full. The arena belongs to the process, so the first cap set in a process holds.
"""

from __future__ import annotations

import logging
import threading

import onnxruntime as ort

log = logging.getLogger(__name__)

_lock = threading.Lock()
_registered: list[int] = []


def cap_cpu_arena(max_bytes: int) -> None:
    """Register the shared CPU arena with `max_bytes`; sessions opt in with env allocators."""
    with _lock:
        if _registered:
            if _registered[0] != max_bytes:
                log.warning("the CPU arena cap of this process stays %d bytes", _registered[0])
            return
        info = ort.OrtMemoryInfo(
            "Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT
        )
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(max_bytes, -1, -1, -1))
        _registered.append(max_bytes)
