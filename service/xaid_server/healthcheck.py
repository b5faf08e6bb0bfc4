"""`python -m xaid_server.healthcheck`: exit 0 when the local server answers health SERVING.

Container runtimes (Docker's HEALTHCHECK) need a command, not a gRPC probe; this one reads the
port from the same settings the server reads (XAID_PORT, XAID_HEALTH_PORT, XAID_CONFIG), so the
two cannot disagree. The plaintext health port is preferred when set: the gRPC port may need TLS.
Exit codes: 0 serving, 1 not serving or unreachable, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from xaid_server.settings import load_settings


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    """True when the server at `address` reports SERVING for `service` within `timeout`."""
    with grpc.insecure_channel(address) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs type it loosely
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m xaid_server.healthcheck",
        description="Exit 0 when the xaid server on this host is SERVING.",
    )
    ap.add_argument("--address", help="HOST:PORT (default: 127.0.0.1, the configured port)")
    ap.add_argument("--service", default="", help="Health service name ('' = the whole server)")
    ap.add_argument("--timeout", type=float, default=3.0, help="Seconds to wait for the answer")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    address = args.address
    if address is None:
        try:
            settings = load_settings([])
            port = settings.health_port if settings.health_port > 0 else settings.port
            address = f"127.0.0.1:{port}"
        except (ValueError, OSError) as exc:
            print(f"healthcheck: {exc}", file=sys.stderr)
            return 2
    serving = check(address, args.service, args.timeout)
    if not serving:
        print(f"healthcheck: {address} is not serving", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
