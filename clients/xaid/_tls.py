"""Channel credentials for servers that serve TLS or mutual TLS."""

from __future__ import annotations

from pathlib import Path

import grpc


def tls_credentials(
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
) -> grpc.ChannelCredentials:
    """TLS trusting `ca` (default: the system's roots); `cert` and `key` add a client certificate.

    All three are PEM file paths.
    """
    if (cert is None) != (key is None):
        raise ValueError("a client certificate needs both cert and key")

    def read(path: str | Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
