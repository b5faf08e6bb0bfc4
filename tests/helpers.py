"""Shared test helpers: tiny ONNX models, loaded models and explanation contexts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from xaid_server.explainers.base import ExplainContext, Explainer, Explanation, Target
from xaid_server.model_config import ModelConfig
from xaid_server.runtime.model import LoadedModel, SessionFactory, load_model
from xaid_server.runtime.runner import BatchRunner, Job

CPU = SessionFactory(("CPUExecutionProvider",))


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Mapping[str, np.ndarray] | None = None,
    *,
    opset: int = 17,
    ir_version: int = 8,
) -> onnx.ModelProto:
    """A checked single-graph model; initializers are given as numpy arrays by name."""
    graph = helper.make_graph(
        list(nodes),
        "test",
        list(inputs),
        list(outputs),
        [onnx.numpy_helper.from_array(v, k) for k, v in (initializers or {}).items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def load(
    tmp_path: Path,
    proto: onnx.ModelProto | bytes,
    config: ModelConfig | None = None,
    name: str = "model",
    factory: SessionFactory = CPU,
) -> LoadedModel:
    """Write the model into a repository-like folder and load it (on the CPU by default)."""
    path = tmp_path / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto if isinstance(proto, bytes) else proto.SerializeToString())
    return load_model(name, "1", path, config or ModelConfig(), factory)


def target_scores(model: LoadedModel, x: np.ndarray, output: str = "") -> np.ndarray:
    """The chosen output of the plain model, flattened per row: float64 [B, classes]."""
    index = model.output_index(output)
    result = model.session.run(None, {model.input.name: x})[index]
    return np.asarray(result, dtype=np.float64).reshape(len(x), -1)


def explain_context(
    model: LoadedModel,
    x: np.ndarray,
    classes: Sequence[int] | None = None,
    *,
    output: str = "",
    job: Job | None = None,
    seed: int = 0,
) -> ExplainContext:
    """A context for explaining `x`; the target class defaults to each row's top class."""
    index = model.output_index(output)
    scores = target_scores(model, x, output)
    chosen = scores.argmax(axis=1) if classes is None else np.asarray(classes)
    chosen = chosen.astype(np.int64)
    return ExplainContext(
        model=model,
        input_name=model.input.name,
        feeds={model.input.name: x},
        target=Target(model.outputs[index].name, index, chosen),
        scores=scores[np.arange(len(x)), chosen],
        runner=BatchRunner(),
        job=job or Job(),
        rng=np.random.default_rng(seed),
    )


def explain(
    explainer: Explainer[Any],
    model: LoadedModel,
    x: np.ndarray,
    given: Mapping[str, Any] | None = None,
    classes: Sequence[int] | None = None,
    *,
    job: Job | None = None,
) -> tuple[Explanation, ExplainContext]:
    """Resolve the parameters and explain `x` as the server would, minus the transport."""
    params = explainer.resolve(model, x.shape, given or {})
    ctx = explain_context(model, x, classes, job=job)
    return explainer.explain(ctx, params), ctx
