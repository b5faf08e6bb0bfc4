"""Text models and faithfulness scores end to end: gRPC, the Python client and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

import xaid
from xaid._codec import from_tensor
from xaid.cli import main
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

EXAMPLES = Path(__file__).resolve().parents[2] / "service" / "xaid_server" / "demo" / "examples"
STAR = EXAMPLES / "star.png"
NEGATIVE = "honestly , the plot was not good ."


@pytest.fixture(scope="module")
def stub(server_address: str) -> Iterator[xaid_pb2_grpc.ExplainerStub]:
    with grpc.insecure_channel(server_address) as channel:
        yield xaid_pb2_grpc.ExplainerStub(channel)


@pytest.fixture(scope="module")
def client(server_address: str) -> Iterator[xaid.Client]:
    with xaid.Client(server_address, timeout=60) as c:
        yield c


def test_predict_text_over_grpc(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    reply = stub.Predict(
        xaid_pb2.PredictRequest(model="text", text=[NEGATIVE, "the food was great !"], top_k=1)
    )
    assert [row.tokens for row in reply.tokens] == [
        ["honestly", ",", "the", "plot", "was", "not", "good", "."],
        ["the", "food", "was", "great", "!"],  # "!" is unknown to the vocabulary
    ]
    assert [s.label for s in reply.top] == ["negative", "positive"]
    assert from_tensor(reply.outputs[0]).shape == (2, 2)


def test_explain_text_returns_token_attributions(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(
            model="text",
            text=[NEGATIVE],
            integrated_gradients=xaid_pb2.IntegratedGradients(n_steps=20),
            evaluate=True,
        )
    )
    attribution = from_tensor(reply.attribution)
    assert attribution.shape == (1, 32)
    segment = reply.segments[0]
    assert list(segment.names[:8]) == list(reply.tokens[0].tokens)
    np.testing.assert_allclose(segment.weights, attribution[0], rtol=1e-6)
    assert abs(reply.convergence_delta[0]) < 0.05
    # faithfulness on tokens: deletion fills with the pad id, insertion starts from it
    assert len(reply.faithfulness.deletion_auc) == 1
    assert reply.faithfulness.model_evaluations == 2 * 21
    assert reply.model_evaluations == 1 + 21


def test_evaluate_reports_faithfulness_and_its_cost(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    reply = stub.Explain(
        xaid_pb2.ExplainRequest(
            model="shapes",
            image=STAR.read_bytes(),
            occlusion=xaid_pb2.Occlusion(window=[16, 16], stride=[16, 16]),
            evaluate=True,
        )
    )
    scores = reply.faithfulness
    assert scores.model_evaluations == 42
    assert reply.model_evaluations == 1 + 16
    assert 0 <= scores.deletion_auc[0] < scores.insertion_auc[0] <= 1


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (
            xaid_pb2.PredictRequest(model="shapes", text=["a circle"]),
            "FAILED_PRECONDITION",
            "vocabulary",
        ),
        (xaid_pb2.PredictRequest(model="text", text=["good", " "]), "INVALID_ARGUMENT", "text[1]"),
        (
            xaid_pb2.PredictRequest(model="text", text=["good"], image=STAR.read_bytes()),
            "INVALID_ARGUMENT",
            "one of inputs, image or text",
        ),
    ],
)
def test_text_errors(
    stub: xaid_pb2_grpc.ExplainerStub, request_: xaid_pb2.PredictRequest, code: str, text: str
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request_)
    assert error.value.code().name == code
    assert text in (error.value.details() or "")


def test_evaluate_over_the_cap_is_refused(stub: xaid_pb2_grpc.ExplainerStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.Explain(
            xaid_pb2.ExplainRequest(
                model="text",
                text=["good"] * 3000,  # 6000 evaluations, plus 3000 * 42 for the scores
                saliency=xaid_pb2.Saliency(),
                evaluate=True,
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "132000 model evaluations" in (error.value.details() or "")


def test_client_text(client: xaid.Client) -> None:
    prediction = client.predict("text", xaid.Text("the movie was superb"))
    assert prediction.tokens == [["the", "movie", "was", "superb"]]
    assert prediction.top[0][0].label == "positive"
    explanation = client.explain("text", xaid.Text([NEGATIVE]), "saliency", evaluate=True)
    assert explanation.tokens[0][5] == "not"
    assert explanation.segments[0].names[5] == "not"
    assert explanation.faithfulness is not None
    assert explanation.faithfulness.model_evaluations == 42


def test_cli_predict_and_explain_text(
    server_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--server", server_address]
    assert main([*base, "predict", "--model", "text", "--text", NEGATIVE]) == 0
    out = capsys.readouterr().out
    assert "tokens: honestly , the plot was not good ." in out
    assert "negative" in out
    argv = [*base, "explain", "--model", "text", "--text", NEGATIVE, "--no-progress"]
    assert main([*argv, "--method", "integrated_gradients", "--evaluate"]) == 0
    out = capsys.readouterr().out
    assert "not(+" in out
    assert "deletion AUC" in out
    assert main([*argv, "--method", "gradient_x_input", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"][0]
    assert [t["token"] for t in tokens] == NEGATIVE.split()


def test_cli_refuses_two_inputs(server_address: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--server", server_address, "predict", "--model", "text", "--text", "good", str(STAR)]
    assert main(argv) == 2
    assert "one of IMAGE, --npy FILE or --text TEXT" in capsys.readouterr().err
