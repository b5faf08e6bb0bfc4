"""Deletion and insertion AUCs (Petsiuk et al. 2018): how well an attribution ranks the input.

Units are pixels (all channels together, ranked by the attribution summed over channels) for
image inputs and single elements otherwise (tabular features, tokens); units of equal attribution
are ranked in a random order drawn from the request's seed. With H steps, curve point
k keeps or replaces the round(k·U/H) highest-ranked units:

- deletion: those units take the baseline (the model config's), the rest stay; lower is better;
- insertion: those units take the input's values, the rest come from the input blurred with a
  Gaussian (kernel 11, sigma 5) for images, or from the baseline for other inputs; higher is
  better.

The AUC is the trapezoid area under the target class's softmax probability over k/H in [0, 1].
Both curves of a row are one batched pass of the faithfulness graph through the runner: the
points are built on the device from the input, the two fills and a boolean mask per point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xaid_server.errors import InvalidArgument
from xaid_server.explainers.base import ExplainContext
from xaid_server.graphs.compose import TARGET
from xaid_server.graphs.faithfulness import build_faithfulness_graph
from xaid_server.graphs.masking import FILL, FILL_INDEX, MASKS, SEGMENTS, X
from xaid_server.runtime.model import LoadedModel

DEFAULT_STEPS = 20  # config: defaults: {faithfulness: {steps: H}}
MAX_STEPS = 1000
BLUR_SIZE = 11
BLUR_SIGMA = 5.0


@dataclass(frozen=True)
class Faithfulness:
    deletion_auc: list[float]
    insertion_auc: list[float]
    model_evaluations: int


def steps_of(model: LoadedModel) -> int:
    """H from the model config's `defaults: faithfulness: steps`, else DEFAULT_STEPS."""
    steps = model.config.defaults.get("faithfulness", {}).get("steps", DEFAULT_STEPS)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument(
            f"evaluate: the model config's faithfulness steps must be an integer in "
            f"[1, {MAX_STEPS}], got {steps!r}",
            field="evaluate",
        )
    return steps


def cost(steps: int, rows: int) -> int:
    """Two curves of steps + 1 points per row."""
    return rows * 2 * (steps + 1)


def unavailable(model: LoadedModel) -> str | None:
    """None when the scores can be computed for this model, else why not."""
    if len(model.inputs) != 1:
        return f"faithfulness supports single-input models; this model takes {len(model.inputs)}"
    if model.input.rank < 2:
        return "faithfulness needs an input with a batch and a per-example dimension"
    return None


def evaluate(ctx: ExplainContext, attribution: np.ndarray, steps: int) -> Faithfulness:
    """Deletion and insertion AUCs of `attribution` (shaped like ctx.x) for every row."""
    model, x = ctx.model, ctx.x
    output = ctx.target.output
    session = model.evaluation_graph(
        f"faithfulness:{output}",
        lambda proto: build_faithfulness_graph(proto, ctx.input_name, output),
    )
    channel_axis = _channel_axis(model, x)
    units = _units(x.shape[1:], channel_axis)
    segments = np.arange(units.size, dtype=np.int64).reshape(units.shape)
    baseline = np.full(x.shape[1:], model.config.baseline).astype(x.dtype)
    fraction = np.arange(steps + 1) / steps
    counts = np.rint(fraction * units.size).astype(np.int64)
    before = ctx.job.evaluations
    deletion, insertion = [], []
    for row in range(len(x)):
        importance = attribution[row].astype(np.float64)
        if channel_axis is not None:
            importance = importance.sum(axis=channel_axis)
        rank = np.empty(units.size, dtype=np.int64)
        rank[_ranking(importance.ravel(), ctx.rng)] = np.arange(units.size)
        top = rank[None, :] < counts[:, None]  # [steps + 1, U]: the k highest-ranked units
        start = _blur(x[row], channel_axis) if channel_axis is not None else baseline
        (probability,) = ctx.runner.run(
            session,
            {
                MASKS: np.concatenate([~top, top]),  # kept units: deletion, then insertion
                FILL_INDEX: np.repeat(np.arange(2, dtype=np.int64), steps + 1),
            },
            ctx.job,
            fixed={
                X: x[row : row + 1],
                FILL: np.stack([baseline, start.astype(x.dtype)]),
                SEGMENTS: segments,
                TARGET: np.asarray(ctx.target.classes[row], dtype=np.int64),
            },
            max_batch=model.config.max_batch_size,
            item_bytes=x[0].nbytes,
        )
        curves = probability.astype(np.float64).reshape(2, steps + 1)
        deletion.append(float(np.trapezoid(curves[0], fraction)))
        insertion.append(float(np.trapezoid(curves[1], fraction)))
    return Faithfulness(deletion, insertion, ctx.job.evaluations - before)


def _ranking(importance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit indices, most important first, ties in a seeded random order.

    Occlusion windows and surrogate segments give plateaus of equal attribution; ranked by index
    they would be removed in raster order, a contiguous strip at each step, not the plateau."""
    shuffled = rng.permutation(importance.size)
    return shuffled[np.argsort(-importance[shuffled], kind="stable")]


def _channel_axis(model: LoadedModel, x: np.ndarray) -> int | None:
    """The channel axis of one example of an image input (units are pixels), else None."""
    image = model.config.image
    if image is None or x.ndim != 4:
        return None
    return 0 if image.layout == "NCHW" else 2


def _units(example: tuple[int, ...], channel_axis: int | None) -> np.ndarray:
    """An empty array shaped like one example with the channel axis set to 1."""
    shape = list(example)
    if channel_axis is not None:
        shape[channel_axis] = 1
    return np.empty(shape, dtype=np.int8)


def _blur(example: np.ndarray, channel_axis: int) -> np.ndarray:
    """Gaussian blur (kernel 11, sigma 5, reflected edges) over the two spatial axes."""
    radius = BLUR_SIZE // 2
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / BLUR_SIGMA) ** 2)
    kernel /= kernel.sum()
    blurred = example.astype(np.float64)
    for axis in [a for a in range(3) if a != channel_axis]:
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(3)]
        padded = np.pad(blurred, pad, mode="reflect")
        windows = np.lib.stride_tricks.sliding_window_view(padded, BLUR_SIZE, axis=axis)
        blurred = windows @ kernel
    return blurred
