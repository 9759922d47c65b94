"""One SDK operation within one deadline, its calls retried on UNAVAILABLE with capped, jittered backoff.

An operation (``Client.select``, an exchanger's push, ...) gets ``Connection.timeout_seconds`` in all:
every attempt of every rpc it makes (retries, and the upload that follows an INITIAL_MODEL_NOT_HELD
refusal) gets what is left of it, and no attempt starts with less left than a backoff would need
(``initial_backoff_seconds``, past the wait before it): the operation ends with DEADLINE_EXCEEDED instead.
Each attempt is logged at DEBUG (logger ``paramsel.client``; the record's ``paramsel_started`` and
``paramsel_timeout`` say when it started, on ``time.monotonic``'s clock, and the time it was given),
each retry at INFO.

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


class Operation:
    """One SDK operation's budget: a deadline that every attempt of every rpc it makes shares."""

    def __init__(self, connection: Connection, name: str) -> None:
        self.connection = connection
        self.name = name
        self.deadline = time.monotonic() + connection.timeout_seconds
        """On ``time.monotonic``'s clock."""
        self.attempts = 0
        """Attempts made so far, of all the operation's rpcs."""

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def min_attempt_seconds(self) -> float:
        """The least time a later attempt must have: the channel reconnects no sooner than
        ``initial_backoff_seconds`` after a failure, so an attempt with less could only fail again."""
        return self.connection.initial_backoff_seconds

    def expired(self, attempts: int, last: ParamselError | None) -> ParamselError:
        said = f"; last: {last}" if last is not None else ""
        return ParamselError(
            StatusCode.DEADLINE_EXCEEDED,
            f"deadline of {self.connection.timeout_seconds:g} s of {self.name} reached after "
            f"{attempts} attempt(s){said}",
            last.reason if last is not None else None,
        )


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
    operation: Operation,
    attempt: Callable[[float], T],
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Runs ``attempt(timeout_seconds)`` until it succeeds, fails for good, or the operation's time is spent.

    Each attempt gets what is left of the operation's deadline and must rebuild its whole request.
    """
    connection = operation.connection
    last: ParamselError | None = None
    for number in range(1, connection.max_attempts + 1):
        now = time.monotonic()
        left = operation.deadline - now
        if operation.attempts and left < operation.min_attempt_seconds:
            raise operation.expired(operation.attempts, last) from None
        operation.attempts += 1
        _log.debug(
            "%s: attempt %d of %d, %.3f s left of %g s",
            operation.name,
            number,
            connection.max_attempts,
            left,
            connection.timeout_seconds,
            extra={
                "paramsel_operation": operation.name,
                "paramsel_attempt": number,
                "paramsel_started": now,
                "paramsel_timeout": left,
                "paramsel_deadline": operation.deadline,
            },
        )
        try:
            return attempt(left)
        except ParamselError as error:
            if error.status not in RETRYABLE:
                raise
            final = tls_failure(connection, error, operation.remaining())
            if final is not None:
                raise final from None
            last = error
        if number == connection.max_attempts:
            break
        wait = backoff(connection, number)
        left = operation.remaining()
        if left - wait < operation.min_attempt_seconds:
            raise operation.expired(operation.attempts, last) from None
        _log.info(
            "%s: attempt %d of %d failed (%s); retrying in %.2f s, %.2f s left",
            operation.name,
            number,
            connection.max_attempts,
            last,
            wait,
            left,
        )
        sleep(wait)
    assert last is not None
    raise ParamselError(
        last.status,
        f"gave up after {connection.max_attempts} attempt(s): {last.message}",
        last.reason,
    ) from None
