"""TLS credentials, bearer tokens, and the interceptor that gates calls on them.

With tokens configured every call needs one except grpc.health.v1's, so that probes work without a
token: reflection too, which would otherwise let anyone hold the server's threads with idle streams.
Token values are never logged, nor kept in a ``repr``.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("paramsel.server")

OPEN_PREFIX = "/grpc.health.v1.Health/"
TOKENS_ENV = "PARAMSEL_TOKENS"
_BEARER = "bearer "


class ConfigError(ValueError):
    """A security setting cannot be used as given (the message says which and why)."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"{what} {path!r} cannot be read: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{what} {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None
) -> grpc.ServerCredentials | None:
    """TLS credentials from PEM files (mTLS with a client CA); None when no certificate is configured."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise ConfigError("a client CA (--tls-client-ca) needs a server certificate and key too")
        return None
    if cert_file is None or key_file is None:
        given, missing = ("--tls-cert", "--tls-key") if key_file is None else ("--tls-key", "--tls-cert")
        raise ConfigError(f"{given} was given without {missing}: TLS needs both the certificate and its key")
    pair = (_read(key_file, "TLS key file"), _read(cert_file, "TLS certificate file"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    client_ca = _read(client_ca_file, "TLS client CA file")
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=True)


def parse_tokens(text: str, *, separator: str | None = None) -> tuple[str, ...]:
    """Tokens from a token file's text (one a line, ``#`` comments) or, with ``separator``, one string."""
    if separator is not None:
        items = text.split(separator)
    else:
        items = [line.split("#", 1)[0] for line in text.splitlines()]
    return tuple(token for token in (item.strip() for item in items) if token)


def load_tokens(token_file: str | None, environ: Any = None) -> tuple[str, ...]:
    """The accepted tokens: ``token_file`` and ``$PARAMSEL_TOKENS`` (comma-separated), both if both are set."""
    env = os.environ if environ is None else environ
    tokens: tuple[str, ...] = ()
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"token file {token_file!r} cannot be read: {err}") from None
        tokens = parse_tokens(text)
        if not tokens:
            raise ConfigError(f"token file {token_file!r} holds no token (one a line, '#' starts a comment)")
    return tokens + parse_tokens(env.get(TOKENS_ENV, ""), separator=",")


def refusal(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as ``handler`` that aborts with ``code`` before reading anything."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    factory: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    if handler.request_streaming and handler.response_streaming:
        factory = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Requires ``authorization: Bearer <token>`` matching one of ``tokens`` on every call but a health check."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ConfigError("token authentication needs at least one token")
        self._tokens = [token.encode() for token in tokens]

    def __repr__(self) -> str:
        return f"TokenAuthInterceptor({len(self._tokens)} tokens)"

    def _accepts(self, presented: bytes) -> bool:
        matched = False
        for token in self._tokens:  # no early exit: the time taken does not say which token matched
            matched |= hmac.compare_digest(presented, token)
        return matched

    def _problem(self, metadata: Sequence[tuple[str, Any]] | None) -> str | None:
        values = [value for key, value in (metadata or ()) if key == "authorization"]
        if not values:
            return "missing 'authorization' metadata: send 'authorization: Bearer <token>'"
        value = values[0]
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        if len(values) > 1 or text[: len(_BEARER)].lower() != _BEARER:
            return "the 'authorization' metadata must be exactly one 'Bearer <token>'"
        if not self._accepts(text[len(_BEARER) :].strip().encode("utf-8", "surrogateescape")):
            return "the bearer token is not accepted by this server"
        return None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(OPEN_PREFIX):
            return handler
        problem = self._problem(handler_call_details.invocation_metadata)
        if problem is None:
            return handler
        log.warning("refused %s: %s", method, problem)
        return refusal(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
