"""Walking the chain: the first record whose hash, sequence or link does not hold."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xaid_server.audit import store
from xaid_server.audit.canonical import canonical, record_hash


@dataclass(frozen=True)
class Verdict:
    records: int  # records checked before the first broken one
    head: store.Link  # the last intact record: note it down to detect a truncated log later
    broken: int | None = None  # sequence number of the first broken record
    reason: str = ""
    triggers: bool = True  # the append-only triggers are in place

    @property
    def intact(self) -> bool:
        return self.broken is None and self.triggers


def _problem(seq: int, text: str, stored: str, expected: int, previous: str) -> str | None:
    """What is wrong with the row at `seq` (its body `text`, its hash `stored`), or None."""
    try:
        body = json.loads(text)
    except ValueError:
        return "the body is not JSON"
    if not isinstance(body, dict) or canonical(body).decode("utf-8") != text:
        return "the body is not canonical JSON"
    if seq != expected or body.get("seq") != seq:
        return f"expected record {expected} here: records were removed or renumbered"
    if body.get("prev_hash") != previous:
        return f"it does not link to record {seq - 1}: that record was changed or replaced"
    if record_hash(body) != stored:
        return "its hash does not match its content: the record was changed"
    return None


def verify(path: Path) -> Verdict:
    with contextlib.closing(store.open_readonly(path)) as connection:
        names = {
            row[0]
            for row in connection.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        }
        triggers = set(store.TRIGGERS) <= names
        head = store.Link()
        try:
            for seq, stored, text in connection.execute(
                "SELECT seq, hash, body FROM records ORDER BY seq"
            ):
                problem = _problem(seq, text, stored, head.seq + 1, head.hash)
                if problem is not None:
                    return Verdict(head.seq, head, seq, problem, triggers)
                head = store.Link(seq, stored)
        except sqlite3.DatabaseError as exc:
            reason = f"the file is damaged after record {head.seq}: {exc}"
            return Verdict(head.seq, head, head.seq + 1, reason, triggers)
    return Verdict(head.seq, head, triggers=triggers)


def _loads(text: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(text)
    return body


def read_record(path: Path, seq: int) -> dict[str, Any]:
    """One record, checked against its own hash."""
    with contextlib.closing(store.open_readonly(path)) as connection:
        row = connection.execute("SELECT hash, body FROM records WHERE seq = ?", (seq,)).fetchone()
    if row is None:
        raise LookupError(f"the log has no record {seq}")
    body = _loads(row[1])
    if record_hash(body) != row[0]:
        raise LookupError(f"record {seq} does not match its hash: run verify")
    return body
