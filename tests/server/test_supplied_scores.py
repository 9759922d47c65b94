"""Top-k by the caller's own scores (SCORE_FUNCTION_SUPPLIED, SECTION_SCORES) over real gRPC: the
selection worked out by hand, through Select and Push, and every refusal with its status and a message
naming the culprit (proto/paramsel/v1/criteria.proto, ScoreFunction).

The model of every case: w (2 x 3) and b (2), float32, N = 8 entries.

    w = [[0.5, -1.0, 2.0],      scores [[0.1, 0.9, 0.3],
         [3.0,  0.0, -4.0]]             [0.8, 0.7, 0.2]]
    b = [7.0, 8.0]              scores [0.4, 0.6]

At sparsity 0.5, k = ceil(8 x 0.5) = 4; the scores in decreasing order are 0.9, 0.8, 0.7, 0.6, ... so
the threshold is 0.6 (as float32) and the entries selected are w[0, 1] (-1.0), w[1, 0] (3.0),
w[1, 1] (0.0: selected, not sent, as FL4Health drops exact zeros) and b[1] (8.0). Sent: w at flat
positions 1 and 3, b at position 1.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from support import assert_serving, running_server

from paramsel import engine
from paramsel.engine import budget
from paramsel.server.app import RunningServer
from paramsel.server.config import Limits
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
SCORES = tensor_pb2.SECTION_SCORES
RESULT = tensor_pb2.SECTION_RESULT
SUPPLIED = criteria_pb2.SCORE_FUNCTION_SUPPLIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)

W = {
    "w": torch.tensor([[0.5, -1.0, 2.0], [3.0, 0.0, -4.0]]),
    "b": torch.tensor([7.0, 8.0]),
}
# Declared in another order than the model's: score tensors are matched by name.
S = {
    "b": torch.tensor([0.4, 0.6]),
    "w": torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.7, 0.2]]),
}
THRESHOLD = float(np.float32(0.6))  # 0.6000000238418579: the float32 score, widened


def top_k(fn: int = SUPPLIED, level: float = 0.5, *, exact_k: bool = False) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(sparsity_level=level, score_function=fn, exact_k=exact_k)  # type: ignore[arg-type]
    )


def frames(
    rpc: str,
    criterion: criteria_pb2.Criterion,
    *,
    model: dict[str, torch.Tensor] | None = None,
    scores: dict[str, torch.Tensor] | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    chunk_size: int = 1 << 20,
    **start: Any,
) -> list[Any]:
    """A Select or Push request: the model (default W), the scores (default S; {} for none)."""
    dense: list[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = [
        (MODEL, list((W if model is None else model).items()))
    ]
    if initial is not None:
        dense.append((INITIAL, list(initial.items())))
    chosen = S if scores is None else scores
    if chosen:
        dense.append((SCORES, list(chosen.items())))
    if rpc == "Select":
        first: tuple[str, Any] = ("start", service_pb2.SelectStart(criterion=criterion, **start))
        return list(write_frames(service_pb2.SelectRequest, first, chunk_size=chunk_size, dense=dense))
    first = ("start", service_pb2.PushStart(criterion=criterion, **start))
    return list(write_frames(service_pb2.PushRequest, first, chunk_size=chunk_size, dense=dense))


def call(target: str, rpc: str, requests: Sequence[Any] | Iterator[Any]) -> list[Any]:
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(getattr(stub, rpc)(iter(requests), timeout=CALL_TIMEOUT))


def refused(target: str, rpc: str, requests: Sequence[Any], *needles: str) -> str:
    """The call fails with INVALID_ARGUMENT whose message holds every needle; the server still serves."""
    with pytest.raises(grpc.RpcError) as err:
        call(target, rpc, requests)
    details = err.value.details() or ""
    assert err.value.code() == INVALID, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    with grpc.insecure_channel(target) as channel:
        assert_serving(channel)
    return details


def selected(
    target: str, requests: Sequence[Any], **start: Any
) -> tuple[Any, dict[str, tuple[list[int], list[float]]]]:
    """A Select's header and, per tensor sent, its flat positions and values."""
    got = read_frames(
        call(target, "Select", requests),
        first="header",
        dense_sections=frozenset({RESULT}),
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
    )
    return got.first, {
        s.decl.name: (s.positions.tolist(), s.values.tolist()) for s in got.sparse.get(RESULT, [])
    }


