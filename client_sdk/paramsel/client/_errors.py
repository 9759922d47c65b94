"""The SDK's errors, so that callers never need to import grpc, and the one table that makes them.

Every failure the SDK raises is a :class:`ParamselError` whose ``status`` is the status the server gives
for the same mistake, whether the server found it or this process did (validation, encoding, a pull
applied here). The decisions are all made here:

- :meth:`ParamselError.from_rpc_error`: a gRPC failure, by its status code;
- :func:`local_error`: an exception raised in this process, by :data:`_LOCAL_STATUS` (the server's own
  table, ``server/paramsel/server/status.py``, for the errors both sides raise);
- :data:`_TYPE_OF_STATUS`: the exception type of a status. A ``ParamselError`` whose status is
  INVALID_ARGUMENT is an :class:`InvalidArgumentError`, which is also a ``ValueError``, as the SDK's
  local refusals were before they carried a status.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from paramsel.wire.errors import WireError, WireLimitError


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
    """A call to the paramsel service, or the SDK's own work, failed: ``status`` says how, ``message``
    says what.

    The status is the one the server gives for the same mistake, wherever it was found. One whose
    status is INVALID_ARGUMENT is an :class:`InvalidArgumentError` (also a ``ValueError``), even when
    made as ``ParamselError(StatusCode.INVALID_ARGUMENT, ...)``.
    """

    status: StatusCode
    message: str
    reason: str | None

    def __new__(cls, status: StatusCode, message: str, reason: str | None = None) -> ParamselError:
        kind = _TYPE_OF_STATUS.get(StatusCode(status), cls) if cls is ParamselError else cls
        error: ParamselError = super().__new__(kind, status, message, reason)
        return error

    def __init__(self, status: StatusCode, message: str, reason: str | None = None) -> None:
        status = StatusCode(status)
        super().__init__(f"{status.name}: {message}")
        self.status = status
        """How the call failed."""
        self.message = message
        """What the server (or the SDK) said was wrong."""
        self.reason = reason
        """A machine-readable reason (google.rpc.ErrorInfo) when the server gave one."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.message, self.reason))

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ParamselError:
        """The error a failed gRPC call raises: its status, details and ErrorInfo reason."""
        if not isinstance(error, grpc.Call):
            return ParamselError(StatusCode.UNKNOWN, str(error))
        return ParamselError(StatusCode(error.code().value[0]), error.details() or "", _reason(error))


class InvalidArgumentError(ParamselError, ValueError):
    """A :class:`ParamselError` with status INVALID_ARGUMENT: a request, or a value given to the SDK, is
    malformed. Also a ``ValueError``, which is what the SDK raised for such values before."""

    def __init__(self, status: StatusCode, message: str, reason: str | None = None) -> None:
        if status != StatusCode.INVALID_ARGUMENT:
            raise TypeError(f"an InvalidArgumentError has status INVALID_ARGUMENT, not {status!r}")
        super().__init__(status, message, reason)


# The exception type of each status; any status not listed is a plain ParamselError.
_TYPE_OF_STATUS: dict[StatusCode, type[ParamselError]] = {StatusCode.INVALID_ARGUMENT: InvalidArgumentError}


def invalid_argument(message: str) -> ParamselError:
    """The error of a malformed value, found in this process (as the server would find it)."""
    return ParamselError(StatusCode.INVALID_ARGUMENT, message)


def _local_status() -> list[tuple[type[BaseException], StatusCode]]:
    """The status of each exception type the SDK's own work raises, most specific first: the server's
    table (``server/paramsel/server/status.py``) for the types both sides raise, and undecodable
    protobuf, which the server also refuses as INVALID_ARGUMENT."""
    table: list[tuple[type[BaseException], StatusCode]] = [
        (WireLimitError, StatusCode.RESOURCE_EXHAUSTED),
        (WireError, StatusCode.INVALID_ARGUMENT),
        (DecodeError, StatusCode.INVALID_ARGUMENT),
    ]
    # The engine (and torch) is imported only by the work that raises its errors: when it is not
    # loaded, none of its errors can exist.
    engine = sys.modules.get("paramsel.engine.errors")
    if engine is not None:
        table += [
            (engine.InvalidArgument, StatusCode.INVALID_ARGUMENT),
            (engine.FailedPrecondition, StatusCode.FAILED_PRECONDITION),
        ]
    return table


def local_status(error: BaseException) -> StatusCode | None:
    """The status the server gives for the error this process raised; None for anything else (a bug,
    or an error that is not the service's to report)."""
    for kind, status in _local_status():
        if isinstance(error, kind):
            return status
    return None


def local_error(error: BaseException, context: str = "") -> ParamselError | None:
    """The ParamselError for an error raised by this process's own work; None when it has no status."""
    if isinstance(error, ParamselError):
        return error
    status = local_status(error)
    if status is None:
        return None
    return ParamselError(status, f"{context}{error}")


@contextmanager
def local_errors(context: str = "") -> Iterator[None]:
    """Errors of work done in this process surface as the same ParamselError a server would give."""
    try:
        yield
    except Exception as error:
        mapped = local_error(error, context)
        if mapped is None or mapped is error:
            raise
        raise mapped from None


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
