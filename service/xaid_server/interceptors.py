"""gRPC interceptors: the request id, errors mapped to status codes in one place, and the
grpc_server_* metrics."""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, NoReturn, TypeAlias, cast

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from prometheus_client import Counter

from xaid_server.errors import InvalidArgument, XaidError
from xaid_server.metrics import Metrics
from xaid_server.requestid import METADATA_KEY, REQUEST_ID, with_request_id

log = logging.getLogger(__name__)

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
Unary = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
Stream = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]


def rewrap(
    handler: Handler,
    unary: Callable[[Unary], Unary],
    stream: Callable[[Stream], Stream],
    deserializer: Callable[[bytes], Any] | None = None,
) -> Handler:
    """The same handler with its behaviour (and optionally its request parser) wrapped; only
    the shapes xaid serves are wrapped."""
    parse = deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(Unary, handler.unary_unary)),
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        behavior = handler.unary_stream
        # a streaming handler that writes with context.write (health's Watch) is a coroutine
        wrapped = (
            stream(cast(Stream, behavior))
            if inspect.isasyncgenfunction(behavior)
            else unary(cast(Unary, behavior))
        )
        return grpc.unary_stream_rpc_method_handler(
            wrapped,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
    return handler


class _Undecodable:
    """Stands for request bytes that do not parse, so the handler can answer INVALID_ARGUMENT
    (a parser that raises makes grpc answer UNKNOWN with the exception's text)."""


UNDECODABLE = _Undecodable()


def _lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def run(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception:
            return UNDECODABLE

    return run


def _check_parsed(request: Any) -> None:
    if request is UNDECODABLE:
        raise InvalidArgument("request: the message cannot be parsed", field="request")


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """Abort the RPC for an exception: XaidError text as is, anything else as a generic INTERNAL."""
    if isinstance(exc, XaidError):
        status = status_pb2.Status(code=exc.code.value[0], message=exc.message)
        if exc.field:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=exc.field, description=exc.message
            )
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        await context.abort(
            exc.code, exc.message, with_request_id(rpc_status.to_status(status).trailing_metadata)
        )
    request_id = REQUEST_ID.get() or uuid.uuid4().hex
    log.error("unexpected error, request id %s", request_id, exc_info=exc)
    message = f"internal error; request id {request_id}"
    status = status_pb2.Status(code=code_pb2.INTERNAL, message=message)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        message,
        with_request_id(rpc_status.to_status(status).trailing_metadata),
    )


class WrapOnce(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once, not on every call."""

    def __init__(self) -> None:
        # method -> (registered handler, its wrapped copy)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    @abc.abstractmethod
    def wrap(self, method: str, handler: Handler) -> Handler: ...

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._wrapped.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(details.method, handler)
        self._wrapped[details.method] = (handler, wrapped)
        return wrapped


class RequestIdInterceptor(WrapOnce):
    """Gives every call but the exempt services' a fresh id, in `REQUEST_ID` and sent as
    trailing metadata, so the caller has it whatever the status."""

    def __init__(self, exempt: Iterable[str]) -> None:
        super().__init__()
        self.exempt = frozenset(exempt)

    def wrap(self, method: str, handler: Handler) -> Handler:
        if split_method(method)[0] in self.exempt:
            return handler
        return rewrap(handler, self._unary, self._stream)

    @staticmethod
    def _assign(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """The id, and trailing metadata carrying it for a call that ends well (the error
        paths send their own, with the id: `with_request_id`)."""
        request_id = uuid.uuid4().hex
        REQUEST_ID.set(request_id)
        context.set_trailing_metadata(((METADATA_KEY, request_id),))

    def _unary(self, behavior: Unary) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self._assign(context)
            return await behavior(request, context)

        return run

    def _stream(self, behavior: Stream) -> Stream:
        async def run(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            self._assign(context)
            async for item in behavior(request, context):
                yield item

        return run


class ErrorInterceptor(WrapOnce):
    def wrap(self, method: str, handler: Handler) -> Handler:
        return rewrap(handler, self._unary, self._stream, _lenient(handler.request_deserializer))

    @staticmethod
    def _unary(behavior: Unary) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                _check_parsed(request)
                return await behavior(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await abort_with(context, exc)

        return run

    @staticmethod
    def _stream(behavior: Stream) -> Stream:
        async def run(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            try:
                _check_parsed(request)
                async for item in behavior(request, context):
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:
                await abort_with(context, exc)

        return run


def split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


class _Series:
    """The grpc_server_* children of one RPC, looked up once: a labels() lookup costs more
    than the update itself."""

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.handled = metrics.grpc_handled
        self.started = metrics.grpc_started.labels(*labels)
        self.handling = metrics.grpc_handling.labels(*labels)
        self.by_code: dict[grpc.StatusCode, Counter] = {}

    def done(self, began: float, code: grpc.StatusCode) -> None:
        handled = self.by_code.get(code)
        if handled is None:
            handled = self.by_code[code] = self.handled.labels(*self.labels, code.name)
        handled.inc()
        self.handling.observe(time.perf_counter() - began)


class MetricsInterceptor(WrapOnce):
    """grpc_server_started/handled/handling_seconds, counting aborted and cancelled RPCs too."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def series(self, method: str, rpc_type: str) -> _Series:
        service, name = split_method(method)
        return _Series(self.metrics, (service, name, rpc_type))

    def wrap(self, method: str, handler: Handler) -> Handler:
        return rewrap(
            handler,
            lambda b: self._unary(b, self.series(method, "unary")),
            lambda b: self._stream(b, self.series(method, "server_stream")),
        )

    @staticmethod
    def _code(
        context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
    ) -> grpc.StatusCode:
        if exc is None:
            return grpc.StatusCode.OK
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN

    def _unary(self, behavior: Unary, series: _Series) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            series.started.inc()
            began = time.perf_counter()
            try:
                response = await behavior(request, context)
            except BaseException as exc:
                series.done(began, self._code(context, exc))
                raise
            series.done(began, grpc.StatusCode.OK)
            return response

        return run

    def _stream(self, behavior: Stream, series: _Series) -> Stream:
        async def run(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            series.started.inc()
            began = time.perf_counter()
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                series.done(began, self._code(context, exc))
                raise
            series.done(began, grpc.StatusCode.OK)

        return run
