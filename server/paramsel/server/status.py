"""The one table from domain errors to gRPC status codes, and the guard that applies it."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramsel import engine
from paramsel.server.limits import ServerDrainingError
from paramsel.server.models import ModelNotHeldError
from paramsel.wire import WireError, WireLimitError
from paramsel.wire.errors import StreamEndedError

log = logging.getLogger("paramsel.server")

# Most specific first: WireLimitError is a WireError.
STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (WireLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (WireError, grpc.StatusCode.INVALID_ARGUMENT),
    (engine.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (engine.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelNotHeldError, grpc.StatusCode.FAILED_PRECONDITION),
    (ServerDrainingError, grpc.StatusCode.UNAVAILABLE),
)
DOMAIN = "paramsel.v1"
# How long a cut-short request stream waits to learn whether the client cancelled.
CANCEL_GRACE_SECONDS = 0.05


def status_of(error: Exception) -> grpc.StatusCode | None:
    """The status a domain error maps to; None for anything else (a bug)."""
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            return code
    return None


@contextmanager
def statuses(context: grpc.ServicerContext, method: str) -> Iterator[None]:
    """Turns domain errors raised inside into their status; anything unexpected becomes INTERNAL, logged."""
    try:
        yield
    except Exception as error:
        if isinstance(error, grpc.RpcError) or not context.is_active() or _cancelled(context, error):
            raise  # the client went away or the call was already aborted: nothing to answer
        code = status_of(error)
        if code is not None:
            reason = getattr(error, "reason", None)
            if reason is None:
                context.abort(code, str(error))
            # A machine-readable reason lets clients act (e.g. re-send the initial model).
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
            status = status_pb2.Status(code=code.value[0], message=str(error), details=[detail])
            context.abort_with_status(rpc_status.to_status(status))
        incident = uuid.uuid4().hex[:12]
        log.exception("%s failed unexpectedly (incident %s)", method, incident)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method} (incident {incident})")


def _cancelled(context: grpc.ServicerContext, error: Exception) -> bool:
    """Whether a request stream that ended early was in fact cancelled by the client.

    gRPC can end a cancelled call's request stream a moment before it marks the call inactive; waiting
    that moment keeps a cancellation from being answered, and counted, as INVALID_ARGUMENT.
    """
    if not isinstance(error, StreamEndedError):
        return False
    deadline = time.monotonic() + CANCEL_GRACE_SECONDS
    while time.monotonic() < deadline:
        if not context.is_active():
            return True
        time.sleep(0.005)
    return not context.is_active()
