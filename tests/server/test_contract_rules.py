"""The rules proto/paramsel/v1 states for a client in another language, checked on the wire.

Each test drives the rpc frame by frame through a plain stub, as a non-Python client does, and checks
one statement of the proto's comments: Aggregate's order (FL4Health's pseudo-sort, arrival order for
equal keys) and arithmetic, COMPACT answers and their tie, Push's packed layout, Pull's answer and
SECTION_BASE, scatter's duplicate positions, and k = ceil(N x sparsity) in IEEE double.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch

from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, read_frames, write_contributions, write_frames

RESULT = tensor_pb2.SECTION_RESULT
PAYLOAD = tensor_pb2.SECTION_PAYLOAD
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
Contribution = tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]
"""One client's (num_examples, dense tensors, sparse tensors)."""
Contributions = Sequence[Contribution]
Stub = service_pb2_grpc.ParameterSelectionServiceStub


@pytest.fixture
def stub(server: RunningServer) -> Iterator[Stub]:
    with grpc.insecure_channel(server.target) as channel:
        yield service_pb2_grpc.ParameterSelectionServiceStub(channel)


def _aggregate(
    stub: Stub,
    contributions: Contributions,
    *,
    sparse: bool = True,
    weighted: bool = True,
    encoding: tensor_pb2.PositionEncoding.ValueType = COO,
) -> tuple[list[Any], list[bytes]]:
    """The response's result specs and each result tensor's bytes (values, then encoded positions)."""
    kind = service_pb2.PAYLOAD_KIND_SPARSE_COO if sparse else service_pb2.PAYLOAD_KIND_LAYERS
    start = service_pb2.AggregateStart(payload_kind=kind, weighted=weighted, position_encoding=encoding)
    frames = write_contributions(
        service_pb2.AggregateRequest,
        ("start", start),
        contributions,
        section=PAYLOAD,
        encoding=COO,
        chunk_size=1 << 16,
    )
    responses = list(stub.Aggregate(frames, timeout=60))
    field = "sparse_tensors" if sparse else "tensors"
    specs = [s for r in responses if r.WhichOneof("frame") == field for s in getattr(r, field).tensors]
    data = b"".join(r.chunk.data for r in responses if r.WhichOneof("frame") == "chunk")
    pieces, offset = [], 0
    for s in specs:
        size = (
            s.nnz * torch.empty(0, dtype=_DTYPES[s.dtype]).element_size() + s.positions_size_bytes
            if sparse
            else math.prod(s.shape) * torch.empty(0, dtype=_DTYPES[s.dtype]).element_size()
        )
        pieces.append(data[offset : offset + size])
        offset += size
    assert offset == len(data)
    return specs, pieces


_DTYPES = {
    tensor_pb2.DATA_TYPE_FLOAT16: torch.float16,
    tensor_pb2.DATA_TYPE_FLOAT32: torch.float32,
    tensor_pb2.DATA_TYPE_FLOAT64: torch.float64,
    tensor_pb2.DATA_TYPE_INT64: torch.int64,
}


def sp(
    name: str, shape: tuple[int, ...], values: list[float], flat: list[int], dtype: Any = torch.float32
) -> SparseOut:
    """A sparse tensor sent with COO_INT64 coordinates, in the order given."""
    positions = torch.tensor(flat, dtype=torch.int64)
    coords = torch.stack(torch.unravel_index(positions, shape), dim=1) if shape else positions.reshape(-1, 0)
    return SparseOut(name, shape, torch.tensor(values, dtype=dtype), coords)


# Pseudo-sort keys: first value of each floating tensor, summed, plus num_examples.
LOW: Contribution = (1, [], [sp("w", (4,), [0.5, 1e8], [0, 1])])  # key 1.5
TIED_A: Contribution = (2, [], [sp("w", (4,), [1.0, 1.0], [0, 1])])  # key 3
TIED_B: Contribution = (1, [], [sp("w", (4,), [2.0, -1e8], [0, 1])])  # key 3
HIGH: Contribution = (1, [], [sp("v", (2,), [5.0], [1]), sp("w", (4,), [4.0, 3.0], [0, 3])])  # key 10


