"""Streams that stop making progress are ended by the server's progress timeout (issue 10, finding 2):
their call slots and the bytes they declared are freed, so a stalled or hung client cannot lock the
others out. Real servers on loopback; every wait is bounded, none measures speed."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from support import (
    assert_serving,
    metric,
    running_server,
    scrape,
    serve_process,
    start_server,
    wait_for,
)

from paramsel import engine
from paramsel.server import outbound
from paramsel.server.admission import peer_address
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, write_frames

MODEL = tensor_pb2.SECTION_MODEL
F32 = tensor_pb2.DATA_TYPE_FLOAT32
PROGRESS_TIMEOUT = 1.5  # seconds; the server's, shortened for the test
TIMEOUT = 60  # seconds: a generous bound for every wait, never a measure of speed
HOLD = 300  # how long a stalled client keeps its stream open: far longer than the test
TOP_K = criteria_pb2.Criterion(
    top_k=criteria_pb2.TopKCriterion(
        sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
    )
)


def push_frames(numel: int) -> list[Any]:
    first = ("start", service_pb2.PushStart(criterion=TOP_K))
    dense = [(MODEL, [("w", torch.randn(numel))])]
    return list(write_frames(service_pb2.PushRequest, first, chunk_size=1 << 20, dense=dense))


def declarations(frames: list[Any]) -> list[Any]:
    """The frames before the first chunk: the start and the manifest."""
    return frames[: next(i for i, f in enumerate(frames) if f.WhichOneof("frame") == "chunk")]


class Stalled:
    """A call that sends ``frames`` and then nothing, its stream held open until ``release``."""

    def __init__(self, call: Callable[..., Any], frames: list[Any]) -> None:
        self.sent = threading.Event()
        self._release = threading.Event()
        self.outcome: list[Any] | grpc.RpcError | None = None

        def stream() -> Iterator[Any]:
            yield from frames
            self.sent.set()
            self._release.wait(HOLD)

        def run() -> None:
            try:
                self.outcome = list(call(stream(), timeout=HOLD))
            except grpc.RpcError as error:
                self.outcome = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def ended(self, timeout: float = TIMEOUT) -> grpc.RpcError:
        """The error the server ended the call with, while the client still holds its stream open."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stalled call was never ended"
        assert isinstance(self.outcome, grpc.RpcError), self.outcome
        assert not self._release.is_set()
        return self.outcome

    def release(self) -> None:
        self._release.set()

    def finish(self) -> list[Any] | grpc.RpcError | None:
        """Lets the stream end (without the frames it never sent) and returns how the call ended."""
        self.release()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()
        return self.outcome


def assert_ended_by_progress_timeout(error: grpc.RpcError) -> None:
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert "progress timeout" in (error.details() or "")


