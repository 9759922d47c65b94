"""Memory amplification (issue 10, item 1): a request of a few dozen bytes must not make the server
build gigabytes. What Aggregate and Pull compute from declared shapes - dense accumulators, densified
tensors, answers - is counted against --max-call-bytes and --max-inflight-bytes from the declarations,
before the first chunk is read, and a call it does not fit is refused with RESOURCE_EXHAUSTED naming the
tensor and the figures.

The attacks run against ``paramsel serve`` in a process of its own (its log goes to a file), over real
gRPC on loopback, with hand-made raw frames; the server's memory is read from /proc. The budget
arithmetic is checked against figures worked out by hand.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from support import PeakGrowth, assert_serving, serve_process

from paramsel import engine
from paramsel.client import Client, PayloadKind, SparseTensor
from paramsel.engine import budget
from paramsel.engine.budget import Need, SparseSpec, Work
from paramsel.engine.state import TensorSpec
from paramsel.server import inbound
from paramsel.server.limits import CallLimits, Limits
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire import WireLimitError
from paramsel.wire.streams import read_frames

PAYLOAD = tensor_pb2.SECTION_PAYLOAD
RESULT = frozenset({tensor_pb2.SECTION_RESULT})
F32, F64, U8 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT64, tensor_pb2.DATA_TYPE_UINT8
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
SPARSE = service_pb2.PAYLOAD_KIND_SPARSE_COO
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
HUGE = 2**31  # elements: the server's default --max-elements-per-tensor, so only the budget stops it
TIMEOUT = 120  # seconds: a generous bound for calls and waits on a loaded machine, never a speed measure
REFUSAL_BOUND = 15  # seconds: a refusal made from the declarations; the unfixed server took 35.7 s (10 GB)
RSS_GROWTH_BOUND = 64 << 20


# ---------------------------------------------------------------------------------------------------
# Raw requests, as an attacker writes them


def raw_aggregate(
    dtype: tensor_pb2.DataType.ValueType = F32, shape: int = HUGE, name: str = "w"
) -> list[service_pb2.AggregateRequest]:
    """One contribution of one sparse tensor of ``shape`` elements with a single entry (1.0 at 0)."""
    spec = tensor_pb2.SparseTensorSpec(
        name=name, dtype=dtype, shape=[shape], nnz=1, position_encoding=FLAT, positions_size_bytes=8
    )
    value = struct.pack("<f", 1.0) if dtype == F32 else struct.pack("<d", 1.0)
    return [
        service_pb2.AggregateRequest(start=service_pb2.AggregateStart(payload_kind=SPARSE)),
        service_pb2.AggregateRequest(contribution=service_pb2.Contribution(num_examples=1)),
        service_pb2.AggregateRequest(
            sparse_tensors=tensor_pb2.SparseManifest(section=PAYLOAD, tensors=[spec])
        ),
        service_pb2.AggregateRequest(
            chunk=tensor_pb2.Chunk(section=PAYLOAD, offset_bytes=0, data=value + struct.pack("<q", 0))
        ),
    ]


def raw_pull(
    layout_dtype: tensor_pb2.DataType.ValueType, value_dtype: tensor_pb2.DataType.ValueType
) -> list[service_pb2.PullRequest]:
    """A replace-mode Pull of a layout of 2**31 entries, with a payload that sends none of them."""
    layout = tensor_pb2.TensorSpec(name="w", dtype=layout_dtype, shape=[HUGE])
    payload = tensor_pb2.SparseTensorSpec(
        name="w", dtype=value_dtype, shape=[HUGE], nnz=0, position_encoding=FLAT, positions_size_bytes=0
    )
    start = service_pb2.PullStart(payload_kind=SPARSE, mode=service_pb2.PULL_MODE_REPLACE)
    return [
        service_pb2.PullRequest(start=start),
        service_pb2.PullRequest(layout=tensor_pb2.StateLayout(tensors=[layout])),
        service_pb2.PullRequest(sparse_tensors=tensor_pb2.SparseManifest(section=PAYLOAD, tensors=[payload])),
    ]


def size_of(frames: list[Any]) -> int:
    return sum(frame.ByteSize() for frame in frames)


# ---------------------------------------------------------------------------------------------------
# A server of its own


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """``paramsel serve`` with the default limits; yields its pid and address."""
    with serve_process(log=tmp_path / "serve.log") as (proc, target):
        yield proc.pid, target


def warm_up(target: str) -> None:
    """Legitimate calls first, so that the measured ones find the server's threads and code paths ready."""
    legitimate_aggregate(target)
    legitimate_pull(target)


