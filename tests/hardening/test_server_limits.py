"""Server limits over real gRPC: each cap is refused with RESOURCE_EXHAUSTED at once, before the data is
sent, and the server keeps serving; a cancelled or timed-out upload releases its memory and its bytes."""

from __future__ import annotations

import ctypes
import gc
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch
from reserved import reserved_bytes
from support import assert_serving, metric, proc_status, start_server, wait_for

from paramsel.server import inbound
from paramsel.server.app import RunningServer
from paramsel.server.limits import CallLimits, Limits
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


def refused_at_first_chunk(call: Any, frames: list[Any]) -> grpc.RpcError:
    """Sends the declarations and the first chunk, then holds the stream open: the refusal must come
    anyway (the work is reserved at the first chunk, before anything is computed)."""
    return refused_before_chunks(call, frames, chunks=1)


def refused_before_chunks(call: Any, frames: list[Any], *, chunks: int = 0) -> grpc.RpcError:
    """Sends only the declarations and then holds the stream open: the refusal must come anyway.

    The proof is the order of events, not a stopwatch: the refusal arrives while the upload is still
    held (it is released only once the call has failed), however slow a loaded machine makes it."""
    release = threading.Event()
    held_to_the_end: list[bool] = []

    def declarations_only() -> Iterator[Any]:
        yield from frames[: declarations(frames) + chunks]
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


@pytest.fixture
def limited(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, Any]]:
    running = start_server(limits=request.param)
    with grpc.insecure_channel(running.target) as channel:
        yield running, channel
    running.stop(0)


@pytest.mark.parametrize("limited", [Limits(max_tensors_per_call=3)], indirect=True)
@pytest.mark.parametrize("method", ["Select", "Aggregate"])
def test_tensors_per_call(limited: tuple[RunningServer, Any], method: str) -> None:
    _, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    build, call = (select_frames, stub.Select) if method == "Select" else (aggregate_frames, stub.Aggregate)
    err = refused_before_chunks(call, build(4, 4, 4, 4))
    assert err.code() == EXHAUSTED
    assert "more than 3 tensors" in (err.details() or "")
    assert list(call(iter(build(4, 4, 4)), timeout=TIMEOUT))
    assert_serving(channel)


@pytest.mark.parametrize("limited", [Limits(max_elements_per_tensor=1000)], indirect=True)
def test_elements_per_tensor(limited: tuple[RunningServer, Any]) -> None:
    running, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    err = refused_before_chunks(stub.Select, select_frames(10, 1001))
    assert err.code() == EXHAUSTED
    assert "'t1' has 1001 elements" in (err.details() or "")
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


@contextmanager
def serving(**settings: Any) -> Iterator[tuple[RunningServer, Any]]:
    """A server of these settings, on a free port, and a channel to it."""
    running = start_server(**settings)
    try:
        with grpc.insecure_channel(running.target) as channel:
            yield running, channel
    finally:
        running.stop(0)


