"""Bearer-token authentication on every RPC but health, checked before any handler runs.

Tokens come from a file or an environment variable as `subject:token` entries; the subject names
the caller in logs (never the token). A call without a known `authorization: Bearer <token>`
gets UNAUTHENTICATED and reaches no servicer, so it costs no model evaluation.
"""

from __future__ import annotations

import contextvars
import hmac
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from xaid_server.interceptors import Handler, Stream, Unary, WrapOnce, rewrap, split_method
from xaid_server.requestid import with_request_id
from xaid_server.settings import Settings

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
#: Who made the current call: the token's subject, else the client certificate's common name.
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("xaid_caller", default="")
REFUSED = "missing or invalid bearer token"


@dataclass(frozen=True)
class Token:
    subject: str
    secret: bytes

    def __repr__(self) -> str:  # never print the secret
        return f"Token({self.subject!r})"


def parse_tokens(text: str, source: str) -> list[Token]:
    """`subject:token` entries, one per line or separated by commas; `#` starts a comment."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            subject, sep, secret = entry.partition(":")
            if not sep or not subject.strip() or not secret.strip():
                raise ValueError(f"{source}, entry {number}: expected subject:token")
            tokens.append(Token(subject.strip(), secret.strip().encode()))
    return tokens


def load_tokens(settings: Settings, env: Mapping[str, str]) -> list[Token]:
    """The configured tokens; an empty list means authentication is off."""
    tokens: list[Token] = []
    if settings.auth_token_file:
        path = Path(settings.auth_token_file)
        tokens += parse_tokens(path.read_text(encoding="utf-8"), f"token file {path.name}")
    if settings.auth_token_env:
        name = settings.auth_token_env
        if not env.get(name):
            raise ValueError(f"auth_token_env: environment variable {name} is empty or unset")
        tokens += parse_tokens(env[name], f"environment variable {name}")
    if (settings.auth_token_file or settings.auth_token_env) and not tokens:
        raise ValueError("bearer-token authentication is configured but no token is given")
    return tokens


def bearer(metadata: Iterable[Any] | None) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip().encode() if scheme.lower() == "bearer" else None
    return None


def _certificate_name(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    names = list(context.auth_context().get("x509_common_name") or ())
    return bytes(names[0]).decode(errors="replace") if names else ""


class AuthInterceptor(WrapOnce):
    """Refuses calls without a known token (if tokens are configured) and names every caller."""

    def __init__(self, tokens: Sequence[Token], exempt: Iterable[str] = (HEALTH_SERVICE,)) -> None:
        super().__init__()
        self.tokens = tuple(tokens)
        self.exempt = frozenset(exempt)

    def subject(self, presented: bytes | None) -> str | None:
        """The subject of a presented token, comparing with every token in constant time."""
        found = None
        for token in self.tokens:
            if hmac.compare_digest(token.secret, presented or b"") and presented:
                found = token.subject
        return found

    def wrap(self, method: str, handler: Handler) -> Handler:
        """Per method once; the token is read from each call's metadata."""
        service, _ = split_method(method)
        if service in self.exempt:
            return handler
        return rewrap(handler, lambda b: self._unary(b, method), lambda b: self._stream(b, method))

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """Name the caller, or refuse the call (UNAUTHENTICATED)."""
        subject = self.subject(bearer(context.invocation_metadata())) if self.tokens else ""
        if subject is None:
            log.info("refused %s: %s", method, REFUSED)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED, with_request_id())
        CALLER.set(subject or _certificate_name(context))

    def _unary(self, behavior: Unary, method: str) -> Unary:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._admit(context, method)
            return await behavior(request, context)

        return run

    def _stream(self, behavior: Stream, method: str) -> Stream:
        async def run(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await self._admit(context, method)
            async for item in behavior(request, context):
                yield item

        return run
