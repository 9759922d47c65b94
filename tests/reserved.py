"""What a call reserves against --max-call-bytes, as the server's own code counts it: the call run on an
in-process servicer whose limits admit anything, and the bytes it had reserved when it ended."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from paramsel.server.config import Limits, ServerConfig
from paramsel.server.limits import Call, CallLimits
from paramsel.server.servicer import ParameterSelectionServicer, limits_of

UNLIMITED = 1 << 50


class _Recording(CallLimits):
    """Limits that remember, for the last call, its upload and its work when it ended."""

    uploaded = 0
    work = 0

    @contextmanager
    def call(self) -> Iterator[Call]:
        with super().call() as call:
            try:
                yield call
            finally:
                self.uploaded, self.work = call.declared, call.work


class _Context:
    """Enough of a ServicerContext for a call that succeeds (a failure is raised as it is)."""

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"the call failed: {code} {details}")

    def abort_with_status(self, status: Any) -> None:
        raise AssertionError(f"the call failed: {status}")


def reserved(method: str, frames: list[Any]) -> tuple[int, int]:
    """(upload, work): the bytes ``frames`` reserve as a call of ``method`` (``"Select"``, ``"Push"``,
    ``"Pull"`` or ``"Aggregate"``), counted by the server's own code. The call must succeed."""
    config = ServerConfig(
        port=0,
        limits=Limits(max_call_bytes=UNLIMITED, max_inflight_bytes=UNLIMITED, max_tensors_per_call=1 << 30),
    )
    limits = _Recording(limits_of(config))
    servicer = ParameterSelectionServicer(config, limits)
    for _ in getattr(servicer, method)(iter(frames), _Context()):
        pass
    return limits.uploaded, limits.work


def reserved_bytes(method: str, frames: list[Any]) -> int:
    """The bytes ``frames`` reserve in all (upload and work) as a call of ``method``."""
    upload, work = reserved(method, frames)
    return upload + work