def legitimate_aggregate(target: str) -> None:
    """A small weighted sparse aggregate, checked against its value by hand."""
    a = SparseTensor("w", (4,), torch.tensor([2.0, 4.0]), torch.tensor([0, 3]))
    b = SparseTensor("w", (4,), torch.tensor([8.0]), torch.tensor([3]))
    result = Client(target=target).aggregate(PayloadKind.SPARSE_COO, [(1, [], [a]), (3, [], [b])])
    # (1 * [2, 0, 0, 4] + 3 * [0, 0, 0, 8]) / 4 = [0.5, 0, 0, 7]
    (got,) = result.sparse
    assert got.name == "w"
    assert got.values.tolist() == [0.5, 7.0]
    assert got.positions.tolist() == [0, 3]


def legitimate_pull(target: str) -> None:
    """A small replace-mode pull: the densified tensor, in the model's dtype."""
    layout = {"w": torch.zeros(5, dtype=torch.float64), "b": torch.zeros(2)}
    payload = SparseTensor("w", (5,), torch.tensor([1.5, -2.0]), torch.tensor([1, 4]))
    changed = Client(target=target).pull(PayloadKind.SPARSE_COO, layout, sparse=[payload])
    assert list(changed) == ["w"]
    assert changed["w"].dtype == torch.float64
    assert changed["w"].tolist() == [0.0, 1.5, 0.0, 0.0, -2.0]


def refused(call: Any, frames: list[Any], pid: int, *, hold: bool) -> tuple[grpc.RpcError, float, int]:
    """Sends ``frames`` (and, with ``hold``, keeps the stream open after them); returns the refusal, the
    call's own elapsed seconds and how far the server's memory rose meanwhile."""
    release = threading.Event()

    def requests() -> Iterator[Any]:
        yield from frames
        if hold:  # the refusal must come at the first chunk, not at the stream's end
            release.wait(TIMEOUT)

    def run() -> None:
        list(call(requests(), timeout=TIMEOUT))

    began = time.monotonic()
    try:
        with PeakGrowth(pid) as memory, pytest.raises(grpc.RpcError) as err:
            run()
        elapsed = time.monotonic() - began
    finally:
        release.set()
    return err.value, elapsed, memory.growth


def assert_refused_cheaply(err: grpc.RpcError, elapsed: float, growth: int, *figures: str) -> None:
    assert err.code() == EXHAUSTED, (err.code(), err.details())
    details = err.details() or ""
    assert "tensor 'w'" in details, details
    assert "--max-call-bytes" in details, details
    for figure in figures:
        assert figure in details, (figure, details)
    assert elapsed < REFUSAL_BOUND, f"the refusal took {elapsed:.1f} s"
    assert growth < RSS_GROWTH_BOUND, f"the server's memory rose by {growth >> 20} MiB"


@pytest.mark.slow  # a `paramsel serve` process
def test_a_50_byte_aggregate_of_a_2_31_shape_is_refused_before_it_allocates(served: tuple[int, str]) -> None:
    pid, target = served
    warm_up(target)
    frames = raw_aggregate()
    assert size_of(frames) < 64  # a few dozen bytes on the wire
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        err, elapsed, growth = refused(stub.Aggregate, frames, pid, hold=True)
        # Two float32 accumulators of 2**31 elements: 16 GiB, over the default 8 GiB per call.
        assert_refused_cheaply(err, elapsed, growth, str(8 << 30))
        assert "over shape [2147483648]" in (err.details() or "")
        assert_serving(channel)
    legitimate_aggregate(target)
    legitimate_pull(target)


