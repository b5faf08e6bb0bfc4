"""What one record says: the facts of a request gathered as it runs, then its outcome."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from xaid_server.audit.canonical import jsonable, utc_now
from xaid_server.audit.digests import tensor_digest, top_attributions
from xaid_server.auth import CALLER
from xaid_server.core.inputs import ModelInput
from xaid_server.core.requests import ExplainResult, PredictResult
from xaid_server.errors import XaidError
from xaid_server.requestid import REQUEST_ID
from xaid_server.runtime.model import LoadedModel

Record = dict[str, Any]  # a record's body: plain JSON values


def model_fields(model: LoadedModel) -> dict[str, Any]:
    """The model version, and the chunk sizes its graphs ran in (measured at load, so a replay
    must take the recorded ones to batch the same rows together)."""
    return {
        "name": model.name,
        "version": model.version,
        "sha256": model.sha256,
        "provider": model.provider,
        "chunks": dict(model.chunks),
        "lanes": {
            key: {"count": lanes.count, "chunk": lanes.chunk} for key, lanes in model.lanes.items()
        },
    }


def status_of(exc: BaseException) -> tuple[str, str]:
    """The status code name a client sees for `exc`, and the message it reads."""
    if isinstance(exc, XaidError):
        return exc.code.name, exc.message
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name, "the call was cancelled"
    return grpc.StatusCode.INTERNAL.name, type(exc).__name__


@dataclass
class Trail:
    """One Predict or Explain: the core fills it in as the facts become known."""

    kind: str  # predict or explain
    model_name: str
    model_version: str
    caller: str = field(default_factory=CALLER.get)  # token subject or certificate name
    method: str = ""
    image: bytes = b""
    text: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    request_id: str = field(default_factory=REQUEST_ID.get)  # the one the caller was sent
    started: str = ""  # set by begin(): a request that is not recorded costs nothing here
    model: LoadedModel | None = None
    given: ModelInput | None = None
    input_name: str = ""
    parameters: Any = None
    seed: int | None = None

    def begin(self) -> None:
        self.started = utc_now()

    def body(self, status: str, message: str, outcome: dict[str, Any]) -> Record:
        """The record without its chain fields (record id, sequence and hashes come on write)."""
        body: dict[str, Any] = {
            "kind": self.kind,
            "request_id": self.request_id,
            "started": self.started,
            "finished": utc_now(),
            "caller": self.caller,
            "status": status,
            "message": message,
            "model": model_fields(self.model)
            if self.model is not None
            else {"name": self.model_name, "version": self.model_version},
            "settings": self.settings,
        }
        if self.given is not None:
            body["input"] = self._input()
        if self.kind == "explain":
            body["explanation"] = {
                "method": self.method,
                "input": self.input_name,
                "parameters": None if self.parameters is None else jsonable(self.parameters),
                "seed": self.seed,
            }
        body.update(outcome)
        return body

    def _input(self) -> dict[str, Any]:
        assert self.given is not None
        feeds = self.given.feeds
        source = "image" if self.image else "text" if self.text else "tensors"
        described: dict[str, Any] = {
            "source": source,
            "sha256": tensor_digest(feeds.items()),
            "tensors": [
                {"name": name, "dtype": a.dtype.name, "shape": list(a.shape)}
                for name, a in sorted(feeds.items())
            ],
        }
        if self.image:
            described["image_sha256"] = hashlib.sha256(self.image).hexdigest()
        if self.text:
            described["text_sha256"] = hashlib.sha256("\n".join(self.text).encode()).hexdigest()
        return described

    def failed(self, exc: BaseException) -> Record:
        return self.body(*status_of(exc), {})

    def predicted(self, result: PredictResult) -> Record:
        return self.body(
            grpc.StatusCode.OK.name,
            "",
            {
                "output": {
                    "sha256": tensor_digest(result.outputs),
                    "top": [jsonable(score) for score in result.top],
                }
            },
        )

    def explained(self, result: ExplainResult) -> Record:
        self.parameters = result.parameters
        self.seed = result.seed
        attribution = result.attribution
        return self.body(
            grpc.StatusCode.OK.name,
            "",
            {
                "output": {"sha256": tensor_digest(result.prediction)},
                "target": {"output": result.target_output, "classes": result.target_classes},
                "attribution": {
                    "sha256": tensor_digest([("attribution", attribution)]),
                    "dtype": attribution.dtype.name,
                    "shape": list(attribution.shape),
                    "top": top_attributions(np.asarray(attribution)),
                },
                "model_evaluations": result.model_evaluations,
            },
        )


def model_event(
    kind: str, name: str, version: str, model: LoadedModel | None, error: str = ""
) -> Record:
    """A model load (or failed load) or unload: no caller, no request."""
    now = utc_now()
    return {
        "kind": kind,
        "started": now,
        "finished": now,
        "status": "FAILED" if error else grpc.StatusCode.OK.name,
        "message": error,
        "model": model_fields(model) if model is not None else {"name": name, "version": version},
    }
