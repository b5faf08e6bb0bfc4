"""One request id per RPC: sent as trailing metadata, read by the clients, written to the audit
record of the same call."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import xaid
from tests.running_server import RunningServer
from xaid._codec import to_tensor
from xaid.cli import main
from xaid.oip import grpc_service_pb2 as oip_pb2
from xaid.oip import grpc_service_pb2_grpc as oip_grpc
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

HEX32 = re.compile(r"[0-9a-f]{32}")
KEY = "xaid-request-id"
ROWS = np.random.default_rng(3).random((1, 30), dtype=np.float32)
OCCLUSION: dict[str, Any] = {"window": [10], "stride": [10]}  # three model runs: a fast explanation


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("request-id") / "audit.db"
    running = RunningServer(audit_log=str(log), audit_fail_closed=True)
    yield running
    running.stop()


@pytest.fixture
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as opened:
        yield opened


def record(server: RunningServer, request_id: str) -> dict[str, Any]:
    """The one audit record of `request_id` (written before the answer left the server)."""
    with sqlite3.connect(f"file:{server.settings.audit_log}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT body FROM records").fetchall()
    found: list[dict[str, Any]] = [
        body
        for body in map(json.loads, (row[0] for row in rows))
        if body.get("request_id") == request_id
    ]
    assert len(found) == 1, request_id
    return found[0]


def sent_id(metadata: Any) -> str:
    ids = [value for key, value in metadata or () if key == KEY]
    assert len(ids) == 1, metadata
    assert HEX32.fullmatch(ids[0]), ids[0]
    return str(ids[0])


def test_client_results_name_their_audit_records(server: RunningServer) -> None:
    with xaid.Client(server.address, timeout=60) as client:
        predictions = [client.predict("tabular", ROWS) for _ in range(2)]
        explanation = client.explain("tabular", ROWS, "occlusion", target=0, **OCCLUSION)
        streamed = client.explain(
            "tabular", ROWS, "occlusion", target=0, progress=lambda *_: None, **OCCLUSION
        )
    answers: list[xaid.Prediction | xaid.Explanation] = [*predictions, explanation, streamed]
    ids = [answer.request_id for answer in answers]
    assert all(HEX32.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids)
    for answer, kind in zip(answers, ["predict", "predict", "explain", "explain"], strict=True):
        audited = record(server, answer.request_id)
        assert (audited["kind"], audited["status"]) == (kind, "OK")
        assert audited["model"]["version"] == answer.version


def test_async_client_reads_the_id_too(server: RunningServer) -> None:
    async def calls() -> list[str]:
        async with xaid.AsyncClient(server.address, timeout=60) as client:
            prediction = await client.predict("tabular", ROWS)
            explanation = await client.explain("tabular", ROWS, "occlusion", **OCCLUSION)
            streamed = await client.explain(
                "tabular", ROWS, "occlusion", progress=lambda *_: None, **OCCLUSION
            )
            assert len(await client.models()) == 3  # unaffected: no id in its result
        return [prediction.request_id, explanation.request_id, streamed.request_id]

    ids = asyncio.run(calls())
    assert len(set(ids)) == 3
    assert [record(server, i)["kind"] for i in ids] == ["predict", "explain", "explain"]


def test_a_failed_call_carries_its_id_and_record(
    channel: grpc.Channel, server: RunningServer
) -> None:
    stub = xaid_pb2_grpc.ExplainerStub(channel)
    request = xaid_pb2.PredictRequest(model="tabular", top_k=10_000)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Predict(request, timeout=30)
    error: Any = failed.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    audited = record(server, sent_id(error.trailing_metadata()))
    assert (audited["kind"], audited["status"]) == ("predict", "INVALID_ARGUMENT")
    assert audited["message"] == error.details()


def test_client_errors_carry_the_id(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with (
        xaid.Client(server.address, timeout=60) as client,
        pytest.raises(xaid.errors.InvalidArgument) as failed,
    ):
        client.predict("tabular", ROWS[:, :7])  # 7 of the 30 features
    assert HEX32.fullmatch(failed.value.request_id)
    assert record(server, failed.value.request_id)["status"] == "INVALID_ARGUMENT"
    npy = Path(server.settings.audit_log).with_name("short.npy")
    np.save(npy, ROWS[:, :7])
    argv = ["--server", server.address, "predict", "--model", "tabular", "--npy", str(npy)]
    assert main(argv) == 1
    printed = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in printed
    assert HEX32.search(printed.split("request id:")[1])


def test_a_failed_stream_carries_its_id(channel: grpc.Channel, server: RunningServer) -> None:
    stub = xaid_pb2_grpc.ExplainerStub(channel)
    request = xaid_pb2.ExplainRequest(
        model="tabular",
        inputs=[to_tensor(ROWS, "input")],
        occlusion=xaid_pb2.Occlusion(window=[100]),  # wider than the 30 features
    )
    stream = stub.ExplainStream(request, timeout=30)
    with pytest.raises(grpc.RpcError):
        list(stream)
    assert stream.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert record(server, sent_id(stream.trailing_metadata()))["status"] == "INVALID_ARGUMENT"


def test_open_inference_protocol_calls_get_an_id(
    channel: grpc.Channel, server: RunningServer
) -> None:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    _, live = stub.ServerLive.with_call(oip_pb2.ServerLiveRequest(), timeout=30)
    tensor = oip_pb2.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[1, 30]
    )
    request = oip_pb2.ModelInferRequest(
        model_name="tabular", inputs=[tensor], raw_input_contents=[ROWS.tobytes()]
    )
    _, inferred = stub.ModelInfer.with_call(request, timeout=30)
    ids = [sent_id(live.trailing_metadata()), sent_id(inferred.trailing_metadata())]
    assert ids[0] != ids[1]
    assert record(server, ids[1])["kind"] == "predict"


def test_health_checks_have_no_id_and_still_answer(channel: grpc.Channel) -> None:
    stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type it loosely
    answer, call = stub.Check.with_call(health_pb2.HealthCheckRequest(), timeout=30)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    assert KEY not in dict(call.trailing_metadata() or ())


def test_cli_reports_the_id(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    npy = Path(server.settings.audit_log).with_name("rows.npy")
    np.save(npy, ROWS)
    argv = ["--server", server.address, "predict", "--model", "tabular", "--npy", str(npy)]
    assert main([*argv, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)["request_id"]
    assert main(argv) == 0
    as_text = capsys.readouterr().err.removeprefix("request id: ").strip()
    assert HEX32.fullmatch(as_text)
    assert as_text != as_json
    assert [record(server, i)["kind"] for i in (as_json, as_text)] == ["predict"] * 2
    explain = ["--server", server.address, "explain", "--model", "tabular", "--npy", str(npy)]
    assert main([*explain, "--param", "window=10", "--json", "--no-progress"]) == 0
    assert record(server, json.loads(capsys.readouterr().out)["request_id"])["kind"] == "explain"
