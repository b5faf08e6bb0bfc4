"""The Open Inference Protocol servicer: decode, call the same core as xaid.v1, encode.

ModelInfer runs Predict, or Explain when the request parameters name a method; the attribution
is returned as one more output tensor, `<input>_attribution`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

import grpc

from xaid.oip import grpc_service_pb2 as oip
from xaid.oip import grpc_service_pb2_grpc as oip_grpc
from xaid_server.core.requests import ExplainCall, PredictCall, Tensors
from xaid_server.core.service import Core
from xaid_server.errors import InvalidArgument, NotFound
from xaid_server.metrics import Metrics
from xaid_server.oip.parameters import EXPLAIN, InferParameters, parse_parameters
from xaid_server.oip.statistics import InferStatistics
from xaid_server.oip.tensors import decode_inputs, encode_outputs
from xaid_server.runtime.model import LoadedModel
from xaid_server.runtime.tensors import TensorSpec

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
PLATFORM = "onnxruntime_onnx"
#: Triton protocol extensions served here; `explain` is xaid's own (request parameters).
EXTENSIONS = ("model_configuration", "statistics", "explain")
ATTRIBUTION_SUFFIX = "_attribution"


def _metadata(specs: Sequence[TensorSpec]) -> list[oip.ModelMetadataResponse.TensorMetadata]:
    return [
        oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape)
        for s in specs
    ]


def data_type(datatype: str) -> oip.DataType.ValueType:
    """Triton's config enum for a tensor datatype (BYTES is TYPE_STRING there)."""
    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    try:
        return oip.DataType.Value(name)
    except ValueError:
        return oip.TYPE_INVALID


def batches(model: LoadedModel) -> bool:
    """Whether every input and output has a free leading (batch) dimension."""
    return all(s.shape[:1] == (-1,) for s in (*model.inputs, *model.outputs))


def model_config(model: LoadedModel) -> oip.ModelConfig:
    """The minimal Triton config: dims exclude the batch dimension when max_batch_size > 0."""
    batched = batches(model)
    skip = 1 if batched else 0
    config = oip.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        max_batch_size=model.config.max_batch_size if batched else 0,
        input=[
            oip.ModelInput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:])
            for s in model.inputs
        ],
        output=[
            oip.ModelOutput(name=s.name, data_type=data_type(s.datatype), dims=s.shape[skip:])
            for s in model.outputs
        ],
    )
    batching = model.config.dynamic_batching
    if batching is not None and batched:
        config.dynamic_batching.CopyFrom(
            oip.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_size,
                max_queue_delay_microseconds=batching.max_queue_delay_microseconds,
            )
        )
    return config


def select_outputs(
    outputs: Tensors, requested: Sequence[oip.ModelInferRequest.InferRequestedOutputTensor]
) -> Tensors:
    """All outputs, or the requested ones in the requested order."""
    if not requested:
        return outputs
    by_name = dict(outputs)
    chosen: Tensors = []
    for i, wanted in enumerate(requested):
        field = f"outputs[{i}]"
        if wanted.parameters:
            raise InvalidArgument(
                f"{field}.parameters: unknown parameters {sorted(wanted.parameters)}; "
                "requested outputs take none",
                field=f"{field}.parameters",
            )
        if wanted.name not in by_name:
            raise InvalidArgument(
                f"{field}.name: {wanted.name!r} is not an output; outputs: {list(by_name)}",
                field=f"{field}.name",
            )
        chosen.append((wanted.name, by_name[wanted.name]))
    return chosen


def _timeout(context: Context, parameters: InferParameters) -> float | None:
    remaining = context.time_remaining()
    limits = [t for t in (remaining, parameters.timeout) if t is not None]
    return float(min(limits)) if limits else None


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: Core, ready: Callable[[], bool]) -> None:
        self.core = core
        self.ready = ready
        self.statistics = InferStatistics()

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Context
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Context
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.ready())

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Context
    ) -> oip.ModelReadyResponse:
        try:
            self.core.repository.get(request.name, request.version)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self.ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Context
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="xaid", version=version("xaid"), extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Context
    ) -> oip.ModelMetadataResponse:
        model = self.core.repository.get(request.name, request.version)
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=PLATFORM,
            inputs=_metadata(model.inputs),
            outputs=_metadata(model.outputs),
        )

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: Context
    ) -> oip.ModelConfigResponse:
        model = self.core.repository.get(request.name, request.version)
        return oip.ModelConfigResponse(config=model_config(model))

    async def ModelStatistics(
        self, request: oip.ModelStatisticsRequest, context: Context
    ) -> oip.ModelStatisticsResponse:
        if request.name:
            models = [self.core.repository.get(request.name, request.version)]
        else:
            models = self.core.repository.models()
        return oip.ModelStatisticsResponse(
            model_stats=[self.statistics.message(m.name, m.version) for m in models]
        )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        model = self.core.repository.get(request.model_name, request.model_version)
        began = time.perf_counter_ns()
        rows: int | None = None
        try:
            response = await self._infer(request, model, context)
            rows = int(response.outputs[0].shape[0]) if response.outputs else 0
            return response
        finally:
            elapsed = time.perf_counter_ns() - began
            self.statistics.record(model.name, model.version, elapsed, rows)

    async def _infer(
        self, request: oip.ModelInferRequest, model: LoadedModel, context: Context
    ) -> oip.ModelInferResponse:
        parameters = parse_parameters(request.parameters)
        inputs = decode_inputs(request)
        timeout = _timeout(context, parameters)
        response = oip.ModelInferResponse(id=request.id)
        if parameters.method:
            result = await self.core.explain(
                ExplainCall(
                    model=request.model_name,
                    version=request.model_version,
                    method=parameters.method,
                    parameters=parameters.method_parameters,
                    inputs=inputs,
                    input=parameters.input,
                    target_output=parameters.output,
                    target_class=parameters.target,
                    seed=parameters.seed,
                    timeout=timeout,
                )
            )
            explained = parameters.input or model.config.input
            outputs = [*result.prediction, (explained + ATTRIBUTION_SUFFIX, result.attribution)]
            response.parameters[EXPLAIN].string_param = result.method
            response.parameters["explain.seed"].uint64_param = result.seed
            response.parameters["explain.model_evaluations"].int64_param = result.model_evaluations
            response.parameters["explain.target"].string_param = ",".join(
                str(c) for c in result.target_classes
            )
            response.parameters["explain.output"].string_param = result.target_output
            name, model_version = result.model, result.version
        else:
            predicted = await self.core.predict(
                PredictCall(
                    model=request.model_name,
                    version=request.model_version,
                    inputs=inputs,
                    top_k=0,
                    timeout=timeout,
                )
            )
            outputs, name, model_version = predicted.outputs, predicted.model, predicted.version
        response.model_name, response.model_version = name, model_version
        encode_outputs(response, select_outputs(outputs, request.outputs))
        return response


def add_to_server(
    server: grpc.aio.Server, core: Core, ready: Callable[[], bool], metrics: Metrics
) -> None:
    """Serve the protocol beside xaid.v1, with zero metric series for each of its RPCs."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, ready), server)
    for method in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        metrics.known_rpc(SERVICE_NAME, method.name, "unary")
