"""Replaying a record: the same model file, input, method, parameters and seed on the CPU must
give the recorded digests bit for bit.

The input file is what the request sent: the image file for an image request, a UTF-8 text file
(one text a line) for a text request, else a `.npy` file (a model with one input) or a `.npz`
file whose arrays are named after the model's inputs.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from xaid_server.audit.digests import tensor_digest
from xaid_server.audit.verify import read_record
from xaid_server.core.inputs import model_input
from xaid_server.core.requests import ExplainCall, PredictCall, Tensors
from xaid_server.core.service import Core
from xaid_server.errors import ModelLoadError, XaidError
from xaid_server.metrics import Metrics
from xaid_server.repository import ModelRepository
from xaid_server.runtime.model import LoadedModel, SessionFactory
from xaid_server.runtime.runner import Lanes
from xaid_server.server import prepare_explainers
from xaid_server.settings import Settings

CPU = "CPUExecutionProvider"


class ReplayRefused(Exception):
    """The record cannot be replayed as asked: the message says why."""


@dataclass(frozen=True)
class Replayed:
    seq: int
    kind: str
    what: str  # the digest compared: attribution (Explain) or output (Predict)
    recorded: str
    replayed: str

    @property
    def matches(self) -> bool:
        return self.recorded == self.replayed


@dataclass
class _Request:
    tensors: Tensors
    image: bytes = b""
    text: tuple[str, ...] = ()


def read_input(path: Path, described: dict[str, Any]) -> _Request:
    """The request's input from `path`, in the format its record's `source` asks for."""
    source = described["source"]
    try:
        if source == "image":
            return _Request([], image=path.read_bytes())
        if source == "text":
            return _Request([], text=tuple(path.read_text(encoding="utf-8").splitlines()))
        return _Request(_tensors(path, [t["name"] for t in described["tensors"]]))
    except (ValueError, OSError) as exc:
        raise ReplayRefused(f"{path.name}: not a readable {source} input: {exc}") from None


def _tensors(path: Path, names: list[str]) -> Tensors:
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise ReplayRefused(f"the model takes inputs {names}: give an .npz file")
        return [(names[0], loaded)]
    with loaded:
        return [(name, loaded[name]) for name in loaded.files]


def _run_as_recorded(
    model: LoadedModel, chunks: dict[str, int], lanes: dict[str, dict[str, int]]
) -> None:
    """The recorded chunk sizes and lanes instead of the ones measured at this load."""
    model.chunks.clear()
    model.chunks.update(chunks)
    model.lanes.clear()
    for key, lane in lanes.items():
        session = model.lane_session(key)
        if session is None:
            raise ReplayRefused(f"the graph the record ran as {key} could not be made here")
        model.lanes[key] = Lanes(session, lane["count"], lane["chunk"])


async def replay(
    log: Path, seq: int, input_path: Path, models: Path, gradient_cache: Path | None = None
) -> Replayed:
    """Re-run record `seq` of `log` with the model of the repository `models`."""
    try:
        record = read_record(log, seq)
    except LookupError as exc:
        raise ReplayRefused(str(exc)) from None
    kind = record["kind"]
    if kind not in ("predict", "explain") or record["status"] != "OK":
        raise ReplayRefused(f"record {seq} is a {kind} with status {record['status']}: no answer")
    recorded = record["settings"]
    wanted = record["model"]
    lanes = wanted.get("lanes", {})
    # side-by-side runs need a factory that makes lane sessions: as many threads as lanes
    counts = {lane["count"] for lane in lanes.values()}
    settings = Settings(
        models=models,
        max_chunk_bytes=recorded["max_chunk_bytes"],
        max_evaluations=recorded["max_evaluations"],
        intra_op_threads=recorded["intra_op_threads"] or max(counts, default=0),
        gradient_cache=gradient_cache or Settings().gradient_cache,
    )
    factory = SessionFactory(
        (CPU,), settings.intra_op_threads, settings.gradient_cache.expanduser()
    )
    metrics = Metrics()
    repository = ModelRepository(models, factory, metrics, prepare_explainers)
    try:
        model = repository.load(wanted["name"], wanted["version"])
    except ModelLoadError as exc:
        raise ReplayRefused(f"model {wanted['name']} version {wanted['version']}: {exc}") from None
    if model.sha256 != wanted["sha256"]:
        raise ReplayRefused(
            f"model {model.name} version {model.version} is not the recorded file: sha256 "
            f"{model.sha256} instead of {wanted['sha256']}"
        )
    _run_as_recorded(model, wanted.get("chunks", {}), lanes)
    request = read_input(input_path, record["input"])
    try:
        given = model_input(model, request.tensors, request.image, request.text)
    except XaidError as exc:
        raise ReplayRefused(f"{input_path.name}: {exc.message}") from None
    if tensor_digest(given.feeds.items()) != record["input"]["sha256"]:
        raise ReplayRefused(
            f"{input_path.name} does not match the input digest of record {seq}: "
            "it is not the input the model was given"
        )
    with ThreadPoolExecutor(1, thread_name_prefix="xaid-replay") as executor:
        core = Core(settings, repository, metrics, executor)
        if kind == "predict":
            predicted = await core.predict(
                PredictCall(
                    model.name,
                    model.version,
                    request.tensors,
                    request.image,
                    list(request.text),
                    top_k=0,
                )
            )
            digest = tensor_digest(predicted.outputs)
            return Replayed(seq, kind, "output", record["output"]["sha256"], digest)
        explanation = record["explanation"]
        classes = record["target"]["classes"]
        explained = await core.explain(
            ExplainCall(
                model=model.name,
                method=explanation["method"],
                parameters={k: v for k, v in explanation["parameters"].items() if v is not None},
                version=model.version,
                inputs=request.tensors,
                image=request.image,
                text=list(request.text),
                input=explanation["input"],
                target_output=record["target"]["output"],
                target_class=classes[0] if len(set(classes)) == 1 else None,
                seed=explanation["seed"],
            )
        )
    digest = tensor_digest([("attribution", explained.attribution)])
    return Replayed(seq, kind, "attribution", record["attribution"]["sha256"], digest)