@pytest.mark.slow  # a `paramsel serve` process
@pytest.mark.parametrize(
    ("layout_dtype", "value_dtype"),
    [(F32, F32), (U8, F64)],
    ids=["float32", "uint8-layout-float64-values"],
)
def test_a_pull_of_a_2_31_layout_is_refused_before_it_allocates(
    served: tuple[int, str],
    layout_dtype: tensor_pb2.DataType.ValueType,
    value_dtype: tensor_pb2.DataType.ValueType,
) -> None:
    pid, target = served
    warm_up(target)
    frames = raw_pull(layout_dtype, value_dtype)
    assert size_of(frames) < 96
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        # No chunk to wait for: the declarations are complete when the stream ends.
        err, elapsed, growth = refused(stub.Pull, frames, pid, hold=False)
        # float32: the 8 GiB answer alone (and the call's bookkeeping) passes 8 GiB. uint8 layout,
        # float64 values: a 2 GiB answer, but the payload densified in float64 first takes 16 GiB more -
        # the answer-only check let that through 8x over.
        assert_refused_cheaply(err, elapsed, growth, str(8 << 30))
        assert_serving(channel)
    legitimate_aggregate(target)
    legitimate_pull(target)


@pytest.mark.slow  # a `paramsel serve` process
def test_two_aggregates_that_each_fit_but_not_together_one_is_refused(tmp_path: Path) -> None:
    shape = 1 << 22  # one contribution, one entry: two float32 accumulators of 16 MiB each
    one = inbound.aggregate_plan(_declarations_of(raw_aggregate(shape=shape))).nbytes + 12
    assert 32 << 20 < one < 33 << 20
    cap = one * 3 // 2  # room for one such call, not two
    args = ("--max-inflight-bytes", str(cap), "--progress-timeout-seconds", str(TIMEOUT))
    with serve_process(*args, log=tmp_path / "serve.log") as (_, target):
        warm_up(target)
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            release = threading.Event()
            outcomes: list[Any] = [None, None]

            def run(index: int) -> None:
                def held() -> Iterator[Any]:
                    # Every frame, the chunk included (which reserves the work), then the stream is held
                    # open: both calls hold their reservation until one is refused.
                    yield from raw_aggregate(shape=shape)
                    release.wait(TIMEOUT)

                try:
                    outcomes[index] = list(stub.Aggregate(held(), timeout=TIMEOUT))
                except grpc.RpcError as error:
                    outcomes[index] = error
                    release.set()

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
            for thread in threads:
                thread.start()
            assert release.wait(TIMEOUT), "neither call was refused while both held their reservation"
            for thread in threads:
                thread.join(TIMEOUT)
            errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
            answers = [o for o in outcomes if isinstance(o, list)]
            assert len(errors) == 1, outcomes
            assert len(answers) == 1, outcomes
            assert errors[0].code() == EXHAUSTED
            details = errors[0].details() or ""
            assert "tensor 'w'" in details
            assert f"limit of {cap} (--max-inflight-bytes)" in details
            # The other one completed: 1.0 at position 0 of the 2**22 entries.
            got = read_frames(iter(answers[0]), first="header", sparse_sections=RESULT, max_bytes=1 << 20)
            (tensor,) = got.sparse[tensor_pb2.SECTION_RESULT]
            assert (tensor.values.tolist(), tensor.positions.tolist()) == ([1.0], [0])
            # Both reservations are gone: two of them in turn fit again.
            for _ in range(2):
                assert list(stub.Aggregate(iter(raw_aggregate(shape=shape)), timeout=TIMEOUT))
            assert_serving(channel)
        legitimate_aggregate(target)


