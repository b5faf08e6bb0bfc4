"""TLS and mutual TLS for the gRPC port, from PEM files named in the settings."""

from __future__ import annotations

from pathlib import Path

import grpc

from xaid_server.settings import Settings


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {Path(path).name}: {exc.strerror}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for plaintext; a client CA makes a client certificate signed by it mandatory."""
    s = settings
    if not s.tls_cert and not s.tls_key:
        if s.tls_client_ca:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return None
    if not (s.tls_cert and s.tls_key):
        raise ValueError("tls_cert and tls_key go together")
    pair = (_read(s.tls_key, "tls_key"), _read(s.tls_cert, "tls_cert"))
    ca = _read(s.tls_client_ca, "tls_client_ca") if s.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )
