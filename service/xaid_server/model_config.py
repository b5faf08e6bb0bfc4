"""A model's `config.yaml`: what the graph alone cannot say (kind, preprocessing, labels, defaults).

Every field is optional; `infer_config` fills what is missing from the graph's input shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xaid_server.errors import ModelLoadError

KINDS = ("image", "tabular", "text")
LAYOUTS = ("NCHW", "NHWC")


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
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    return parse_config(raw)


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ModelLoadError(f"config.yaml has unknown keys {unknown}; known: {sorted(known)}")
    kind = str(raw.get("kind", ""))
    if kind and kind not in KINDS:
        raise ModelLoadError(f"config.yaml kind {kind!r} is not one of {KINDS}")
    image = _parse_image(raw["image"]) if raw.get("image") is not None else None
    features = _parse_features(raw["features"]) if raw.get("features") is not None else None
    input_range = raw.get("input_range")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict) or not all(isinstance(v, dict) for v in defaults.values()):
        raise ModelLoadError("config.yaml defaults must map method names to parameter mappings")
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
            defaults={str(k): dict(v) for k, v in defaults.items()},
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
