"""Gradient methods on token-id inputs: the points live in embedding space.

The explained point of a token model is the embedding of its ids (the lookup graph computes it);
gradients are taken there, and the attribution of a token is the sum over the embedding dimension
of the per-dimension attribution (e.g. (e - e') * mean gradient for integrated gradients), so it
has the shape of the token input and integrated-gradient completeness still holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from xaid_server.explainers.base import ExplainContext, Explanation, SegmentResult
from xaid_server.graphs.embedding import build_lookup_graph
from xaid_server.runtime.model import LoadedModel
from xaid_server.tokens import names

TOKEN_TYPES = ("INT64", "INT32")


def is_token_input(model: LoadedModel, name: str) -> bool:
    """Whether `name` is a model input of integer token ids."""
    return any(s.name == name and s.datatype in TOKEN_TYPES for s in model.inputs)


def lookup_session(model: LoadedModel, input_name: str) -> ort.InferenceSession:
    """The cached graph from token ids to their embeddings; its output names the embedding."""
    return model.evaluation_graph(
        f"embedding:{input_name}", lambda proto: build_lookup_graph(proto, input_name)
    )


def embedding_name(model: LoadedModel, input_name: str) -> str:
    return str(lookup_session(model, input_name).get_outputs()[0].name)


@dataclass(frozen=True)
class GradientSpace:
    """Where the gradient methods take their points: the input itself, or the token embeddings."""

    x: np.ndarray  # the explained point in that space, [B, ...]
    tokens: bool

    def explanation(
        self, ctx: ExplainContext, values: np.ndarray, delta: np.ndarray | None = None
    ) -> Explanation:
        """Attributions shaped like the input; token models sum over the embedding dimension
        and also return one segment per row: the weight and the token of each position."""
        if not self.tokens:
            return Explanation(attribution=values.astype(np.float32), convergence_delta=delta)
        attribution = values.sum(axis=-1).astype(np.float32)
        return Explanation(
            attribution=attribution,
            convergence_delta=delta,
            segments=token_segments(ctx.model, ctx.x, attribution),
        )


def gradient_space(ctx: ExplainContext) -> GradientSpace:
    """The explained point: ctx.x, or the embedding of its token ids (not a model evaluation)."""
    if not is_token_input(ctx.model, ctx.input_name):
        return GradientSpace(ctx.x, tokens=False)
    session = lookup_session(ctx.model, ctx.input_name)
    (embedding,) = session.run(None, {ctx.input_name: ctx.x})
    return GradientSpace(np.asarray(embedding), tokens=True)


def token_segments(
    model: LoadedModel, ids: np.ndarray, attribution: np.ndarray
) -> list[SegmentResult]:
    """One segment result per row: position i of the row is segment i, named by its token."""
    tokens = names(ids, model.config.text)
    return [
        SegmentResult(
            segment_map=np.arange(ids.shape[1], dtype=np.int32),
            weights=attribution[row].astype(np.float64),
            names=tokens[row],
        )
        for row in range(len(ids))
    ]
