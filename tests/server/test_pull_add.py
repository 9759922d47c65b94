"""PULL_MODE_ADD and SEEDED payloads over real gRPC (proto/paramsel/v1/service.proto, PullMode; tensor.proto,
POSITION_ENCODING_SEEDED): an update added to the current values, worked out by hand; seeded positions
drawn again from their seed (tests/seeded_reference.py); a random-k answer applied as it came; the memory
reserved; and every refusal with its status and a message naming the culprit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grpc
import pytest
import torch
from reserved import reserved
from seeded_reference import reference_positions
from support import assert_serving, running_server

from paramsel.server.app import RunningServer
from paramsel.server.config import Limits
from paramsel.server.inbound import TENSOR_OVERHEAD_BYTES
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.seeded import seeded_positions
from paramsel.wire.streams import SparseOut, read_frames, write_contributions, write_frames

PAYLOAD = tensor_pb2.SECTION_PAYLOAD
BASE = tensor_pb2.SECTION_BASE
RESULT = tensor_pb2.SECTION_RESULT
MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
ADD = service_pb2.PULL_MODE_ADD
SCATTER = service_pb2.PULL_MODE_SCATTER
REPLACE = service_pb2.PULL_MODE_REPLACE
SPARSE = service_pb2.PAYLOAD_KIND_SPARSE_COO
LAYERS = service_pb2.PAYLOAD_KIND_LAYERS
FEDPM = service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)


def pull_frames(
    layout: dict[str, torch.Tensor],
    *,
    mode: int = ADD,
    kind: int = SPARSE,
    sparse: Sequence[SparseOut] = (),
    dense: Sequence[tuple[str, torch.Tensor]] = (),
    base: Sequence[tuple[str, torch.Tensor]] = (),
    encoding: int = FLAT,
) -> list[Any]:
    """A Pull request: ``layout`` gives each tensor's dtype and shape (and is the base by default)."""
    sections = [(PAYLOAD, list(dense))] if dense else []
    if base:
        sections.append((BASE, list(base)))
    return list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart(payload_kind=kind, mode=mode)),  # type: ignore[arg-type]
            chunk_size=7,
            layout=list(layout.items()),
            dense=sections,
            sparse=[(PAYLOAD, list(sparse), encoding)] if sparse else [],
        )
    )


def call(target: str, rpc: str, requests: Sequence[Any]) -> list[Any]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(getattr(stub, rpc)(iter(requests), timeout=CALL_TIMEOUT))


def pulled(target: str, requests: Sequence[Any]) -> dict[str, torch.Tensor]:
    got = read_frames(
        call(target, "Pull", requests), first="header", dense_sections=frozenset({RESULT}), max_bytes=1 << 30
    )
    state = got.state(RESULT)
    assert state is not None
    return state


def refused(
    target: str, rpc: str, requests: Sequence[Any], *needles: str, code: grpc.StatusCode = INVALID
) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call(target, rpc, requests)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    with grpc.insecure_channel(target) as channel:
        assert_serving(channel)
    return details


def flat(name: str, shape: tuple[int, ...], values: torch.Tensor, positions: list[int]) -> SparseOut:
    return SparseOut(name, shape, values, torch.tensor(positions, dtype=torch.int64))


BASE_W = torch.tensor([[1.0, -0.0, 3.0], [4.0, 5.0, 6.0]])


def test_add_applies_the_update_to_the_base(server: RunningServer) -> None:
    # float64 values at flat positions [0, 5, 0]: position 0 twice, summed in float64 first (1 + 0.5),
    # then cast to float32 and added: w[0] = 1 + 1.5, w[5] = 6 + 2. Everywhere else base + 0: the same
    # values, but -0.0 + 0.0 is +0.0 (the formula's, not a bug's).
    update = flat("w", (2, 3), torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), [0, 5, 0])
    got = pulled(server.target, pull_frames({"w": BASE_W}, sparse=[update], base=[("w", BASE_W)]))
    assert got["w"].dtype == torch.float32
    assert got["w"].tolist() == [[2.5, 0.0, 3.0], [4.0, 5.0, 8.0]]
    assert math.copysign(1.0, float(got["w"][0, 1])) == 1.0