def _declarations_of(frames: list[Any]) -> Any:
    limits = CallLimits(Limits(4, 1 << 40, 1 << 40, 1000, HUGE))
    with limits.call() as call:
        for _ in call.watch(iter(frames)):
            pass
        return call.declarations


# ---------------------------------------------------------------------------------------------------
# The arithmetic, by hand


def test_the_sparse_aggregate_attack_is_two_dense_accumulators() -> None:
    work = budget.aggregate_sparse_work([(1, [SparseSpec("w", torch.float32, (HUGE,), 1)])])
    (need,) = work.needs
    # Answer: at most 1 entry, a float32 value and an int64 position.
    assert need.held == 4 + 8
    # Two float32 accumulators of 2**31, the end phase of 1 answer entry (9 + 2 * 4 bytes) and the
    # per-entry scratch of 1 entry (32 + 4 * 4 bytes).
    assert need.scratch == 2 * HUGE * 4 + 17 + 48
    assert work.nbytes == 12 + 2 * HUGE * 4 + 17 + 48 == 17_179_869_261


def test_sparse_aggregate_counts_the_widest_dtype_and_broadcasting() -> None:
    # float16 with float32, weighted: the sum and the quotient are float32 (4 bytes).
    mixed = budget.aggregate_sparse_work(
        [(3, [SparseSpec("w", torch.float16, (10,), 2)]), (5, [SparseSpec("w", torch.float32, (10,), 3)])]
    )
    (need,) = mixed.needs
    assert need.held == 5 * (4 + 8)  # at most 2 + 3 answer entries
    assert need.scratch == 2 * 10 * 4 + 5 * (9 + 8) + 3 * (32 + 16)
    # bool values weighted by an example count become int64 terms (8 bytes); the quotient is float32.
    flags = budget.aggregate_sparse_work([(7, [SparseSpec("f", torch.bool, (100,), 10)])])
    assert flags.needs[0].held == 10 * (4 + 8)
    assert flags.needs[0].scratch == 2 * 100 * 8 + 10 * (9 + 16) + 10 * (32 + 32)
    # Shapes (1, 4) and (3, 1) broadcast to (3, 4): four accumulators of 12 float32; the (1, 4) entry
    # can repeat 3 times and the (3, 1) one 4 times, capped at 12.
    broadcast = budget.aggregate_sparse_work(
        [(1, [SparseSpec("b", torch.float32, (1, 4), 1)]), (1, [SparseSpec("b", torch.float32, (3, 1), 3)])]
    )
    assert broadcast.needs[0].held == 12 * (4 + 8)
    assert broadcast.needs[0].scratch == 4 * 12 * 4 + 12 * (9 + 8) + 3 * (32 + 16)
    # Shapes that do not broadcast are refused before anything is built: nothing to count.
    clash = budget.aggregate_sparse_work(
        [(1, [SparseSpec("c", torch.float32, (2,), 1)]), (1, [SparseSpec("c", torch.float32, (3,), 1)])]
    )
    assert clash.nbytes == 0


