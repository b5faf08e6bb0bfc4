"""TLS, mutual TLS and bearer tokens end to end, with certificates made for the test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

import xaid
from tests.hardening.certificates import Authority, Issued
from tests.hardening.processes import ServerProcess, health_stub
from xaid._codec import to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.settings import DEMO_MODELS

ROWS = np.load(DEMO_MODELS.parent / "examples" / "tabular.npy")[:1].astype(np.float32)
TOKEN = "s3cret-token-for-the-test"
SERVING = health_pb2.HealthCheckResponse.SERVING


class Pki:
    def __init__(self, folder: Path) -> None:
        self.ca = Authority(folder, "xaid-test-ca")
        self.server = self.ca.issue("xaid-server", server=True)
        self.client = self.ca.issue("backend-a", server=False)
        self.rogue = Authority(folder, "rogue-ca").issue("intruder", server=False)

    def credentials(self, client: Issued | None) -> grpc.ChannelCredentials:
        if client is None:
            return xaid.tls_credentials(self.ca.path)
        return xaid.tls_credentials(self.ca.path, client.cert, client.key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerProcess]:
    """Mutual TLS, bearer tokens from the environment, plaintext health on its own port."""
    env = {**os.environ, "XAID_TEST_TOKENS": f"backend-a:{TOKEN}, backend-b:another-one"}
    with ServerProcess(
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca.path),
        "--auth-token-env",
        "XAID_TEST_TOKENS",
        "--health-port",
        "0",
        "--poll-interval",
        "0",
        env=env,
    ) as server:
        yield server


def health_port(server: ServerProcess) -> int:
    for line in server.log:
        if "health on " in line:
            return int(line.rsplit(":", 1)[1])
    raise AssertionError("no health port in the log")


def evaluations(server: ServerProcess) -> float:
    return server.metric("xaid_model_evaluations_total", {"model": "tabular", "method": "predict"})


def test_plaintext_health_port_answers_without_credentials(mtls_server: ServerProcess) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{health_port(mtls_server)}") as channel:
        stub = health_stub(channel)
        deadline = time.monotonic() + 120
        while stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status != SERVING:
            assert time.monotonic() < deadline, "the health port never said SERVING"
            time.sleep(0.05)


def wait_serving(server: ServerProcess, credentials: grpc.ChannelCredentials) -> None:
    with grpc.secure_channel(server.address, credentials) as channel:
        check = health_stub(channel).Check
        deadline = time.monotonic() + 120
        while check(health_pb2.HealthCheckRequest(), timeout=10).status != SERVING:
            assert time.monotonic() < deadline, "the server never became SERVING"
            time.sleep(0.05)


def test_mutual_tls_with_a_token_serves(pki: Pki, mtls_server: ServerProcess) -> None:
    credentials = pki.credentials(pki.client)
    wait_serving(mtls_server, credentials)
    with xaid.Client(mtls_server.address, credentials=credentials, token=TOKEN) as client:
        before = evaluations(mtls_server)
        prediction = client.predict("tabular", ROWS)
        assert prediction.top[0]
        assert evaluations(mtls_server) == before + 1


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA", "plaintext"])
def test_a_client_without_a_trusted_certificate_is_refused(
    pki: Pki, mtls_server: ServerProcess, who: str
) -> None:
    wait_serving(mtls_server, pki.credentials(pki.client))
    if who == "plaintext":
        client = xaid.Client(mtls_server.address, token=TOKEN, timeout=10)
    else:
        cert = None if who == "no certificate" else pki.rogue
        client = xaid.Client(
            mtls_server.address, credentials=pki.credentials(cert), token=TOKEN, timeout=10
        )
    with client, pytest.raises(xaid.Unavailable):
        client.predict("tabular", ROWS)


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x", ""])
def test_missing_or_wrong_token_is_unauthenticated_before_any_evaluation(
    pki: Pki, mtls_server: ServerProcess, token: str | None
) -> None:
    credentials = pki.credentials(pki.client)
    wait_serving(mtls_server, credentials)
    before = evaluations(mtls_server)
    with xaid.Client(mtls_server.address, credentials=credentials, token=token) as client:
        for call in (
            lambda: client.predict("tabular", ROWS),
            lambda: client.explain("tabular", ROWS, "occlusion"),
            lambda: client.models(),
        ):
            with pytest.raises(xaid.Unauthenticated):
                call()
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        stub = xaid_pb2_grpc.ExplainerStub(channel)
        stream = stub.ExplainStream(
            xaid_pb2.ExplainRequest(model="tabular", inputs=[to_tensor(ROWS)]),
            metadata=(("authorization", "Basic " + TOKEN),),
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stream.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_stub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
    assert evaluations(mtls_server) == before
    assert (
        mtls_server.metric(
            "grpc_server_handled_total",
            {
                "grpc_service": "xaid.v1.Explainer",
                "grpc_method": "Predict",
                "grpc_type": "unary",
                "grpc_code": "UNAUTHENTICATED",
            },
        )
        >= 1
    )


def test_tls_without_client_certificates(pki: Pki, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# subject:token\nbackend-a:{TOKEN}\n")
    with ServerProcess(
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--auth-token-file",
        str(tokens),
        "--poll-interval",
        "0",
    ) as server:
        wait_serving(server, pki.credentials(None))
        with xaid.Client(server.address, credentials=pki.credentials(None), token=TOKEN) as client:
            assert client.predict("tabular", ROWS).top[0]
        anonymous = xaid.Client(server.address, credentials=pki.credentials(None))
        with anonymous, pytest.raises(xaid.Unauthenticated):
            anonymous.predict("tabular", ROWS)
