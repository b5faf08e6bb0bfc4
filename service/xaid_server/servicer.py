"""The xaid.v1 servicer: decode the request, call the core, encode the response. No logic here."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf.message import Message

from xaid._codec import TensorCodecError, from_tensor, to_tensor
from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.core.requests import ExplainCall, ExplainResult, PredictCall, Tensors
from xaid_server.core.service import Core
from xaid_server.errors import InvalidArgument
from xaid_server.runtime.model import LoadedModel

Context = grpc.aio.ServicerContext[Any, Any]

METHOD_FIELDS: tuple[str, ...] = tuple(
    f.name for f in xaid_pb2.ExplainRequest.DESCRIPTOR.oneofs_by_name["method"].fields
)


def decode_tensors(tensors: Any, field: str) -> Tensors:
    try:
        return [(t.name, from_tensor(t, f"{field}[{i}]")) for i, t in enumerate(tensors)]
    except TensorCodecError as exc:
        raise InvalidArgument(str(exc), field=exc.field) from None


def parameters_from_proto(message: Message) -> dict[str, Any]:
    """The fields a request actually set; unset ones take the method's defaults."""
    given: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            if len(value):
                given[field.name] = list(value)
        elif field.has_presence:
            if message.HasField(field.name):
                given[field.name] = (
                    parameters_from_proto(value) if isinstance(value, Message) else value
                )
        elif value != field.default_value:
            given[field.name] = value
    return given


