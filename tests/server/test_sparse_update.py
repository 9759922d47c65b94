"""Sparse updates (SparseUpdateCriterion, SECTION_RESIDUAL) over real gRPC: the update's top-k and seeded
random-k worked out by hand, through Select and Push, SEEDED answers, lossy value dtypes (Push's too, for
every criterion), the memory reserved, and every refusal with its status and a message naming the
culprit (proto/paramsel/v1/criteria.proto, SparseUpdateCriterion).

The model of every case, float32, N = 8 entries:

    w  = a [1.0, -2.0, 3.0, 0.5]      b [[0.25, 4.0], [1.0, 1.0]]
    w0 = a [0.5,  0.0, 3.0, 1.0]      b [[0.0,  1.0], [1.0, 0.0]]
    r  = a [0.0,  1.0, -0.25, 0.0]    (b has none: r = 0)

    u  = a [0.5, -1.0, -0.25, -0.5]   b [[0.25, 3.0], [0.0, 1.0]]   (b flat: [0.25, 3.0, 0.0, 1.0])

Top-k at sparsity 0.5: k = 4, |u| descending 3, 1, 1, 0.5, 0.5, 0.25, 0.25, 0: threshold 0.5, reached by
a[0], a[1], a[3], b[1], b[3] (ties at 0.5 included). Random-k at sparsity 0.5 with seed 4: a (tensor 0)
draws k_a = 2 of 4 with seed 4, b (tensor 1) 2 of 4 with seed 5; by SplitMix64 (tests/seeded_reference.py)
those are a [0, 3] and b [2, 3]: u = a [0.5, -0.5], b [0.0, 1.0] (b's zero is sent).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from reserved import reserved
from seeded_reference import reference_positions
from support import assert_serving, running_server

from paramsel.server.app import RunningServer
from paramsel.server.config import Limits
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.digest import model_digest
from paramsel.wire.streams import Received, read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
RESIDUAL = tensor_pb2.SECTION_RESIDUAL
RESULT = tensor_pb2.SECTION_RESULT
SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
TOP_K = criteria_pb2.UPDATE_SELECTION_TOP_K
RANDOM_K = criteria_pb2.UPDATE_SELECTION_RANDOM_K
F16 = tensor_pb2.DATA_TYPE_FLOAT16
BF16 = tensor_pb2.DATA_TYPE_BFLOAT16
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)
RPCS = ["Select", "Push"]

W = {"a": torch.tensor([1.0, -2.0, 3.0, 0.5]), "b": torch.tensor([[0.25, 4.0], [1.0, 1.0]])}
W0 = {"a": torch.tensor([0.5, 0.0, 3.0, 1.0]), "b": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
R = {"a": torch.tensor([0.0, 1.0, -0.25, 0.0])}


def update(
    level: float = 0.5, selection: int = TOP_K, *, exact_k: bool = False, seed: int = 0
) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        sparse_update=criteria_pb2.SparseUpdateCriterion(
            sparsity_level=level,
            selection=selection,  # type: ignore[arg-type]
            exact_k=exact_k,
            seed=seed,
        )
    )


def frames(
    rpc: str,
    criterion: criteria_pb2.Criterion,
    *,
    model: dict[str, torch.Tensor] | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
    chunk_size: int = 1 << 20,
    **start: Any,
) -> list[Any]:
    """A Select or Push request: the model (default W), the initial model (default W0; {} for none) and
    the residual (default R; {} for none)."""
    dense: list[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = [
        (MODEL, list((W if model is None else model).items()))
    ]
    for section, tensors, default in ((INITIAL, initial, W0), (RESIDUAL, residual, R)):
        chosen = default if tensors is None else tensors
        if chosen:
            dense.append((section, list(chosen.items())))
    message, start_type = (
        (service_pb2.SelectRequest, service_pb2.SelectStart)
        if rpc == "Select"
        else (service_pb2.PushRequest, service_pb2.PushStart)
    )
    first = ("start", start_type(criterion=criterion, **start))
    return list(write_frames(message, first, chunk_size=chunk_size, dense=dense))


def call(target: str, rpc: str, requests: Sequence[Any] | Iterator[Any]) -> list[Any]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(getattr(stub, rpc)(iter(requests), timeout=CALL_TIMEOUT))


def refused(
    target: str, rpc: str, requests: Sequence[Any], *needles: str, code: grpc.StatusCode = INVALID
) -> str:
    """The call fails with ``code`` whose message holds every needle; the server still serves."""
    with pytest.raises(grpc.RpcError) as err:
        call(target, rpc, requests)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    with grpc.insecure_channel(target) as channel:
        assert_serving(channel)
    return details


def selected(target: str, requests: Sequence[Any]) -> Received:
    return read_frames(
        call(target, "Select", requests),
        first="header",
        dense_sections=frozenset({RESULT}),
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
    )


def sent(received: Received) -> dict[str, tuple[list[int], list[float]]]:
    return {s.decl.name: (s.positions.tolist(), s.values.tolist()) for s in received.sparse.get(RESULT, [])}


def pushed(target: str, requests: Sequence[Any]) -> tuple[Any, list[tuple[str, torch.Tensor]]]:
    got = read_frames(
        call(target, "Push", requests),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
        unique_names=False,
    )
    return got.first, [(decl.name, tensor) for decl, tensor in got.dense.get(RESULT, [])]


# --- top-k of the update ---------------------------------------------------------------------------


def test_select_sends_the_top_k_of_the_update(server: RunningServer) -> None:
    got = selected(server.target, frames("Select", update()))
    header = got.first
    assert header.kind == service_pb2.SELECTION_KIND_SPARSE_UPDATE
    s = header.top_k
    assert (s.total_entries, s.k, s.threshold, s.selected_entries, s.sent_entries) == (8, 4, 0.5, 5, 5)
    assert sent(got) == {"a": ([0, 1, 3], [0.5, -1.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}
    for sparse in got.sparse[RESULT]:
        assert sparse.decl.dtype == torch.float32
        assert sparse.decl.position_encoding == COO


def test_exact_k_and_no_residual(server: RunningServer) -> None:
    # Strictly above 0.5: a[1], b[1], b[3]; the first tie, a[0], fills k = 4.
    got = selected(server.target, frames("Select", update(exact_k=True)))
    assert (got.first.top_k.selected_entries, got.first.top_k.sent_entries) == (4, 4)
    assert sent(got) == {"a": ([0, 1], [0.5, -1.0]), "b": ([1, 3], [3.0, 1.0])}
    # No residual: u = a [0.5, -2, 0, -0.5]; threshold still 0.5.
    got = selected(server.target, frames("Select", update(), residual={}))
    assert sent(got) == {"a": ([0, 1, 3], [0.5, -2.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}


def test_the_residual_comes_in_any_order_and_by_digest_the_initial_model_too(fresh: RunningServer) -> None:
    digest = model_digest(W0.items())
    residual = {"b": torch.zeros(2, 2), "a": R["a"]}  # b's zero residual changes nothing
    expected = {"a": ([0, 1, 3], [0.5, -1.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}
    named = tensor_pb2.ModelDigest(sha256=digest)
    got = selected(fresh.target, frames("Select", update(), residual=residual, initial_model_digest=named))
    assert sent(got) == expected
    # Held now: the digest alone will do, and the held model is not overwritten by the update.
    for _ in range(2):
        got = selected(fresh.target, frames("Select", update(), initial={}, initial_model_digest=named))
        assert sent(got) == expected


@pytest.fixture
def fresh() -> Iterator[RunningServer]:
    with running_server() as running:
        yield running


def test_push_packs_the_update_as_fl4health_packs_top_k(server: RunningServer) -> None:
    header, arrays = pushed(server.target, frames("Push", update()))
    assert header.kind == service_pb2.SELECTION_KIND_SPARSE_UPDATE
    assert [name for name, _ in arrays] == ["a", "b"] * 3
    values_a, values_b, indices_a, indices_b, shape_a, shape_b = (t for _, t in arrays)
    assert (values_a.dtype, indices_a.dtype, shape_a.dtype) == (torch.float32, torch.int64, torch.int64)
    assert values_a.tolist() == [0.5, -1.0, -0.5]
    assert values_b.tolist() == [3.0, 1.0]
    assert indices_a.tolist() == [[0], [1], [3]]
    assert indices_b.tolist() == [[0, 1], [1, 1]]
    assert (shape_a.tolist(), shape_b.tolist()) == ([4], [2, 2])


# --- random-k --------------------------------------------------------------------------------------


def test_random_k_answers_compact_with_seeded_positions(server: RunningServer) -> None:
    assert (reference_positions(4, 4, 2), reference_positions(5, 4, 2)) == ([0, 3], [2, 3])
    expected = {"a": ([0, 3], [0.5, -0.5]), "b": ([2, 3], [0.0, 1.0])}
    for asked in (COMPACT, SEEDED):
        got = selected(
            server.target, frames("Select", update(0.5, RANDOM_K, seed=4), position_encoding=asked)
        )
        s = got.first.top_k
        assert got.first.kind == service_pb2.SELECTION_KIND_SPARSE_UPDATE
        assert (s.total_entries, s.k, s.threshold, s.selected_entries, s.sent_entries) == (8, 4, 0.0, 4, 4)
        specs = {t.decl.name: t.decl for t in got.sparse[RESULT]}
        assert {
            n: (d.position_encoding, d.position_seed, d.nnz, d.positions_nbytes) for n, d in specs.items()
        } == {
            "a": (SEEDED, 4, 2, 0),
            "b": (SEEDED, 5, 2, 0),
        }
        assert sent(got) == expected
    # Asked for explicit positions, it gets them: the same entries.
    for asked in (tensor_pb2.POSITION_ENCODING_UNSPECIFIED, COO, tensor_pb2.POSITION_ENCODING_BITMAP):
        got = selected(
            server.target, frames("Select", update(0.5, RANDOM_K, seed=4), position_encoding=asked)
        )
        assert sent(got) == expected
        assert all(t.decl.position_encoding != SEEDED for t in got.sparse[RESULT])


def test_random_k_seeds_wrap_and_push_packs_them(server: RunningServer) -> None:
    # seed 2^64 - 1: a draws with it, b with (2^64 - 1 + 1) mod 2^64 = 0.
    top = (1 << 64) - 1
    pos_a, pos_b = reference_positions(top, 4, 2), reference_positions(0, 4, 2)
    assert (pos_a, pos_b) == ([2, 3], [1, 2])
    u_a, u_b = [0.5, -1.0, -0.25, -0.5], [0.25, 3.0, 0.0, 1.0]
    got = selected(
        server.target, frames("Select", update(0.5, RANDOM_K, seed=top), position_encoding=COMPACT)
    )
    assert {t.decl.name: t.decl.position_seed for t in got.sparse[RESULT]} == {"a": top, "b": 0}
    assert sent(got) == {"a": (pos_a, [u_a[p] for p in pos_a]), "b": (pos_b, [u_b[p] for p in pos_b])}
    _, arrays = pushed(server.target, frames("Push", update(0.5, RANDOM_K, seed=top)))
    values_a, values_b, indices_a, indices_b, _, _ = (t for _, t in arrays)
    assert (values_a.tolist(), values_b.tolist()) == ([-0.25, -0.5], [3.0, 0.0])
    assert (indices_a.tolist(), indices_b.tolist()) == ([[2], [3]], [[0, 1], [1, 0]])


# --- lossy value dtypes ----------------------------------------------------------------------------

# Values no float16 holds (all in its normal range): each is sent as its float32 value rounded to nearest
# (even), so within half an ulp: 2^-11 of it for float16 (11 significant bits), 2^-8 for bfloat16 (8).
ODD = torch.tensor([0.1, -1.0 / 3.0, 1e-3, 12345.678, 2.0 / 3.0, -0.7])


def test_select_update_values_in_float16(server: RunningServer) -> None:
    model, start = {"x": ODD.clone()}, {"x": torch.zeros(6)}
    got = selected(
        server.target,
        frames("Select", update(1.0), model=model, initial=start, residual={}, value_dtype=F16),
    )
    (x,) = got.sparse[RESULT]
    assert x.decl.dtype == torch.float16
    assert torch.equal(x.values, ODD.to(torch.float16))


@pytest.mark.parametrize(("wire", "dtype"), [(F16, torch.float16), (BF16, torch.bfloat16)])
def test_push_value_dtype_applies_to_every_criterion(
    server: RunningServer, wire: int, dtype: torch.dtype
) -> None:
    model = {"x": ODD.clone(), "n": torch.tensor([5, -7, 9], dtype=torch.int64)}
    zero = {"x": torch.zeros(6), "n": torch.zeros(3, dtype=torch.int64)}
    # Top-k (FL4Health's criterion), everything selected: x's values rounded, n's integers as they are.
    top_k = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=1.0, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    _, arrays = pushed(
        server.target, frames("Push", top_k, model=model, initial={}, residual={}, value_dtype=wire)
    )
    values_x, values_n, indices_x, _, _, _ = (t for _, t in arrays)
    assert values_x.dtype == dtype
    assert torch.equal(values_x, ODD.to(dtype))
    half_ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert ((values_x.double() - ODD.double()).abs() <= half_ulp * ODD.double().abs()).all()
    assert (values_n.dtype, values_n.tolist()) == (torch.int64, [5, -7, 9])
    assert indices_x.dtype == torch.int64
    # The update: u = w - 0 = w.
    _, arrays = pushed(
        server.target, frames("Push", update(1.0), model=model, initial=zero, residual={}, value_dtype=wire)
    )
    assert torch.equal(arrays[0][1], ODD.to(dtype))
    assert (arrays[1][1].dtype, arrays[1][1].tolist()) == (torch.int64, [5, -7, 9])
    # Whole layers (drift): float tensors rounded, integer ones not.
    drift = criteria_pb2.Criterion(
        drift_percentage=criteria_pb2.DriftPercentageCriterion(exchange_percentage=1.0)
    )
    _, arrays = pushed(
        server.target, frames("Push", drift, model=model, initial=zero, residual={}, value_dtype=wire)
    )
    layers = dict(arrays)
    assert torch.equal(layers["x"], ODD.to(dtype))
    assert (layers["n"].dtype, layers["n"].tolist()) == (torch.int64, [5, -7, 9])
    # FedPM's masks are int64 0/1, never converted.
    fedpm = criteria_pb2.Criterion(fed_pm=criteria_pb2.FedPmCriterion(seed=3))
    scores = {"x.weight_scores": torch.tensor([50.0, -50.0])}  # sigmoid: all but certainly 1, then 0
    _, arrays = pushed(
        server.target, frames("Push", fedpm, model=scores, initial={}, residual={}, value_dtype=wire)
    )
    (mask,) = (t for _, t in arrays)
    assert (mask.dtype, mask.tolist()) == (torch.int64, [1, 0])


def test_push_without_value_dtype_is_unchanged(server: RunningServer) -> None:
    _, arrays = pushed(
        server.target,
        frames("Push", update(1.0), model={"x": ODD}, initial={"x": torch.zeros(6)}, residual={}),
    )
    assert arrays[0][1].dtype == torch.float32
    assert torch.equal(arrays[0][1], ODD)


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", RPCS)
def test_no_initial_model_is_a_failed_precondition(server: RunningServer, rpc: str) -> None:
    for criterion in (update(), update(0.5, RANDOM_K, seed=1)):
        refused(
            server.target,
            rpc,
            frames(rpc, criterion, initial={}),
            "criterion.sparse_update needs the initial model",
            code=grpc.StatusCode.FAILED_PRECONDITION,
        )


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("changes", "needles"),
    [
        (
            {"residual": {"zz": torch.zeros(3)}},
            ("SECTION_RESIDUAL 'zz': SECTION_MODEL declares no tensor of that name",),
        ),
        (
            {"residual": {"a": torch.zeros(4, dtype=torch.float64)}},
            (
                "SECTION_RESIDUAL 'a': dtype torch.float64 differs from the SECTION_MODEL tensor's torch.float32",
            ),
        ),
        (
            {"residual": {"b": torch.zeros(4)}},
            ("SECTION_RESIDUAL 'b': shape [4] differs from the SECTION_MODEL tensor's [2, 2]",),
        ),
        (
            {
                "criterion": criteria_pb2.Criterion(
                    drift_threshold=criteria_pb2.DriftThresholdCriterion(norm_threshold=1)
                )
            },
            ("SECTION_RESIDUAL 'a': SECTION_RESIDUAL is only for criterion.sparse_update", "drift_threshold"),
        ),
        (
            {"criterion": criteria_pb2.Criterion()},
            ("SECTION_RESIDUAL 'a'", "no criterion is set"),
        ),
        (
            {
                "model": {**W, "m": torch.tensor([True, False])},
                "initial": {**W0, "m": torch.tensor([False, False])},
            },
            ("SECTION_MODEL 'm': criterion.sparse_update cannot take a bool tensor",),
        ),
        ({"criterion": update(0.5, 99)}, ("criterion.sparse_update.selection: unknown value 99",)),
        ({"criterion": update(0.0)}, ("sparsity_level",)),
        ({"criterion": update(1.5, RANDOM_K)}, ("sparsity_level",)),
    ],
    ids=[
        "residual_unknown_name",
        "residual_dtype",
        "residual_shape",
        "residual_with_drift",
        "residual_without_criterion",
        "bool_model_tensor",
        "selection_99",
        "sparsity_0",
        "sparsity_1.5_random_k",
    ],
)
def test_bad_sparse_updates_are_refused(
    server: RunningServer, rpc: str, changes: dict[str, Any], needles: tuple[str, ...]
) -> None:
    changes = dict(changes)  # shared by both rpcs' cases
    criterion = changes.pop("criterion", update())
    refused(server.target, rpc, frames(rpc, criterion, **changes), *needles)


def test_a_residual_with_supplied_scores_is_refused(server: RunningServer) -> None:
    supplied = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_SUPPLIED
        )
    )
    scores = [(name, t.abs()) for name, t in W.items()]
    requests = list(
        write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart(criterion=supplied)),
            chunk_size=1 << 20,
            dense=[
                (MODEL, list(W.items())),
                (tensor_pb2.SECTION_SCORES, scores),
                (RESIDUAL, list(R.items())),
            ],
        )
    )
    refused(
        server.target,
        "Select",
        requests,
        "SECTION_RESIDUAL 'a': SECTION_RESIDUAL is only for criterion.sparse_update, but the criterion is top_k",
    )


def test_seeded_is_only_for_random_k_answers(server: RunningServer) -> None:
    refused(
        server.target,
        "Select",
        frames("Select", update(), position_encoding=SEEDED),
        "start.position_encoding: POSITION_ENCODING_SEEDED describes only the positions of",
        "UPDATE_SELECTION_RANDOM_K",
    )


def test_a_residual_declared_twice_is_refused(server: RunningServer) -> None:
    requests = frames("Select", update())
    residual = next(
        i
        for i, f in enumerate(requests)
        if f.WhichOneof("frame") == "tensors" and f.tensors.section == RESIDUAL
    )
    requests.insert(residual, requests[residual])
    refused(server.target, "Select", requests, "SECTION_RESIDUAL", "'a'", "declared twice")


def test_a_bad_residual_is_refused_at_the_first_chunk_before_the_upload(server: RunningServer) -> None:
    requests = frames("Select", update(), residual={"b": torch.zeros(4)}, chunk_size=8)
    first_chunk = next(i for i, f in enumerate(requests) if f.WhichOneof("frame") == "chunk")
    release = threading.Event()
    sent_after = []

    def stalled() -> Iterator[Any]:
        yield from requests[: first_chunk + 1]
        release.wait(CALL_TIMEOUT)
        for frame in requests[first_chunk + 1 :]:
            sent_after.append(frame)
            yield frame

    try:
        with pytest.raises(grpc.RpcError) as err:
            call(server.target, "Select", stalled())
    finally:
        release.set()
    assert err.value.code() == INVALID
    assert "SECTION_RESIDUAL 'b': shape [4]" in (err.value.details() or "")
    assert not sent_after


# --- memory ----------------------------------------------------------------------------------------


def test_random_k_reserves_the_keys_of_its_draw() -> None:
    # 100,000 float32 entries at sparsity 0.01: k_t = 1,000. The draw keys every entry (8 bytes each)
    # and computes them in chunks of 65,536 (25 bytes per entry of temporaries); the answer holds 1,000
    # positions and values (12 bytes each).
    n = 100_000
    big = {"w": torch.linspace(-1.0, 1.0, n)}
    start = {"w": torch.zeros(n)}
    requests = frames("Select", update(0.01, RANDOM_K, seed=9), model=big, initial=start, residual={})
    uploaded, work = reserved("Select", requests)
    assert uploaded == 2 * 4 * n
    keys = 8 * n + 8 * 1000 + 25 * 65_536
    assert work >= keys + 1000 * 12
    # A limit that takes the upload but not the draw refuses the call, naming the tensor.
    with running_server(limits=Limits(max_call_bytes=uploaded + keys // 2)) as small:
        details = refused(
            small.target,
            "Select",
            requests,
            "tensor 'w'",
            "random-k",
            code=grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "keys" in details


def test_top_k_of_the_update_reserves_the_update_and_its_scores() -> None:
    # 1,000 float32 entries: u (4,000 bytes, held) and |u| (4,000) beside the upload; sent with an initial
    # model of its own, u is written over it (the initial model is not counted twice).
    n = 1000
    big = {"w": torch.linspace(-1.0, 1.0, n)}
    start = {"w": torch.zeros(n)}
    requests = frames("Select", update(0.5), model=big, initial=start, residual={})
    _, work = reserved("Select", requests)
    named = tensor_pb2.ModelDigest(sha256=model_digest(start.items()))
    _, work_by_digest = reserved(
        "Select",
        frames("Select", update(0.5), model=big, initial=start, residual={}, initial_model_digest=named),
    )
    # Named by digest, the initial model is kept: u takes 4,000 bytes of its own.
    assert work_by_digest - work == 4 * n


@pytest.mark.parametrize("value", [tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_INT8, 99])
def test_push_value_dtype_must_be_a_16_bit_float(server: RunningServer, value: int) -> None:
    refused(
        server.target, "Push", frames("Push", update(), value_dtype=value), "start.value_dtype", str(value)
    )