def test_add_rounds_the_sum_in_the_values_dtype_then_in_the_models(server: RunningServer) -> None:
    # float16 values 1024 and 0.5 at one position: 1024.5 is not a float16 (spacing 1 there), so the sum
    # rounds to 1024 (even) in float16; then 1024 is added to the float32 base 0.25: 1024.25.
    update = flat("w", (1,), torch.tensor([1024.0, 0.5], dtype=torch.float16), [0, 0])
    base = torch.tensor([0.25])
    got = pulled(server.target, pull_frames({"w": base}, sparse=[update], base=[("w", base)]))
    assert got["w"].tolist() == [1024.25]
    # Integer models: the value cast to int64 (2.7 -> 2), added to the base (10): 12.
    ints = torch.tensor([10, 20], dtype=torch.int64)
    update = flat("n", (2,), torch.tensor([2.7]), [0])
    got = pulled(server.target, pull_frames({"n": ints}, sparse=[update], base=[("n", ints)]))
    assert (got["n"].dtype, got["n"].tolist()) == (torch.int64, [12, 20])


def test_seeded_payloads_apply_in_every_mode(server: RunningServer) -> None:
    # 5 of 20 entries (4 x 5) drawn from seed 42: flat [1, 4, 15, 16, 18], the pinned literal.
    positions = reference_positions(42, 20, 5)
    assert positions == [1, 4, 15, 16, 18]
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    seeded = SparseOut("w", (4, 5), values, torch.tensor(positions), SEEDED, 42)
    base = torch.full((4, 5), 10.0)
    dense = torch.zeros(20)
    dense[positions] = values
    for mode, expected in (
        (ADD, (base.reshape(-1) + dense)),
        (REPLACE, dense),
        (SCATTER, torch.where(dense != 0, dense, base.reshape(-1))),
    ):
        frames = pull_frames(
            {"w": base}, mode=mode, sparse=[seeded], base=[("w", base)] if mode != REPLACE else []
        )
        manifest = next(f.sparse_tensors for f in frames if f.WhichOneof("frame") == "sparse_tensors")
        (spec,) = manifest.tensors
        assert (spec.position_encoding, spec.position_seed, spec.positions_size_bytes) == (SEEDED, 42, 0)
        got = pulled(server.target, frames)
        assert got["w"].reshape(-1).tolist() == expected.tolist()


def test_a_random_k_update_applies_as_it_came(server: RunningServer) -> None:
    # Select a random-k update (answer SEEDED), send the answer back as a Pull payload in ADD mode: the
    # base gets u at the drawn positions. u = w - w0 = [1, 2, ..., 12] (w0 = 0), sparsity 0.25: k = 3 of
    # 12, seed 77.
    w = {"w": torch.arange(1.0, 13.0).reshape(3, 4)}
    criterion = criteria_pb2.Criterion(
        sparse_update=criteria_pb2.SparseUpdateCriterion(
            sparsity_level=0.25, selection=criteria_pb2.UPDATE_SELECTION_RANDOM_K, seed=77
        )
    )
    select = write_frames(
        service_pb2.SelectRequest,
        (
            "start",
            service_pb2.SelectStart(
                criterion=criterion, position_encoding=tensor_pb2.POSITION_ENCODING_COMPACT
            ),
        ),
        chunk_size=1 << 20,
        dense=[(MODEL, list(w.items())), (INITIAL, [("w", torch.zeros(3, 4))])],
    )
    answer = read_frames(
        call(server.target, "Select", list(select)),
        first="header",
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 20,
    )
    (t,) = answer.sparse[RESULT]
    expected_positions = reference_positions(77, 12, 3)
    assert (t.decl.position_encoding, t.decl.position_seed) == (SEEDED, 77)
    assert t.positions.tolist() == expected_positions
    payload = SparseOut("w", t.decl.shape, t.values, t.positions, SEEDED, t.decl.position_seed)
    base = torch.full((3, 4), 100.0)
    got = pulled(server.target, pull_frames({"w": base}, sparse=[payload], base=[("w", base)]))
    expected = base.reshape(-1).clone()
    for p in expected_positions:
        expected[p] += p + 1  # u at flat p is p + 1
    assert got["w"].reshape(-1).tolist() == expected.tolist()