def test_aggregate_sums_in_fl4health_order_whatever_the_arrival_order(stub: Stub) -> None:
    mixed: list[Contribution] = [
        (7, [], [sp("w", (3, 5), [1e7, 3.25, -2.5, 0.1], [14, 2, 2, 7]), sp("b", (2,), [0.3], [1])]),
        (300, [], [sp("w", (3, 5), [-0.7, 1e-3], [7, 0], torch.float16)]),
        (11, [], [sp("b", (2,), [1e-7, 5.0], [0, 1], torch.float64), sp("w", (3, 5), [1.0 / 3], [14])]),
        (2, [], [sp("w", (3, 5), [-1e7, 9.0, 0.0], [14, 7, 3])]),
    ]
    answers = {
        tuple(map(bytes, _aggregate(stub, [mixed[i] for i in order])[1]))
        for order in itertools.permutations(range(len(mixed)))
    }
    assert len(answers) == 1
    layers: list[Contribution] = [
        (3, [("w", torch.tensor([1e7, 0.1, 3.0]))], []),
        (5, [("w", torch.tensor([-1e7, 0.7, 1.0], dtype=torch.float64))], []),
        (1, [("w", torch.tensor([0.3, 1e-8, 2.0]))], []),
    ]
    answers = {
        tuple(_aggregate(stub, [layers[i] for i in order], sparse=False)[1])
        for order in itertools.permutations(range(len(layers)))
    }
    assert len(answers) == 1


def test_names_come_out_in_order_of_first_appearance_in_sorted_order(stub: Stub) -> None:
    specs, _ = _aggregate(stub, [HIGH, LOW])  # HIGH (key 10) sorts after LOW (key 1.5): w, then v
    assert [s.name for s in specs] == ["w", "v"]


def test_equal_keys_keep_their_arrival_order(stub: Stub) -> None:
    # LOW first, then the two tied ones in arrival order: (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1.
    low_a_b = _aggregate(stub, [TIED_A, LOW, TIED_B], weighted=False)
    assert low_a_b == _aggregate(stub, [LOW, TIED_A, TIED_B], weighted=False)
    low_b_a = _aggregate(stub, [TIED_B, TIED_A, LOW], weighted=False)
    # The one order-dependent case: equal keys, different contents. Position 1 cancels to an exact zero
    # (dropped) one way, and is 1/3 the other.
    assert (low_a_b[0][0].nnz, low_b_a[0][0].nnz) == (1, 2)


def test_products_in_the_values_dtype_exact_zeros_dropped_duplicates_summed(stub: Stub) -> None:
    # float16 * 1000 overflows in float16 (the count does not widen it); 0.5 - 0.5 is an exact zero.
    specs, pieces = _aggregate(
        stub,
        [
            (1000, [], [sp("h", (3,), [100.0, 0.5], [0, 2], torch.float16)]),
            (1, [], [sp("z", (3,), [2.0, 0.5, 1.0, -1.5], [1, 0, 1, 0])]),  # unsorted, repeated
        ],
    )
    by_name = dict(zip([s.name for s in specs], zip(specs, pieces, strict=True), strict=True))
    h_spec, h_bytes = by_name["h"]
    assert h_spec.dtype == tensor_pb2.DATA_TYPE_FLOAT16
    assert h_spec.nnz == 2
    assert torch.frombuffer(bytearray(h_bytes[:4]), dtype=torch.float16).tolist() == [math.inf, 0.5]
    z_spec, z_bytes = by_name["z"]
    # z[0] = 0.5 - 1.5 = -1, z[1] = 2 + 1 = 3, in increasing positions; nothing at 2.
    assert z_spec.nnz == 2
    assert torch.frombuffer(bytearray(z_bytes[:8]), dtype=torch.float32).tolist() == [-1.0, 3.0]
    assert torch.frombuffer(bytearray(z_bytes[8:]), dtype=torch.int64).tolist() == [0, 1]
    # Entries that cancel exactly are not sent.
    specs, _ = _aggregate(stub, [(1, [], [sp("c", (2,), [1.0], [0])]), (1, [], [sp("c", (2,), [-1.0], [0])])])
    assert specs[0].nnz == 0


def test_a_name_twice_in_one_contribution_counts_twice(stub: Stub) -> None:
    _specs, pieces = _aggregate(stub, [(1, [], [sp("w", (2,), [1.0], [0]), sp("w", (2,), [2.0], [1])])])
    assert torch.frombuffer(bytearray(pieces[0][:8]), dtype=torch.float32).tolist() == [0.5, 1.0]


def test_aggregate_start_takes_compact_and_ties_go_to_elias_fano(stub: Stub) -> None:
    # 16 positions, one sent: BITMAP is 2 bytes, ELIAS_FANO 1 byte of low bits + 1 of high bits.
    specs, _ = _aggregate(
        stub,
        [(1, [], [sp("tie", (16,), [1.0], [5]), sp("dense", (16,), [1.0] * 12, list(range(12)))])],
        encoding=tensor_pb2.POSITION_ENCODING_COMPACT,
    )
    chosen = {s.name: (s.position_encoding, s.positions_size_bytes) for s in specs}
    assert chosen["tie"] == (tensor_pb2.POSITION_ENCODING_ELIAS_FANO, 2)
    assert chosen["dense"] == (tensor_pb2.POSITION_ENCODING_BITMAP, 2)


