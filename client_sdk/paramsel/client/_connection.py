"""How the SDK reaches a server: address, TLS, bearer token, deadline and retry budget, in one value."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from paramsel.client._errors import ParamselError, StatusCode
from paramsel.client._target import EMBEDDED_GRPC, ENV_TARGET, embedded_target

ENV_CA_FILE = "PARAMSEL_CA_FILE"
ENV_CERT_FILE = "PARAMSEL_CERT_FILE"
ENV_KEY_FILE = "PARAMSEL_KEY_FILE"
ENV_TOKEN = "PARAMSEL_TOKEN"
ENV_TOKEN_FILE = "PARAMSEL_TOKEN_FILE"

_LOCAL_SCHEMES = ("unix:", "unix-abstract:")
_SCHEMES = ("dns:///", "dns:", "ipv4:", "ipv6:")


@dataclass(frozen=True)
class Connection:
    """Where and how the SDK calls a paramsel server; every field has a safe default.

    Unset fields fall back, at call time, to the environment: ``PARAMSEL_TARGET``, ``PARAMSEL_CA_FILE``,
    ``PARAMSEL_CERT_FILE`` / ``PARAMSEL_KEY_FILE``, ``PARAMSEL_TOKEN`` (else ``PARAMSEL_TOKEN_FILE``).
    With no target at all, the service runs in this process, on the caller's tensors (no gRPC, no
    limits, no deadline); the target ``"embedded-grpc"`` starts a plaintext loopback server in this
    process instead, and calls go through it without token.
    Invalid values raise ValueError here; a refused or unreadable setting raises
    :class:`ParamselError` (FAILED_PRECONDITION) when a call is made, before anything is sent.
    """

    target: str | None = None
    """``host:port`` (or any gRPC target) of the server, or ``"embedded-grpc"`` (a loopback server
    started in this process); None: ``$PARAMSEL_TARGET``, else the service runs in this process."""

    _: dataclasses.KW_ONLY

    ca_file: str | None = None
    """PEM file of the CA(s) that signed the server's certificate; setting it turns TLS on."""

    cert_file: str | None = None
    """PEM client certificate for mutual TLS (with ``key_file``); setting it turns TLS on."""

    key_file: str | None = None
    """PEM private key of ``cert_file``."""

    tls: bool | None = None
    """Force TLS on (True: system roots unless ``ca_file``) or off (False); None: on iff a file is set."""

    token: str | None = dataclasses.field(default=None, repr=False)
    """Bearer token (never shown in ``repr``) sent as ``authorization: Bearer <token>`` metadata on every call."""

    token_file: str | None = None
    """File holding the bearer token (read at each call, so it may be rotated); not with ``token``."""

    allow_insecure_token: bool = False
    """Send the token over plaintext to a non-loopback address (refused by default)."""

    timeout_seconds: float = 600.0
    """Deadline of one SDK operation (a method call), every attempt and wait included; past it: DEADLINE_EXCEEDED."""

    max_attempts: int = 5
    """Attempts of a call that fails with UNAVAILABLE (each re-sends the whole upload); 1: no retry."""

    initial_backoff_seconds: float = 0.2
    """Wait before the first retry (doubling, jittered to half to all of it); also the least time a retry must have left."""

    max_backoff_seconds: float = 5.0
    """Cap of the wait between two attempts."""

    load_balancing_policy: str | None = None
    """gRPC's client-side load balancing across the addresses a target resolves to, e.g.
    ``"round_robin"`` with ``dns:///paramsel.internal:50051`` or ``ipv4:10.0.0.1:50051,10.0.0.2:50051``;
    None keeps gRPC's default (pick_first)."""

    def __post_init__(self) -> None:
        if not self.timeout_seconds > 0:
            raise ValueError(f"timeout_seconds must be > 0, got {self.timeout_seconds}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("backoffs must satisfy 0 < initial_backoff_seconds <= max_backoff_seconds")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if self.token is not None and not self.token.strip():
            raise ValueError("token must not be empty")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        if self.tls is False and (self.ca_file or self.cert_file):
            raise ValueError("tls=False contradicts ca_file / cert_file")


def with_target(connection: Connection | None, target: str | None) -> Connection:
    """The connection a ``target=`` / ``connection=`` pair means: ``target`` overrides the address."""
    connection = connection or Connection()
    return dataclasses.replace(connection, target=target) if target else connection


def is_loopback(target: str) -> bool:
    """Whether a gRPC target names this machine: 127.0.0.0/8, ::1, localhost, or a unix socket."""
    if target.startswith(_LOCAL_SCHEMES):
        return True
    for scheme in _SCHEMES:
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        host = target[1:].split("]", 1)[0]
    elif target.count(":") == 1:
        host = target.split(":", 1)[0]
    else:
        host = target  # a bare host, or a bare IPv6 address
    host = host.split("%", 1)[0].rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Resolved:
    """A connection with the environment applied: what one call uses."""

    target: str
    tls: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    metadata: tuple[tuple[str, str], ...]
    connection: Connection


def in_process(connection: Connection) -> bool:
    """Whether calls run in this process, without gRPC: no target given, and none in the environment."""
    return not (connection.target or os.environ.get(ENV_TARGET))


def resolve(connection: Connection) -> Resolved:
    """Applies the environment and the token rule; raises ParamselError before any connection. With no
    target (in-process calls do not resolve) or ``"embedded-grpc"``: the embedded loopback server."""
    target = connection.target or os.environ.get(ENV_TARGET)
    if not target or target == EMBEDDED_GRPC:  # the embedded server: in-process, plaintext, no token
        return Resolved(embedded_target(), False, None, None, None, (), connection)
    ca_file = connection.ca_file or os.environ.get(ENV_CA_FILE) or None
    cert_file, key_file = connection.cert_file, connection.key_file
    if cert_file is None:
        cert_file, key_file = os.environ.get(ENV_CERT_FILE) or None, os.environ.get(ENV_KEY_FILE) or None
    tls = connection.tls if connection.tls is not None else bool(ca_file or cert_file)
    token = _token(connection)
    if token is not None and not tls and not connection.allow_insecure_token and not is_loopback(target):
        raise ParamselError(
            StatusCode.FAILED_PRECONDITION,
            f"refusing to send a bearer token in plaintext to {target}: give ca_file (TLS), "
            "or allow_insecure_token=True",
        )
    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    return Resolved(target, tls, ca_file, cert_file, key_file, metadata, connection)


def _token(connection: Connection) -> str | None:
    if connection.token is not None:
        return connection.token.strip()
    token_file = connection.token_file
    if token_file is None:
        token = os.environ.get(ENV_TOKEN)
        if token:
            return token.strip()
        token_file = os.environ.get(ENV_TOKEN_FILE) or None
    if token_file is None:
        return None
    token = _read(token_file, "token_file").decode().strip()
    if not token:
        raise ParamselError(StatusCode.FAILED_PRECONDITION, f"token_file {token_file} is empty")
    return token


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ParamselError(StatusCode.FAILED_PRECONDITION, f"cannot read {what} {path}: {error}") from None


_lock = threading.Lock()
_channels: dict[tuple[object, ...], grpc.Channel] = {}


def channel_for(resolved: Resolved) -> grpc.Channel:
    """One shared channel per (target, TLS files, backoff): channels are expensive and thread-safe."""
    c = resolved.connection
    options: list[tuple[str, int | str]] = [
        # The channel's own reconnection follows the retry backoff, so that a retry finds a restarted
        # server instead of a channel still waiting out gRPC's default 1 s to 120 s backoff.
        ("grpc.initial_reconnect_backoff_ms", int(c.initial_backoff_seconds * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(c.initial_backoff_seconds * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(c.max_backoff_seconds * 1000)),
    ]
    if c.load_balancing_policy:
        options.append(("grpc.lb_policy_name", c.load_balancing_policy))
    key = (resolved.target, resolved.tls, resolved.ca_file, resolved.cert_file, resolved.key_file, *options)
    with _lock:
        channel = _channels.get(key)
        if channel is None:
            if resolved.tls:
                channel = grpc.secure_channel(resolved.target, credentials(resolved), options=options)
            else:
                channel = grpc.insecure_channel(resolved.target, options=options)
            _channels[key] = channel
        return channel


def credentials(resolved: Resolved) -> grpc.ChannelCredentials:
    """The TLS credentials of a TLS connection: its CA (else gRPC's default roots) and client certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(resolved.ca_file, "ca_file") if resolved.ca_file else None,
        private_key=_read(resolved.key_file, "key_file") if resolved.key_file else None,
        certificate_chain=_read(resolved.cert_file, "cert_file") if resolved.cert_file else None,
    )
