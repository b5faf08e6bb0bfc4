"""The audit log on real SQLite files: chain, group commit, append-only triggers, tampering."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from xaid_server.audit import store
from xaid_server.audit.__main__ import main
from xaid_server.audit.canonical import GENESIS, canonical, record_hash
from xaid_server.audit.digests import tensor_digest, top_attributions
from xaid_server.audit.log import AuditLog
from xaid_server.audit.verify import read_record, verify
from xaid_server.errors import Unavailable
from xaid_server.metrics import Metrics


def _write(path: Path, count: int, metrics: Metrics | None = None) -> None:
    log = AuditLog(path, metrics or Metrics())
    for i in range(count):
        log.append({"kind": "predict", "status": "OK", "n": i, "score": 0.1 * i})
    log.close()


def _sample(metrics: Metrics, name: str) -> float | None:
    return metrics.registry.get_sample_value(name)


def _rows(path: Path) -> list[tuple[int, str, dict[str, object]]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT seq, hash, body FROM records ORDER BY seq").fetchall()
    return [(seq, digest, json.loads(body)) for seq, digest, body in rows]


def test_records_form_a_hash_chain_over_canonical_json(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    metrics = Metrics()
    _write(path, 5, metrics)
    rows = _rows(path)
    assert [seq for seq, _, _ in rows] == [1, 2, 3, 4, 5]
    previous = GENESIS
    for seq, digest, body in rows:
        assert body["seq"] == seq
        assert body["prev_hash"] == previous
        text = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        assert hashlib.sha256(text).hexdigest() == digest
        previous = digest
    assert [body["n"] for _, _, body in rows] == [0, 1, 2, 3, 4]
    assert len({body["record_id"] for _, _, body in rows}) == 5
    assert _sample(metrics, "xaid_audit_records_total") == 5
    verdict = verify(path)
    assert verdict.intact
    assert verdict.records == 5
    assert verdict.head.hash == previous
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _write(path, 2)
    _write(path, 3)
    assert [seq for seq, _, _ in _rows(path)] == [1, 2, 3, 4, 5]
    assert verify(path).intact


def test_concurrent_writers_share_transactions_and_keep_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, Metrics())
    commits = 0
    original = store.append

    def counting(connection: sqlite3.Connection, bodies: list[dict[str, object]]) -> store.Link:
        nonlocal commits
        commits += 1
        return original(connection, bodies)

    def write(thread: int) -> None:
        for n in range(200):
            log.append({"thread": thread, "n": n})

    monkeypatch.setattr(store, "append", counting)
    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    rows = _rows(path)
    assert len(rows) == 800
    assert verify(path).intact
    assert commits < 800, "records that queued up together were not committed together"
    for t in range(4):  # each thread's records keep its order
        assert [b["n"] for _, _, b in rows if b["thread"] == t] == list(range(200))


def test_triggers_refuse_update_and_delete(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _write(path, 2)
    with sqlite3.connect(path) as connection:
        for statement in ("UPDATE records SET body = '{}' WHERE seq = 1", "DELETE FROM records"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                connection.execute(statement)
    assert verify(path).intact


def _tamper(path: Path, statement: str) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TRIGGER records_no_update")
        connection.execute("DROP TRIGGER records_no_delete")
        connection.execute(statement)


def test_an_updated_record_is_found_at_its_sequence_number(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _write(path, 6)
    _tamper(path, "UPDATE records SET body = replace(body, '\"n\":3', '\"n\":9') WHERE seq = 4")
    verdict = verify(path)
    assert not verdict.intact
    assert verdict.broken == 4
    assert verdict.records == 3
    assert "changed" in verdict.reason
    assert not verdict.triggers


def test_a_record_rewritten_with_its_hash_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _write(path, 4)
    _, _, body = _rows(path)[1]
    body["status"] = "INVALID_ARGUMENT"
    text = canonical(body).decode()
    _tamper(path, f"UPDATE records SET body = '{text}', hash = '{record_hash(body)}' WHERE seq = 2")
    assert verify(path).broken == 3


def test_a_deleted_record_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    _write(path, 5)
    _tamper(path, "DELETE FROM records WHERE seq = 2")
    verdict = verify(path)
    assert verdict.broken == 3
    assert "removed" in verdict.reason


def test_edited_bytes_in_the_file_are_found_by_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.db"
    _write(path, 5)
    data = path.read_bytes()
    needle = b'"n":2,'
    assert data.count(needle) == 1
    path.write_bytes(data.replace(needle, b'"n":7,'))
    assert main(["verify", str(path)]) == 1
    assert "TAMPERED at record 3" in capsys.readouterr().out
    with pytest.raises(LookupError, match="record 3 does not match its hash"):
        read_record(path, 3)


def test_the_command_reports_an_intact_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.db"
    _write(path, 3)
    assert main(["verify", str(path)]) == 0
    assert "intact: 3 records" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "absent.db")]) == 2


def test_an_unwritable_log_counts_failures_and_fails_closed(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    metrics = Metrics()
    closed = AuditLog(blocker / "audit.db", metrics, fail_closed=True)
    with pytest.raises(Unavailable, match="audit trail unavailable"):
        asyncio.run(closed.record({"kind": "predict"}))
    closed.close()
    opened = AuditLog(blocker / "audit.db", metrics, fail_closed=False)
    asyncio.run(opened.record({"kind": "predict"}))  # returns at once
    opened.close()
    assert _sample(metrics, "xaid_audit_write_failures_total") == 2
    assert _sample(metrics, "xaid_audit_records_total") == 0


def test_fail_closed_returns_once_the_record_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    log = AuditLog(path, Metrics(), fail_closed=True)

    async def both() -> None:
        await asyncio.gather(log.record({"kind": "a"}), log.record({"kind": "b"}))
        with sqlite3.connect(path) as connection:  # another connection sees both at once
            assert connection.execute("SELECT count(*) FROM records").fetchone()[0] == 2

    asyncio.run(both())
    log.close()


def test_tensor_digest_follows_the_documented_layout() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[1, 2]], dtype=">i8")  # big-endian input: the digest uses little-endian bytes
    expected = hashlib.sha256()
    for name, array in (("a", a), ("b", b.astype("<i8"))):
        expected.update(f"{name}\0{array.dtype.name}\0{','.join(map(str, array.shape))}\0".encode())
        expected.update(array.tobytes())
    assert tensor_digest([("b", b), ("a", a)]) == expected.hexdigest()
    assert tensor_digest([("a", a)]) != tensor_digest([("a", a.reshape(3, 2))])


def test_top_attributions_are_the_largest_magnitudes_with_flat_indices() -> None:
    attribution = np.array([[0.1, -0.9], [0.5, 0.9]], dtype=np.float32)
    top = top_attributions(attribution, k=3)
    assert [index for index, _ in top] == [1, 3, 2]
    assert top[0][1] == pytest.approx(-0.9)
