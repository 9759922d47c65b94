"""One SDK call within its deadline, retried on UNAVAILABLE with capped, jittered exponential backoff.

gRPC says UNAVAILABLE both for a server that is down or restarting, which a retry may find back, and for
a TLS mismatch (a refused client certificate, an untrusted server certificate, TLS on one side only),
which every attempt meets again. The status code cannot tell them apart and grpc-core's wording changes
between releases, so after each UNAVAILABLE the server's handshake is probed (``_tls_probe``): a mismatch
ends the call at once, with a message that names it and its reason in ``ParamselError.reason``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from paramsel.client._connection import Connection, resolve
from paramsel.client._errors import ParamselError, StatusCode
from paramsel.client._tls_probe import tls_mismatch

T = TypeVar("T")

# Only a server that could not be reached (down, restarting, connection reset) is worth another
# attempt: every other failure would fail the same way again, or must not be repeated.
RETRYABLE = frozenset({StatusCode.UNAVAILABLE})
# The longest a TLS probe after a failed attempt may take (less when the call's deadline is nearer).
PROBE_SECONDS = 5.0

_log = logging.getLogger("paramsel.client")


def tls_failure(connection: Connection, error: ParamselError, timeout: float) -> ParamselError | None:
    """The final error to raise instead of retrying ``error``, when TLS refused the connection."""
    if timeout <= 0:
        return None
    try:
        resolved = resolve(connection)
    except ParamselError:  # settings that worked a moment ago and no longer do: the next attempt says so
        return None
    mismatch = tls_mismatch(resolved, min(timeout, PROBE_SECONDS))
    if mismatch is None:
        return None
    return ParamselError(error.status, f"{mismatch.message} [gRPC: {error.message}]", mismatch.reason)


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

    Each attempt gets what is left of the call's deadline and must rebuild its whole request. Each
    retry is logged (INFO, logger ``paramsel.client``).
    """
    deadline = time.monotonic() + connection.timeout_seconds
    for number in range(1, connection.max_attempts + 1):
        try:
            return attempt(deadline - time.monotonic())
        except ParamselError as error:
            if error.status not in RETRYABLE:
                raise
            final = tls_failure(connection, error, deadline - time.monotonic())
            if final is not None:
                raise final from None
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
        _log.info(
            "attempt %d of %d failed (%s); retrying in %.2f s", number, connection.max_attempts, last, wait
        )
        sleep(wait)
    raise ParamselError(
        last.status,
        f"gave up after {connection.max_attempts} attempt(s): {last.message}",
        last.reason,
    ) from None
