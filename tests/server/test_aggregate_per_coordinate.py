"""Aggregate with AggregateStart.averaging = AVERAGING_PER_COORDINATE and AggregateStart.value_dtype,
through a real server, against values worked out by hand (proto/paramsel/v1/service.proto, Averaging).

The running example, one tensor "w" of shape (2, 3), i.e. flat positions 0..5:

    A (1 example):  positions 0, 1, 4  values 1.0, 2.0, 6.0
    B (2 examples): positions 1, 4, 5  values 4.0, 0.0, -3.0
    C (3 examples): positions 1, 2     values 7.0, 5.0

Weighted, per position over the contributions that sent it: 0 -> 1 (A alone); 1 -> (2 x 1 + 4 x 2 +
7 x 3) / 6 = 31 / 6; 2 -> 5 (C alone); 3 -> not sent, not listed; 4 -> (6 x 1 + 0 x 2) / 3 = 2 (B's 0.0
was sent, so it counts); 5 -> -3 (B alone). Unweighted: 1 -> 13 / 3, 4 -> 6 / 2 = 3. FL4Health's
per-tensor average divides every position by all three: 1 / 6, 31 / 6, 15 / 6, 1, -1.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from support import assert_serving, running_server

from paramsel.server.app import RunningServer
from paramsel.server.config import Limits
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.seeded import seeded_positions
from paramsel.wire.streams import Received, SparseOut, read_frames, write_contributions

PAYLOAD = tensor_pb2.SECTION_PAYLOAD
RESULT = tensor_pb2.SECTION_RESULT
SPARSE = service_pb2.PAYLOAD_KIND_SPARSE_COO
LAYERS = service_pb2.PAYLOAD_KIND_LAYERS
PER_COORDINATE = service_pb2.AVERAGING_PER_COORDINATE
COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
FLOAT16 = tensor_pb2.DATA_TYPE_FLOAT16
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)

Contribution = tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]


def _w(values: list[float], positions: list[int], dtype: torch.dtype = torch.float32) -> SparseOut:
    return SparseOut("w", (2, 3), torch.tensor(values, dtype=dtype), torch.tensor(positions))


A: Contribution = (1, [], [_w([1.0, 2.0, 6.0], [0, 1, 4])])
B: Contribution = (2, [], [_w([4.0, 0.0, -3.0], [1, 4, 5])])
C: Contribution = (3, [], [_w([7.0, 5.0], [1, 2])])


def requests(
    contributions: Sequence[Contribution],
    *,
    sent_in: int = tensor_pb2.POSITION_ENCODING_FLAT_INT64,
    chunk_size: int = 1 << 20,
    **start: Any,
) -> list[Any]:
    """An Aggregate request (default: sparse payloads), the contributions' positions in ``sent_in``."""
    first = ("start", service_pb2.AggregateStart(**{"payload_kind": SPARSE, **start}))
    frames = write_contributions(
        service_pb2.AggregateRequest,
        first,
        contributions,
        section=PAYLOAD,
        encoding=sent_in,
        chunk_size=chunk_size,
    )
    return list(frames)