# --- the selection --------------------------------------------------------------------------------


def test_select_takes_the_top_k_of_the_supplied_scores(server: RunningServer) -> None:
    header, sent = selected(server.target, frames("Select", top_k()))
    assert header.kind == service_pb2.SELECTION_KIND_SPARSE_COO
    summary = header.top_k
    assert (summary.total_entries, summary.k, summary.selected_entries, summary.sent_entries) == (8, 4, 4, 3)
    assert summary.threshold == THRESHOLD
    # In SECTION_MODEL's order (w, b), though the scores came b first.
    assert list(sent) == ["w", "b"]
    assert sent["w"] == ([1, 3], [-1.0, 3.0])
    assert sent["b"] == ([1], [8.0])


def test_push_packs_the_same_selection_as_fl4health_does(server: RunningServer) -> None:
    got = read_frames(
        call(server.target, "Push", frames("Push", top_k())),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
        unique_names=False,
    )
    assert got.first.top_k.threshold == THRESHOLD
    arrays = [(decl.name, tensor) for decl, tensor in got.dense[RESULT]]
    # [values..., indices..., shapes...], each group in state order (the names array is not sent).
    assert [name for name, _ in arrays] == ["w", "b"] * 3
    values_w, values_b, indices_w, indices_b, shape_w, shape_b = (t for _, t in arrays)
    assert values_w.dtype == torch.float32
    assert values_w.tolist() == [-1.0, 3.0]
    assert values_b.tolist() == [8.0]
    assert indices_w.dtype == torch.int64
    assert indices_w.tolist() == [[0, 1], [1, 0]]
    assert indices_b.tolist() == [[1]]
    assert shape_w.tolist() == [2, 3]
    assert shape_b.tolist() == [2]


def test_ties_and_exact_k_as_for_a_score_function(server: RunningServer) -> None:
    # Every score 1.0: all 8 entries tie at the threshold and all are selected (FL4Health's rule); the
    # 0.0 at w[1, 1] is not sent. exact_k takes the first k = 4 in state order: w[0, :] and w[1, 0].
    ones = {"w": torch.ones(2, 3), "b": torch.ones(2)}
    header, sent = selected(server.target, frames("Select", top_k(), scores=ones))
    assert (header.top_k.selected_entries, header.top_k.sent_entries) == (8, 7)
    assert sent["w"] == ([0, 1, 2, 3, 5], [0.5, -1.0, 2.0, 3.0, -4.0])
    assert sent["b"] == ([0, 1], [7.0, 8.0])
    header, sent = selected(server.target, frames("Select", top_k(exact_k=True), scores=ones))
    assert (header.top_k.k, header.top_k.selected_entries, header.top_k.sent_entries) == (4, 4, 4)
    assert sent == {"w": ([0, 1, 2, 3], [0.5, -1.0, 2.0, 3.0])}


def test_any_dtype_is_taken_and_promoted_as_torch_cat_promotes(server: RunningServer) -> None:
    # b's scores as int64 [0, 1] beside w's float32 ones: compared in float32. Descending: 1 (b[1]),
    # 0.9, 0.8, 0.7, so the threshold is 0.7 (float32) and the same four entries are selected.
    mixed = {"w": S["w"], "b": torch.tensor([0, 1], dtype=torch.int64)}
    header, sent = selected(server.target, frames("Select", top_k(), scores=mixed))
    assert header.top_k.threshold == float(np.float32(0.7))
    assert sent == {"w": ([1, 3], [-1.0, 3.0]), "b": ([1], [8.0])}
    # float64 scores alone: compared in float64, threshold the double 0.6.
    wide = {
        "w": torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.7, 0.2]], dtype=torch.float64),
        "b": torch.tensor([0.4, 0.6], dtype=torch.float64),
    }
    header, sent = selected(server.target, frames("Select", top_k(), scores=wide))
    assert header.top_k.threshold == 0.6
    assert sent == {"w": ([1, 3], [-1.0, 3.0]), "b": ([1], [8.0])}