def test_layer_aggregate_counts_sums_and_the_answer() -> None:
    f32 = budget.aggregate_layers_work(
        [(1, [TensorSpec("w", torch.float32, (10,))]), (3, [TensorSpec("w", torch.float32, (10,))])]
    )
    assert (f32.needs[0].held, f32.needs[0].scratch) == (40, 3 * 40)
    unweighted = budget.aggregate_layers_work(
        [(1, [TensorSpec("w", torch.float32, (10,))]), (3, [TensorSpec("w", torch.float32, (10,))])],
        weighted=False,
    )
    assert (unweighted.needs[0].held, unweighted.needs[0].scratch) == (40, 2 * 40)
    # int8 layers divide to float64 (numpy): 8 bytes per element, answer included.
    ints = budget.aggregate_layers_work([(2, [TensorSpec("i", torch.int8, (5, 4))])])
    assert (ints.needs[0].held, ints.needs[0].scratch) == (20 * 8, 3 * 20 * 8)
    # bfloat16 is averaged in torch: bfloat16 throughout.
    bf16 = budget.aggregate_layers_work([(2, [TensorSpec("h", torch.bfloat16, (8,))])])
    assert (bf16.needs[0].held, bf16.needs[0].scratch) == (16, 3 * 16)
    # Two names: both answers held, one name's sums at a time.
    two = budget.aggregate_layers_work(
        [(1, [TensorSpec("a", torch.float32, (100,)), TensorSpec("b", torch.float64, (10,))])]
    )
    assert two.nbytes == 400 + 80 + 3 * 400


def test_pull_counts_the_answer_and_the_densified_payload() -> None:
    model = [TensorSpec("w", torch.uint8, (HUGE,)), TensorSpec("v", torch.float32, (6,))]
    widen = budget.pull_sparse_work(model, [SparseSpec("w", torch.float64, (HUGE,), 0)])
    # A uint8 answer of 2**31 (2 GiB), and the payload densified in float64 first (16 GiB).
    assert (widen.needs[0].held, widen.needs[0].scratch) == (HUGE, 8 * HUGE)
    # Same dtype: the densified tensor is the answer itself.
    same = budget.pull_sparse_work(model, [SparseSpec("v", torch.float32, (6,), 2)])
    assert (same.needs[0].held, same.needs[0].scratch) == (24, 2 * (32 + 16))
    scatter = budget.pull_sparse_work(
        model, [SparseSpec("w", torch.float64, (HUGE,), 0)], mode=engine.PullMode.SCATTER
    )
    assert (scatter.needs[0].held, scatter.needs[0].scratch) == (HUGE, 0)
    # Unknown names and shapes the model disagrees with are refused before anything is built.
    assert budget.pull_sparse_work(model, [SparseSpec("x", torch.float32, (HUGE,), 0)]).nbytes == 0
    assert budget.pull_sparse_work(model, [SparseSpec("v", torch.float32, (HUGE,), 0)]).nbytes == 0
    layers = budget.pull_layers_work(model, [TensorSpec("v", torch.float64, (6,))])
    assert layers.nbytes == 24
    # FedPM: 1 / x of int8 is float32: two float32 intermediates beside the uint8 answer.
    fedpm = budget.pull_fedpm_work(model, [TensorSpec("w", torch.int8, (HUGE,))])
    assert (fedpm.needs[0].held, fedpm.needs[0].scratch) == (HUGE, 2 * 4 * HUGE)


def test_work_sums_what_is_held_and_the_largest_scratch() -> None:
    work = Work((Need("a", 10, 100, "x"), Need("b", 20, 300, "y"), Need("a", 5, 50, "z")))
    assert work.nbytes == 10 + 20 + 5 + 300
    largest = work.largest()
    assert largest is not None
    assert (largest.name, largest.held, largest.scratch) == ("b", 20, 300)
    assert Work().nbytes == 0
    assert Work().largest() is None


def test_the_server_plans_add_decoding_encoding_and_bookkeeping() -> None:
    declared = _declarations_of(raw_aggregate(shape=1000))
    plan = inbound.aggregate_plan(declared)
    # Bookkeeping of one tensor, its one FLAT position (a view: nothing to decode), the average (two
    # float32 accumulators of 1000, one answer entry) and its position encoded as (1, 1) int64 COO.
    expected = inbound.TENSOR_OVERHEAD_BYTES + 12 + 8 + max(2 * 1000 * 4 + 17 + 48, 16)
    assert plan.nbytes == expected
    pull = inbound.pull_plan(_declarations_of(raw_pull(U8, F64)))
    assert (
        pull.nbytes == inbound.LAYOUT_ENTRY_OVERHEAD_BYTES + inbound.TENSOR_OVERHEAD_BYTES + HUGE + 8 * HUGE
    )