def push_when_admitted(stub: service_pb2_grpc.ParameterSelectionServiceStub, frames: list[Any]) -> list[Any]:
    """A Push, retried while the server is full (RESOURCE_EXHAUSTED), as a client would; any other
    failure, or no success within TIMEOUT, fails the test."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            return list(stub.Push(iter(frames), timeout=TIMEOUT))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def small_push(stub: service_pb2_grpc.ParameterSelectionServiceStub) -> Any:
    """A 1000-parameter Push; its header."""
    header, *_ = stub.Push(iter(push_frames(1000)), timeout=TIMEOUT)
    return header


@pytest.mark.slow  # a `paramsel serve` process
@pytest.mark.timeout(240)
def test_sixteen_stalled_streams_no_longer_lock_out_a_push(tmp_path: Path) -> None:
    """The finding: 16 streams that send a start and a manifest, then nothing, took every call slot for
    as long as their connections stayed open. Now each is ended with DEADLINE_EXCEEDED once it has
    waited the progress timeout, and a Push from another client goes through - while the stalled
    clients still hold their streams and connections open."""
    log = tmp_path / "serve.log"
    flags = ("--progress-timeout-seconds", str(PROGRESS_TIMEOUT), "--max-concurrent-calls", "16")
    with serve_process(*flags, "--metrics-port", "0", log=log) as (_, target):
        found = re.search(r"metrics port=(\d+)", log.read_text())
        assert found is not None, log.read_text()
        metrics_port = int(found.group(1))
        channels = [grpc.insecure_channel(target) for _ in range(4)]  # stalled clients, four connections
        stalled: list[Stalled] = []
        try:
            held = declarations(push_frames(1 << 16))
            for i in range(16):
                stub = service_pb2_grpc.ParameterSelectionServiceStub(channels[i % 4])
                stalled.append(Stalled(stub.Push, held))
            for s in stalled:
                assert s.sent.wait(TIMEOUT)
            # Sent is not admitted: the Push below must not take a slot before the last stalled call does.
            wait_for(lambda: scrape(metrics_port, "paramsel_active_calls") == 16)
            with grpc.insecure_channel(target) as channel:
                stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
                frames = push_frames(1000)
                reply = push_when_admitted(stub, frames)
                assert reply[0].WhichOneof("frame") == "header"
                assert reply[0].header.top_k.sent_entries == 500
                for s in stalled:
                    assert_ended_by_progress_timeout(s.ended())
                assert_serving(channel)
                # All 16 slots are free again: 16 pushes at once are all admitted.
                results: list[Any] = []
                pushes = [
                    threading.Thread(target=lambda: results.append(push_when_admitted(stub, frames)))
                    for _ in range(16)
                ]
                for thread in pushes:
                    thread.start()
                for thread in pushes:
                    thread.join(TIMEOUT)
                assert len(results) == 16
        finally:
            for s in stalled:
                s.release()
            for c in channels:
                c.close()
    text = log.read_text()
    assert text.count("waited more than 1.5 s for the next request frame: ending it") == 16
    assert text.count('"method":"Push","code":"DEADLINE_EXCEEDED"') == 16


@pytest.mark.timeout(240)
@pytest.mark.slow  # waits out progress timeouts
def test_stalled_streams_release_the_bytes_they_declared() -> None:
    """The finding: two streams declaring 8 GiB + 4 GiB and sending 4 bytes held the whole 12 GiB
    in-flight budget, refusing every other call. (Their first chunk now has them refused at once, as
    their work does not fit beside their upload; without it, they hold what they declared.) Ended by
    the progress timeout, they release it."""
    running = start_server(progress_timeout_seconds=PROGRESS_TIMEOUT)
    stalled: list[Stalled] = []
    try:
        assert running.config.max_inflight_bytes == 12 << 30
        with grpc.insecure_channel(running.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            for numel in (2 << 30, 1 << 30):  # float32: 8 GiB and 4 GiB
                spec = tensor_pb2.TensorSpec(name="w", dtype=F32, shape=[numel])
                frames = [
                    service_pb2.PushRequest(start=service_pb2.PushStart(criterion=TOP_K)),
                    service_pb2.PushRequest(tensors=tensor_pb2.TensorManifest(section=MODEL, tensors=[spec])),
                ]
                stalled.append(Stalled(stub.Push, frames))
            for s in stalled:
                assert_ended_by_progress_timeout(s.ended())
            wait_for(lambda: running.limits.active_calls == 0)
            assert running.limits.inflight_bytes == 0
            reply = push_when_admitted(stub, push_frames(1 << 20))  # 4 MiB: needs the budget back
            assert reply[0].header.top_k.sent_entries == 1 << 19
            assert running.limits.inflight_bytes == 0
    finally:
        for s in stalled:
            s.release()
        running.stop(0)


@pytest.mark.timeout(240)
@pytest.mark.slow  # waits out progress timeouts
def test_a_client_that_stops_reading_the_answer_is_ended_too() -> None:
    """The other direction: a client that sent its request but takes no response frame holds the call
    (its handler blocks in the send) until the progress timeout ends it."""
    running = start_server(progress_timeout_seconds=PROGRESS_TIMEOUT)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            frames = push_frames(8 << 20)  # 32 MiB model: about 16 MiB of answer, far beyond any window
            call = stub.Push(iter(frames), timeout=HOLD)  # the answer is never read until the end
            wait_for(lambda: running.limits.active_calls == 1)
            wait_for(lambda: running.limits.active_calls == 0)
            with pytest.raises(grpc.RpcError) as err:
                list(call)
            assert_ended_by_progress_timeout(err.value)
            assert "take the next response frame" in (err.value.details() or "")
            assert small_push(stub).header.top_k.sent_entries == 500
    finally:
        running.stop(0)


def pull_frames() -> list[Any]:
    """A Pull of a 2-entry sparse payload into a 3x4 tensor: its answer is a header, a manifest and a
    chunk."""
    payload = SparseOut("w", (3, 4), torch.ones(2), torch.tensor([[0, 1], [2, 3]]))
    return list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO)),
            chunk_size=1 << 20,
            layout=[("w", torch.zeros(3, 4))],
            sparse=[(tensor_pb2.SECTION_PAYLOAD, [payload], tensor_pb2.POSITION_ENCODING_COO_INT64)],
        )
    )


@pytest.mark.slow  # waits out progress timeouts
def test_computing_does_not_count_as_stalled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only waits on the client count: a call whose server computes for longer than the progress
    timeout, before its answer and between its frames, is not ended. (The server's computing is
    lengthened by sleeps in the engine and in the encoder of the answer.)"""
    timeout = 1.0
    compute, encode = engine.pull_sparse, outbound.pull_frames

    def slow_compute(*args: Any, **kwargs: Any) -> Any:
        time.sleep(2 * timeout)  # computing: the client waits, the server does not
        return compute(*args, **kwargs)

    def slow_encode(*args: Any, **kwargs: Any) -> Iterator[Any]:
        for number, frame in enumerate(encode(*args, **kwargs)):
            if number == 1:
                time.sleep(1.5 * timeout)  # computing the next frame, after the client took the first
            yield frame

    monkeypatch.setattr(engine, "pull_sparse", slow_compute)
    monkeypatch.setattr(outbound, "pull_frames", slow_encode)
    with (
        running_server(progress_timeout_seconds=timeout) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        replies = list(stub.Pull(iter(pull_frames()), timeout=TIMEOUT))
        assert len(replies) >= 3
        assert replies[0].header.changed_tensors == 1
        assert metric(running, "paramsel_calls_total", method="Pull", code="OK") == 1


def test_peer_address_drops_the_port() -> None:
    assert peer_address("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_address("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_address("ipv6:[2001:db8::1]:8080") == "ipv6:[2001:db8::1]"
    assert peer_address("unix:/run/paramsel.sock") == "unix:/run/paramsel.sock"


@pytest.mark.timeout(240)
def test_calls_per_peer_are_capped_when_asked() -> None:
    """--max-calls-per-peer: one client address cannot take every slot; beyond the cap it is refused
    with RESOURCE_EXHAUSTED at once, and its slots come back when its calls end."""
    running = start_server(max_calls_per_peer=2, progress_timeout_seconds=TIMEOUT)
    stalled: list[Stalled] = []
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            held = declarations(push_frames(1000))
            stalled = [Stalled(stub.Push, held) for _ in range(2)]
            wait_for(
                lambda: running.admission is not None and running.admission.calls_from("ipv4:127.0.0.1") == 2
            )
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Push(iter(push_frames(1000)), timeout=TIMEOUT))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-calls-per-peer" in (err.value.details() or "")
            assert running.limits.active_calls == 2  # refused before it took a slot
            assert_serving(channel)  # health checks are never counted
            for s in stalled:
                outcome = s.finish()  # the rest of the upload never comes: the stream just ends
                assert isinstance(outcome, grpc.RpcError)
                assert outcome.code() == grpc.StatusCode.INVALID_ARGUMENT
            wait_for(
                lambda: running.admission is not None and running.admission.calls_from("ipv4:127.0.0.1") == 0
            )
            assert small_push(stub).header.top_k.sent_entries == 500
    finally:
        for s in stalled:
            s.release()
        running.stop(0)
