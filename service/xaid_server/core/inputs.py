"""Request inputs checked against the model's specs and turned into session feeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from xaid._codec import datatype_of
from xaid_server.errors import FailedPrecondition, InvalidArgument
from xaid_server.preprocess import decode_image
from xaid_server.runtime.model import LoadedModel
from xaid_server.tokens import encode


@dataclass
class ModelInput:
    """Feeds for every model input, and the decoded image when the request sent one."""

    feeds: dict[str, np.ndarray]
    image: Image.Image | None = None
    tokens: list[list[str]] = field(default_factory=list)  # when the request sent text

    @property
    def rows(self) -> int:
        return int(next(iter(self.feeds.values())).shape[0])


def model_input(
    model: LoadedModel,
    tensors: Sequence[tuple[str, np.ndarray]],
    image: bytes,
    text: Sequence[str] = (),
) -> ModelInput:
    """Feeds from raw tensors, an encoded image or text (exactly one of the three)."""
    if sum(map(bool, (image, tensors, text))) > 1:
        raise InvalidArgument("send one of inputs, image or text", field="image")
    if text:
        if len(model.inputs) != 1:
            raise FailedPrecondition("text requests need a model with a single input", field="text")
        spec = model.inputs[0]
        ids, tokens = encode(text, model.config.text, spec.shape[1] if spec.rank == 2 else -1)
        return ModelInput(check_tensors(model, [(spec.name, ids)]), tokens=tokens)
    if image:
        if model.config.image is None:
            raise FailedPrecondition(
                f"model {model.name!r} has no image preprocessing; send raw tensors in inputs",
                field="image",
            )
        if len(model.inputs) != 1:
            raise FailedPrecondition(
                "image requests need a model with a single input", field="image"
            )
        tensor, original = decode_image(image, model.config.image)
        return ModelInput({model.inputs[0].name: tensor}, original)
    if not tensors:
        raise InvalidArgument("inputs: no input tensor and no image in the request", field="inputs")
    return ModelInput(check_tensors(model, tensors))


def check_tensors(
    model: LoadedModel, tensors: Sequence[tuple[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    specs = {spec.name: spec for spec in model.inputs}
    if len(tensors) != len(specs):
        raise InvalidArgument(
            f"inputs: model {model.name!r} takes {len(specs)} input(s) {sorted(specs)}, "
            f"got {len(tensors)}",
            field="inputs",
        )
    feeds: dict[str, np.ndarray] = {}
    for i, (given_name, array) in enumerate(tensors):
        name = given_name or model.inputs[i].name
        field = f"inputs[{i}]"
        spec = specs.get(name)
        if spec is None:
            raise InvalidArgument(
                f"{field}.name: {name!r} is not an input of {model.name!r}; "
                f"inputs: {sorted(specs)}",
                field=f"{field}.name",
            )
        if name in feeds:
            raise InvalidArgument(
                f"{field}.name: input {name!r} given twice", field=f"{field}.name"
            )
        datatype = datatype_of(array.dtype)
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"{field}.datatype: input {name!r} takes {spec.datatype}, got {datatype}",
                field=f"{field}.datatype",
            )
        if array.ndim != spec.rank or any(
            want >= 0 and got != want for got, want in zip(array.shape, spec.shape, strict=True)
        ):
            raise InvalidArgument(
                f"{field}.shape: input {name!r} takes shape {list(spec.shape)} (-1 = any), "
                f"got {list(array.shape)}",
                field=f"{field}.shape",
            )
        if array.ndim == 0 or array.shape[0] == 0 or array.size == 0:
            raise InvalidArgument(
                f"{field}.shape: empty tensor {list(array.shape)}", field=f"{field}.shape"
            )
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidArgument(f"{field}.data: NaN or infinite values", field=f"{field}.data")
        feeds[name] = array
    batches = {a.shape[0] for a in feeds.values()}
    if len(batches) != 1:
        raise InvalidArgument(f"inputs: batch sizes differ: {sorted(batches)}", field="inputs")
    return feeds
