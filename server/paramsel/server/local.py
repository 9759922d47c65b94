"""The service's rpcs run in the caller's process, on the caller's own tensors: the SDK's default when it
is given no server (``paramsel.client._embedded`` calls these functions; nothing else does).

Each function takes what the SDK would write into the rpc's request stream (its start message and its
named tensors) and runs the servicer's own code on it (:mod:`paramsel.server.calls`): the declarations
are built and read as the wire's writer and reader do (:func:`~paramsel.wire.streams.declare_frames`,
:func:`~paramsel.wire.streams.read_frames` with ``delivered``), every request check and plan runs, then
the engine. So the results and the errors (the same exceptions, mapped to the same status and message
by :data:`paramsel.server.status.STATUS_OF`) are the service's. What is skipped is the transport:
no gRPC, no protobuf encoding of tensor bytes, no chunks; a contiguous CPU tensor is read where it is,
without a copy, and the answer is the engine's tensors (whole tensors that are views of the caller's are
copied, as an answer received from a server never shares their memory); no model digest is taken, as the
initial model is right there.

What differs from a server:

- No limits: no per-call byte budget (``max_call_bytes``), in-flight budget, tensor count or element
  count; a call may use as much memory as the process has. (:func:`server_info` still describes the
  embedded server, limits included, as ``target="embedded-grpc"`` would.)
- No deadline: ``Connection.timeout_seconds`` and the retries do not apply (nothing can be unavailable).
- An error that is a bug (any exception the status table does not know) is raised as it is, not as
  INTERNAL with an incident id.
- The initial model is never overwritten with scores (a server may write over the copy it received).

Like ``paramsel serve``, the process keeps the memory its calls free while they keep coming and gives
it back once idle: the SDK runs every call inside :data:`paramsel.wire.memory.KEPT`
(``$PARAMSEL_IDLE_RELEASE_SECONDS``, 60 s by default, 0 to leave malloc alone).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from paramsel.server import calls, inbound, outbound
from paramsel.server.config import Limits, ServerConfig
from paramsel.server.info import server_info as _server_info
from paramsel.server.limits import CallLimits
from paramsel.server.models import ModelStore
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.codec import choose_encoding
from paramsel.wire.sections import section_name
from paramsel.wire.streams import Received, SparseOut, declare_contributions, declare_frames

_UNBOUNDED = 1 << 62
# Admission as the servicer runs it, with nothing refused: the plans run (they check the request), their
# reservations count nothing that matters.
_LIMITS = CallLimits(
    Limits(
        max_concurrent_calls=_UNBOUNDED,
        max_inflight_bytes=_UNBOUNDED,
        max_call_bytes=_UNBOUNDED,
        max_tensors_per_call=_UNBOUNDED,
        max_elements_per_tensor=_UNBOUNDED,
    )
)
# Never holds a model: an in-process call sends its initial model, never a digest.
_MODELS = ModelStore(0)
EMBEDDED_CONFIG = ServerConfig(host="127.0.0.1", port=0, reflection=False)
"""The configuration of the loopback server the SDK starts for ``target="embedded-grpc"``."""

Named = Sequence[tuple[str, torch.Tensor]]
Dense = Sequence[tuple[int, Named]]


@dataclass(frozen=True)
class SparseAnswer:
    """A sparse tensor of an answer, as the SDK reads it: flat int64 positions, and the seed they were
    drawn from when the answer declares them POSITION_ENCODING_SEEDED (else None)."""

    name: str
    shape: tuple[int, ...]
    values: torch.Tensor
    positions: torch.Tensor
    position_seed: int | None


@dataclass(frozen=True)
class Answer:
    """An rpc's answer: its header message and its tensors, as a client would decode them."""

    header: Any
    sparse: list[SparseAnswer]
    tensors: list[tuple[str, torch.Tensor]]
    frames: list[Any] | None = None
    """The answer's frames, as a server would send them (``keep_frames``)."""


def server_info() -> service_pb2.GetServerInfoResponse:
    """GetServerInfo of the embedded server (its limits are not applied in process)."""
    return _server_info(EMBEDDED_CONFIG)


@contextmanager
def _call() -> Iterator[Any]:
    """One call, admitted as the servicer admits it."""
    with _LIMITS.call() as call:
        yield call


@contextmanager
def _selection(request: type[Any], start: Any, dense: Dense, chunk_size: int) -> Iterator[calls.Selected]:
    """The servicer's selection of a Select or Push (``request``) of ``dense``, inside its call."""
    frames, segments = declare_frames(request, ("start", start), chunk_size=chunk_size, dense=dense)
    with _call() as call:
        yield calls.selection(
            call,
            frames,
            models=_MODELS,
            max_bytes=_UNBOUNDED,
            default_chunk_size=chunk_size,
            owns_initial=False,
            delivered=segments,
        )


