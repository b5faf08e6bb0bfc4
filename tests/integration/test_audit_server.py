"""The audit trail of a real server: records of real RPCs, the chain, replay, write failures."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xaid
from tests.running_server import RunningServer
from xaid_server.audit.__main__ import main
from xaid_server.audit.digests import tensor_digest
from xaid_server.audit.verify import verify
from xaid_server.settings import DEMO_MODELS

EXAMPLES = DEMO_MODELS.parent / "examples"
STAR = EXAMPLES / "star.png"
TOKEN = "audit-test-token-4f1d"


@dataclass
class Trail:
    log: Path
    records: list[dict[str, Any]]
    answers: dict[str, Any]
    gradient_cache: Path

    def one(self, **wanted: object) -> dict[str, Any]:
        found = [r for r in self.records if all(r.get(k) == v for k, v in wanted.items())]
        assert len(found) == 1, wanted
        return found[0]


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Trail:
    folder = tmp_path_factory.mktemp("audit")
    tokens = folder / "tokens"
    tokens.write_text(f"auditor:{TOKEN}\n")
    log = folder / "audit.db"
    cache = folder / "gradients"
    server = RunningServer(
        audit_log=str(log),
        audit_fail_closed=True,
        auth_token_file=str(tokens),
        gradient_cache=cache,
    )
    answers: dict[str, Any] = {}
    try:
        with xaid.Client(server.address, token=TOKEN, timeout=60) as client:
            answers["predict"] = client.predict("shapes", STAR)
            answers["occlusion"] = client.explain("shapes", STAR, "occlusion", seed=7)
            answers["integrated_gradients"] = client.explain(
                "shapes", STAR, "integrated_gradients", seed=11, n_steps=16
            )
            with pytest.raises(xaid.InvalidArgument):
                client.explain("shapes", STAR, "occlusion", window=[100, 100])
    finally:
        server.stop()
    with sqlite3.connect(log) as connection:
        rows = connection.execute("SELECT body FROM records ORDER BY seq").fetchall()
    return Trail(log, [json.loads(body) for (body,) in rows], answers, cache)


def test_every_decision_and_model_load_has_a_record(trail: Trail) -> None:
    loads = [r for r in trail.records if r["kind"] == "model_load"]
    assert {r["model"]["name"] for r in loads} == {"shapes", "tabular", "text"}
    assert [r["kind"] for r in trail.records[len(loads) :]] == ["predict", *["explain"] * 3]
    shapes = trail.one(kind="model_load", status="OK", model=loads[0]["model"])["model"]
    assert set(shapes) == {"name", "version", "sha256", "provider", "chunks", "lanes"}
    assert shapes["chunks"], "the gradient chunk measured at load, for replays"
    for record in trail.records[len(loads) :]:
        assert record["caller"] == "auditor"
        assert record["model"] == next(r["model"] for r in loads if r["model"]["name"] == "shapes")
        assert record["input"]["source"] == "image"
        assert record["input"]["tensors"] == [
            {"name": "input", "dtype": "float32", "shape": [1, 3, 64, 64]}
        ]
        assert record["started"].endswith("Z")
        assert record["started"] <= record["finished"]
    assert TOKEN.encode() not in trail.log.read_bytes()


def test_a_predict_record_holds_the_answer(trail: Trail) -> None:
    record = trail.one(kind="predict")
    assert record["status"] == "OK"
    answer = trail.answers["predict"]
    assert [(c["index"], c["label"]) for c in record["output"]["top"]] == [
        (c.index, c.label) for c in answer.top[0]
    ]
    assert record["output"]["sha256"] == tensor_digest(list(answer.outputs.items()))


def test_an_explain_record_holds_parameters_seed_and_attribution(trail: Trail) -> None:
    record = _explanation(trail, "occlusion")
    answer = trail.answers["occlusion"]
    assert record["explanation"]["seed"] == 7 == answer.seed
    assert record["explanation"]["parameters"] == {
        "window": [8, 8],
        "stride": [4, 4],
        "baseline": 0.0,
    }
    assert record["attribution"]["sha256"] == tensor_digest([("attribution", answer.attribution)])
    flat = answer.attribution.reshape(-1)
    top = record["attribution"]["top"]
    assert len(top) == 10
    assert [value for _, value in top] == [float(flat[i]) for i, _ in top]
    assert abs(top[0][1]) == float(np.abs(flat).max())
    assert record["target"]["classes"] == [int(answer.target.class_indices[0])]


def test_an_error_is_recorded_with_its_status(trail: Trail) -> None:
    record = trail.one(kind="explain", status="INVALID_ARGUMENT")
    assert "window" in record["message"]
    assert record["explanation"]["parameters"] == {"window": [100, 100]}
    assert "attribution" not in record


def test_the_chain_verifies(trail: Trail) -> None:
    verdict = verify(trail.log)
    assert verdict.intact
    assert verdict.records == len(trail.records)


@pytest.mark.parametrize("method", ["occlusion", "integrated_gradients"])
def test_replay_reproduces_the_explanation_bit_for_bit(
    trail: Trail, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seq = _explanation(trail, method)["seq"]
    argv = ["replay", str(trail.log), "--record", str(seq), "--input", str(STAR)]
    assert main([*argv, "--gradient-cache", str(trail.gradient_cache)]) == 0
    out = capsys.readouterr().out
    assert f"record {seq} (explain): attribution digest matches" in out


def test_replay_refuses_another_input(trail: Trail, capsys: pytest.CaptureFixture[str]) -> None:
    seq = _explanation(trail, "occlusion")["seq"]
    heart = EXAMPLES / "heart.png"
    assert main(["replay", str(trail.log), "--record", str(seq), "--input", str(heart)]) == 2
    assert "heart.png does not match the input digest" in capsys.readouterr().err


def _explanation(trail: Trail, method: str) -> dict[str, Any]:
    explained = [r for r in trail.records if r["kind"] == "explain" and r["status"] == "OK"]
    return next(r for r in explained if r["explanation"]["method"] == method)


def _failures(server: RunningServer) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    lines = [
        line for line in text.splitlines() if line.startswith("xaid_audit_write_failures_total")
    ]
    return float(lines[0].split()[-1])


def _wait_for_failures(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while _failures(server) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _failures(server) == count


@pytest.mark.parametrize("fail_closed", [True, False])
def test_an_unwritable_log(tmp_path: Path, fail_closed: bool) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    server = RunningServer(audit_log=str(blocker / "audit.db"), audit_fail_closed=fail_closed)
    try:
        loads = 3  # the records of the demo models' loads failed first
        _wait_for_failures(server, loads)
        with xaid.Client(server.address, timeout=30) as client:
            if fail_closed:
                with pytest.raises(xaid.Unavailable, match="audit trail unavailable"):
                    client.predict("shapes", STAR)
            else:
                assert client.predict("shapes", STAR).top
        _wait_for_failures(server, loads + 1)  # fail-open counts after answering
    finally:
        server.stop()
