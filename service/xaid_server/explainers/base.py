"""What every explanation method is: parameters with defaults, a cost, and numpy over the runner.

Explainers never import grpc or asyncio; all model evaluations go through `ctx.runner`.
"""

from __future__ import annotations

import dataclasses
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np

from xaid_server.errors import InvalidArgument
from xaid_server.runtime.model import LoadedModel
from xaid_server.runtime.runner import BatchRunner, Job


@dataclass(frozen=True)
class Target:
    """The score being explained: one output, one class per batch row."""

    output: str
    output_index: int
    classes: np.ndarray  # int64 [B]


@dataclass
class ExplainContext:
    model: LoadedModel
    input_name: str
    feeds: dict[str, np.ndarray]  # every model input; feeds[input_name] is the explained x
    target: Target
    scores: np.ndarray  # float64 [B]: F(x), the target score of each row
    runner: BatchRunner
    job: Job
    rng: np.random.Generator

    @property
    def x(self) -> np.ndarray:
        return self.feeds[self.input_name]


@dataclass
class SegmentResult:
    segment_map: np.ndarray
    weights: np.ndarray
    names: list[str] = field(default_factory=list)
    intercept: float = 0.0
    score: float = 0.0
    base_value: float = 0.0


@dataclass
class Explanation:
    attribution: np.ndarray  # float32, the shape of the explained input
    convergence_delta: np.ndarray | None = None
    segments: list[SegmentResult] = field(default_factory=list)


@dataclass(frozen=True)
class Limits:
    """The server's bounds on one request, for methods whose defaults follow them."""

    max_evaluations: int  # the server cap on a request's model evaluations
    reserved: int = 0  # what the request spends besides the explanation: forward, scoring

    @property
    def available(self) -> int:
        """Model evaluations left for the explanation itself."""
        return self.max_evaluations - self.reserved


NO_LIMITS = Limits(sys.maxsize)

P = TypeVar("P")


class Explainer(ABC, Generic[P]):
    """One explanation method. `params_type` is a frozen dataclass: its defaults are the table."""

    name: ClassVar[str]
    params_type: ClassVar[type[Any]]
    signed: ClassVar[bool] = True  # attributions may be negative (diverging heatmap)

    def prepare(self, model: LoadedModel) -> None:
        """Build what the method needs for this model at load time, off the request path."""

    def applicable(self, model: LoadedModel) -> str | None:
        """None when the method works for this model, else the reason it does not."""
        return None

    def merge(self, model: LoadedModel, given: Mapping[str, Any]) -> P:
        """Dataclass defaults, then the model config's `defaults`, then the request's values."""
        allowed = {f.name for f in dataclasses.fields(self.params_type)}
        values: dict[str, Any] = {}
        for source in (model.config.defaults.get(self.name, {}), given):
            for key, value in source.items():
                if key not in allowed:
                    raise InvalidArgument(
                        f"{self.name}.{key}: unknown parameter; known: {sorted(allowed)}",
                        field=f"{self.name}.{key}",
                    )
                values[key] = tuple(value) if isinstance(value, list) else value
        return self.params_type(**values)  # type: ignore[no-any-return]

    @abstractmethod
    def resolve(self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any]) -> P:
        """Merged parameters with every derived default filled in, validated for this input."""

    def resolve_within(
        self, model: LoadedModel, x_shape: tuple[int, ...], given: Mapping[str, Any], limits: Limits
    ) -> P:
        """`resolve` for the server: methods whose defaults grow with the input shrink them here."""
        return self.resolve(model, x_shape, given)

    @abstractmethod
    def cost(self, params: P, x_shape: tuple[int, ...], model: LoadedModel) -> int:
        """Model evaluations the explanation will take (checked against the server cap first)."""

    @abstractmethod
    def explain(self, ctx: ExplainContext, params: P) -> Explanation: ...