def call(target: str, frames: Sequence[Any]) -> list[service_pb2.AggregateResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(stub.Aggregate(iter(frames), timeout=CALL_TIMEOUT))


def answer(responses: Sequence[Any]) -> Received:
    return read_frames(
        responses,
        first="header",
        dense_sections=frozenset({RESULT}),
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
    )


def sparse_answer(target: str, contributions: Sequence[Contribution], **start: Any) -> dict[str, Any]:
    """Per name: (flat positions, values, the answer's declaration)."""
    got = answer(call(target, requests(contributions, **start)))
    return {s.decl.name: (s.positions.tolist(), s.values, s.decl) for s in got.sparse.get(RESULT, [])}


def refused(target: str, frames: Sequence[Any], *needles: str) -> None:
    """INVALID_ARGUMENT whose message holds every needle; the server still serves."""
    with pytest.raises(grpc.RpcError) as err:
        call(target, frames)
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    with grpc.insecure_channel(target) as channel:
        assert_serving(channel)


# --- the averages -------------------------------------------------------------------------------------


def test_weighted_per_coordinate_average(server: RunningServer) -> None:
    got = sparse_answer(server.target, [A, B, C], averaging=PER_COORDINATE)
    positions, values, decl = got["w"]
    assert positions == [0, 1, 2, 4, 5]
    assert values.dtype == torch.float32
    assert values.tolist() == [1.0, float(np.float32(31 / 6)), 5.0, 2.0, -3.0]
    assert (decl.shape, decl.nnz) == ((2, 3), 5)


def test_unweighted_per_coordinate_average(server: RunningServer) -> None:
    got = sparse_answer(server.target, [A, B, C], averaging=PER_COORDINATE, weighted=False)
    positions, values, _ = got["w"]
    assert positions == [0, 1, 2, 4, 5]
    assert values.tolist() == [1.0, float(np.float32(13 / 3)), 5.0, 3.0, -3.0]


def test_unset_and_per_tensor_keep_fl4health_s_average(server: RunningServer) -> None:
    # Every position divided by 6; position 4's (6 + 0) / 6 = 1; zeros dropped.
    expected = [float(np.float32(x)) for x in (1 / 6, 31 / 6, 15 / 6, 1.0, -1.0)]
    for start in ({}, {"averaging": service_pb2.AVERAGING_PER_TENSOR}):
        positions, values, _ = sparse_answer(server.target, [A, B, C], **start)["w"]
        assert (positions, values.tolist()) == ([0, 1, 2, 4, 5], expected)


def test_every_arrival_order_gives_the_same_bytes(server: RunningServer) -> None:
    # At position 0, 2**53, -2**53 and 1 (float64) sum to 1 in FL4Health's order (keys: first value +
    # num_examples, so -2**53 first, then 1, then 2**53) but to 0 when 2**53 + 1 comes first.
    def x(values: list[float], positions: list[int]) -> list[SparseOut]:
        return [SparseOut("x", (4,), torch.tensor(values, dtype=torch.float64), torch.tensor(positions))]

    d: Contribution = (1, [], x([1.0, 0.3], [0, 3]))
    e: Contribution = (1, [], x([2.0**53], [0]))
    f: Contribution = (1, [], x([-(2.0**53), 0.7], [0, 3]))
    replies = set()
    for order in itertools.permutations([d, e, f]):
        frames = call(server.target, requests(order, averaging=PER_COORDINATE))
        replies.add(b"".join(frame.SerializeToString() for frame in frames))
    assert len(replies) == 1
    positions, values, _ = sparse_answer(server.target, [e, f, d], averaging=PER_COORDINATE)["x"]
    assert positions == [0, 3]
    assert values.tolist() == [1 / 3, (0.7 + 0.3) / 2]


def test_float16_contributions_are_averaged_in_float64(server: RunningServer) -> None:
    # 65504 x 2 overflows float16 (the per-tensor average is inf) but not float64.
    top: Contribution = (2, [], [_w([65504.0], [0], torch.float16)])
    _, values, _ = sparse_answer(server.target, [top, top], averaging=PER_COORDINATE)["w"]
    assert (values.dtype, values.tolist()) == (torch.float16, [65504.0])
    _, values, _ = sparse_answer(server.target, [top, top])["w"]
    assert values.tolist() == [float("inf")]
    # Unweighted 1, 2**-11, 2**-11: (1 + 2**-10) / 3 in float64 rounds to the float16 2734 / 8192.
    one: Contribution = (1, [], [_w([1.0], [0], torch.float16)])
    tiny: Contribution = (1, [], [_w([2**-11], [0], torch.float16)])
    _, values, _ = sparse_answer(server.target, [one, tiny, tiny], averaging=PER_COORDINATE, weighted=False)[
        "w"
    ]
    assert values.tolist() == [2734 / 8192] == [float(np.float16((1 + 2**-10) / 3))]


def test_repeated_positions_count_once_and_zeros_count(server: RunningServer) -> None:
    # A sends position 2 as 2048, 1, 1 (float16, summed in float16: 2048) and B sends 0.0 there:
    # unweighted (2048 + 0) / 2 = 1024. COO_INT64 carries repeats (the compact codes cannot).
    a: Contribution = (1, [], [_w([2048.0, 1.0, 1.0], [2, 2, 2], torch.float16)])
    b: Contribution = (1, [], [_w([0.0], [2], torch.float16)])
    got = sparse_answer(
        server.target,
        [a, b],
        averaging=PER_COORDINATE,
        weighted=False,
        sent_in=tensor_pb2.POSITION_ENCODING_COO_INT64,
    )
    positions, values, _ = got["w"]
    assert (positions, values.tolist()) == ([2], [1024.0])


# --- value_dtype ------------------------------------------------------------------------------------


def test_value_dtype_rounds_the_per_coordinate_average_once(server: RunningServer) -> None:
    # 1 + 2**-11 + 2**-40 (float64) lies just above a float16 midpoint: once rounded, 1 + 2**-10 (torch's
    # float64 -> float16 cast goes through float32 and would give 1.0).
    x = 1 + 2**-11 + 2**-40
    alone: Contribution = (1, [], [_w([x], [0], torch.float64)])
    _, values, decl = sparse_answer(server.target, [alone], averaging=PER_COORDINATE, value_dtype=FLOAT16)[
        "w"
    ]
    assert (decl.dtype, values.tolist()) == (torch.float16, [1 + 2**-10])
    # The running example's 31 / 6, rounded from float64 straight to float16.
    got = sparse_answer(server.target, [A, B, C], averaging=PER_COORDINATE, value_dtype=FLOAT16)
    _, values, _ = got["w"]
    assert values.dtype == torch.float16
    assert values.tolist() == [1.0, float(np.float16(31 / 6)), 5.0, 2.0, -3.0]


def test_value_dtype_rounds_the_per_tensor_average(server: RunningServer) -> None:
    # Unweighted float32 (1 + 0.1) / 2 = 0.55000001 (float32): float16 0.5498046875 (1126 / 2048, the
    # nearest: 1127 / 2048 is 0.0003 away, 1126 / 2048 0.0002).
    one: Contribution = (1, [], [SparseOut("v", (1,), torch.tensor([1.0]), torch.tensor([0]))])
    tenth: Contribution = (1, [], [SparseOut("v", (1,), torch.tensor([0.1]), torch.tensor([0]))])
    average = (torch.tensor([1.0]) + torch.tensor([0.1])) / 2
    _, values, decl = sparse_answer(server.target, [one, tenth], weighted=False, value_dtype=FLOAT16)["v"]
    assert decl.dtype == torch.float16
    assert values.tolist() == [0.5498046875] == average.to(torch.float16).tolist()
    ulp = 2**-11
    assert abs(values.double().item() - average.double().item()) <= ulp / 2


def test_value_dtype_rounds_layers(server: RunningServer) -> None:
    # float32 layers: the float32 average rounded (as above); a float64 layer's average rounded once.
    layers: list[Contribution] = [
        (
            1,
            [("f", torch.tensor([1.0])), ("d", torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64))],
            [],
        ),
        (1, [("f", torch.tensor([0.1])), ("i", torch.tensor([3], dtype=torch.int64))], []),
    ]
    got = answer(
        call(server.target, requests(layers, payload_kind=LAYERS, weighted=False, value_dtype=FLOAT16))
    )
    result = {decl.name: tensor for decl, tensor in got.dense[RESULT]}
    assert result["f"].dtype == torch.float16
    assert result["f"].tolist() == [0.5498046875]
    assert result["d"].tolist() == [1 + 2**-10]
    # An integer layer averages to float64 (numpy), so it is rounded too: 3 / 1.
    assert (result["i"].dtype, result["i"].tolist()) == (torch.float16, [3.0])
    plain = answer(call(server.target, requests(layers, payload_kind=LAYERS, weighted=False)))
    assert {decl.name: decl.dtype for decl, _ in plain.dense[RESULT]} == {
        "f": torch.float32,
        "d": torch.float64,
        "i": torch.float64,
    }


