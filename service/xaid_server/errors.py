"""One error base class carrying its gRPC status code; one interceptor maps it (interceptors.py).

Messages are shown to clients verbatim: they name fields and values, never paths or internals.
"""

from __future__ import annotations

import grpc


class XaidError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidArgument(XaidError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(XaidError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(XaidError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(XaidError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(XaidError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(XaidError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(XaidError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(XaidError):
    code = grpc.StatusCode.UNIMPLEMENTED


class ModelLoadError(Exception):
    """A model version that cannot be served; never reaches a client directly."""
