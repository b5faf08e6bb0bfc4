"""The SQLite file: schema, append-only triggers, and appending a group of chained records.

A row holds the record's canonical JSON (`body`) and sha256 of it (`hash`); the body carries its
sequence number and the previous record's hash, so editing, inserting or deleting a row breaks
the chain from there on.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xaid_server.audit.canonical import GENESIS, canonical, record_hash

APPEND_ONLY = "audit records are append-only"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS records (
    seq INTEGER PRIMARY KEY,
    hash TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS records_no_update BEFORE UPDATE ON records
BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
CREATE TRIGGER IF NOT EXISTS records_no_delete BEFORE DELETE ON records
BEGIN SELECT RAISE(ABORT, '{APPEND_ONLY}'); END;
"""
TRIGGERS = ("records_no_delete", "records_no_update")


@dataclass(frozen=True)
class Link:
    """The end of the chain: the next record follows it."""

    seq: int = 0
    hash: str = GENESIS


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating) the log: WAL, a full fsync on every commit, the triggers in place."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.executescript(SCHEMA)
    except sqlite3.Error:
        connection.close()
        raise
    return connection


def open_readonly(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise FileNotFoundError(f"no audit log at {path}")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def last_link(connection: sqlite3.Connection) -> Link:
    row = connection.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
    return Link() if row is None else Link(int(row[0]), str(row[1]))


def chain(bodies: Sequence[dict[str, Any]], after: Link) -> list[tuple[int, str, str]]:
    """Rows for `bodies`, each linked to the one before."""
    rows = []
    link = after
    for body in bodies:
        full = {**body, "record_id": uuid.uuid4().hex, "seq": link.seq + 1, "prev_hash": link.hash}
        link = Link(link.seq + 1, record_hash(full))
        rows.append((link.seq, link.hash, canonical(full).decode("utf-8")))
    return rows


def append(connection: sqlite3.Connection, bodies: Sequence[dict[str, Any]]) -> Link:
    """One transaction for the whole group; durable when this returns."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        rows = chain(bodies, last_link(connection))
        connection.executemany("INSERT INTO records (seq, hash, body) VALUES (?, ?, ?)", rows)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return Link(rows[-1][0], rows[-1][1]) if rows else last_link(connection)