def test_bytes_per_call() -> None:
    fits = select_frames(600, 400)
    limit = reserved_bytes("Select", fits)
    # 4000 uploaded; 2 x 8 KiB of objects; 1000 float32 scores; all of them joined and partitioned for
    # the k-th largest (4000); 500 entries selected (float32 values, int64 positions) and their 500
    # int64 positions encoded: what a call is counted for, beside its upload, as the README's table says.
    assert limit == 4000 + 2 * inbound.TENSOR_OVERHEAD_BYTES + 4000 + 4000 + 500 * (4 + 8) + 500 * 8
    with serving(limits=Limits(max_call_bytes=limit)) as (running, channel):
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        # An upload over the limit is refused from its declarations, before any chunk.
        err = refused_before_chunks(stub.Select, select_frames(limit // 8 + 1, limit // 8 + 1))
        assert err.code() == EXHAUSTED
        assert f"more than {limit} bytes" in (err.details() or "")
        # An upload well within it whose work is not: refused at the first chunk, the rest never read.
        err = refused_at_first_chunk(stub.Select, select_frames(1000, 1000))
        assert err.code() == EXHAUSTED
        assert f"over the server's limit of {limit} bytes per call (--max-call-bytes)" in (
            err.details() or ""
        )
        assert select(stub, fits)
        assert running.limits.inflight_bytes == 0
        assert_serving(channel)


@pytest.mark.parametrize("limited", [Limits(max_concurrent_calls=1)], indirect=True)
def test_concurrent_calls_beyond_the_limit_are_refused_not_queued(limited: tuple[RunningServer, Any]) -> None:
    running, channel = limited
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    held = Held(stub, select_frames(1000))
    wait_for(lambda: running.limits.active_calls == 1)
    # Refused, not queued: a queued call would wait for the held one, which waits for finish() below.
    with pytest.raises(grpc.RpcError) as err:
        select(stub, select_frames(10))
    assert err.value.code() == EXHAUSTED
    assert "already running 1 calls" in (err.value.details() or "")
    assert_serving(channel)  # health is not a paramsel call: it is never refused
    assert held.finish()[0].WhichOneof("frame") == "header"
    wait_for(lambda: running.limits.active_calls == 0)
    assert select(stub, select_frames(10))


def change_frames(*numels: int) -> list[Any]:
    """A Select of the top 1 % by |w - w0|, the initial model sent: scores written over it, so the work
    (the k-th search, the few entries selected) is a fraction of the upload."""
    model = [(f"t{i}", torch.randn(n)) for i, n in enumerate(numels)]
    initial = [(name, tensor + 0.1 * torch.randn(tensor.shape)) for name, tensor in model]
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=0.01, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE
        )
    )
    first = ("start", service_pb2.SelectStart(criterion=criterion))
    dense = [(MODEL, model), (tensor_pb2.SECTION_INITIAL_MODEL, initial)]
    return list(write_frames(service_pb2.SelectRequest, first, chunk_size=CHUNK, dense=dense))


def test_inflight_bytes_across_calls() -> None:
    held_frames, small_frames, big = (
        change_frames(1 << 17, 1 << 17),
        change_frames(1024),
        change_frames(3 << 16),
    )
    held_upload, big_upload = 2 << 20, 3 << 19  # model and initial model, declared before any chunk
    held_bytes, small_bytes, big_bytes = (
        reserved_bytes("Select", f) for f in (held_frames, small_frames, big)
    )
    cap = held_bytes + small_bytes  # room for the held call's upload and work, and the small call's
    assert big_upload > cap - held_upload  # the big upload does not fit beside the held one ...
    assert big_bytes <= cap  # ... but the whole big call fits alone
    with serving(limits=Limits(max_inflight_bytes=cap)) as (running, channel):
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        held = Held(stub, held_frames)
        wait_for(lambda: running.limits.inflight_bytes == held_upload)
        err = refused_before_chunks(stub.Select, big)
        assert err.code() == EXHAUSTED
        assert "in flight" in (err.details() or "")
        assert select(stub, small_frames)  # upload and work fit beside the held upload
        assert held.finish()  # its work is reserved as it computes, where the small call's was
        wait_for(lambda: running.limits.inflight_bytes == 0)
        assert select(stub, big)
        assert running.limits.inflight_bytes == 0
        assert_serving(channel)


# ---------------------------------------------------------------------------------------------------
# Cancellation and deadlines release memory


def rss_bytes() -> int:
    return proc_status(os.getpid(), "VmRSS")


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc: freed memory is measured as the allocator keeps it
        return None


MALLOC_TRIM = _malloc_trim()


