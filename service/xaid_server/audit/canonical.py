"""Canonical JSON and the record hash: what makes a record's bytes, and so its hash, unique."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64  # the previous hash of the first record


def jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses as objects, tuples as lists, numpy scalars as numbers,
    non-finite floats as strings (canonical JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} cannot be recorded")


def canonical(body: dict[str, Any]) -> bytes:
    """Sorted keys, no whitespace, UTF-8."""
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def record_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def utc_now() -> str:
    """ISO 8601 in UTC with microseconds, e.g. 2025-01-31T12:00:00.123456Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
