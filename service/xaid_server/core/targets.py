"""Which score is explained, and the top classes of a prediction."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.explainers.base import Target
from xaid_server.runtime.model import LoadedModel


@dataclass(frozen=True)
class ClassScore:
    row: int
    index: int
    label: str
    score: float
    probability: float


def scores_2d(output: np.ndarray, name: str) -> np.ndarray:
    """An output as [rows, classes]; explanations and top-k need one score per class."""
    if output.ndim < 1:
        raise FailedPrecondition(f"output {name!r} is a scalar; it has no classes to explain")
    return output.reshape(output.shape[0], -1).astype(np.float64)


def resolve_target(
    model: LoadedModel, outputs: list[np.ndarray], output_name: str, class_index: int | None
) -> Target:
    try:
        index = model.output_index(output_name)
    except KeyError:
        names = [o.name for o in model.outputs]
        raise InvalidArgument(
            f"target.output: {output_name!r} is not an output of {model.name!r}; outputs: {names}",
            field="target.output",
        ) from None
    spec = model.outputs[index]
    scores = scores_2d(outputs[index], spec.name)
    if class_index is None:
        classes = scores.argmax(axis=1)
    else:
        if not 0 <= class_index < scores.shape[1]:
            raise InvalidArgument(
                f"target.class_index: {class_index} is outside [0, {scores.shape[1]})",
                field="target.class_index",
            )
        classes = np.full(scores.shape[0], class_index)
    return Target(spec.name, index, classes.astype(np.int64))


def target_scores(target: Target, outputs: list[np.ndarray]) -> np.ndarray:
    scores = scores_2d(outputs[target.output_index], target.output)
    return np.asarray(scores[np.arange(scores.shape[0]), target.classes])


def label_of(model: LoadedModel, index: int) -> str:
    labels = model.config.labels
    return labels[index] if 0 <= index < len(labels) else str(index)


def top_classes(model: LoadedModel, output: np.ndarray, name: str, k: int) -> list[ClassScore]:
    scores = scores_2d(output, name)
    shifted = scores - scores.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    top: list[ClassScore] = []
    for row in range(scores.shape[0]):
        for index in np.argsort(-scores[row], kind="stable")[:k]:
            top.append(
                ClassScore(
                    row,
                    int(index),
                    label_of(model, int(index)),
                    float(scores[row, index]),
                    float(probabilities[row, index]),
                )
            )
    return top
