"""Transport-neutral requests and results: what the servicer decodes into and encodes from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xaid_server.core.faithfulness import Faithfulness
from xaid_server.core.targets import ClassScore
from xaid_server.explainers.base import SegmentResult

Tensors = list[tuple[str, np.ndarray]]


@dataclass
class PredictCall:
    model: str
    version: str = ""
    inputs: Tensors = field(default_factory=list)
    image: bytes = b""
    text: list[str] = field(default_factory=list)
    top_k: int = 5
    timeout: float | None = None


@dataclass
class PredictResult:
    model: str
    version: str
    outputs: Tensors
    top: list[ClassScore]
    tokens: list[list[str]] = field(default_factory=list)


@dataclass
class ExplainCall:
    model: str
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    inputs: Tensors = field(default_factory=list)
    image: bytes = b""
    text: list[str] = field(default_factory=list)
    input: str = ""
    target_output: str = ""
    target_class: int | None = None
    seed: int | None = None
    render: bool = False
    evaluate: bool = False
    timeout: float | None = None
    progress: Callable[[int, int], None] | None = None


@dataclass
class ExplainResult:
    model: str
    version: str
    method: str
    parameters: Any  # the method's params dataclass, defaults filled in
    attribution: np.ndarray
    prediction: Tensors
    target_output: str
    target_classes: list[int]
    target_labels: list[str]
    seed: int
    model_evaluations: int
    total_seconds: float
    compute_seconds: float
    heatmaps: list[bytes] = field(default_factory=list)
    aggregation: str = ""
    convergence_delta: list[float] = field(default_factory=list)
    segments: list[SegmentResult] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    faithfulness: Faithfulness | None = None
