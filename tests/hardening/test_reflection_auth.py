"""Idle reflection streams cannot starve the server (issue 10, finding 3): with a token configured they
need it too; health checks and reflection run on threads of their own. Real servers on loopback; every
wait is bounded generously, none measures speed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import start_server, wait_for

from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import write_frames

TOKEN = "reflection-test-token-5e1d"
STREAMS = 20  # as many as the server has workers by default
TIMEOUT = 60  # seconds: a generous bound for every wait, never a measure of speed
HEALTH_TIMEOUT = 10  # a health probe's budget (the container's is 5 s; doubled for a loaded machine)
HOLD = 300  # how long an idle stream is kept open, at most: far longer than the test


def push_frames() -> list[Any]:
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    first = ("start", service_pb2.PushStart(criterion=criterion))
    dense = [(tensor_pb2.SECTION_MODEL, [("w", torch.randn(1000))])]
    return list(write_frames(service_pb2.PushRequest, first, chunk_size=1 << 20, dense=dense))


class IdleReflection:
    """A reflection stream that asks one question (when ``ask``) and then sits idle, held open."""

    def __init__(
        self, channel: grpc.Channel, *, ask: bool, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.answered = threading.Event()
        self.release = threading.Event()
        self.error: grpc.RpcError | None = None

        def requests() -> Iterator[Any]:
            if ask:
                yield reflection_pb2.ServerReflectionRequest(list_services="")
            self.release.wait(HOLD)

        def run() -> None:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            try:
                for _ in stub.ServerReflectionInfo(requests(), timeout=HOLD, metadata=metadata):
                    self.answered.set()
            except grpc.RpcError as error:
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def refused(self) -> grpc.RpcError:
        """The error the call ended with while its client still held it open."""
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the idle stream was never refused"
        assert not self.release.is_set()
        assert self.error is not None
        return self.error


def health_check(channel: grpc.Channel) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)
    return int(reply.status)


@pytest.mark.timeout(240)
def test_unauthenticated_reflection_streams_delay_neither_push_nor_health() -> None:
    """The finding: with a token configured and reflection on, 20 idle reflection streams without a
    token took every worker; authenticated Pushes and the health check timed out. Now they are refused
    with UNAUTHENTICATED, and the server goes on serving while they are held open."""
    running = start_server(tokens=(TOKEN,))
    assert running.config.reflection
    assert running.config.max_workers == STREAMS
    idle: list[IdleReflection] = []
    try:
        with (
            grpc.insecure_channel(running.target) as attacker,
            grpc.insecure_channel(running.target) as client,
        ):
            idle = [IdleReflection(attacker, ask=i % 2 == 0) for i in range(STREAMS)]
            for stream in idle:
                error = stream.refused()
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
                assert not stream.answered.is_set()
            assert health_check(client) == health_pb2.HealthCheckResponse.SERVING
            stub = service_pb2_grpc.ParameterSelectionServiceStub(client)
            metadata = (("authorization", f"Bearer {TOKEN}"),)
            reply = list(stub.Push(iter(push_frames()), timeout=TIMEOUT, metadata=metadata))
            assert reply[0].header.top_k.sent_entries == 500
            # Reflection itself still works, with the token.
            with_token = IdleReflection(client, ask=True, metadata=metadata)
            assert with_token.answered.wait(TIMEOUT)
            with_token.release.set()
            with_token.thread.join(TIMEOUT)
            assert with_token.error is None
    finally:
        for stream in idle:
            stream.release.set()
        running.stop(0)


@pytest.mark.timeout(240)
def test_busy_reflection_streams_leave_health_and_paramsel_their_threads() -> None:
    """Without a token anyone may use reflection: 20 reflection streams that each got an answer and then
    sit idle (their handlers blocked waiting for the next request) neither delay a health check nor
    take the workers a Push needs."""
    running = start_server(progress_timeout_seconds=TIMEOUT * 2)
    idle: list[IdleReflection] = []
    try:
        with grpc.insecure_channel(running.target) as others, grpc.insecure_channel(running.target) as client:
            idle = [IdleReflection(others, ask=True) for _ in range(STREAMS)]
            # Reflection is served: whichever streams reached its threads first are answered (the others
            # queue for them, in no set order).
            wait_for(lambda: any(stream.answered.is_set() for stream in idle), what="a reflection answer")
            assert health_check(client) == health_pb2.HealthCheckResponse.SERVING
            stub = service_pb2_grpc.ParameterSelectionServiceStub(client)
            reply = list(stub.Push(iter(push_frames()), timeout=TIMEOUT))
            assert reply[0].header.top_k.sent_entries == 500
            info = stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=TIMEOUT)
            assert info.api_package == "paramsel.v1"
            for stream in idle:  # their clients hang up: each queued one is served in turn
                stream.release.set()
            for stream in idle:
                stream.thread.join(TIMEOUT)
                assert not stream.thread.is_alive()
                assert stream.error is None
                assert stream.answered.is_set()
    finally:
        for stream in idle:
            stream.release.set()
        running.stop(0)
