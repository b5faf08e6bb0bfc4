"""The id of the current RPC: one per call, sent to the caller and written to its audit record,
so an answer, its log lines and its record can be matched up.

It travels as trailing metadata, which goes out with the status whatever it is: initial
metadata would be a message of its own ahead of the response (0.1 ms more per Predict)."""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from typing import Any

#: The trailing-metadata key the id travels under.
METADATA_KEY = "xaid-request-id"
#: The current call's id (uuid4 hex); empty outside an RPC, e.g. for model loads.
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("xaid_request_id", default="")


def with_request_id(metadata: Sequence[tuple[str, str | bytes]] = ()) -> tuple[Any, ...]:
    """Trailing metadata for an error status: `metadata` and the current call's id."""
    request_id = REQUEST_ID.get()
    return (*metadata, (METADATA_KEY, request_id)) if request_id else tuple(metadata)
