"""``paramsel health``: one grpc.health.v1 ``Check`` against a server, as a probe for containers.

The module needs only grpc and the health stubs; it speaks the standard protocol, so no separately
downloaded ``grpc_health_probe`` binary is needed in the image.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "PARAMSEL_TARGET"
DEFAULT_TIMEOUT_SECONDS = 5.0


def default_target() -> str:
    """``$PARAMSEL_TARGET`` when set and not empty, else ``127.0.0.1:50051``."""
    return os.environ.get(TARGET_ENV) or DEFAULT_TARGET


@dataclass(frozen=True)
class HealthResult:
    """What one probe found.

    ``status`` is the server's answer (``SERVING``, ``NOT_SERVING``, ``SERVICE_UNKNOWN``, ``UNKNOWN``)
    or, when no answer came, ``UNREACHABLE``, ``TIMEOUT``, ``SERVICE_NOT_FOUND``, ``UNIMPLEMENTED`` or
    ``ERROR``. ``message`` is one line saying what happened.
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


def check_health(target: str, service: str = "", timeout: float = DEFAULT_TIMEOUT_SECONDS) -> HealthResult:
    """Calls ``grpc.health.v1.Health/Check`` for ``service`` ("" = overall) at ``target``.

    Never raises for what the server or the network does: every outcome is a :class:`HealthResult`.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    what = _describe(service)
    request = health_pb2.HealthCheckRequest(service=service)
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = _one_line(error.details() if isinstance(error, grpc.Call) else str(error))
        if code == grpc.StatusCode.UNAVAILABLE:
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
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """The command: prints the status on ``out``; when not SERVING, one line on ``err`` and returns 1."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    result = check_health(target, service, timeout)
    print(result.status, file=out, flush=True)
    if result.serving:
        return 0
    print(f"paramsel health: {result.message}", file=err, flush=True)
    return 1