# --- SEEDED answers -----------------------------------------------------------------------------------


def _seeded(name: str, values: list[float], seed: int, numel: int = 10) -> SparseOut:
    positions = torch.from_numpy(seeded_positions(seed, numel, len(values)))
    return SparseOut(name, (numel,), torch.tensor(values), positions, SEEDED, seed)


def test_a_name_every_contribution_sent_with_one_seed_is_answered_seeded(server: RunningServer) -> None:
    # "u": both clients sent the same 3 seeded positions (seed 42); weighted (1 x 1 + 3 x 3) / 4 = 2.5,
    # (2 + 12) / 4 = 3.5, (3 + 15) / 4 = 4.5. "v": seeds 42 and 43, so the positions differ: not SEEDED.
    first: Contribution = (1, [], [_seeded("u", [1.0, 2.0, 3.0], 42), _seeded("v", [1.0, 1.0], 42, 1000)])
    second: Contribution = (3, [], [_seeded("u", [3.0, 4.0, 5.0], 42), _seeded("v", [1.0, 1.0], 43, 1000)])
    got = sparse_answer(server.target, [first, second], averaging=PER_COORDINATE, position_encoding=COMPACT)
    positions, values, decl = got["u"]
    assert (decl.position_encoding, decl.position_seed, decl.nnz, decl.positions_nbytes) == (SEEDED, 42, 3, 0)
    assert positions == seeded_positions(42, 10, 3).tolist()
    assert values.tolist() == [2.5, 3.5, 4.5]
    positions, values, decl = got["v"]
    assert decl.position_encoding in (
        tensor_pb2.POSITION_ENCODING_BITMAP,
        tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
    )
    assert positions == sorted(
        {*seeded_positions(42, 1000, 2).tolist(), *seeded_positions(43, 1000, 2).tolist()}
    )
    assert values.tolist() == [1.0] * len(positions)
    # Asked for another encoding, that one; per tensor, never SEEDED.
    coo = sparse_answer(server.target, [first, second], averaging=PER_COORDINATE)
    assert coo["u"][2].position_encoding == tensor_pb2.POSITION_ENCODING_COO_INT64
    per_tensor = sparse_answer(server.target, [first, second], position_encoding=COMPACT)
    assert per_tensor["u"][2].position_encoding != SEEDED
    assert per_tensor["u"][1].tolist() == [2.5, 3.5, 4.5]  # every position sent by both: the same here


