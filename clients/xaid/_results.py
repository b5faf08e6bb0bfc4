"""Result types: plain frozen dataclasses over the response messages, with numpy arrays decoded.

Callers work with arrays, images and Python numbers instead of proto containers; each result
keeps its raw message (`response` / `proto`) for fields added to the contract later.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message
from PIL import Image

from xaid._codec import from_tensor
from xaid.v1 import xaid_pb2


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, datatype (FP32, ...) and shape, -1 for dynamic."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_proto(cls, spec: xaid_pb2.TensorSpec) -> TensorSpec:
        return cls(name=spec.name, datatype=spec.datatype, shape=tuple(int(d) for d in spec.shape))

    def __str__(self) -> str:
        dims = ",".join("?" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}:{self.datatype}[{dims}]"


@dataclass(frozen=True)
class ImagePreprocessing:
    """How the server turns an encoded image into the model's input tensor."""

    height: int
    width: int
    channels: int
    layout: str
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_proto(cls, image: xaid_pb2.ImagePreprocessing) -> ImagePreprocessing:
        return cls(
            height=image.height,
            width=image.width,
            channels=image.channels,
            layout=image.layout,
            scale=image.scale,
            mean=tuple(image.mean),
            std=tuple(image.std),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A served model: what it takes, what it returns and which methods can explain it."""

    name: str
    version: str
    versions: tuple[str, ...]
    kind: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: tuple[str, ...]
    methods: tuple[str, ...]
    execution_provider: str
    sha256: str
    max_batch_size: int
    ready: bool
    feature_names: tuple[str, ...]
    #: None for models that take no encoded images.
    image: ImagePreprocessing | None
    proto: xaid_pb2.ModelInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, info: xaid_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=info.name,
            version=info.version,
            versions=tuple(info.versions),
            kind=info.kind,
            inputs=tuple(TensorSpec.from_proto(s) for s in info.inputs),
            outputs=tuple(TensorSpec.from_proto(s) for s in info.outputs),
            labels=tuple(info.labels),
            methods=tuple(info.methods),
            execution_provider=info.execution_provider,
            sha256=info.sha256,
            max_batch_size=info.max_batch_size,
            ready=info.ready,
            feature_names=tuple(info.feature_names),
            image=ImagePreprocessing.from_proto(info.image) if info.HasField("image") else None,
            proto=info,
        )


@dataclass(frozen=True)
class ClassScore:
    """One of a row's top classes: raw `score` (a logit) and softmax `probability`."""

    row: int
    index: int
    label: str
    score: float
    probability: float

    @classmethod
    def from_proto(cls, score: xaid_pb2.ClassScore) -> ClassScore:
        return cls(
            row=score.row,
            index=score.index,
            label=score.label,
            score=score.score,
            probability=score.probability,
        )


def _outputs(tensors: Iterable[xaid_pb2.Tensor], field_name: str) -> dict[str, np.ndarray]:
    return {t.name or str(i): from_tensor(t, f"{field_name}[{i}]") for i, t in enumerate(tensors)}


def _rows(scores: Sequence[xaid_pb2.ClassScore]) -> list[list[ClassScore]]:
    rows: list[list[ClassScore]] = [[] for _ in range(max((s.row for s in scores), default=-1) + 1)]
    for score in scores:
        rows[score.row].append(ClassScore.from_proto(score))
    return rows


@dataclass(frozen=True, eq=False)
class Prediction:
    """Model outputs by name and, per batch row, the top classes best first."""

    model: str
    version: str
    outputs: dict[str, np.ndarray]
    top: list[list[ClassScore]]
    response: xaid_pb2.PredictResponse = field(repr=False)
    tokens: list[list[str]] = field(default_factory=list)  # per row, when text was sent
    request_id: str = ""  # the server's id of the call, as in its audit record

    @classmethod
    def from_proto(cls, response: xaid_pb2.PredictResponse, request_id: str = "") -> Prediction:
        return cls(
            model=response.model,
            version=response.version,
            outputs=_outputs(response.outputs, "outputs"),
            top=_rows(list(response.top)),
            response=response,
            tokens=[list(row.tokens) for row in response.tokens],
            request_id=request_id,
        )


@dataclass(frozen=True)
class Target:
    """What was explained: the output and, per batch row, the class index and its label."""

    output: str
    class_indices: tuple[int, ...]
    labels: tuple[str, ...]

    @classmethod
    def from_proto(cls, target: xaid_pb2.ResolvedTarget) -> Target:
        return cls(
            output=target.output,
            class_indices=tuple(int(i) for i in target.class_indices),
            labels=tuple(target.labels),
        )


@dataclass(frozen=True, eq=False)
class SegmentAttribution:
    """A surrogate-model explanation (LIME, KernelSHAP): one weight per segment."""

    segment_map: np.ndarray
    weights: tuple[float, ...]
    names: tuple[str, ...]
    intercept: float
    score: float
    base_value: float

    @classmethod
    def from_proto(cls, segment: xaid_pb2.SegmentAttribution, row: int) -> SegmentAttribution:
        return cls(
            segment_map=from_tensor(segment.segment_map, f"segments[{row}].segment_map"),
            weights=tuple(segment.weights),
            names=tuple(segment.names),
            intercept=segment.intercept,
            score=segment.score,
            base_value=segment.base_value,
        )


@dataclass(frozen=True)
class Faithfulness:
    """Deletion and insertion AUCs per row (lower and higher are better, respectively)."""

    deletion_auc: tuple[float, ...]
    insertion_auc: tuple[float, ...]
    model_evaluations: int

    @classmethod
    def from_proto(cls, faithfulness: xaid_pb2.Faithfulness) -> Faithfulness:
        return cls(
            deletion_auc=tuple(faithfulness.deletion_auc),
            insertion_auc=tuple(faithfulness.insertion_auc),
            model_evaluations=faithfulness.model_evaluations,
        )


@dataclass(frozen=True)
class Timing:
    """Server-side seconds: the whole request and the attribution computation in it."""

    total_seconds: float
    compute_seconds: float


def _message_dict(message: Message) -> dict[str, Any]:
    """Field values by proto name, defaults included and 64-bit ints as ints, not strings."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


def _decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a lazily decoded image would keep the buffer and fail late
    return image


@dataclass(frozen=True, eq=False)
class Explanation:
    """An attribution of one prediction, with the parameters and target the server resolved.

    `attribution` has the explained input's shape; `heatmaps` (one per row, when rendering
    was asked for) are the PNGs of `heatmap_png` decoded.
    """

    model: str
    version: str
    method: str
    attribution: np.ndarray
    heatmap_png: list[bytes]
    heatmaps: list[Image.Image]
    target: Target
    seed: int
    model_evaluations: int
    parameters: dict[str, Any]
    convergence_delta: list[float]
    faithfulness: Faithfulness | None
    segments: list[SegmentAttribution]
    prediction: dict[str, np.ndarray]
    timing: Timing
    aggregation: str
    response: xaid_pb2.ExplainResponse = field(repr=False)
    tokens: list[list[str]] = field(default_factory=list)  # per row, when text was sent
    request_id: str = ""  # the server's id of the call, as in its audit record

    @classmethod
    def from_proto(cls, response: xaid_pb2.ExplainResponse, request_id: str = "") -> Explanation:
        method = response.WhichOneof("method") or ""
        parameters = _message_dict(getattr(response, method)) if method else {}
        pngs = [bytes(p) for p in response.heatmap_png]
        return cls(
            model=response.model,
            version=response.version,
            method=method,
            attribution=(
                from_tensor(response.attribution, "attribution")
                if response.HasField("attribution")
                else np.zeros((0,), dtype=np.float32)
            ),
            heatmap_png=pngs,
            heatmaps=[_decode_png(p) for p in pngs],
            target=Target.from_proto(response.target),
            seed=response.seed,
            model_evaluations=response.model_evaluations,
            parameters=parameters,
            convergence_delta=list(response.convergence_delta),
            faithfulness=(
                Faithfulness.from_proto(response.faithfulness)
                if response.HasField("faithfulness")
                else None
            ),
            segments=[SegmentAttribution.from_proto(s, i) for i, s in enumerate(response.segments)],
            prediction=_outputs(response.prediction, "prediction"),
            timing=Timing(
                total_seconds=response.timing.total_seconds,
                compute_seconds=response.timing.compute_seconds,
            ),
            aggregation=response.aggregation,
            response=response,
            tokens=[list(row.tokens) for row in response.tokens],
            request_id=request_id,
        )
