"""The SDK's own error type, so that callers never need to import grpc."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class StatusCode(enum.IntEnum):
    """gRPC status codes, by their numbers in the gRPC spec."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ParamselError(Exception):
    """A call to the paramsel service failed: ``status`` says how, ``message`` says what."""

    def __init__(self, status: StatusCode, message: str, reason: str | None = None) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        """How the call failed."""
        self.message = message
        """What the server (or the SDK) said was wrong."""
        self.reason = reason
        """A machine-readable reason (google.rpc.ErrorInfo) when the server gave one."""

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ParamselError:
        if not isinstance(error, grpc.Call):
            return cls(StatusCode.UNKNOWN, str(error))
        return cls(StatusCode(error.code().value[0]), error.details() or "", _reason(error))


def _reason(call: grpc.Call) -> str | None:
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # inconsistent rich status: ignore the details, keep code and message
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return None


@contextmanager
def local_errors() -> Iterator[None]:
    """Errors of work done in this process surface as the same ParamselError a server would give."""
    from paramsel import engine  # the SDK's in-process work is the engine's
    from paramsel.wire import WireError

    try:
        yield
    except (WireError, engine.EngineError) as error:
        status = (
            StatusCode.FAILED_PRECONDITION
            if isinstance(error, engine.FailedPrecondition)
            else StatusCode.INVALID_ARGUMENT
        )
        raise ParamselError(status, str(error)) from None