def test_no_initial_model_is_needed_and_one_sent_is_not_used(server: RunningServer) -> None:
    # |w - w0| would select other entries; the supplied scores decide.
    initial = {"w": torch.zeros(2, 3), "b": torch.tensor([7.0, -100.0])}
    for requests in (frames("Select", top_k()), frames("Select", top_k(), initial=initial)):
        _, sent = selected(server.target, requests)
        assert sent == {"w": ([1, 3], [-1.0, 3.0]), "b": ([1], [8.0])}


def test_value_dtype_and_compact_positions_apply(server: RunningServer) -> None:
    requests = frames(
        "Select",
        top_k(),
        value_dtype=tensor_pb2.DATA_TYPE_FLOAT16,
        position_encoding=tensor_pb2.POSITION_ENCODING_COMPACT,
    )
    got = read_frames(
        call(server.target, "Select", requests),
        first="header",
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
    )
    for sparse in got.sparse[RESULT]:
        assert sparse.decl.dtype == torch.float16
        assert sparse.decl.position_encoding in (
            tensor_pb2.POSITION_ENCODING_BITMAP,
            tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
        )
    assert {s.decl.name: s.positions.tolist() for s in got.sparse[RESULT]} == {"w": [1, 3], "b": [1]}


def test_server_info_lists_the_supplied_scores(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        info = service_pb2_grpc.ParameterSelectionServiceStub(channel).GetServerInfo(
            service_pb2.GetServerInfoRequest(), timeout=CALL_TIMEOUT
        )
    assert SUPPLIED in info.score_functions
    assert "top_k" in info.criteria


# --- refusals ---------------------------------------------------------------------------------------

RPCS = ["Select", "Push"]


@pytest.mark.parametrize("rpc", RPCS)
def test_supplied_without_scores_is_refused(server: RunningServer, rpc: str) -> None:
    refused(
        server.target,
        rpc,
        frames(rpc, top_k(), scores={}),
        "SCORE_FUNCTION_SUPPLIED needs the caller's scores",
        "one SECTION_SCORES tensor per SECTION_MODEL tensor",
        "'w'",
    )


@pytest.mark.parametrize("rpc", RPCS)
def test_a_model_tensor_without_scores_is_refused(server: RunningServer, rpc: str) -> None:
    refused(
        server.target,
        rpc,
        frames(rpc, top_k(), scores={"w": S["w"]}),
        "SECTION_SCORES has no tensor for 'b', which SECTION_MODEL declares",
    )


@pytest.mark.parametrize("rpc", RPCS)
def test_scores_for_a_tensor_the_model_lacks_are_refused(server: RunningServer, rpc: str) -> None:
    refused(
        server.target,
        rpc,
        frames(rpc, top_k(), scores={**S, "extra": torch.zeros(3)}),
        "SECTION_SCORES 'extra': SECTION_MODEL declares no tensor of that name",
    )


@pytest.mark.parametrize("rpc", RPCS)
def test_scores_of_another_shape_are_refused(server: RunningServer, rpc: str) -> None:
    refused(
        server.target,
        rpc,
        frames(rpc, top_k(), scores={"w": S["w"].reshape(3, 2), "b": S["b"]}),
        "SECTION_SCORES 'w': shape [3, 2] differs from the SECTION_MODEL tensor's [2, 3]",
    )
    # A 0-d model tensor needs 0-d scores: [1] is another shape.
    refused(
        server.target,
        rpc,
        frames(rpc, top_k(), model={"n": torch.tensor(3)}, scores={"n": torch.tensor([1.0])}),
        "SECTION_SCORES 'n': shape [1] differs from the SECTION_MODEL tensor's []",
    )


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused(server: RunningServer, rpc: str, bad: float) -> None:
    scores = {"w": S["w"].clone(), "b": S["b"]}
    scores["w"][1, 2] = bad
    refused(server.target, rpc, frames(rpc, top_k(), scores=scores), "'w'", "NaN or infinite score")


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize(
    ("criterion", "said"),
    [
        (
            top_k(criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE),
            "is SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE",
        ),
        (top_k(99), "is 99"),
        (
            criteria_pb2.Criterion(drift_threshold=criteria_pb2.DriftThresholdCriterion(norm_threshold=0.1)),
            "the criterion is drift_threshold",
        ),
        (criteria_pb2.Criterion(fed_pm=criteria_pb2.FedPmCriterion(seed=1)), "the criterion is fed_pm"),
        (criteria_pb2.Criterion(), "no criterion is set"),
    ],
    ids=["score_function", "unknown_score_function", "drift_threshold", "fed_pm", "unset"],
)
def test_scores_with_any_other_criterion_are_refused(
    server: RunningServer, rpc: str, criterion: criteria_pb2.Criterion, said: str
) -> None:
    refused(
        server.target,
        rpc,
        frames(rpc, criterion),
        "SECTION_SCORES 'b': SECTION_SCORES is only for criterion.top_k.score_function SCORE_FUNCTION_SUPPLIED",
        said,
    )


def test_scores_are_not_taken_by_pull_or_aggregate(server: RunningServer) -> None:
    pull = [
        service_pb2.PullRequest(start=service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS)),
        service_pb2.PullRequest(
            tensors=tensor_pb2.TensorManifest(
                section=SCORES,
                tensors=[tensor_pb2.TensorSpec(name="b", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2])],
            )
        ),
    ]
    refused(server.target, "Pull", pull, "SECTION_SCORES is not accepted here")
    aggregate = [
        service_pb2.AggregateRequest(
            start=service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS)
        ),
        service_pb2.AggregateRequest(contribution=service_pb2.Contribution(num_examples=1)),
        service_pb2.AggregateRequest(tensors=pull[1].tensors),
    ]
    refused(server.target, "Aggregate", aggregate, "SECTION_SCORES is not accepted here")