def _model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(10, 10, generator=g), "b": torch.randn(0, generator=g)}


def _select_header(
    stub: Stub, model: dict[str, torch.Tensor], sparsity: float
) -> service_pb2.SelectionHeader:
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=sparsity, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    frames = write_frames(
        service_pb2.SelectRequest,
        ("start", service_pb2.SelectStart(criterion=criterion)),
        chunk_size=1 << 16,
        dense=[(tensor_pb2.SECTION_MODEL, list(model.items()))],
    )
    return next(iter(stub.Select(frames, timeout=60))).header


def test_k_is_ceil_of_n_times_sparsity_in_ieee_double(stub: Stub) -> None:
    assert 100 * 0.07 > 7  # 7.000000000000001 in binary64
    assert _select_header(stub, _model(), 0.07).top_k.k == 8
    assert _select_header(stub, _model(), 0.5).top_k.k == 50


def test_push_packs_values_indices_and_shapes_each_named_after_its_tensor(stub: Stub) -> None:
    model = {"w": torch.arange(1.0, 13.0).reshape(3, 4), "s": torch.tensor(9.0)}
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=0.25, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    frames = write_frames(
        service_pb2.PushRequest,
        ("start", service_pb2.PushStart(criterion=criterion)),
        chunk_size=1 << 16,
        dense=[(tensor_pb2.SECTION_MODEL, list(model.items()))],
    )
    received = read_frames(
        iter(list(stub.Push(frames, timeout=60))),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
        unique_names=False,
    )
    arrays = received.dense[RESULT]
    # k = ceil(13 x 0.25) = 4, so the threshold is 9: w's 9 to 12 and the 0-d s (ties are kept), which
    # has no dimension and is not sent.
    assert [(d.name, d.dtype, d.shape) for d, _ in arrays] == [
        ("w", torch.float32, (4,)),
        ("w", torch.int64, (4, 2)),
        ("w", torch.int64, (2,)),
    ]
    assert arrays[0][1].tolist() == [9.0, 10.0, 11.0, 12.0]
    assert arrays[1][1].tolist() == [[2, 0], [2, 1], [2, 2], [2, 3]]
    assert arrays[2][1].tolist() == [3, 4]


def _pull(
    stub: Stub,
    payload: Sequence[SparseOut],
    *,
    scatter: bool,
    base: Sequence[tuple[str, torch.Tensor]] = (),
) -> list[tuple[str, list[float]]]:
    layout = [("a", torch.zeros(3)), ("w", torch.zeros(2, 2)), ("z", torch.zeros(2))]
    start = service_pb2.PullStart(
        payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO,
        mode=service_pb2.PULL_MODE_SCATTER if scatter else service_pb2.PULL_MODE_REPLACE,
    )
    frames = write_frames(
        service_pb2.PullRequest,
        ("start", start),
        chunk_size=1 << 16,
        layout=layout,
        dense=[(tensor_pb2.SECTION_BASE, list(base))] if base else [],
        sparse=[(PAYLOAD, list(payload), COO)],
    )
    responses = list(stub.Pull(frames, timeout=60))
    received = read_frames(
        iter(responses), first="header", dense_sections=frozenset({RESULT}), max_bytes=1 << 30
    )
    assert responses[0].header.changed_tensors == len(payload)
    return [(d.name, t.reshape(-1).tolist()) for d, t in received.dense[RESULT]]


def test_pull_returns_every_named_tensor_in_payload_order(stub: Stub) -> None:
    # "z" sends nothing: it still comes back (all zeros), as does "w", in the payload's order.
    got = _pull(stub, [sp("z", (2,), [], []), sp("w", (2, 2), [1.0, 2.0, 3.0], [3, 0, 3])], scatter=False)
    assert got == [("z", [0.0, 0.0]), ("w", [2.0, 0.0, 0.0, 4.0])]


def test_scatter_sums_duplicate_positions_then_replaces_and_base_may_come_in_any_order(stub: Stub) -> None:
    base = [("w", torch.tensor([[10.0, 20.0], [30.0, 40.0]])), ("z", torch.tensor([7.0, 8.0]))]
    got = _pull(
        stub,
        [sp("z", (2,), [], []), sp("w", (2, 2), [1.0, 2.0, 3.0], [3, 0, 3])],
        scatter=True,
        base=base,  # w before z: not the payload's order
    )
    # w[3] = 1 + 3 = 4 replaces 40 (not 40 + 4, not the last value 3); unsent entries keep the base.
    assert got == [("z", [7.0, 8.0]), ("w", [2.0, 20.0, 30.0, 4.0])]
