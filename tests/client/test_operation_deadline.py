"""One deadline per SDK operation, retries included: against real servers on loopback that cannot serve,
every attempt an operation makes ends within the operation's own timeout.

What the SDK did is read from its DEBUG records (logger ``paramsel.client``, one per attempt, with when
it started and the time it was given, on ``time.monotonic``'s clock); wall-clock bounds are generous.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from paramsel.client import Client, Connection, ParamselError, ScoreFunction, StatusCode, TopK

CRITERION = TopK(0.5, ScoreFunction.LARGEST_MAGNITUDE_CHANGE)
MODEL = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
INITIAL = {"w": torch.zeros(4)}
SLACK = 0.5  # seconds between the test's reading of the clock and the operation's start, at most
GENEROUS = 10.0  # seconds: a bound a loaded machine cannot reach, never a measure of speed


@contextmanager
def nothing_listening() -> Iterator[str]:
    """A loopback port that was bound and released: connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"127.0.0.1:{port}"


def attempts(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "paramsel.client" and hasattr(r, "paramsel_started")]


def assert_within(records: list[logging.LogRecord], start: float, timeout: float, backoff: float) -> None:
    """Every attempt is given what is left of one deadline, the operation's, ``timeout`` after ``start``;
    none but the first starts with less than a backoff's worth of time left; attempts follow each other."""
    assert records, "no attempt was logged"
    ends = [r.paramsel_started + r.paramsel_timeout for r in records]  # type: ignore[attr-defined]
    assert max(ends) - min(ends) < 1e-6, "an attempt was given a deadline of its own"
    assert start + timeout <= ends[0] <= start + timeout + SLACK
    for i, record in enumerate(records):
        assert start <= record.paramsel_started, record.getMessage()  # type: ignore[attr-defined]
        if i:
            assert record.paramsel_timeout >= backoff, (i, record.paramsel_timeout)  # type: ignore[attr-defined]
            assert record.paramsel_started >= records[i - 1].paramsel_started  # type: ignore[attr-defined]


@pytest.mark.slow  # waits out deadlines
def test_retries_against_a_closed_port_share_one_deadline(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="paramsel.client")
    timeout, backoff = 2.0, 0.05
    with nothing_listening() as target:
        connection = Connection(
            target,
            timeout_seconds=timeout,
            max_attempts=10_000,  # only the deadline can end it
            initial_backoff_seconds=backoff,
            max_backoff_seconds=0.2,
        )
        start = time.monotonic()
        with pytest.raises(ParamselError) as failed:
            Client(connection=connection).push(CRITERION, MODEL)
        elapsed = time.monotonic() - start
    assert failed.value.status is StatusCode.DEADLINE_EXCEEDED, failed.value
    assert "deadline of 2 s of Push" in failed.value.message
    records = attempts(caplog)
    assert len(records) >= 2
    assert_within(records, start, timeout, backoff)
    assert elapsed < timeout + GENEROUS


class _NotHeldThenDown:
    """A gRPC service on loopback: the first Push is held ``hold`` seconds, then refused as a server that
    lacks the initial model refuses it (FAILED_PRECONDITION, ErrorInfo INITIAL_MODEL_NOT_HELD); every
    later call is refused with UNAVAILABLE, as by a server that went down."""

    def __init__(self, hold: float) -> None:
        self.hold = hold
        self.calls = 0
        self._lock = threading.Lock()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        handler = grpc.stream_stream_rpc_method_handler(self._push)
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "paramsel.v1.ParameterSelectionService", {"Push": handler}
                ),
            )
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def _push(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.calls += 1
            first = self.calls == 1
        if not first:
            context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        time.sleep(self.hold)
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.ErrorInfo(reason="INITIAL_MODEL_NOT_HELD", domain="paramsel.v1"))
        status = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message="not held", details=[detail])
        context.abort_with_status(rpc_status.to_status(status))
        yield b""  # never reached: makes this a generator, as a streaming handler is

    def __enter__(self) -> _NotHeldThenDown:
        self.server.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.stop(0).wait()


@pytest.mark.slow  # waits out deadlines
def test_the_upload_after_a_refused_digest_gets_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    """A push names the initial model by digest, is refused after a while, and must upload it: the
    upload and its retries get what is left of the push's deadline, not a deadline of their own."""
    caplog.set_level(logging.DEBUG, logger="paramsel.client")
    timeout, backoff, hold = 4.0, 0.1, 1.0
    with _NotHeldThenDown(hold) as service:
        connection = Connection(
            service.target,
            timeout_seconds=timeout,
            max_attempts=10_000,
            initial_backoff_seconds=backoff,
            max_backoff_seconds=0.2,
        )
        start = time.monotonic()
        with pytest.raises(ParamselError) as failed:
            Client(connection=connection).push(CRITERION, MODEL, INITIAL)
        elapsed = time.monotonic() - start
    assert failed.value.status is StatusCode.DEADLINE_EXCEEDED, failed.value
    records = attempts(caplog)
    assert_within(records, start, timeout, backoff)
    # The digest-only call, then the upload's attempts (numbered afresh: they are another call).
    assert [r.paramsel_attempt for r in records][:2] == [1, 1]  # type: ignore[attr-defined]
    assert service.calls == len(records) >= 2
    assert elapsed < timeout + GENEROUS


def test_an_operation_with_no_time_left_for_the_upload_does_not_start_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the refusal of the digest comes with less than a backoff's worth of time left, the upload
    is not started at all: DEADLINE_EXCEEDED, one call made."""
    caplog.set_level(logging.DEBUG, logger="paramsel.client")
    with _NotHeldThenDown(hold=0.5) as service:
        connection = Connection(
            service.target, timeout_seconds=3.0, initial_backoff_seconds=2.8, max_backoff_seconds=3.0
        )
        with pytest.raises(ParamselError) as failed:
            Client(connection=connection).push(CRITERION, MODEL, INITIAL)
    # On a machine too loaded to answer within the 3 s, the first call itself ends with the deadline.
    assert failed.value.status is StatusCode.DEADLINE_EXCEEDED, failed.value
    assert service.calls == len(attempts(caplog)) == 1
