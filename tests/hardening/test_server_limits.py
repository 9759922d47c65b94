"""Server limits over real gRPC: each cap is refused with RESOURCE_EXHAUSTED at once, before the data is
sent, and the server keeps serving; a cancelled or timed-out upload releases its memory and its bytes."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from support import assert_serving

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import write_contributions, write_frames

MODEL = tensor_pb2.SECTION_MODEL
F32 = tensor_pb2.DATA_TYPE_FLOAT32
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CHUNK = 1 << 20
TIMEOUT = 60  # seconds; a generous bound for calls and waits, never a measure of speed
HOLD = 60  # how long an upload is held open, at most, for a refusal to arrive first

TOP_K = criteria_pb2.Criterion(
    top_k=criteria_pb2.TopKCriterion(
        sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
    )
)


def select_frames(*numels: int) -> list[Any]:
    tensors = [(f"t{i}", torch.randn(n)) for i, n in enumerate(numels)]
    first = ("start", service_pb2.SelectStart(criterion=TOP_K))
    return list(write_frames(service_pb2.SelectRequest, first, chunk_size=CHUNK, dense=[(MODEL, tensors)]))


def aggregate_frames(*numels: int) -> list[Any]:
    tensors = [(f"t{i}", torch.randn(n)) for i, n in enumerate(numels)]
    first = ("start", service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS))
    return list(
        write_contributions(
            service_pb2.AggregateRequest,
            first,
            [(1, tensors, [])],
            section=tensor_pb2.SECTION_PAYLOAD,
            encoding=0,
            chunk_size=CHUNK,
        )
    )


def declarations(frames: list[Any]) -> int:
    """How many frames come before the first chunk."""
    return next(i for i, f in enumerate(frames) if f.WhichOneof("frame") == "chunk")


def select(stub: service_pb2_grpc.ParameterSelectionServiceStub, frames: Any) -> list[Any]:
    return list(stub.Select(iter(frames), timeout=TIMEOUT))


def refused_before_chunks(call: Any, frames: list[Any]) -> grpc.RpcError:
    """Sends only the declarations and then holds the stream open: the refusal must come anyway.

    The proof is the order of events, not a stopwatch: the refusal arrives while the upload is still
    held (it is released only once the call has failed), however slow a loaded machine makes it."""
    release = threading.Event()
    held_to_the_end: list[bool] = []

    def declarations_only() -> Iterator[Any]:
        yield from frames[: declarations(frames)]
        held_to_the_end.append(not release.wait(HOLD))

    try:
        with pytest.raises(grpc.RpcError) as err:
            list(call(declarations_only(), timeout=HOLD + TIMEOUT))
    finally:
        release.set()
    assert not any(held_to_the_end), "the call ended only after the client stopped holding its upload"
    return err.value


class Held:
    """A Select whose declarations are sent and whose chunks wait for ``finish``."""

    def __init__(self, stub: service_pb2_grpc.ParameterSelectionServiceStub, frames: list[Any]) -> None:
        self._go = threading.Event()
        self._sent = threading.Event()
        self.result: list[Any] | BaseException | None = None
        cut = declarations(frames)

        def stream() -> Iterator[Any]:
            yield from frames[:cut]
            self._sent.set()
            self._go.wait(TIMEOUT)
            yield from frames[cut:]

        def run() -> None:
            try:
                self.result = list(stub.Select(stream(), timeout=TIMEOUT))
            except BaseException as error:
                self.result = error

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert self._sent.wait(TIMEOUT)

    def finish(self) -> list[Any]:
        self._go.set()
        self._thread.join(TIMEOUT)
        assert isinstance(self.result, list), self.result
        return self.result


def wait_for(condition: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def limited(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, Any]]:
    running = create_server(ServerConfig(host="127.0.0.1", port=0, **request.param))
    with grpc.insecure_channel(running.target) as channel:
        yield running, channel
    running.stop(0)


@pytest.mark.parametrize("limited", [{"max_tensors_per_call": 3}], indirect=True)
@pytest.mark.parametrize("method", ["Select", "Aggregate"])
def test_tensors_per_call(limited: tuple[RunningServer, Any], method: str) -> None:
    _, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    build, call = (select_frames, stub.Select) if method == "Select" else (aggregate_frames, stub.Aggregate)
    err = refused_before_chunks(call, build(4, 4, 4, 4))
    assert err.code() == EXHAUSTED
    assert "more than 3 tensors" in err.details()
    assert list(call(iter(build(4, 4, 4)), timeout=TIMEOUT))
    assert_serving(channel)


@pytest.mark.parametrize("limited", [{"max_elements_per_tensor": 1000}], indirect=True)
def test_elements_per_tensor(limited: tuple[RunningServer, Any]) -> None:
    running, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    err = refused_before_chunks(stub.Select, select_frames(10, 1001))
    assert err.code() == EXHAUSTED
    assert "'t1' has 1001 elements" in err.details()
    # A declaration far beyond memory is refused from the manifest alone.
    huge = [
        service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=TOP_K)),
        service_pb2.SelectRequest(
            tensors=tensor_pb2.TensorManifest(
                section=MODEL, tensors=[tensor_pb2.TensorSpec(name="w", dtype=F32, shape=[1 << 20, 1 << 20])]
            )
        ),
        service_pb2.SelectRequest(chunk=tensor_pb2.Chunk(section=MODEL, offset_bytes=0, data=b"x")),
    ]
    assert refused_before_chunks(stub.Select, huge).code() == EXHAUSTED
    assert select(stub, select_frames(1000))
    assert running.limits.inflight_bytes == 0
    assert_serving(channel)


@pytest.mark.parametrize("limited", [{"max_call_bytes": 4000}], indirect=True)
def test_bytes_per_call(limited: tuple[RunningServer, Any]) -> None:
    _, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    err = refused_before_chunks(stub.Select, select_frames(600, 600))
    assert err.code() == EXHAUSTED
    assert select(stub, select_frames(600, 400))
    assert_serving(channel)


@pytest.mark.parametrize("limited", [{"max_concurrent_calls": 1}], indirect=True)
def test_concurrent_calls_beyond_the_limit_are_refused_not_queued(limited: tuple[RunningServer, Any]) -> None:
    running, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    held = Held(stub, select_frames(1000))
    wait_for(lambda: running.limits.active_calls == 1)
    # Refused, not queued: a queued call would wait for the held one, which waits for finish() below.
    with pytest.raises(grpc.RpcError) as err:
        select(stub, select_frames(10))
    assert err.value.code() == EXHAUSTED
    assert "already running 1 calls" in err.value.details()
    assert_serving(channel)  # health is not a paramsel call: it is never refused
    assert held.finish()[0].WhichOneof("frame") == "header"
    wait_for(lambda: running.limits.active_calls == 0)
    assert select(stub, select_frames(10))


@pytest.mark.parametrize("limited", [{"max_inflight_bytes": 10 << 20}], indirect=True)
def test_inflight_bytes_across_calls(limited: tuple[RunningServer, Any]) -> None:
    running, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    held = Held(stub, select_frames(2 << 20))  # 8 MiB declared and reserved, not yet sent
    wait_for(lambda: running.limits.inflight_bytes == 8 << 20)
    err = refused_before_chunks(stub.Select, select_frames(1 << 20))  # 4 MiB more
    assert err.code() == EXHAUSTED
    assert "in flight" in err.details()
    assert select(stub, select_frames(1 << 18))  # 1 MiB fits beside it
    assert held.finish()
    wait_for(lambda: running.limits.inflight_bytes == 0)
    assert select(stub, select_frames(1 << 20))
    assert running.limits.inflight_bytes == 0
    assert_serving(channel)


# ---------------------------------------------------------------------------------------------------
# Cancellation and deadlines release memory


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


UPLOAD_ELEMENTS = 100_000_000  # 400 MB of float32 declared
SENT_CHUNKS = 300  # ~300 MiB of it actually sent before the call is cut


DEADLINES = (6.0, 30.0, 120.0)
"""Deadlines tried in turn: the upload must be in, and measured, before the deadline cuts it, and a
loaded machine can need longer than the first."""


def interrupt_upload(
    running: RunningServer, stub: Any, how: str, deadline: float | None
) -> tuple[int, int] | None:
    """Uploads ~300 MiB of a 400 MB declaration, then cancels it or lets ``deadline`` cut it; returns
    the RSS before and at the peak, or None when the deadline came before the upload was measured."""
    gc.collect()
    baseline = rss_bytes()
    sent = threading.Event()
    stop = threading.Event()
    data = bytes(CHUNK)

    def upload() -> Iterator[Any]:
        yield service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=TOP_K))
        spec = tensor_pb2.TensorSpec(name="w", dtype=F32, shape=[UPLOAD_ELEMENTS])
        yield service_pb2.SelectRequest(tensors=tensor_pb2.TensorManifest(section=MODEL, tensors=[spec]))
        for i in range(SENT_CHUNKS):
            yield service_pb2.SelectRequest(
                chunk=tensor_pb2.Chunk(section=MODEL, offset_bytes=i * CHUNK, data=data)
            )
        sent.set()
        stop.wait(TIMEOUT)

    call = stub.Select(upload(), timeout=TIMEOUT if deadline is None else deadline)
    peak = held = 0
    try:
        while not sent.wait(0.05):
            assert deadline is not None or call.is_active(), "the upload ended before it was sent"
            if not call.is_active():  # the deadline came first: the caller tries a longer one
                break
        if sent.is_set():
            # The last chunks are still in flow-control windows; let the server take them in.
            time.sleep(0.5)
            peak = rss_bytes()
            held = running.limits.inflight_bytes  # released when the call ends: proof it had not yet
        if how == "cancel":
            call.cancel()
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.value.code() == expected
    finally:
        stop.set()
    wait_for(lambda: running.limits.active_calls == 0)
    assert running.limits.inflight_bytes == 0
    if not sent.is_set() or (deadline is not None and held != UPLOAD_ELEMENTS * 4):
        return None
    assert held == UPLOAD_ELEMENTS * 4
    return baseline, peak


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_interrupted_upload_releases_its_memory(how: str, caplog: pytest.LogCaptureFixture) -> None:
    # gRPC may log the cut-short stream's exception, traceback and all; pytest keeps log records until
    # the test ends, and that traceback would keep the upload's buffers alive: records are not needed.
    caplog.set_level(logging.CRITICAL + 1, logger="grpc._server")
    running = create_server(ServerConfig(host="127.0.0.1", port=0))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            assert select(stub, select_frames(10))  # warm up the server's threads and buffers
            for deadline in DEADLINES if how == "deadline" else (None,):
                measured = interrupt_upload(running, stub, how, deadline)
                if measured is not None:
                    break
            else:
                pytest.fail(f"the upload was never in before the deadline, even with {DEADLINES[-1]} s")
            baseline, peak = measured
            assert peak - baseline > 200 << 20, "the upload never reached the server's memory"
            # Released, however long a loaded machine takes the server's threads to let go of it.
            deadline = time.monotonic() + TIMEOUT
            while True:
                gc.collect()
                after = rss_bytes()
                if after - baseline < 100 << 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert after - baseline < 100 << 20, f"RSS {baseline >> 20} -> {peak >> 20} -> {after >> 20} MiB"
            assert select(stub, select_frames(10))
            assert_serving(channel)
    finally:
        running.stop(0)
