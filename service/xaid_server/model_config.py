"""A model's `config.yaml`: what the graph alone cannot say (kind, preprocessing, labels, defaults).

Every field is optional; `infer_config` fills what is missing from the graph's input shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from xaid_server.errors import ModelLoadError

KINDS = ("image", "tabular", "text")
MAX_BACKGROUND_ROWS = 100
LAYOUTS = ("NCHW", "NHWC")
PRECISIONS = ("strict", "tf32")  # gradient sessions on CUDA: strict FP32, or TF32 matmuls/convs


@dataclass(frozen=True)
class ImageConfig:
    """How an encoded image becomes the input tensor: resize, divide by scale, (x - mean) / std."""

    height: int
    width: int
    channels: int = 3
    layout: str = "NCHW"
    scale: float = 1.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class FeatureConfig:
    """Tabular feature names and training statistics, in the units the model receives."""

    names: tuple[str, ...] = ()
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    min: tuple[float, ...] = ()
    max: tuple[float, ...] = ()
    quartiles: tuple[tuple[float, float, float], ...] = ()


@dataclass(frozen=True)
class TextConfig:
    """Token-id models: the vocabulary (id = line number of the file) and the special ids."""

    vocabulary: list[str]
    pad_id: int = 0
    unk_id: int = 1
    max_length: int = 128

    @cached_property
    def index(self) -> dict[str, int]:
        """Token -> id, built once per loaded config."""
        return {token: i for i, token in enumerate(self.vocabulary)}


@dataclass(frozen=True)
class DynamicBatchingConfig:
    """Triton's `dynamic_batching`: concurrent requests of a model share one run.

    A batch runs once its rows reach the largest preferred size (else `max_batch_size`) or once
    its oldest request has waited `max_queue_delay_microseconds`.
    """

    max_queue_delay_microseconds: int = 0
    preferred_batch_size: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    kind: str = ""
    input: str = ""
    output: str = ""
    labels: tuple[str, ...] = ()
    max_batch_size: int = 64
    baseline: float = 0.0
    input_range: tuple[float, float] | None = None
    image: ImageConfig | None = None
    features: FeatureConfig | None = None
    dynamic_batching: DynamicBatchingConfig | None = None
    text: TextConfig | None = None
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    precision: str = "strict"
    background: tuple[tuple[float, ...], ...] = ()  # KernelSHAP reference rows, model-input units


def load_config(path: Path) -> ModelConfig:
    """Parse a config.yaml (safe_load only); a missing file gives an all-default config."""
    if not path.exists():
        return ModelConfig()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"config.yaml is not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"config.yaml cannot be read: {type(exc).__name__}") from None
    if not isinstance(raw, dict):
        raise ModelLoadError("config.yaml must be a mapping")
    return parse_config(raw, path.parent)


def parse_config(raw: dict[str, Any], folder: Path | None = None) -> ModelConfig:
    """A config from its YAML mapping; files it names (the vocabulary) are relative to `folder`."""
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ModelLoadError(f"config.yaml has unknown keys {unknown}; known: {sorted(known)}")
    kind = str(raw.get("kind", ""))
    if kind and kind not in KINDS:
        raise ModelLoadError(f"config.yaml kind {kind!r} is not one of {KINDS}")
    image = _parse_image(raw["image"]) if raw.get("image") is not None else None
    features = _parse_features(raw["features"]) if raw.get("features") is not None else None
    text = _parse_text(raw["text"], folder) if raw.get("text") is not None else None
    batching = raw.get("dynamic_batching")
    input_range = raw.get("input_range")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise ModelLoadError("config.yaml defaults must map method names to parameter mappings")
    precision = str(raw.get("precision", "strict"))
    if precision not in PRECISIONS:
        raise ModelLoadError(f"config.yaml precision {precision!r} is not one of {PRECISIONS}")
    try:
        return ModelConfig(
            kind=kind,
            input=str(raw.get("input", "")),
            output=str(raw.get("output", "")),
            labels=tuple(str(label) for label in raw.get("labels") or ()),
            max_batch_size=int(raw.get("max_batch_size", 64)),
            baseline=float(raw.get("baseline", 0.0)),
            input_range=(float(input_range[0]), float(input_range[1])) if input_range else None,
            image=image,
            features=features,
            dynamic_batching=_parse_batching(batching, int(raw.get("max_batch_size", 64)))
            if batching is not None
            else None,
            text=text,
            defaults={str(k): dict(v) for k, v in defaults.items()},
            precision=precision,
            background=_parse_background(raw.get("background"), folder),
        )
    except (TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"config.yaml has a malformed value: {exc}") from None


def _parse_image(raw: Any) -> ImageConfig:
    if not isinstance(raw, dict):
        raise ModelLoadError("config.yaml image must be a mapping")
    try:
        image = ImageConfig(
            height=int(raw["height"]),
            width=int(raw["width"]),
            channels=int(raw.get("channels", 3)),
            layout=str(raw.get("layout", "NCHW")),
            scale=float(raw.get("scale", 1.0)),
            mean=tuple(float(v) for v in raw.get("mean") or ()),
            std=tuple(float(v) for v in raw.get("std") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.yaml image is malformed: {exc}") from None
    if image.layout not in LAYOUTS:
        raise ModelLoadError(f"config.yaml image.layout must be one of {LAYOUTS}")
    if image.channels not in (1, 3):
        raise ModelLoadError("config.yaml image.channels must be 1 or 3")
    for name in ("mean", "std"):
        values = getattr(image, name)
        if values and len(values) != image.channels:
            raise ModelLoadError(f"config.yaml image.{name} needs {image.channels} values")
    if any(s == 0 for s in image.std) or image.scale == 0:
        raise ModelLoadError("config.yaml image.std and image.scale must be non-zero")
    return image


def _parse_features(raw: Any) -> FeatureConfig:
    if not isinstance(raw, dict):
        raise ModelLoadError("config.yaml features must be a mapping")

    def floats(key: str) -> tuple[float, ...]:
        return tuple(float(v) for v in raw.get(key) or ())

    try:
        return FeatureConfig(
            names=tuple(str(n) for n in raw.get("names") or ()),
            mean=floats("mean"),
            std=floats("std"),
            min=floats("min"),
            max=floats("max"),
            quartiles=tuple(
                (float(q[0]), float(q[1]), float(q[2])) for q in raw.get("quartiles") or ()
            ),
        )
    except (TypeError, ValueError, IndexError) as exc:
        raise ModelLoadError(f"config.yaml features is malformed: {exc}") from None


def _parse_text(raw: Any, folder: Path | None) -> TextConfig:
    if not isinstance(raw, dict) or "vocabulary" not in raw:
        raise ModelLoadError("config.yaml text must be a mapping with a vocabulary file")
    unknown = sorted(set(raw) - set(TextConfig.__dataclass_fields__))
    if unknown:
        raise ModelLoadError(f"config.yaml text has unknown keys {unknown}")
    path = Path(str(raw["vocabulary"]))
    if folder is not None and not path.is_absolute():
        path = folder / path
    try:
        vocabulary = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"config.yaml text.vocabulary {path.name!r} cannot be read: {type(exc).__name__}"
        ) from None
    try:
        text = TextConfig(
            vocabulary=vocabulary,
            pad_id=int(raw.get("pad_id", 0)),
            unk_id=int(raw.get("unk_id", 1)),
            max_length=int(raw.get("max_length", 128)),
        )
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"config.yaml text is malformed: {exc}") from None
    for name in ("pad_id", "unk_id"):
        if not 0 <= getattr(text, name) < len(vocabulary):
            raise ModelLoadError(
                f"config.yaml text.{name} must index the vocabulary of {len(vocabulary)} tokens"
            )
    if text.max_length < 1:
        raise ModelLoadError("config.yaml text.max_length must be positive")
    if len(set(vocabulary)) != len(vocabulary):
        raise ModelLoadError("config.yaml text.vocabulary has duplicate tokens")
    return text


def _parse_batching(raw: Any, max_batch_size: int) -> DynamicBatchingConfig:
    """Present means enabled (`dynamic_batching: {}` takes the defaults), as in Triton."""
    if not isinstance(raw, dict):
        raise ModelLoadError("config.yaml dynamic_batching must be a mapping")
    unknown = sorted(set(raw) - set(DynamicBatchingConfig.__dataclass_fields__))
    if unknown:
        raise ModelLoadError(f"config.yaml dynamic_batching has unknown keys {unknown}")
    preferred = raw.get("preferred_batch_size", [])
    batching = DynamicBatchingConfig(
        max_queue_delay_microseconds=int(raw.get("max_queue_delay_microseconds", 0)),
        preferred_batch_size=tuple(
            int(v) for v in (preferred if isinstance(preferred, list) else [preferred])
        ),
    )
    if max_batch_size < 2:
        raise ModelLoadError("config.yaml dynamic_batching needs max_batch_size of 2 or more")
    if batching.max_queue_delay_microseconds < 0:
        raise ModelLoadError("config.yaml dynamic_batching: the queue delay is negative")
    if any(not 1 <= size <= max_batch_size for size in batching.preferred_batch_size):
        raise ModelLoadError(
            f"config.yaml dynamic_batching.preferred_batch_size must lie in [1, {max_batch_size}]"
        )
    return batching


def _parse_background(raw: Any, folder: Path | None) -> tuple[tuple[float, ...], ...]:
    """Up to 100 reference rows: inline lists, or a .npy file [rows, features] beside the config."""
    if raw is None:
        return ()
    if isinstance(raw, str):
        path = Path(raw) if folder is None or Path(raw).is_absolute() else folder / raw
        try:
            raw = np.load(path, allow_pickle=False).tolist()
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"config.yaml background {path.name!r} cannot be read: {type(exc).__name__}"
            ) from None
    rows = tuple(tuple(float(v) for v in row) for row in raw)
    if not rows or len(rows) > MAX_BACKGROUND_ROWS or len({len(r) for r in rows}) != 1:
        raise ModelLoadError(
            f"config.yaml background must hold 1 to {MAX_BACKGROUND_ROWS} rows of equal length"
        )
    return rows
