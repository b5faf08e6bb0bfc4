"""Predict and Explain, independent of gRPC: run on a bounded thread pool off the event loop."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from xaid_server.audit.log import AuditLog
from xaid_server.audit.records import Record, Trail
from xaid_server.core import faithfulness
from xaid_server.core.faithfulness import Faithfulness
from xaid_server.core.inputs import ModelInput, model_input
from xaid_server.core.requests import ExplainCall, ExplainResult, PredictCall, PredictResult
from xaid_server.core.targets import label_of, resolve_target, target_scores, top_classes
from xaid_server.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from xaid_server.explainers import REGISTRY
from xaid_server.explainers.base import ExplainContext, Explainer, Explanation, Limits
from xaid_server.explainers.gradients import gradient_source, gradients_unavailable
from xaid_server.metrics import Metrics
from xaid_server.preprocess import tensor_to_image
from xaid_server.render import aggregate, heatmap_png
from xaid_server.repository import ModelRepository
from xaid_server.runtime.batcher import Batchers
from xaid_server.runtime.model import LoadedModel
from xaid_server.runtime.runner import BatchRunner, Job
from xaid_server.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_TOP_K = 1000
DEADLINE_SLACK = 0.05  # seconds: a cancellation this close to the deadline is the deadline


class Core:
    def __init__(
        self,
        settings: Settings,
        repository: ModelRepository,
        metrics: Metrics,
        executor: ThreadPoolExecutor,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.executor = executor
        self.audit = audit
        #: What shapes a computation, as every record states it (a replay takes these).
        self._recorded_settings = {
            "max_chunk_bytes": settings.max_chunk_bytes,
            "max_evaluations": settings.max_evaluations,
            "intra_op_threads": settings.intra_op_threads,
        }
        self.runner = BatchRunner(settings.max_chunk_bytes)
        self.batchers = Batchers(
            executor,
            lambda model, seconds: metrics.inference_duration.labels(model, "queue").observe(
                seconds
            ),
        )

    def methods_for(self, model: LoadedModel) -> list[str]:
        return [name for name, e in REGISTRY.items() if e.applicable(model) is None]

    def gradients_unavailable(self, model: LoadedModel) -> str | None:
        return gradients_unavailable(model)

    def gradient_source(self, model: LoadedModel) -> str:
        return gradient_source(model)

    def _deadline(self, timeout: float | None) -> float:
        """The client's deadline, else the server default; never past the server maximum."""
        wanted = self.settings.default_deadline if timeout is None else timeout
        return time.monotonic() + max(0.0, min(wanted, self.settings.max_deadline))

    async def _run(self, kind: str, job: Job, work: Callable[[], T]) -> T:
        """Run `work` on the pool; stop its chunks when the client goes away or time runs out."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, work)
        # a cancelled caller never reads the outcome; read it so asyncio does not log it
        future.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await self._watch(kind, job, future)

    async def _watch(self, kind: str, job: Job, future: asyncio.Future[T]) -> T:
        """Await work already started, cancelling its job on deadline or client cancellation."""
        loop = asyncio.get_running_loop()
        assert job.deadline is not None
        timer = loop.call_later(max(0.0, job.deadline - time.monotonic()), job.cancel, "deadline")
        self.metrics.inflight.labels(kind).inc()
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # gRPC cancels the handler itself when the client's deadline passes
            expired = time.monotonic() >= job.deadline - DEADLINE_SLACK
            job.cancel("deadline" if expired else "client")
            self.metrics.cancelled.labels(kind, "deadline" if expired else "client").inc()
            raise
        except DeadlineExceeded:
            self.metrics.cancelled.labels(kind, "deadline").inc()
            raise
        except ResourceExhausted:  # out of memory even in smaller chunks
            self.metrics.rejected.labels(kind, "oom").inc()
            raise
        finally:
            timer.cancel()
            self.metrics.inflight.labels(kind).dec()

    # ---- Audit ----

    def _trail(self, kind: str, model: str, version: str, image: bytes, text: list[str]) -> Trail:
        return Trail(kind, model, version, image=image, text=text, settings=self._recorded_settings)

    async def _audited(self, trail: Trail, work: Awaitable[T], done: Callable[[T], Record]) -> T:
        """Run `work` and record how it ended; fail-closed, answer once the record is durable."""
        audit = self.audit
        if audit is None:
            return await work
        trail.begin()
        try:
            result = await work
        except asyncio.CancelledError as exc:
            audit.append(trail.failed(exc))  # nobody waits for a cancelled call
            raise
        except BaseException as exc:
            await audit.record(await asyncio.to_thread(trail.failed, exc))
            raise
        await audit.record(await asyncio.to_thread(done, result))
        return result

    # ---- Predict ----

    async def predict(self, call: PredictCall) -> PredictResult:
        trail = self._trail("predict", call.model, call.version, call.image, call.text)
        return await self._audited(trail, self._predict(call, trail), trail.predicted)

    async def _predict(self, call: PredictCall, trail: Trail) -> PredictResult:
        model = trail.model = self.repository.get(call.model, call.version)
        if not 0 <= call.top_k <= MAX_TOP_K:
            raise InvalidArgument(f"top_k: must be in [0, {MAX_TOP_K}]", field="top_k")
        began = time.perf_counter()
        given = trail.given = model_input(model, call.inputs, call.image, call.text)
        self.metrics.inference_duration.labels(model.name, "preprocess").observe(
            time.perf_counter() - began
        )
        job = Job(deadline=self._deadline(call.timeout))
        outputs = await self._predict_outputs(model, given, job)
        began = time.perf_counter()
        names = [o.name for o in model.outputs]
        top = []
        if call.top_k > 0:
            index = model.output_index("")
            top = top_classes(model, outputs[index], names[index], call.top_k)
        self.metrics.inference_duration.labels(model.name, "postprocess").observe(
            time.perf_counter() - began
        )
        return PredictResult(
            model.name, model.version, list(zip(names, outputs, strict=True)), top, given.tokens
        )

    async def _predict_outputs(
        self, model: LoadedModel, given: ModelInput, job: Job
    ) -> list[np.ndarray]:
        """One model run, shared with concurrent requests when the model batches dynamically."""
        batching = model.config.dynamic_batching
        if batching is not None and all(s.shape[:1] == (-1,) for s in model.inputs):
            batcher = self.batchers.get(model.name, model.config.max_batch_size, batching)

            def run(feeds: Mapping[str, np.ndarray], batch_job: Job) -> list[np.ndarray]:
                return self._forward(model, ModelInput(dict(feeds)), batch_job, "predict")

            return await self._watch(
                "predict", job, batcher.submit(given.feeds, job, run, id(model))
            )
        queued = time.perf_counter()

        def work() -> list[np.ndarray]:
            self.metrics.inference_duration.labels(model.name, "queue").observe(
                time.perf_counter() - queued
            )
            return self._forward(model, given, job, "predict")

        return await self._run("predict", job, work)

    def _forward(
        self, model: LoadedModel, given: ModelInput, job: Job, method: str
    ) -> list[np.ndarray]:
        began = time.perf_counter()
        outputs = self.runner.run(
            model.session, given.feeds, job, max_batch=model.config.max_batch_size
        )
        self.metrics.inference_duration.labels(model.name, "compute").observe(
            time.perf_counter() - began
        )
        self.metrics.batch_size.labels(model.name).observe(given.rows)
        self.metrics.model_evaluations.labels(model.name, method).inc(given.rows)
        return outputs

    # ---- Explain ----

    def explainer(self, method: str) -> Explainer[Any]:
        if not method:
            raise InvalidArgument(f"method: choose one of {', '.join(REGISTRY)}", field="method")
        explainer = REGISTRY.get(method)
        if explainer is None:
            raise InvalidArgument(f"method: unknown method {method!r}", field="method")
        return explainer

    async def explain(self, call: ExplainCall) -> ExplainResult:
        trail = self._trail("explain", call.model, call.version, call.image, call.text)
        trail.method, trail.parameters, trail.seed = call.method, call.parameters, call.seed
        return await self._audited(trail, self._explain(call, trail), trail.explained)

    async def _explain(self, call: ExplainCall, trail: Trail) -> ExplainResult:
        began = time.perf_counter()
        model = trail.model = self.repository.get(call.model, call.version)
        explainer = self.explainer(call.method)
        reason = explainer.applicable(model)
        if reason is not None:
            raise FailedPrecondition(f"{call.method} cannot explain model {model.name!r}: {reason}")
        if call.evaluate and (why := faithfulness.unavailable(model)) is not None:
            raise FailedPrecondition(f"evaluate: {why}", field="evaluate")
        given = trail.given = model_input(model, call.inputs, call.image, call.text)
        input_name = trail.input_name = call.input or model.config.input
        if input_name not in given.feeds:
            raise InvalidArgument(
                f"input: {input_name!r} is not an input of {model.name!r}", field="input"
            )
        x = given.feeds[input_name]
        if call.render and (x.ndim != 4 or model.config.image is None):
            raise FailedPrecondition(
                f"render: heatmaps need an image-like input; {model.name!r} takes shape "
                f"{list(x.shape)}",
                field="render",
            )
        steps = faithfulness.steps_of(model) if call.evaluate else 0
        scoring = faithfulness.cost(steps, given.rows) if call.evaluate else 0
        limits = Limits(self.settings.max_evaluations, reserved=given.rows + scoring)
        params = trail.parameters = explainer.resolve_within(
            model, tuple(x.shape), call.parameters, limits
        )
        cost = given.rows + explainer.cost(params, tuple(x.shape), model) + scoring
        if cost > self.settings.max_evaluations:
            raise InvalidArgument(
                f"{call.method}: the request needs {cost} model evaluations, over the server cap "
                f"of {self.settings.max_evaluations}",
                field=call.method,
            )
        seed = trail.seed = call.seed if call.seed is not None else secrets.randbits(63)
        job = Job(deadline=self._deadline(call.timeout), progress=call.progress, total=cost)

        def work() -> tuple[
            ExplainContext, list[np.ndarray], Explanation, list[bytes], str, Faithfulness | None
        ]:
            """One pool job: the forward, the explanation, its scores and the heatmaps."""
            outputs = self._forward(model, given, job, call.method)
            target = resolve_target(model, outputs, call.target_output, call.target_class)
            ctx = ExplainContext(
                model=model,
                input_name=input_name,
                feeds=given.feeds,
                target=target,
                scores=target_scores(target, outputs),
                runner=self.runner,
                job=job,
                rng=np.random.default_rng(seed),
            )
            before = job.evaluations
            explanation = explainer.explain(ctx, params)
            self.metrics.model_evaluations.labels(model.name, call.method).inc(
                job.evaluations - before
            )
            scores = None
            if call.evaluate:
                scores = faithfulness.evaluate(ctx, explanation.attribution, steps)
                self.metrics.model_evaluations.labels(model.name, "faithfulness").inc(
                    scores.model_evaluations
                )
            heatmaps, aggregation = (
                self._render(model, given, x, explanation, explainer.signed)
                if call.render
                else ([], "")
            )
            return ctx, outputs, explanation, heatmaps, aggregation, scores

        ctx, outputs, explanation, heatmaps, aggregation, scores = await self._run(
            "explain", job, work
        )
        total = time.perf_counter() - began
        self.metrics.explain_duration.labels(model.name, call.method).observe(total)
        classes = [int(c) for c in ctx.target.classes]
        return ExplainResult(
            model=model.name,
            version=model.version,
            method=call.method,
            parameters=params,
            attribution=explanation.attribution.astype(np.float32, copy=False),
            prediction=list(zip([o.name for o in model.outputs], outputs, strict=True)),
            target_output=ctx.target.output,
            target_classes=classes,
            target_labels=[label_of(model, c) for c in classes],
            seed=seed,
            model_evaluations=job.evaluations - (scores.model_evaluations if scores else 0),
            total_seconds=total,
            compute_seconds=job.compute_seconds,
            heatmaps=heatmaps,
            aggregation=aggregation,
            convergence_delta=[]
            if explanation.convergence_delta is None
            else [float(d) for d in explanation.convergence_delta],
            segments=explanation.segments,
            tokens=given.tokens,
            faithfulness=scores,
        )

    def _render(
        self,
        model: LoadedModel,
        given: ModelInput,
        x: np.ndarray,
        explanation: Explanation,
        signed: bool,
    ) -> tuple[list[bytes], str]:
        assert model.config.image is not None  # checked before any work by explain()
        layout = model.config.image.layout
        images: list[bytes] = []
        how = ""
        for row in range(x.shape[0]):
            map2d, how = aggregate(explanation.attribution[row], layout)
            background = (
                given.image
                if given.image is not None
                else tensor_to_image(x[row], model.config.image, layout)
            )
            outlines = explanation.segments[row].segment_map if explanation.segments else None
            images.append(
                heatmap_png(map2d, background, signed=None if signed else False, outlines=outlines)
            )
        return images, how