def test_a_call_is_refused_over_its_limit_and_releases_its_reservation_on_every_path() -> None:
    limits = CallLimits(Limits(4, 6_000, 5_000, 1000, HUGE))
    # Over the call's limit: refused, naming the tensor, the figures and the flag.
    with pytest.raises(WireLimitError) as err, limits.call() as call:
        call.reserve_work(Work((Need("w", 1000, 4_500, "two accumulators"),)))
    message = str(err.value)
    assert "tensor 'w' needs 5500 bytes (two accumulators)" in message
    assert "5500 bytes in all" in message
    assert "5000 bytes per call (--max-call-bytes)" in message
    assert limits.inflight_bytes == 0
    # Within it, held for the call's life and released when it ends, also by an error.
    seen: list[int] = []

    def failing() -> None:
        with limits.call() as call:
            call.reserve_work(Work((Need("w", 1000, 3_000, "sums"),)))
            seen.append(limits.inflight_bytes)
            raise RuntimeError("the computation failed")

    with pytest.raises(RuntimeError):
        failing()
    assert seen == [4_000]
    assert limits.inflight_bytes == 0
    # Two calls that fit one at a time, not together: the second is refused on the in-flight cap.
    with limits.call() as first:
        first.reserve_work(Work((Need("w", 0, 4_000, "sums"),)))
        with pytest.raises(WireLimitError) as err, limits.call() as second:
            second.reserve_work(Work((Need("v", 0, 4_000, "sums"),)))
        assert "tensor 'v'" in str(err.value)
        assert "(--max-inflight-bytes)" in str(err.value)
        assert limits.inflight_bytes == 4_000
    assert limits.inflight_bytes == 0
    assert limits.active_calls == 0


def test_the_plan_runs_at_the_first_chunk_before_it_goes_on() -> None:
    limits = CallLimits(Limits(4, 1 << 40, 8 << 30, 1000, HUGE))
    passed: list[str] = []

    def read() -> None:
        with limits.call() as call:
            for frame in call.watch(iter(raw_aggregate()), inbound.aggregate_plan):
                passed.append(frame.WhichOneof("frame"))

    with pytest.raises(WireLimitError) as err:
        read()
    assert passed == ["start", "contribution", "sparse_tensors"]  # the chunk was never passed on
    assert "tensor 'w'" in str(err.value)
    # A stream without chunks is planned at its end.
    with pytest.raises(WireLimitError), limits.call() as call:
        list(call.watch(iter(raw_pull(F32, F32)), inbound.pull_plan))
    assert limits.inflight_bytes == 0


def test_engine_results_match_what_was_planned_for_small_inputs() -> None:
    """Not a memory measurement: the planned answers are at least the answers the engine gives."""
    values = torch.tensor([1.0, 2.0, 3.0])
    contributions = [
        engine.Contribution(2, sparse=[engine.SparseTensor("w", (8,), values, torch.tensor([0, 3, 7]))]),
        engine.Contribution(1, sparse=[engine.SparseTensor("w", (8,), values[:2], torch.tensor([3, 5]))]),
    ]
    (result,) = engine.aggregate_sparse(contributions)
    (need,) = budget.aggregate_sparse_work(
        [(2, [SparseSpec("w", torch.float32, (8,), 3)]), (1, [SparseSpec("w", torch.float32, (8,), 2)])]
    ).needs
    assert need.held >= result.values.nbytes + result.positions.nbytes
    layers = engine.aggregate_layers(
        [engine.Contribution(3, layers=[("i", torch.ones(4, dtype=torch.int8))])]
    )
    (layer_need,) = budget.aggregate_layers_work([(3, [TensorSpec("i", torch.int8, (4,))])]).needs
    assert layer_need.held == layers[0][1].nbytes == 4 * np.dtype(np.float64).itemsize