def test_mismatched_scores_are_refused_at_the_first_chunk_before_the_upload(server: RunningServer) -> None:
    # The stream stops after its first chunk until the call has failed: the refusal cannot have
    # waited for the rest of the upload.
    requests = frames("Select", top_k(), scores={"w": S["w"]}, chunk_size=8)
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
    assert "SECTION_SCORES has no tensor for 'b'" in (err.value.details() or "")
    assert not sent_after


def test_scores_count_as_upload_in_the_call_limit() -> None:
    # A 1000-byte limit takes the upload - the model's 32 bytes and the scores' 32 (float32) or 64
    # (float64) - but not the work planned from it (8 KiB of bookkeeping per model tensor alone), so the
    # refusal at the first chunk states what was uploaded: the scores are counted with the model.
    with running_server(limits=Limits(max_call_bytes=1000)) as small:
        for scores, uploaded in ((S, 64), ({name: t.double() for name, t in S.items()}, 96)):
            with pytest.raises(grpc.RpcError) as err:
                call(small.target, "Select", frames("Select", top_k(), scores=scores))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"({uploaded} uploaded," in (err.value.details() or "")
        # Past the limit as they are declared: 1000 float32 scores of a 1000-entry model.
        big = {"w": torch.zeros(1000)}
        with pytest.raises(grpc.RpcError) as err:
            call(small.target, "Select", frames("Select", top_k(), model=big, scores={"w": torch.ones(1000)}))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 1000 bytes of tensor data" in (err.value.details() or "")


def test_the_plan_counts_promoted_copies_and_the_search() -> None:
    # float16 scores beside float32 ones are compared as float32: the float16 tensor's 10 scores are
    # copied (40 bytes, held); too few to sample, all 30 are joined and partitioned at 4 bytes each.
    scores = [
        engine.TensorSpec("h", torch.float16, (10,)),
        engine.TensorSpec("f", torch.float32, (4, 5)),
    ]
    work = budget.supplied_scores_work(scores)
    held = {need.name: need.held for need in work.needs if need.held}
    assert held == {"h": 40}
    assert work.scratch == 30 * 4
    # One dtype: no copies, only the search.
    assert budget.supplied_scores_work([engine.TensorSpec("f", torch.float32, (4, 5))]).held == 0
