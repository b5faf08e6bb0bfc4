"""Composition root: builds the repository, runtime, core and gRPC server, and runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from xaid.v1 import xaid_pb2, xaid_pb2_grpc
from xaid_server.admission import AdmissionInterceptor
from xaid_server.audit.log import AuditLog
from xaid_server.auth import AuthInterceptor, load_tokens
from xaid_server.core.service import Core
from xaid_server.explainers import EXPLAINERS
from xaid_server.interceptors import (
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
)
from xaid_server.metrics import Metrics
from xaid_server.oip import servicer as oip
from xaid_server.oip.reflection import reflection_pool
from xaid_server.probe import Prober
from xaid_server.repository import ModelRepository
from xaid_server.runtime.arena import cap_cpu_arena
from xaid_server.runtime.model import LoadedModel, SessionFactory
from xaid_server.runtime.providers import probe_providers
from xaid_server.servicer import ExplainerServicer
from xaid_server.settings import Settings
from xaid_server.tls import server_credentials

log = logging.getLogger(__name__)

SERVICE_NAME = xaid_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def prepare_explainers(model: LoadedModel) -> None:
    """Build each method's evaluation graphs at load time, so requests never wait for them."""
    for explainer in EXPLAINERS:
        if explainer.applicable(model) is None:
            explainer.prepare(model)


class XaidServer:
    """One server instance: owns its metrics registry, thread pool and gRPC server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = HealthServicer()
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="xaid-eval")
        self.port = 0
        self.metrics_port = 0
        self.health_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._health_grpc: grpc.aio.Server | None = None  # plaintext health for probes
        self._poller: asyncio.Task[None] | None = None
        self.repository: ModelRepository | None = None
        self.audit: AuditLog | None = None
        self.serving = False  # what the Open Inference Protocol's ServerReady answers

    async def start(self) -> None:
        """Bind and answer health NOT_SERVING at once; SERVING after the models are warm."""
        s = self.settings
        tokens = load_tokens(s, os.environ)
        credentials = server_credentials(s)
        providers = probe_providers(s.require_gpu)
        if s.arena_max_bytes > 0:
            cap_cpu_arena(s.arena_max_bytes)
        factory = SessionFactory(
            tuple(providers),
            s.intra_op_threads,
            s.gradient_cache.expanduser(),
            env_allocators=s.arena_max_bytes > 0,
        )
        prober = (
            Prober(tuple(providers), s.probe_timeout, s.probe_memory_bytes)
            if s.probe_timeout > 0
            else None
        )
        if s.audit_log:
            self.audit = AuditLog(Path(s.audit_log), self.metrics, s.audit_fail_closed)
        self.repository = ModelRepository(
            s.models, factory, self.metrics, prepare_explainers, prober, self.audit
        )
        core = Core(s, self.repository, self.metrics, self.executor, self.audit)
        limits = {"predict": s.predict_limit, "explain": s.explain_limit}
        server = grpc.aio.server(
            interceptors=[
                MetricsInterceptor(self.metrics),
                RequestIdInterceptor(exempt=(HEALTH_NAME,)),
                AuthInterceptor(tokens),
                AdmissionInterceptor(limits, self.metrics),
                ErrorInterceptor(),
            ],
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        xaid_pb2_grpc.add_ExplainerServicer_to_server(ExplainerServicer(core), server)
        oip.add_to_server(server, core, lambda: self.serving, self.metrics)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, oip.SERVICE_NAME, HEALTH_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=reflection_pool(names))
        for method in xaid_pb2.DESCRIPTOR.services_by_name["Explainer"].methods:
            kind = "server_stream" if method.server_streaming else "unary"
            self.metrics.known_rpc(SERVICE_NAME, method.name, kind)
        address = f"{s.host}:{s.port}"
        self.port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
        if self.port == 0:
            raise OSError(f"could not bind {s.host}:{s.port}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._grpc = server
        if s.health_port >= 0:
            await self._serve_health(s.host, s.health_port)
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        metrics = f"{s.metrics_host}:{self.metrics_port}" if s.metrics_port >= 0 else "off"
        log.info("xaid listening on %s:%d, metrics %s", s.host, self.port, metrics)
        await asyncio.to_thread(self.repository.scan)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %d model(s)", len(self.repository.models()))
        if s.poll_interval > 0:
            self._poller = asyncio.create_task(self._poll(self.repository, s.poll_interval))

    async def _serve_health(self, host: str, port: int) -> None:
        """grpc.health.v1 alone on a plaintext port, for probes without TLS or tokens."""
        self._health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_grpc)
        self.health_port = self._health_grpc.add_insecure_port(f"{host}:{port}")
        if self.health_port == 0:
            raise OSError(f"could not bind {host}:{port}")
        await self._health_grpc.start()
        log.info("health on %s:%d", host, self.health_port)

    async def _set_health(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _poll(self, repository: ModelRepository, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(repository.scan)
            except Exception:
                log.exception("model repository scan failed")

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish within the grace."""
        self.serving = False
        await self.health.enter_graceful_shutdown()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._grpc is not None:
            await self._grpc.stop(self.settings.grace_period if grace is None else grace)
        if self._health_grpc is not None:  # probes read NOT_SERVING until the drain ends
            await self._health_grpc.stop(0)
        if self.audit is not None:  # every answered request's record reaches the disk
            await asyncio.to_thread(self.audit.close)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.metrics.stop()

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = XaidServer(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace=0)  # release the port and threads before the error leaves
        raise
    await stopping.wait()
    log.info("shutting down (grace %.0f s)", settings.grace_period)
    await server.stop()
