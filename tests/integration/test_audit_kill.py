"""Fail-closed under kill -9: every answer the client got has its record on disk."""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

import xaid
from tests.hardening.processes import ServerProcess
from xaid_server.audit.digests import tensor_digest
from xaid_server.audit.verify import verify

ROUNDS = 3
REQUESTS = 24  # per round, 8 at a time
KILL_AFTER = 8  # answers acknowledged before the kill


def _recorded_inputs(log: Path) -> set[str]:
    with sqlite3.connect(log) as connection:
        bodies = [json.loads(b) for (b,) in connection.execute("SELECT body FROM records")]
    return {b["input"]["sha256"] for b in bodies if b["status"] == "OK" and "input" in b}


def _call(address: str, x: np.ndarray, explain: bool) -> None:
    with xaid.Client(address, timeout=60) as client:
        if explain:
            client.explain("tabular", x, "integrated_gradients", seed=1, n_steps=8)
        else:
            client.predict("tabular", x)


def test_no_acknowledged_record_is_lost_to_kill_9(tmp_path: Path) -> None:
    log = tmp_path / "audit.db"
    rng = np.random.default_rng(0)
    acknowledged: list[str] = []
    for _ in range(ROUNDS):
        with ServerProcess(
            "--audit-log", str(log), "--audit-fail-closed", "--poll-interval", "0"
        ) as server:
            server.wait_serving()
            inputs = [rng.normal(size=(1, 30)).astype(np.float32) for _ in range(REQUESTS)]
            with ThreadPoolExecutor(8) as pool:
                pending: dict[Future[None], np.ndarray] = {
                    pool.submit(_call, server.address, x, i % 3 == 0): x
                    for i, x in enumerate(inputs)
                }
                answered = 0
                while answered < KILL_AFTER and pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        x = pending.pop(future)
                        if future.exception() is None:
                            acknowledged.append(tensor_digest([("input", x)]))
                            answered += 1
                server.process.kill()  # SIGKILL while requests are still in flight
                server.process.wait()
                for future in pending:  # the rest fail or raced the kill; either is fine
                    if future.exception() is None:
                        acknowledged.append(tensor_digest([("input", pending[future])]))
    assert len(acknowledged) >= ROUNDS * KILL_AFTER
    missing = set(acknowledged) - _recorded_inputs(log)
    assert not missing, f"{len(missing)} acknowledged answers have no record"
    assert verify(log).intact
