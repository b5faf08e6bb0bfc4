"""Errors raised by the xaid client: one class per gRPC status code, under one base.

Callers catch `XaidError` for any server failure, or a subclass for the ones they can act on
(`NotFound` for a wrong model name, `InvalidArgument` for a bad input, `Unavailable` to retry),
without importing grpc. The original `grpc.RpcError` stays reachable as `__cause__`.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

__all__ = [
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "XaidError",
    "from_rpc_error",
]


#: The trailing-metadata key of the server's id for a call (the `request_id` of its audit record).
REQUEST_ID_METADATA = "xaid-request-id"


def request_id_of(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The server's id for a call from its trailing metadata ("" when it sent none)."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA:
            return value.decode() if isinstance(value, bytes) else value
    return ""


class XaidError(Exception):
    """A failed call: `code` is the gRPC status, `details` the server's message, `request_id`
    the server's id for the call (quote it to the operator: their log and audit trail have it)."""

    #: The status this class stands for; instances carry the one actually received.
    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, details: str = "", code: grpc.StatusCode | None = None, request_id: str = ""
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.details: str = details
        self.request_id: str = request_id
        super().__init__(f"{self.code.name}: {details}" if details else self.code.name)


class InvalidArgument(XaidError):
    """The request itself is wrong (input shape, datatype, parameter value): fix and resend."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(XaidError):
    """No such model or version on the server."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(XaidError):
    """The request is valid but not for this model (e.g. a method it does not support)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(XaidError):
    """The server cannot be reached or is not ready yet; retrying later may succeed."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(XaidError):
    """A size or load limit was hit (message size, batch size, queue)."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(XaidError):
    """The call took longer than its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(XaidError):
    """The call was cancelled, by the client or the server."""

    default_code = grpc.StatusCode.CANCELLED


class Unimplemented(XaidError):
    """The server does not offer this RPC (an older or different server)."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class Unauthenticated(XaidError):
    """The server wants credentials the call did not carry."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(XaidError):
    """The credentials are known but not allowed to make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Internal(XaidError):
    """The server failed; nothing the caller can fix."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[XaidError]] = {
    cls.default_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unimplemented,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


def from_rpc_error(err: grpc.RpcError) -> XaidError:
    """The xaid error for a failed RPC; codes without a class of their own give `XaidError`.

    Works for both `grpc` and `grpc.aio` errors. The caller should `raise ... from err`.
    """
    code_of = getattr(err, "code", None)
    details_of = getattr(err, "details", None)
    trailing_of = getattr(err, "trailing_metadata", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    request_id = request_id_of(trailing_of()) if callable(trailing_of) else ""
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, XaidError)
    return cls(details if isinstance(details, str) else "", code, request_id)