def test_seeded_contributions_are_aggregated(server: RunningServer) -> None:
    # Two clients sent the same seeded positions of a (10,) tensor (seed 5, 3 positions) with their
    # values: averaged per tensor, weighted 1 : 3, as FL4Health averages COO payloads.
    positions = reference_positions(5, 10, 3)
    one = SparseOut("w", (10,), torch.tensor([4.0, 8.0, 0.0]), torch.tensor(positions), SEEDED, 5)
    two = SparseOut("w", (10,), torch.tensor([0.0, 4.0, 8.0]), torch.tensor(positions), SEEDED, 5)
    frames = list(
        write_contributions(
            service_pb2.AggregateRequest,
            ("start", service_pb2.AggregateStart(payload_kind=SPARSE)),
            [(1, [], [one]), (3, [], [two])],
            section=PAYLOAD,
            encoding=COO,
            chunk_size=1 << 20,
        )
    )
    got = read_frames(
        call(server.target, "Aggregate", frames),
        first="header",
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 20,
    )
    (w,) = got.sparse[RESULT]
    dense = torch.zeros(10)
    dense.index_put_((w.positions,), w.values, accumulate=True)
    expected = torch.zeros(10)
    expected[positions] = torch.tensor([(4.0 * 1 + 0.0 * 3) / 4, (8.0 + 4.0 * 3) / 4, (0.0 + 8.0 * 3) / 4])
    assert dense.tolist() == expected.tolist()


# --- refusals --------------------------------------------------------------------------------------

ONES = torch.ones(2, 3)


@pytest.mark.parametrize(
    ("frames", "needles"),
    [
        (
            pull_frames({"w": ONES}, kind=LAYERS, dense=[("w", ONES)]),
            ("start.mode: PULL_MODE_ADD applies to PAYLOAD_KIND_SPARSE_COO only", "'w'"),
        ),
        (
            pull_frames({"w": ONES}, kind=FEDPM, dense=[("w", ONES / 2)]),
            ("start.mode: PULL_MODE_ADD applies to PAYLOAD_KIND_SPARSE_COO only", "'w'"),
        ),
        (
            pull_frames({"w": ONES}, sparse=[flat("w", (2, 3), torch.ones(1), [0])]),
            ("a scatter or add pull needs the current value of tensor 'w'",),
        ),
        (
            pull_frames(
                {"w": ONES}, sparse=[flat("w", (2, 3), torch.ones(1), [0])], base=[("w", ONES.double())]
            ),
            ("SECTION_BASE 'w'", "float64"),
        ),
        (
            pull_frames(
                {"w": ONES},
                mode=REPLACE,
                sparse=[flat("w", (2, 3), torch.ones(1), [0])],
                base=[("w", ONES)],
            ),
            ("SECTION_BASE is only for PULL_MODE_SCATTER and PULL_MODE_ADD",),
        ),
    ],
    ids=["add_with_layers", "add_with_fedpm", "add_without_base", "add_base_dtype", "base_with_replace"],
)
def test_bad_add_pulls_are_refused(
    server: RunningServer, frames: list[Any], needles: tuple[str, ...]
) -> None:
    refused(server.target, "Pull", frames, *needles)


def _with_spec(frames: list[Any], **changes: Any) -> list[Any]:
    """``frames`` with the first sparse spec changed."""
    out = []
    for frame in frames:
        if frame.WhichOneof("frame") == "sparse_tensors":
            frame = service_pb2.PullRequest.FromString(frame.SerializeToString())
            for field, value in changes.items():
                setattr(frame.sparse_tensors.tensors[0], field, value)
        out.append(frame)
    return out


SEEDED_PULL = pull_frames(
    {"w": ONES},
    sparse=[SparseOut("w", (2, 3), torch.ones(2), torch.tensor(reference_positions(3, 6, 2)), SEEDED, 3)],
    base=[("w", ONES)],
)


