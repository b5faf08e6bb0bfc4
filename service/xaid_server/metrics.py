"""The Prometheus catalogue of OPERATIONS.md, in a registry owned by one server instance."""

from __future__ import annotations

import platform
import threading
from importlib.metadata import version
from wsgiref.simple_server import WSGIServer

import grpc
import onnxruntime as ort
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXPLAIN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUEST_KINDS = ("predict", "explain")
REJECT_REASONS = ("limit", "deadline", "oom", "draining")
CANCEL_CAUSES = ("client", "deadline", "shutdown")
GRPC_LABELS = ("grpc_service", "grpc_method", "grpc_type")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        r = self.registry
        self.grpc_started = Counter(
            "grpc_server_started", "RPCs started on the server.", GRPC_LABELS, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status code.",
            (*GRPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.grpc_handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its completion.",
            GRPC_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "xaid_inference_duration_seconds",
            "Predict time per stage (queue, preprocess, compute, postprocess).",
            ("model", "stage"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.explain_duration = Histogram(
            "xaid_explain_duration_seconds",
            "Time to compute one explanation.",
            ("model", "method"),
            buckets=EXPLAIN_BUCKETS,
            registry=r,
        )
        self.model_evaluations = Counter(
            "xaid_model_evaluations",
            "Model evaluations (forward passes, batch rows) run.",
            ("model", "method"),
            registry=r,
        )
        self.batch_size = Histogram(
            "xaid_batch_size",
            "Rows per executed model run.",
            ("model",),
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "xaid_inflight_requests", "Requests being processed.", ("method",), registry=r
        )
        self.rejected = Counter(
            "xaid_rejected_requests",
            "Requests refused before work.",
            ("method", "reason"),
            registry=r,
        )
        self.cancelled = Counter(
            "xaid_cancelled_requests",
            "Requests stopped before finishing.",
            ("method", "cause"),
            registry=r,
        )
        self.model_info = Gauge(
            "xaid_model_info",
            "Served model versions (value 1), with the execution provider actually used.",
            ("model", "version", "sha256", "provider"),
            registry=r,
        )
        self.model_load = Counter(
            "xaid_model_load", "Model version load attempts.", ("model", "result"), registry=r
        )
        self.model_ready = Gauge(
            "xaid_model_ready", "1 when the model answers requests.", ("model",), registry=r
        )
        self.model_load_duration = Histogram(
            "xaid_model_load_duration_seconds",
            "Time to load, check and warm one model version, whatever the result.",
            ("model",),
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.audit_records = Counter(
            "xaid_audit_records", "Audit records made durable.", registry=r
        )
        self.audit_write_failures = Counter(
            "xaid_audit_write_failures",
            "Audit records that could not be written (fail-closed: the caller got UNAVAILABLE).",
            registry=r,
        )
        self.build_info = Gauge(
            "xaid_build_info",
            "Versions of xaid and of the libraries that decide its numbers (value 1).",
            ("version", "onnxruntime", "grpcio", "python"),
            registry=r,
        )
        self.build_info.labels(
            version("xaid"),
            ort.__version__,
            grpc.__version__,
            platform.python_version(),
        ).set(1)
        for kind in REQUEST_KINDS:
            self.inflight.labels(kind)
            for reason in REJECT_REASONS:
                self.rejected.labels(kind, reason)
            for cause in CANCEL_CAUSES:
                self.cancelled.labels(kind, cause)
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def known_rpc(self, service: str, method: str, rpc_type: str) -> None:
        """Export zero series for an RPC before its first call."""
        self.grpc_started.labels(service, method, rpc_type)
        self.grpc_handled.labels(service, method, rpc_type, "OK")

    def serve(self, host: str, port: int) -> int:
        """Start /metrics on its own port; returns the bound port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
