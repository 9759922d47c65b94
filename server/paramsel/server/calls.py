"""Each rpc's work between its request stream and its answer: read and check the request, call the
engine. One function per rpc, shared by the gRPC servicer (:mod:`paramsel.server.servicer`) and the
in-process runner (:mod:`paramsel.server.local`), so that both check the same things in the same order
and compute the same results; neither adds checks of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from paramsel import engine
from paramsel.server import inbound, outbound
from paramsel.server.criteria import Selection, run_criterion
from paramsel.server.limits import Call
from paramsel.server.models import ModelStore, check_held_early, requested_digest, resolve_initial
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.streams import Received, Segments


@dataclass(frozen=True)
class Selected:
    """A Select's or Push's request, read and run: its start, answer chunk size and selection."""

    start: Any
    size: int
    selection: Selection
    received: Received


def selection(
    call: Call,
    frames: Iterable[Any],
    *,
    models: ModelStore,
    max_bytes: int,
    default_chunk_size: int,
    owns_initial: bool = True,
    delivered: Sequence[Segments] | None = None,
) -> Selected:
    """Select's and Push's common part: read the models (and the caller's scores, if any), resolve
    the initial one, select.

    What the criterion builds from the declared shapes is reserved at the first chunk
    (``select_plan``); what only the data decide, as the engine comes to it (``reserve_need``).
    ``owns_initial``: an initial model sent without a digest is this call's own copy (received from
    the wire), which the scores may overwrite; False when it is the caller's own tensors (in process)."""
    received = inbound.read_models(
        check_held_early(call.watch(frames, inbound.select_plan), models),
        max_bytes=max_bytes,
        delivered=delivered,
    )
    start = received.first
    size = outbound.chunk_size(start.response_chunk_size_bytes, default_chunk_size)
    sent = received.state(inbound.INITIAL)
    initial = resolve_initial(start, sent, models)
    # An initial model sent without a digest is this call's alone (the store keeps only named ones):
    # the scores may overwrite it.
    scratch = owns_initial and sent is not None and requested_digest(start) is None
    model = received.state(inbound.MODEL)
    assert model is not None  # read_models refuses a request without one
    return Selected(
        start,
        size,
        run_criterion(
            start.criterion,
            model,
            initial,
            scores=received.state(inbound.SCORES),
            residual=received.state(inbound.RESIDUAL),
            initial_is_scratch=scratch,
            reserve=call.reserve_need,
        ),
        received,
    )


def select_answer(start: service_pb2.SelectStart) -> tuple[int, torch.dtype | None]:
    """The position encoding and value dtype a Select's answer is written in, checked."""
    encoding = inbound.position_encoding(start.position_encoding)
    inbound.check_select_encoding(encoding, start.criterion)
    return encoding, inbound.value_dtype(start.value_dtype)


def pull(
    call: Call,
    frames: Iterable[Any],
    *,
    max_bytes: int,
    default_chunk_size: int,
    delivered: Sequence[Segments] | None = None,
) -> tuple[int, dict[str, torch.Tensor], Received]:
    """A Pull: (answer chunk size, the tensors that changed, the request as read)."""
    received = inbound.read_pull(
        call.watch(frames, inbound.pull_plan), max_bytes=max_bytes, delivered=delivered
    )
    start: service_pb2.PullStart = received.first
    size = outbound.chunk_size(start.response_chunk_size_bytes, default_chunk_size)
    mode = inbound.pull_mode(start.mode)
    model = inbound.model_specs(received)
    kind = start.payload_kind
    if kind == service_pb2.PAYLOAD_KIND_SPARSE_COO:
        changed = engine.pull_sparse(
            model,
            inbound.sparse_payload(received),
            mode=mode,
            base=inbound.base_state(received, mode),
        )
    elif kind in (service_pb2.PAYLOAD_KIND_LAYERS, service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES):
        if mode is not engine.PullMode.REPLACE:
            name = "PULL_MODE_SCATTER" if mode is engine.PullMode.SCATTER else "PULL_MODE_ADD"
            sent = received.dense.get(inbound.PAYLOAD, [])
            named = f" (the payload's '{sent[0][0].name}' is a whole tensor)" if sent else ""
            raise WireError(f"start.mode: {name} applies to PAYLOAD_KIND_SPARSE_COO only{named}")
        pull_dense = engine.pull_layers if kind == service_pb2.PAYLOAD_KIND_LAYERS else engine.pull_fedpm
        changed = pull_dense(model, inbound.dense_payload(received))
    else:
        raise WireError(
            f"start.payload_kind: unknown value {kind} "
            "(expected PAYLOAD_KIND_SPARSE_COO, _LAYERS or _FEDPM_PROBABILITIES)"
        )
    return size, changed, received


@dataclass(frozen=True)
class Aggregated:
    """An Aggregate's result and how its answer is written (:func:`outbound.aggregate_frames`)."""

    contributions: int
    size: int
    sparse: list[engine.SparseTensor] | None
    layers: list[tuple[str, torch.Tensor]] | None
    encoding: int
    value_dtype: torch.dtype | None
    seeds: dict[str, tuple[int, int]]
    received: Received


def aggregate(
    call: Call,
    frames: Iterable[Any],
    *,
    max_bytes: int,
    default_chunk_size: int,
    delivered: Sequence[Segments] | None = None,
) -> Aggregated:
    """An Aggregate: the sparse or layer average of the contributions."""
    received = inbound.read_contributions(
        call.watch(frames, inbound.aggregate_plan), max_bytes=max_bytes, delivered=delivered
    )
    start: service_pb2.AggregateStart = received.first
    size = outbound.chunk_size(start.response_chunk_size_bytes, default_chunk_size)
    weighted = start.weighted if start.HasField("weighted") else True
    per_coordinate = inbound.per_coordinate(start)
    value_dtype = inbound.value_dtype(start.value_dtype)
    contributions = inbound.contributions(received, start.payload_kind)
    if start.payload_kind != service_pb2.PAYLOAD_KIND_SPARSE_COO:
        layers = engine.aggregate_layers(contributions, weighted=weighted)
        return Aggregated(
            len(contributions),
            size,
            None,
            layers,
            tensor_pb2.POSITION_ENCODING_COO_INT64,
            value_dtype,
            {},
            received,
        )
    encoding = inbound.aggregate_encoding(start.position_encoding)
    seeds: dict[str, tuple[int, int]] = {}
    if per_coordinate:
        sparse = engine.aggregate_per_coordinate(contributions, weighted=weighted, value_dtype=value_dtype)
        if encoding == tensor_pb2.POSITION_ENCODING_COMPACT:
            seeds = inbound.shared_seeds(s.decl for s in received.sparse.get(inbound.PAYLOAD, []))
    else:
        sparse = engine.aggregate_sparse(contributions, weighted=weighted)
    return Aggregated(len(contributions), size, sparse, None, encoding, value_dtype, seeds, received)
