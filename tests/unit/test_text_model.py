"""The text demo model, its `text:` config, tokenisation, and token attributions of the
gradient methods (at the embedding output, summed over the embedding dimension) against torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.helpers import explain, load, make_model
from xaid_server.demo import reviews
from xaid_server.errors import FailedPrecondition, InvalidArgument, ModelLoadError
from xaid_server.explainers import REGISTRY
from xaid_server.explainers.integrated_gradients import quadrature
from xaid_server.model_config import TextConfig, load_config, parse_config
from xaid_server.runtime.model import LoadedModel
from xaid_server.settings import DEMO_MODELS
from xaid_server.tokens import encode, names, tokenize

TEXT = DEMO_MODELS / "text"


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    data = (TEXT / "1" / "model.onnx").read_bytes()
    return load(tmp_path_factory.mktemp("text"), data, load_config(TEXT / "config.yaml"), "text")


def _config(vocabulary: list[str], **extra: Any) -> TextConfig:
    return TextConfig(vocabulary=vocabulary, **extra)


# ---- config ----


def test_text_section_reads_the_vocabulary_next_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\ngood\n", encoding="utf-8")
    raw = {"text": {"vocabulary": "vocab.txt", "pad_id": 0, "unk_id": 1, "max_length": 8}}
    config = parse_config(raw, tmp_path)
    assert config.text == TextConfig(["<pad>", "<unk>", "good"], 0, 1, 8)
    assert config.text.index["good"] == 2


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ({"pad_id": 0}, "vocabulary file"),
        ({"vocabulary": "missing.txt"}, "cannot be read"),
        ({"vocabulary": "vocab.txt", "pad_id": 3}, "pad_id must index"),
        ({"vocabulary": "vocab.txt", "max_length": 0}, "max_length must be positive"),
        ({"vocabulary": "vocab.txt", "lowercase": True}, "unknown keys"),
        ({"vocabulary": "vocab.txt", "unk_id": "x"}, "malformed"),
        ({"vocabulary": "twice.txt"}, "duplicate"),
    ],
)
def test_text_section_errors(tmp_path: Path, text: dict[str, Any], match: str) -> None:
    (tmp_path / "vocab.txt").write_text("<pad>\n<unk>\n", encoding="utf-8")
    (tmp_path / "twice.txt").write_text("<pad>\n<unk>\n<pad>\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match=match):
        parse_config({"text": text}, tmp_path)


def test_demo_config() -> None:
    config = load_config(TEXT / "config.yaml")
    assert config.kind == "text"
    assert config.text is not None
    assert config.text.vocabulary == reviews.vocabulary()
    assert (config.text.pad_id, config.text.unk_id) == (0, 1)
    assert config.labels == reviews.LABELS


# ---- tokenisation ----


def test_tokenize_splits_words_and_punctuation() -> None:
    assert tokenize("The movie wasn't GOOD, really!") == [
        "the", "movie", "wasn't", "good", ",", "really", "!",
    ]  # fmt: skip


def test_encode_maps_unknown_words_pads_and_truncates() -> None:
    config = _config(["<pad>", "<unk>", "good", "movie"], max_length=3)
    ids, tokens = encode(["good movie", "a good movie indeed"], config, length=5)
    assert ids.tolist() == [[2, 3, 0, 0, 0], [1, 2, 3, 0, 0]]
    assert tokens == [["good", "movie"], ["a", "good", "movie"]]
    ids, _ = encode(["good", "good movie"], config)  # no fixed length: the longest row
    assert ids.shape == (2, 2)
    assert names(ids, config) == [["good", "<pad>"], ["good", "movie"]]
    assert names(np.array([[7]]), None) == [["7"]]


def test_encode_errors() -> None:
    with pytest.raises(InvalidArgument, match=r"text\[1\]: no tokens"):
        encode(["good", "  "], _config(["<pad>", "<unk>", "good"]))
    with pytest.raises(FailedPrecondition, match="no vocabulary"):
        encode(["good"], None)


def test_demo_text_model_classifies_fresh_sentences(text_model: LoadedModel) -> None:
    sentences, labels = reviews.generate(np.random.default_rng(123), 300)
    ids, _ = encode(sentences, text_model.config.text, text_model.input.shape[1])
    (logits,) = text_model.session.run(None, {"input": ids})
    assert float((np.asarray(logits).argmax(1) == labels).mean()) >= 0.98


# ---- token attributions against torch autograd ----


def _torch_scores(model: LoadedModel) -> Any:
    """The demo text model rebuilt in torch from the ONNX weights: F(embedding, ids, target)."""
    torch = pytest.importorskip("torch")
    proto = onnx.load_from_string(model.model_bytes)
    weights = {
        t.name: torch.tensor(numpy_helper.to_array(t), dtype=torch.float64)
        for t in proto.graph.initializer
    }

    def score(embedding: Any, ids: np.ndarray, target: np.ndarray) -> Any:
        mask = torch.tensor(ids != 0, dtype=torch.float64).unsqueeze(1)
        hidden = torch.nn.functional.conv1d(
            embedding.transpose(1, 2), weights["conv.weight"], weights["conv.bias"], padding=1
        )
        pooled = (torch.relu(hidden) * mask).sum(2) / mask.sum(2).clamp(min=1.0)
        logits = pooled @ weights["out.weight"].T + weights["out.bias"]
        return logits[torch.arange(len(ids)), torch.tensor(target)]

    return torch, weights["embedding.weight"], score


def _ids(model: LoadedModel) -> np.ndarray:
    sentences = ["the movie was not good .", "honestly , the food was really great", "dull"]
    return encode(sentences, model.config.text, model.input.shape[1])[0]


def test_saliency_and_gradient_x_input_match_torch(text_model: LoadedModel) -> None:
    torch, table, score = _torch_scores(text_model)
    ids = _ids(text_model)
    saliency, ctx = explain(REGISTRY["saliency"], text_model, ids)
    gxi, _ = explain(REGISTRY["gradient_x_input"], text_model, ids)
    target = ctx.target.classes
    embedding = table[torch.tensor(ids)].requires_grad_(True)
    (grad,) = torch.autograd.grad(score(embedding, ids, target).sum(), embedding)
    assert saliency.attribution.shape == ids.shape
    np.testing.assert_allclose(saliency.attribution, grad.sum(-1).numpy(), atol=1e-5)
    expected = (grad * embedding).sum(-1).detach().numpy()
    np.testing.assert_allclose(gxi.attribution, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_interpolate_embeddings_like_torch(
    text_model: LoadedModel, method: str
) -> None:
    torch, table, score = _torch_scores(text_model)
    ids = _ids(text_model)
    given = {"n_steps": 16, "integration_method": method}
    explanation, ctx = explain(REGISTRY["integrated_gradients"], text_model, ids, given)
    target = ctx.target.classes
    embedding = table[torch.tensor(ids)]
    alphas, weights = quadrature(method, 16)
    total = torch.zeros_like(embedding)
    for alpha, weight in zip(alphas, weights, strict=True):
        point = (alpha * embedding).requires_grad_(True)  # baseline: the zero embedding
        (grad,) = torch.autograd.grad(score(point, ids, target).sum(), point)
        total += weight * grad
    expected = (embedding * total).sum(-1).numpy()
    np.testing.assert_allclose(explanation.attribution, expected, atol=1e-4)
    # completeness: the token attributions add up to F(x) - F(zero embedding)
    gap = score(embedding, ids, target) - score(torch.zeros_like(embedding), ids, target)
    assert explanation.convergence_delta is not None
    np.testing.assert_allclose(
        explanation.convergence_delta, expected.sum(1) - gap.numpy(), atol=1e-4
    )


def test_token_segments_name_each_position(text_model: LoadedModel) -> None:
    ids = _ids(text_model)
    explanation, _ = explain(REGISTRY["smoothgrad"], text_model, ids, {"n_samples": 4})
    assert len(explanation.segments) == len(ids)
    first = explanation.segments[0]
    assert first.names[:6] == ["the", "movie", "was", "not", "good", "."]
    assert first.names[6] == "<pad>"
    assert first.segment_map.tolist() == list(range(ids.shape[1]))
    np.testing.assert_array_equal(first.weights, explanation.attribution[0])


def test_not_good_is_attributed_to_its_words(text_model: LoadedModel) -> None:
    ids = _ids(text_model)[:1]  # "the movie was not good ." -> negative
    explanation, ctx = explain(REGISTRY["integrated_gradients"], text_model, ids)
    assert reviews.LABELS[int(ctx.target.classes[0])] == "negative"
    top = np.argsort(-explanation.attribution[0])[:2]
    assert set(top.tolist()) == {3, 4}  # "not", "good"


def test_token_model_without_an_embedding_lookup_is_refused(tmp_path: Path) -> None:
    proto = make_model(
        [helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("MatMul", ["f", "w"], ["y"])],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 2])],
        {"w": np.ones((3, 2), dtype=np.float32)},
    )  # fmt: skip
    model = load(tmp_path, proto)
    reason = REGISTRY["saliency"].applicable(model)
    assert reason is not None
    assert "embedding lookup" in reason
