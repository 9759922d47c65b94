"""One SDK call within its deadline, retried on UNAVAILABLE with capped, jittered exponential backoff."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

from paramsel.client._connection import Connection
from paramsel.client._errors import ParamselError, StatusCode

T = TypeVar("T")

# Only a server that could not be reached (down, restarting, connection reset) is worth another
# attempt: every other failure would fail the same way again, or must not be repeated.
RETRYABLE = frozenset({StatusCode.UNAVAILABLE})


def _retryable(error: ParamselError) -> bool:
    """UNAVAILABLE, unless TLS itself refused the server (an untrusted certificate, a plaintext port):
    gRPC reports that as UNAVAILABLE too, but it fails the same way on every attempt."""
    return error.status in RETRYABLE and not (
        "handshake failed" in error.message and "SSL_ERROR_SSL" in error.message
    )


def backoff(connection: Connection, retry: int) -> float:
    """The wait before retry number ``retry`` (1-based): doubling, capped, jittered to [d/2, d]."""
    cap = min(connection.max_backoff_seconds, connection.initial_backoff_seconds * 2.0 ** (retry - 1))
    return cap / 2 + random.uniform(0, cap / 2)


def with_retries(
    connection: Connection,
    attempt: Callable[[float], T],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Runs ``attempt(timeout_seconds)`` until it succeeds, fails for good, or the budget is spent.

    Each attempt gets what is left of the call's deadline and must rebuild its whole request.
    """
    deadline = time.monotonic() + connection.timeout_seconds
    for number in range(1, connection.max_attempts + 1):
        try:
            return attempt(deadline - time.monotonic())
        except ParamselError as error:
            if not _retryable(error):
                raise
            last = error
        if number == connection.max_attempts:
            break
        wait = backoff(connection, number)
        if time.monotonic() + wait >= deadline:
            raise ParamselError(
                StatusCode.DEADLINE_EXCEEDED,
                f"deadline of {connection.timeout_seconds:g} s reached after {number} attempt(s); "
                f"last: {last}",
                last.reason,
            ) from None
        sleep(wait)
    raise ParamselError(
        last.status,
        f"gave up after {connection.max_attempts} attempt(s): {last.message}",
        last.reason,
    ) from None