@pytest.mark.parametrize("rpc", ["Pull", "Aggregate"])
@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        ({"positions_size_bytes": 16}, ("'w'", "positions_size_bytes is 16", "POSITION_ENCODING_SEEDED")),
        ({"nnz": 7}, ("'w'", "nnz 7 exceeds the tensor's 6 elements")),
        (
            {"position_encoding": COO, "positions_size_bytes": 32},
            ("'w'", "position_seed is set (3)", "POSITION_ENCODING_SEEDED only"),
        ),
    ],
    ids=["position_bytes", "nnz_over_numel", "seed_with_coo"],
)
def test_bad_seeded_declarations_are_refused(
    server: RunningServer, rpc: str, changes: dict[str, Any], needles: tuple[str, ...]
) -> None:
    frames = _with_spec(SEEDED_PULL, **changes)
    if rpc == "Aggregate":
        manifest = next(f.sparse_tensors for f in frames if f.WhichOneof("frame") == "sparse_tensors")
        frames = [
            service_pb2.AggregateRequest(start=service_pb2.AggregateStart(payload_kind=SPARSE)),
            service_pb2.AggregateRequest(contribution=service_pb2.Contribution(num_examples=1)),
            service_pb2.AggregateRequest(sparse_tensors=manifest),
        ]
    refused(server.target, rpc, frames, *needles)


def test_a_seeded_payload_with_bytes_in_its_chunks_is_refused(server: RunningServer) -> None:
    # Declared with no position bytes, but 8 more bytes arrive: beyond what the section declared.
    extra = tensor_pb2.Chunk(section=PAYLOAD, offset_bytes=8, data=bytes(8))
    frames = [*SEEDED_PULL, service_pb2.PullRequest(chunk=extra)]
    refused(server.target, "Pull", frames, "SECTION_PAYLOAD", "beyond the 8 bytes")


# --- memory ----------------------------------------------------------------------------------------


def test_add_reserves_what_replace_does() -> None:
    # Both densify the payload (float64 here, 8 bytes per entry) and answer in float32; ADD's base is
    # upload (4 bytes per entry) and one more declared tensor (its objects, TENSOR_OVERHEAD_BYTES).
    n = 1000
    layout = {"w": torch.zeros(n)}
    update = flat("w", (n,), torch.ones(3, dtype=torch.float64), [0, 10, 999])
    add_up, add_work = reserved("Pull", pull_frames(layout, sparse=[update], base=[("w", torch.zeros(n))]))
    rep_up, rep_work = reserved("Pull", pull_frames(layout, mode=REPLACE, sparse=[update]))
    assert add_up - rep_up == 4 * n
    assert add_work - rep_work == TENSOR_OVERHEAD_BYTES


def test_seeded_decoding_reserves_the_keys() -> None:
    # 100,000 entries, 10 drawn: the decoder keys all of them (8 bytes each) in chunks of 65,536 (25
    # bytes of temporaries per entry), beside the 10 positions; the answer is 100,000 float32.
    n = 100_000
    drawn = torch.from_numpy(seeded_positions(1, n, 10))
    frames = pull_frames(
        {"w": torch.zeros(n)}, mode=REPLACE, sparse=[SparseOut("w", (n,), torch.ones(10), drawn, SEEDED, 1)]
    )
    _, seeded_work = reserved("Pull", frames)
    keys = 8 * n + 8 * 10 + 25 * 65_536
    assert seeded_work >= keys + 4 * n
    # The same positions sent explicitly (FLAT_INT64, views of the upload) need no keys.
    explicit = pull_frames(
        {"w": torch.zeros(n)}, mode=REPLACE, sparse=[SparseOut("w", (n,), torch.ones(10), drawn)]
    )
    upload, flat_work = reserved("Pull", explicit)
    assert flat_work < seeded_work - 8 * n
    # A limit that takes the upload and the answer but not the keys refuses the call, naming the tensor.
    with running_server(limits=Limits(max_call_bytes=upload + flat_work + 2_000)) as small:
        pulled(small.target, explicit)
        refused(small.target, "Pull", frames, "'w'", code=grpc.StatusCode.RESOURCE_EXHAUSTED)