# --- refusals ---------------------------------------------------------------------------------------


def test_refusals_name_what_is_wrong(server: RunningServer) -> None:
    layers: list[Contribution] = [(1, [("x", torch.ones(2))], [])]
    refused(
        server.target,
        requests(layers, payload_kind=LAYERS, averaging=PER_COORDINATE),
        "start.averaging",
        "AVERAGING_PER_COORDINATE averages sparse payloads only",
        "PAYLOAD_KIND_LAYERS",
    )
    other: Contribution = (1, [], [SparseOut("w", (3, 2), torch.ones(1), torch.tensor([0]))])
    refused(
        server.target,
        requests([A, other], averaging=PER_COORDINATE),
        "'w' has shape (3, 2) in contributions[1] but (2, 3) in contributions[0]",
        "one shape per name",
    )
    refused(server.target, requests([A], averaging=7), "start.averaging: unknown value 7")
    refused(
        server.target,
        requests([A], averaging=PER_COORDINATE, position_encoding=SEEDED),
        "start.position_encoding: POSITION_ENCODING_SEEDED cannot be asked for",
    )
    refused(
        server.target,
        requests([A], averaging=PER_COORDINATE, value_dtype=tensor_pb2.DATA_TYPE_INT8),
        "start.value_dtype",
    )


def test_refusals_come_before_the_upload(server: RunningServer) -> None:
    # The stream stops after its first chunk until the call has failed: the refusal (from the start
    # frame, checked when the declarations are complete) cannot have waited for the rest of the upload.
    frames = requests([A, B, C], averaging=PER_COORDINATE, payload_kind=LAYERS, chunk_size=8)
    first_chunk = next(i for i, f in enumerate(frames) if f.WhichOneof("frame") == "chunk")
    assert first_chunk + 1 < len(frames)
    release = threading.Event()
    sent_after = []

    def stalled() -> Iterator[Any]:
        yield from frames[: first_chunk + 1]
        release.wait(CALL_TIMEOUT)
        for frame in frames[first_chunk + 1 :]:
            sent_after.append(frame)
            yield frame

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Aggregate(stalled(), timeout=CALL_TIMEOUT))
    finally:
        release.set()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "AVERAGING_PER_COORDINATE averages sparse payloads only" in (err.value.details() or "")
    assert not sent_after


# --- memory -----------------------------------------------------------------------------------------


def test_the_float64_accumulators_are_counted() -> None:
    # 6,000 of 10,000 entries sent (72 kB uploaded): per coordinate, float64 sums and weights over the
    # 10,000 elements and more; past a 200 kB limit, refused naming them.
    big: Contribution = (
        1,
        [],
        [SparseOut("w", (10_000,), torch.ones(6_000), torch.arange(6_000))],
    )
    with running_server(limits=Limits(max_call_bytes=200_000)) as small:
        with pytest.raises(grpc.RpcError) as err:
            call(small.target, requests([big], averaging=PER_COORDINATE))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tensor 'w'" in (err.value.details() or "")
        assert "float64 sums and weights over shape [10000]" in (err.value.details() or "")


def test_a_few_entries_of_a_large_tensor_need_little() -> None:
    # 100 entries of a 10-million-element tensor: per tensor, dense accumulators over the 10 million
    # (80 MB in float32) are refused under a 4 MB limit; per coordinate, only the positions sent count.
    positions = torch.arange(0, 10_000_000, 100_000, dtype=torch.int64)
    few: Contribution = (1, [], [SparseOut("w", (10_000_000,), torch.full((100,), 2.0), positions)])
    with running_server(limits=Limits(max_call_bytes=4 << 20)) as small:
        with pytest.raises(grpc.RpcError) as err:
            call(small.target, requests([few, few]))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "dense accumulators" in (err.value.details() or "")
        got = answer(call(small.target, requests([few, few], averaging=PER_COORDINATE)))
        (w,) = got.sparse[RESULT]
        assert w.positions.tolist() == positions.tolist()
        assert w.values.tolist() == [2.0] * 100