def settled_rss() -> int:
    """The RSS once garbage is collected and glibc has handed freed heap memory back to the system.

    Without the trim, memory a previous, interrupted upload freed can stay in the process's heap: a
    baseline taken then is too high by it, and the next upload, which reuses it, seems to add less."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
    return rss_bytes()


UPLOAD_ELEMENTS = 100_000_000  # 400 MB of float32 declared


def upload_and_plan(frames: list[Any]) -> int:
    """What a call of these declarations holds reserved once its first chunk is in: the upload, and the
    work its declared shapes decide (here, top-k's scores and the k-th search's sample and masks)."""
    limits = CallLimits(Limits(4, 1 << 50, 1 << 50, 1000, 1 << 40))
    with limits.call() as call:
        for _ in call.watch(iter(frames), inbound.select_plan):
            pass
        return call.declared + call.work


SENT_CHUNKS = 300  # ~300 MiB of it actually sent before the call is cut


DEADLINES = (6.0, 30.0, 120.0)
"""Deadlines tried in turn: the upload must be in, and measured, before the deadline cuts it, and a
loaded machine can need longer than the first."""


def interrupt_upload(
    running: RunningServer, stub: Any, how: str, deadline: float | None
) -> tuple[int, int] | None:
    """Uploads ~300 MiB of a 400 MB declaration, then cancels it or lets ``deadline`` cut it; returns
    the RSS before and at the peak, or None when the deadline came before the upload was measured."""
    baseline = settled_rss()
    sent = threading.Event()
    stop = threading.Event()
    data = bytes(CHUNK)
    received_before = metric(running, "paramsel_received_bytes_total", method="Select")
    uploaded = 0

    def upload() -> Iterator[Any]:
        nonlocal uploaded
        spec = tensor_pb2.TensorSpec(name="w", dtype=F32, shape=[UPLOAD_ELEMENTS])
        declarations = [
            service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=TOP_K)),
            service_pb2.SelectRequest(tensors=tensor_pb2.TensorManifest(section=MODEL, tensors=[spec])),
        ]
        chunks = (
            service_pb2.SelectRequest(
                chunk=tensor_pb2.Chunk(section=MODEL, offset_bytes=i * CHUNK, data=data)
            )
            for i in range(SENT_CHUNKS)
        )
        for frame in itertools.chain(declarations, chunks):
            uploaded += frame.ByteSize()
            yield frame
        sent.set()
        stop.wait(TIMEOUT)

    def taken_in() -> bool:
        """The server's handler has read every frame sent (the server's own count of request bytes),
        or the call is over."""
        received = metric(running, "paramsel_received_bytes_total", method="Select") - received_before
        return received >= uploaded or not call.is_active()

    call = stub.Select(upload(), timeout=TIMEOUT if deadline is None else deadline)
    peak = held = 0
    try:
        while not sent.wait(0.05):
            assert deadline is not None or call.is_active(), "the upload ended before it was sent"
            if not call.is_active():  # the deadline came first: the caller tries a longer one
                break
        if sent.is_set():
            # The last chunks may still be in flow-control windows: wait until the server has them.
            wait_for(taken_in, what="the server to read the whole upload")
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
    spec = tensor_pb2.TensorSpec(name="w", dtype=F32, shape=[UPLOAD_ELEMENTS])
    planned = upload_and_plan(
        [
            service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=TOP_K)),
            service_pb2.SelectRequest(tensors=tensor_pb2.TensorManifest(section=MODEL, tensors=[spec])),
            service_pb2.SelectRequest(chunk=tensor_pb2.Chunk(section=MODEL, offset_bytes=0, data=b"x")),
        ]
    )
    if not sent.is_set() or (deadline is not None and held != planned):
        return None
    assert held == planned
    return baseline, peak


@pytest.mark.slow  # ~300 MiB uploaded, in-process: a large model
@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_an_interrupted_upload_releases_its_memory(how: str, caplog: pytest.LogCaptureFixture) -> None:
    # gRPC may log the cut-short stream's exception, traceback and all; pytest keeps log records until
    # the test ends, and that traceback would keep the upload's buffers alive: records are not needed.
    caplog.set_level(logging.CRITICAL + 1, logger="grpc._server")
    running = start_server()
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
                after = settled_rss()
                if after - baseline < 100 << 20 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert after - baseline < 100 << 20, f"RSS {baseline >> 20} -> {peak >> 20} -> {after >> 20} MiB"
            assert select(stub, select_frames(10))
            assert_serving(channel)
    finally:
        running.stop(0)
