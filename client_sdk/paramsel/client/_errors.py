"""The SDK's own error type, so that callers never need to import grpc."""

from __future__ import annotations

import enum

import grpc


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

    def __init__(self, status: StatusCode, message: str) -> None:
        super().__init__(f"{status.name}: {message}")
        self.status = status
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ParamselError:
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(StatusCode(code.value[0]), details or "")