def parameters_to_proto(parameters: Any, message: Message) -> None:
    """Set the fields of `parameters`; the message counts as set even with none (oneofs)."""
    message.SetInParent()
    for f in dataclasses.fields(parameters):
        value = getattr(parameters, f.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            parameters_to_proto(value, getattr(message, f.name))
        elif isinstance(value, tuple | list):
            getattr(message, f.name).extend(value)
        else:
            setattr(message, f.name, value)


def timeout_of(context: Context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else float(remaining)


def model_info(core: Core, model: LoadedModel) -> xaid_pb2.ModelInfo:
    info = xaid_pb2.ModelInfo(
        name=model.name,
        versions=[model.version],
        version=model.version,
        inputs=[
            xaid_pb2.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in model.inputs
        ],
        outputs=[
            xaid_pb2.TensorSpec(name=s.name, datatype=s.datatype, shape=s.shape)
            for s in model.outputs
        ],
        labels=model.config.labels,
        methods=core.methods_for(model),
        execution_provider=model.provider,
        sha256=model.sha256,
        kind=model.config.kind,
        max_batch_size=model.config.max_batch_size,
        ready=True,
        feature_names=model.config.features.names if model.config.features else (),
    )
    reason = core.gradients_unavailable(model)
    info.gradients.CopyFrom(
        xaid_pb2.GradientSupport(
            available=reason is None,
            reason=reason or "",
            precision=model.config.precision,
            source=core.gradient_source(model),
        )
    )
    image = model.config.image
    if image is not None:
        info.image.CopyFrom(
            xaid_pb2.ImagePreprocessing(
                height=image.height,
                width=image.width,
                channels=image.channels,
                layout=image.layout,
                scale=image.scale,
                mean=image.mean,
                std=image.std,
            )
        )
    return info


def explain_call(request: xaid_pb2.ExplainRequest, context: Context) -> ExplainCall:
    method = request.WhichOneof("method") or ""
    return ExplainCall(
        model=request.model,
        version=request.version,
        method=method,
        parameters=parameters_from_proto(getattr(request, method)) if method else {},
        inputs=decode_tensors(request.inputs, "inputs"),
        image=request.image,
        text=list(request.text),
        input=request.input,
        target_output=request.target.output,
        target_class=request.target.class_index if request.target.HasField("class_index") else None,
        seed=request.seed if request.HasField("seed") else None,
        render=request.render,
        evaluate=request.evaluate,
        timeout=timeout_of(context),
    )


def explain_response(result: ExplainResult) -> xaid_pb2.ExplainResponse:
    response = xaid_pb2.ExplainResponse(
        model=result.model,
        version=result.version,
        attribution=to_tensor(result.attribution, "attribution"),
        prediction=[to_tensor(array, name) for name, array in result.prediction],
        target=xaid_pb2.ResolvedTarget(
            output=result.target_output,
            class_indices=result.target_classes,
            labels=result.target_labels,
        ),
        seed=result.seed,
        convergence_delta=result.convergence_delta,
        heatmap_png=result.heatmaps,
        model_evaluations=result.model_evaluations,
        timing=xaid_pb2.Timing(
            total_seconds=result.total_seconds, compute_seconds=result.compute_seconds
        ),
        aggregation=result.aggregation,
    )
    response.tokens.extend(xaid_pb2.Tokens(tokens=row) for row in result.tokens)
    if result.faithfulness is not None:
        response.faithfulness.CopyFrom(
            xaid_pb2.Faithfulness(
                deletion_auc=result.faithfulness.deletion_auc,
                insertion_auc=result.faithfulness.insertion_auc,
                model_evaluations=result.faithfulness.model_evaluations,
            )
        )
    for segment in result.segments:
        response.segments.add(
            segment_map=to_tensor(segment.segment_map, "segment_map"),
            weights=segment.weights.tolist(),
            names=segment.names,
            intercept=segment.intercept,
            score=segment.score,
            base_value=segment.base_value,
        )
    parameters_to_proto(result.parameters, getattr(response, result.method))
    return response


class ExplainerServicer(xaid_pb2_grpc.ExplainerServicer):
    def __init__(self, core: Core) -> None:
        self.core = core

    async def ListModels(
        self, request: xaid_pb2.ListModelsRequest, context: Context
    ) -> xaid_pb2.ListModelsResponse:
        models = self.core.repository.models()
        return xaid_pb2.ListModelsResponse(models=[model_info(self.core, m) for m in models])

    async def GetModel(
        self, request: xaid_pb2.GetModelRequest, context: Context
    ) -> xaid_pb2.ModelInfo:
        return model_info(self.core, self.core.repository.get(request.model, request.version))

    async def Predict(
        self, request: xaid_pb2.PredictRequest, context: Context
    ) -> xaid_pb2.PredictResponse:
        result = await self.core.predict(
            PredictCall(
                model=request.model,
                version=request.version,
                inputs=decode_tensors(request.inputs, "inputs"),
                image=request.image,
                text=list(request.text),
                top_k=request.top_k or 5,
                timeout=timeout_of(context),
            )
        )
        return xaid_pb2.PredictResponse(
            model=result.model,
            version=result.version,
            outputs=[to_tensor(array, name) for name, array in result.outputs],
            top=[
                xaid_pb2.ClassScore(
                    row=s.row,
                    index=s.index,
                    label=s.label,
                    score=s.score,
                    probability=s.probability,
                )
                for s in result.top
            ],
            tokens=[xaid_pb2.Tokens(tokens=row) for row in result.tokens],
        )

    async def Explain(
        self, request: xaid_pb2.ExplainRequest, context: Context
    ) -> xaid_pb2.ExplainResponse:
        return explain_response(await self.core.explain(explain_call(request, context)))

    async def ExplainStream(
        self, request: xaid_pb2.ExplainRequest, context: Context
    ) -> AsyncIterator[xaid_pb2.ExplainStreamResponse]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        call = explain_call(request, context)

        def progress(done: int, total: int) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, (done, total))

        call.progress = progress
        began = loop.time()
        task = asyncio.ensure_future(self.core.explain(call))
        waiter: asyncio.Future[tuple[int, int]] | None = None

        def progress_message(done: int, total: int) -> xaid_pb2.ExplainStreamResponse:
            elapsed = loop.time() - began
            return xaid_pb2.ExplainStreamResponse(
                progress=xaid_pb2.Progress(done=done, total=total, elapsed_seconds=elapsed)
            )

        try:
            while not task.done():
                if waiter is None:
                    waiter = asyncio.ensure_future(updates.get())
                either: set[asyncio.Future[Any]] = {task, waiter}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if waiter.done():
                    yield progress_message(*waiter.result())
                    waiter = None
            result = task.result()
            while not updates.empty():
                yield progress_message(*updates.get_nowait())
            yield xaid_pb2.ExplainStreamResponse(result=explain_response(result))
        finally:
            for pending in (task, waiter):
                if pending is not None and not pending.done():
                    pending.cancel()