def select(
    start: service_pb2.SelectStart, dense: Dense, *, chunk_size: int, keep_frames: bool = False
) -> Answer:
    """A Select of the tensors of ``dense`` (section, named tensors), as a server answers it."""
    with _selection(service_pb2.SelectRequest, start, dense, chunk_size) as selected:
        encoding, value_dtype = calls.select_answer(selected.start)
        selection = selected.selection
        kept = (
            list(outbound.select_frames(selection, encoding, selected.size, value_dtype))
            if keep_frames
            else None
        )
        header = outbound.selection_header(selection)
        inputs = _storages(selected.received)
        if selection.top_k is not None:
            sparse = []
            for t in selection.top_k.tensors:
                shape = tuple(int(d) for d in t.shape)
                seed = outbound.seeded(selection, t.name, encoding)
                if seed is None:
                    _check_encoding(encoding, t.values.numel(), shape, t.name)
                values = outbound.cast_values(t.values, value_dtype)
                sparse.append(
                    SparseAnswer(t.name, shape, _own(values.reshape(-1), inputs), _flat(t.positions), seed)
                )
            return Answer(header, sparse, [], kept)
        assert selection.layers is not None
        named = zip(selection.layers.names, selection.layers.tensors, strict=True)
        tensors = [(n, _own(outbound.cast_values(t, value_dtype), inputs)) for n, t in named]
        return Answer(header, [], tensors, kept)


def push(start: service_pb2.PushStart, dense: Dense, *, chunk_size: int) -> Answer:
    """A Push of the tensors of ``dense``: FL4Health's packed arrays, each named after its tensor."""
    with _selection(service_pb2.PushRequest, start, dense, chunk_size) as selected:
        value_dtype = inbound.value_dtype(selected.start.value_dtype)
        inputs = _storages(selected.received)
        arrays = [(n, _own(t, inputs)) for n, t in outbound.packed_arrays(selected.selection, value_dtype)]
        return Answer(outbound.selection_header(selected.selection), [], arrays)


def pull(
    start: service_pb2.PullStart,
    *,
    layout: Named,
    dense: Dense,
    sparse: Sequence[tuple[int, Sequence[SparseOut], int]],
    chunk_size: int,
) -> dict[str, torch.Tensor]:
    """A Pull: the tensors the payload changes, by name."""
    frames, segments = declare_frames(
        service_pb2.PullRequest,
        ("start", start),
        chunk_size=chunk_size,
        layout=layout,
        dense=dense,
        sparse=sparse,
    )
    with _call() as call:
        _, changed, received = calls.pull(
            call, frames, max_bytes=_UNBOUNDED, default_chunk_size=chunk_size, delivered=segments
        )
        inputs = _storages(received)
        return {name: _own(t, inputs) for name, t in changed.items()}


def aggregate(
    start: service_pb2.AggregateStart,
    contributions: Sequence[tuple[int, Named, Sequence[SparseOut]]],
    *,
    encoding: int,
    chunk_size: int,
    keep_frames: bool = False,
) -> Answer:
    """An Aggregate of ``contributions`` (num_examples, whole tensors, sparse tensors in ``encoding``)."""
    frames, segments = declare_contributions(
        service_pb2.AggregateRequest,
        ("start", start),
        contributions,
        section=tensor_pb2.SECTION_PAYLOAD,
        encoding=encoding,
        chunk_size=chunk_size,
    )
    with _call() as call:
        done = calls.aggregate(
            call, frames, max_bytes=_UNBOUNDED, default_chunk_size=chunk_size, delivered=segments
        )
        kept = list(outbound.aggregate_answer(done)) if keep_frames else None
        inputs = _storages(done.received)
        count = len(done.sparse) if done.sparse is not None else len(done.layers or [])
        header = service_pb2.AggregateHeader(contributions=done.contributions, tensors=count)
        if done.sparse is None:
            layers = [(n, _own(outbound.rounded(t, done.value_dtype), inputs)) for n, t in done.layers or []]
            return Answer(header, [], layers, kept)
        sparse = []
        for t in done.sparse:
            out = outbound.aggregate_out(t, done.value_dtype, done.seeds.get(t.name))
            shape = tuple(int(d) for d in out.shape)
            seed = out.position_seed if out.encoding == tensor_pb2.POSITION_ENCODING_SEEDED else None
            if seed is None:
                _check_encoding(done.encoding, out.values.numel(), shape, t.name)
            values = _own(out.values.reshape(-1), inputs)
            sparse.append(SparseAnswer(t.name, shape, values, _flat(out.positions), seed))
        return Answer(header, sparse, [], kept)


def _check_encoding(encoding: int, nnz: int, shape: tuple[int, ...], name: str) -> None:
    """The refusal a server's answer would meet when its positions are written in ``encoding``."""
    try:
        choose_encoding(encoding, nnz, shape)
    except WireError as error:
        raise WireError(f"{section_name(tensor_pb2.SECTION_RESULT)} '{name}': {error}") from None


def _flat(positions: torch.Tensor) -> torch.Tensor:
    """Flat int64 positions, as a client decodes them."""
    return positions.reshape(-1).to(torch.int64).contiguous()


def _storages(received: Received) -> set[int]:
    """The memory the request's tensors are views of (the caller's tensors, read in place)."""
    tensors = [t for items in received.dense.values() for _, t in items]
    tensors += [s.values for items in received.sparse.values() for s in items]
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _own(tensor: torch.Tensor, inputs: set[int]) -> torch.Tensor:
    """``tensor`` as a received answer holds it: contiguous, and never sharing the caller's memory."""
    tensor = tensor.detach().contiguous()
    if tensor.numel() and tensor.untyped_storage().data_ptr() in inputs:
        return tensor.clone()
    return tensor
