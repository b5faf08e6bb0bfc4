"""What the gradient family shares: the cached gradient graph and batched gradient runs.

Every gradient method is a set of points x_i (one per evaluation, each tied to a batch row) at
which the gradient of the target score is taken. The points of all rows go through the runner as
one batched evaluation, so chunking, counting, cancellation and the deadline apply to each method
the same way. The gradient graph is built once per (output, ReLU rule, wrt) and cached by the
model; a model whose graph cannot be built still loads, and the gradient methods report why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import ExplainContext, Explainer
from xaid_server.explainers.tokens import embedding_name, is_token_input
from xaid_server.graphs.embedding import build_embedding_gradient_graph
from xaid_server.graphs.gradient import GRADIENT, TARGET
from xaid_server.graphs.gradient.store import SHIPPED, gradient_graph
from xaid_server.runtime.model import LoadedModel, example_input
from xaid_server.runtime.runner import Lanes
from xaid_server.runtime.tuning import fastest_chunk

log = logging.getLogger(__name__)

P = TypeVar("P")

MAX_SAMPLES = 1024  # n_steps / n_samples above this are refused; the server cap still applies


def output_name(model: LoadedModel, output: str = "") -> str:
    """The output explained by default: config `output`, else the first."""
    return model.outputs[model.output_index(output)].name


def gradient_session(
    model: LoadedModel, output: str, *, relu: str = "standard", wrt: str = ""
) -> ort.InferenceSession:
    """The cached gradient graph of `output` w.r.t. `wrt` (the explained input when empty).

    The default graph (the config's output w.r.t. the explained input, standard ReLU rule) may
    be shipped as `model.grad.onnx` in the version folder; others are built or read from the
    disk cache. For a token-id input it is the gradient graph w.r.t. the embedding, which it
    takes as an input (graphs/embedding.py)."""
    wrt = wrt or model.input.name
    if is_token_input(model, wrt):

        def embedding_graph() -> tuple[bytes, str]:
            proto = onnx.load_from_string(model.model_bytes)
            graph = build_embedding_gradient_graph(proto, wrt, output, relu)
            return graph.SerializeToString(), "built"

        key = f"embedding-{gradient_key(output, relu, wrt)}"
        return model.graph_session(key, embedding_graph, model.config.precision)
    default = (output, relu, wrt) == (output_name(model), "standard", model.input.name)

    def produce() -> tuple[bytes, str]:
        graph = gradient_graph(
            model.model_bytes,
            model.sha256,
            wrt=wrt,
            output=output,
            relu=relu,
            shipped=model.path.parent / SHIPPED if default else None,
            cache_folder=model.factory.gradient_cache,
        )
        return graph.data, graph.source

    return model.graph_session(
        gradient_key(output, relu, wrt), produce, model.config.precision, lanes=default
    )


def gradient_key(output: str, relu: str, wrt: str) -> str:
    return f"gradient:{output}:{relu}:{wrt}"


def run_gradients(
    ctx: ExplainContext,
    points: np.ndarray,
    rows: np.ndarray,
    *,
    relu: str = "standard",
    wrt: str = "",
    extra: tuple[str, ...] = (),
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Gradients and target scores at `points`, evaluation i explaining batch row `rows[i]`.

    Returns (gradient [N, ...], score float64 [N], the `extra` outputs). Other model inputs are
    repeated from their row, so multi-input models take the same path. For token-id inputs the
    points are embeddings (`tokens.gradient_space`) and the ids ride along.
    """
    model = ctx.model
    output = ctx.target.output
    key = gradient_key(output, relu, wrt or ctx.input_name)
    session = gradient_session(model, output, relu=relu, wrt=wrt or ctx.input_name)
    batched = {name: value[rows] for name, value in ctx.feeds.items()}
    if not wrt and is_token_input(model, ctx.input_name):
        batched[embedding_name(model, ctx.input_name)] = np.ascontiguousarray(points)
    else:
        batched[ctx.input_name] = np.ascontiguousarray(points, dtype=ctx.x.dtype)
    batched[TARGET] = ctx.target.classes[rows].astype(np.int64)
    results = ctx.runner.run(
        session,
        batched,
        ctx.job,
        outputs=[output, GRADIENT, *extra],
        max_batch=model.chunks.get(key, model.config.max_batch_size),
        lanes=model.lanes.get(key),
    )
    scores = results[0].astype(np.float64).reshape(len(rows), -1)
    score = scores[np.arange(len(rows)), batched[TARGET]]
    return results[1], score, results[2:]


class GradientExplainer(Explainer[P]):
    """An explainer over the gradient graph; the ReLU rule it needs decides applicability."""

    relu: str = "standard"

    def prepare(self, model: LoadedModel) -> None:
        """Build the graph at load time; a model it cannot serve still loads for other methods."""
        try:
            session = gradient_session(model, output_name(model), relu=self.relu)
        except FailedPrecondition as exc:  # cached by the model and reported by applicable()
            log.warning("%s %s: no gradient graph: %s", model.name, model.version, exc.message)
            return
        # under a capped arena the measurement could take the memory the cap keeps for requests
        capped = model.factory.env_allocators
        if self.relu == "standard" and not capped and not is_token_input(model, model.input.name):
            tune_chunk(model, session)

    def applicable(self, model: LoadedModel) -> str | None:
        return gradients_unavailable(model, self.relu)


def tune_chunk(model: LoadedModel, session: ort.InferenceSession) -> None:
    """Measure the default gradient graph's fastest chunk once per model version, and that of
    its single-threaded lane session where there is one (runner.Lanes).

    Integrated gradients and SmoothGrad run many points per row in chunks of this size."""
    key = gradient_key(output_name(model), "standard", model.input.name)
    if key in model.chunks:
        return
    rng = np.random.default_rng(0)

    def feeds(size: int) -> dict[str, np.ndarray]:
        batch = {spec.name: example_input(spec, size) for spec in model.inputs}
        x = batch[model.input.name]
        batch[model.input.name] = rng.standard_normal(x.shape).astype(x.dtype)
        batch[TARGET] = np.zeros(size, dtype=np.int64)
        return batch

    measured = fastest_chunk(session, feeds, model.config.max_batch_size)
    if measured is None:
        log.info("%s %s: the gradient graph could not be timed", model.name, model.version)
        return
    model.chunks[key] = measured[0]
    lane_session = model.lane_session(key)
    count = model.factory.lane_count
    lane = None
    if lane_session is not None:
        lane = fastest_chunk(lane_session, feeds, measured[0], side_by_side=count)
        if lane is not None:
            model.lanes[key] = Lanes(lane_session, count, lane[0])
    log.info(
        "%s %s: gradient chunks of %d rows (%.2f ms per row)%s",
        model.name,
        model.version,
        measured[0],
        measured[1] * 1e3,
        "" if lane is None else f"; {lane[0]} rows on each of {count} lanes",
    )


def gradients_unavailable(model: LoadedModel, relu: str = "standard") -> str | None:
    """None when the model's gradient graph builds, else why not (shown by GetModel)."""
    try:
        gradient_session(model, output_name(model), relu=relu)
    except FailedPrecondition as exc:
        return f"the gradient graph cannot be built: {exc.message}"
    return None


def gradient_source(model: LoadedModel) -> str:
    """Where the default gradient graph came from: shipped, cache or built; empty when none."""
    key = gradient_key(output_name(model), "standard", model.input.name)
    return model.graph_sources.get(key, "")


def number(value: Any, field: str) -> float:
    """A finite real number, or InvalidArgument naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise InvalidArgument(f"{field}: expected a number, got {value!r}", field=field)
    if not np.isfinite(value):
        raise InvalidArgument(f"{field}: expected a finite number, got {value!r}", field=field)
    return float(value)


def count(value: Any, field: str, default: int, low: int = 1) -> int:
    """An integer in [low, MAX_SAMPLES], `default` when unset."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidArgument(f"{field}: expected an integer, got {value!r}", field=field)
    if not low <= value <= MAX_SAMPLES:
        raise InvalidArgument(
            f"{field}: must be between {low} and {MAX_SAMPLES}, got {value}", field=field
        )
    return int(value)


def choice(value: str, field: str, choices: Mapping[str, Any] | tuple[str, ...]) -> str:
    """One of `choices`, the first when empty."""
    options = list(choices)
    if not value:
        return options[0]
    if value not in options:
        raise InvalidArgument(
            f"{field}: unknown value {value!r}; choose one of {', '.join(options)}", field=field
        )
    return value
