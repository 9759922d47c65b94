"""``paramsel health``: one grpc.health.v1 ``Check`` against a server, as a probe for containers.

The module needs only grpc, the health stubs and the SDK's torch-free connection code; it speaks the
standard protocol, so no separately downloaded ``grpc_health_probe`` binary is needed in the image.
The SDK's code is imported in :func:`check_health` only: this is one of the server's named seams into
``paramsel.client`` (CONTRIBUTING.md, "Layout and dependency rule"), used by ``paramsel health``.

TLS, the client certificate and the bearer token are the SDK's :class:`~paramsel.client.Connection`
settings, resolved by the SDK's own code: flags, else ``$PARAMSEL_CA_FILE``, ``$PARAMSEL_CERT_FILE`` /
``$PARAMSEL_KEY_FILE``, ``$PARAMSEL_TOKEN`` / ``$PARAMSEL_TOKEN_FILE``. So the image's HEALTHCHECK, which
cannot take flags from the operator, probes a TLS server once the container has those variables. A probe
dials 127.0.0.1, which a server certificate seldom names: ``$PARAMSEL_TLS_SERVER_NAME`` (or
``--tls-server-name``) gives the name to check it against instead.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:  # types only; the code is imported where it runs (check_health)
    from paramsel.client._connection import Connection, Resolved

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "PARAMSEL_TARGET"
TLS_SERVER_NAME_ENV = "PARAMSEL_TLS_SERVER_NAME"
DEFAULT_TIMEOUT_SECONDS = 5.0


def default_target() -> str:
    """``$PARAMSEL_TARGET`` when set and not empty, else ``127.0.0.1:50051``."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


@dataclass(frozen=True)
class HealthResult:
    """What one probe found.

    ``status`` is the server's answer (``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``, ``UNKNOWN``)
    or, when no answer came, ``UNREACHABLE``, ``TLS_ERROR`` (TLS refused the connection, e.g. a CA that
    does not sign the server's certificate, or no client certificate for a mutual-TLS server),
    ``CONFIG_ERROR`` (a settings file cannot be read, a token refused in plaintext), ``TIMEOUT``,
    ``SERVICE_NOT_FOUND``, ``UNIMPLEMENTED`` or ``ERROR``. ``message`` is one line saying what happened.
    """

    status: str
    message: str

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _describe(service: str) -> str:
    return f"service {service!r}" if service else "the server as a whole"


def tls_server_name(name: str | None = None) -> str | None:
    """``name`` if given, else ``$PARAMSEL_TLS_SERVER_NAME`` when set and not empty, else None."""
    return name or os.environ.get(TLS_SERVER_NAME_ENV) or None


def _channel(resolved: Resolved, server_name: str | None) -> grpc.Channel:
    if not resolved.tls:
        return grpc.insecure_channel(resolved.target)
    from paramsel.client._connection import credentials  # seam: the SDK's TLS settings, as it reads them

    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(resolved.target, credentials(resolved), options=options)


def check_health(
    target: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    connection: Connection | None = None,
    server_name: str | None = None,
) -> HealthResult:
    """Calls ``grpc.health.v1.Health/Check`` for ``service`` ("" = overall) at ``target``.

    ``connection`` gives TLS, client certificate and token as for the SDK (its target is ignored);
    None: from the environment. ``server_name``: the name the server's certificate must carry, when it
    is not the target's host (None: ``$PARAMSEL_TLS_SERVER_NAME``, else the host).
    Never raises for what the server, the network or the settings' files do: every outcome is a
    :class:`HealthResult`.
    """
    # Seam: the probe connects as the SDK does (TLS, client certificate, token, their environment
    # variables), with the SDK's own torch-free code rather than a copy of it.
    from paramsel.client._connection import Connection, resolve
    from paramsel.client._errors import ParamselError
    from paramsel.client._tls_probe import tls_mismatch

    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if not target:
        raise ValueError("target must not be empty")
    what = _describe(service)
    request = health_pb2.HealthCheckRequest(service=service)
    server_name = tls_server_name(server_name)
    deadline = time.monotonic() + timeout
    try:
        resolved = resolve(dataclasses.replace(connection or Connection(), target=target))
        channel = _channel(resolved, server_name)
    except ParamselError as error:  # a file that cannot be read, a token refused in plaintext
        return HealthResult("CONFIG_ERROR", f"cannot probe {target}: {error.message}")
    try:
        with channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                request, timeout=timeout, metadata=resolved.metadata
            )
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = _one_line(error.details() if isinstance(error, grpc.Call) else str(error))
        if code == grpc.StatusCode.UNAVAILABLE:
            # Within the same timeout: Docker kills a probe that outlives its own.
            mismatch = tls_mismatch(resolved, deadline - time.monotonic(), server_name)
            if mismatch is not None:
                return HealthResult("TLS_ERROR", f"cannot probe {target}: {mismatch.message}")
            return HealthResult(
                "UNREACHABLE", f"cannot reach {target} (nothing listening, or shutting down): {details}"
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return HealthResult("TIMEOUT", f"no answer from {target} within {timeout:g} s")
        if code == grpc.StatusCode.NOT_FOUND:
            return HealthResult("SERVICE_NOT_FOUND", f"{target} has no health status for {what}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return HealthResult("UNIMPLEMENTED", f"{target} does not implement grpc.health.v1.Health")
        return HealthResult("ERROR", f"health check of {target} failed with {code.name}: {details}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if status == "SERVING":
        return HealthResult(status, f"{target} is SERVING {what}")
    if status == "NOT_SERVING":
        return HealthResult(status, f"{target} reports NOT_SERVING for {what} (starting or shutting down)")
    return HealthResult(status, f"{target} reports {status} for {what}")


def run_health(
    target: str,
    service: str = "",
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    *,
    connection: Connection | None = None,
    server_name: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The command: prints the status on ``out``; when not SERVING, one line on ``err`` and returns 1."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    result = check_health(target, service, timeout, connection=connection, server_name=server_name)
    print(result.status, file=out, flush=True)
    if result.serving:
        return 0
    print(f"paramsel health: {result.message}", file=err, flush=True)
    return 1
