"""Client and AsyncClient: the same methods over a blocking channel and over grpc.aio.

Request building and result decoding live in `_requests` / `_results`, so the two clients only
differ in how they call the stub; every `grpc.RpcError` leaves as an `xaid.errors` class.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import Message

from xaid import _requests
from xaid._requests import ModelInput
from xaid._results import Explanation, ModelInfo, Prediction
from xaid.errors import Internal, from_rpc_error, request_id_of
from xaid.v1 import xaid_pb2, xaid_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
#: Attributions and heatmaps of large batches easily pass grpc's 4 MiB default.
DEFAULT_MAX_MESSAGE_LENGTH = 64 * 1024 * 1024

_Response = TypeVar("_Response")


class _BaseClient:
    """Channel options and request building shared by both clients."""

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None,
        max_send_message_length: int,
        max_receive_message_length: int,
        options: Sequence[tuple[str, Any]],
        token: str | None,
    ) -> None:
        self.target = target
        #: Sent with every call when the server requires bearer-token authentication.
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        #: Seconds each call may take; None waits as long as the server works.
        self.timeout = timeout
        self._channel_options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_send_message_length),
            ("grpc.max_receive_message_length", max_receive_message_length),
            *options,
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, timeout={self.timeout!r})"

    @staticmethod
    def _predict_request(
        model: str, x: ModelInput, top_k: int, version: str
    ) -> xaid_pb2.PredictRequest:
        return _requests.predict_request(model, x, top_k=top_k, version=version)

    @staticmethod
    def _explain_request(
        model: str,
        x: ModelInput,
        method: str,
        *,
        target: int | None,
        output: str,
        seed: int | None,
        render: bool,
        evaluate: bool,
        version: str,
        input: str,
        params: dict[str, object],
    ) -> xaid_pb2.ExplainRequest:
        return _requests.explain_request(
            model,
            x,
            method,
            target=target,
            output=output,
            seed=seed,
            render=render,
            evaluate=evaluate,
            version=version,
            input=input,
            params=params,
        )


def _no_result() -> Internal:
    return Internal("the progress stream ended without a result")


class Client(_BaseClient):
    """A blocking client; use it as a context manager or call `close()`.

    `channel` lets callers bring their own (interceptors, TLS set up elsewhere); such a channel
    is theirs to close. Otherwise `credentials` selects TLS and `options` add channel options.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.Channel | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            max_send_message_length=max_send_message_length,
            max_receive_message_length=max_receive_message_length,
            options=options,
            token=token,
        )
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.insecure_channel(target, options=self._channel_options)
            else:
                channel = grpc.secure_channel(target, credentials, options=self._channel_options)
        self._channel = channel
        self._stub = xaid_pb2_grpc.ExplainerStub(channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel this client opened (a caller's channel stays open)."""
        if self._owns_channel:
            self._channel.close()

    def _call(
        self,
        method: Callable[..., _Response],
        request: Message,
    ) -> _Response:
        try:
            response: _Response = method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return response

    def _identified(
        self, method: grpc.UnaryUnaryMultiCallable[Any, _Response], request: Message
    ) -> tuple[_Response, str]:
        """The response and the server's id for the call."""
        response, call = self._call(method.with_call, request)
        return response, request_id_of(call.trailing_metadata())

    def models(self) -> list[ModelInfo]:
        """Every model the server knows, with its served version."""
        response: xaid_pb2.ListModelsResponse = self._call(
            self._stub.ListModels, xaid_pb2.ListModelsRequest()
        )
        return [ModelInfo.from_proto(m) for m in response.models]

    def model(self, name: str, version: str = "") -> ModelInfo:
        """One model; an empty version means the served one."""
        return ModelInfo.from_proto(
            self._call(self._stub.GetModel, _requests.model_request(name, version))
        )

    def predict(
        self, model: str, x: ModelInput, *, top_k: int = 5, version: str = ""
    ) -> Prediction:
        """Model outputs and top classes for an array, a dict of arrays, or an image."""
        request = self._predict_request(model, x, top_k, version)
        return Prediction.from_proto(*self._identified(self._stub.Predict, request))

    def explain(
        self,
        model: str,
        x: ModelInput,
        method: str = "occlusion",
        *,
        target: int | None = None,
        output: str = "",
        seed: int | None = None,
        render: bool = False,
        evaluate: bool = False,
        version: str = "",
        input: str = "",
        progress: Callable[[int, int], None] | None = None,
        **params: object,
    ) -> Explanation:
        """Attribute the prediction for `x` with `method`; `params` are its proto fields.

        With `progress`, the streaming RPC is used and `progress(done, total)` is called for
        every progress message; an exception from it cancels the call on the server.
        """
        request = self._explain_request(
            model,
            x,
            method,
            target=target,
            output=output,
            seed=seed,
            render=render,
            evaluate=evaluate,
            version=version,
            input=input,
            params=params,
        )
        if progress is None:
            return Explanation.from_proto(*self._identified(self._stub.Explain, request))
        return Explanation.from_proto(*self._stream(request, progress))

    def _stream(
        self, request: xaid_pb2.ExplainRequest, progress: Callable[[int, int], None]
    ) -> tuple[xaid_pb2.ExplainResponse, str]:
        stream = self._stub.ExplainStream(request, timeout=self.timeout, metadata=self._metadata)
        result: xaid_pb2.ExplainResponse | None = None
        try:
            message: xaid_pb2.ExplainStreamResponse
            for message in stream:  # read to the end, so the call finishes with OK
                kind = message.WhichOneof("kind")
                if kind == "progress":
                    progress(message.progress.done, message.progress.total)
                elif kind == "result":
                    result = message.result
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except BaseException:
            stream.cancel()  # the callback failed or the caller interrupted: stop the server
            raise
        if result is None:
            raise _no_result()
        return result, request_id_of(stream.trailing_metadata())


class AsyncClient(_BaseClient):
    """The asyncio client: Client's methods as coroutines, on a grpc.aio channel.

    Create it inside the running event loop; `async with` closes it.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = None,
        max_send_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        max_receive_message_length: int = DEFAULT_MAX_MESSAGE_LENGTH,
        options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        channel: grpc.aio.Channel | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__(
            target,
            timeout=timeout,
            max_send_message_length=max_send_message_length,
            max_receive_message_length=max_receive_message_length,
            options=options,
            token=token,
        )
        self._owns_channel = channel is None
        if channel is None:
            if credentials is None:
                channel = grpc.aio.insecure_channel(target, options=self._channel_options)
            else:
                channel = grpc.aio.secure_channel(
                    target, credentials, options=self._channel_options
                )
        self._channel = channel
        self._stub = xaid_pb2_grpc.ExplainerStub(channel)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel this client opened (a caller's channel stays open)."""
        if self._owns_channel:
            await self._channel.close()

    async def _call(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Any, _Response], request: Message
    ) -> _Response:
        response, _ = await self._identified(method, request)
        return response

    async def _identified(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Any, _Response], request: Message
    ) -> tuple[_Response, str]:
        """The response and the server's id for the call."""
        call = method(request, timeout=self.timeout, metadata=self._metadata)
        try:
            response = await call
            request_id = request_id_of(await call.trailing_metadata())
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        return response, request_id

    async def models(self) -> list[ModelInfo]:
        """Every model the server knows, with its served version."""
        response: xaid_pb2.ListModelsResponse = await self._call(
            self._stub.ListModels, xaid_pb2.ListModelsRequest()
        )
        return [ModelInfo.from_proto(m) for m in response.models]

    async def model(self, name: str, version: str = "") -> ModelInfo:
        """One model; an empty version means the served one."""
        return ModelInfo.from_proto(
            await self._call(self._stub.GetModel, _requests.model_request(name, version))
        )

    async def predict(
        self, model: str, x: ModelInput, *, top_k: int = 5, version: str = ""
    ) -> Prediction:
        """Model outputs and top classes for an array, a dict of arrays, or an image."""
        request = self._predict_request(model, x, top_k, version)
        return Prediction.from_proto(*await self._identified(self._stub.Predict, request))

    async def explain(
        self,
        model: str,
        x: ModelInput,
        method: str = "occlusion",
        *,
        target: int | None = None,
        output: str = "",
        seed: int | None = None,
        render: bool = False,
        evaluate: bool = False,
        version: str = "",
        input: str = "",
        progress: Callable[[int, int], Awaitable[None] | None] | None = None,
        **params: object,
    ) -> Explanation:
        """Attribute the prediction for `x` with `method`; `params` are its proto fields.

        With `progress` (a function or a coroutine function), the streaming RPC is used and
        `progress(done, total)` is called for every progress message.
        """
        request = self._explain_request(
            model,
            x,
            method,
            target=target,
            output=output,
            seed=seed,
            render=render,
            evaluate=evaluate,
            version=version,
            input=input,
            params=params,
        )
        if progress is None:
            return Explanation.from_proto(*await self._identified(self._stub.Explain, request))
        return Explanation.from_proto(*await self._stream(request, progress))

    async def _stream(
        self,
        request: xaid_pb2.ExplainRequest,
        progress: Callable[[int, int], Awaitable[None] | None],
    ) -> tuple[xaid_pb2.ExplainResponse, str]:
        call = self._stub.ExplainStream(request, timeout=self.timeout, metadata=self._metadata)
        result: xaid_pb2.ExplainResponse | None = None
        try:
            message: xaid_pb2.ExplainStreamResponse
            async for message in call:  # read to the end, so the call finishes with OK
                kind = message.WhichOneof("kind")
                if kind == "progress":
                    pending = progress(message.progress.done, message.progress.total)
                    if inspect.isawaitable(pending):
                        await pending
                elif kind == "result":
                    result = message.result
        except grpc.RpcError as err:
            raise from_rpc_error(err) from err
        except BaseException:
            call.cancel()  # the callback failed or the task was cancelled: stop the server
            raise
        if result is None:
            raise _no_result()
        return result, request_id_of(await call.trailing_metadata())
