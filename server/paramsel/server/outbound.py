"""Engine results -> response streams: a header, manifests, then chunks of SECTION_RESULT."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import torch

from paramsel import engine
from paramsel.engine import budget
from paramsel.server.criteria import Selection
from paramsel.server.inbound import encode_need
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES, WireError
from paramsel.wire.codec import choose_encoding
from paramsel.wire.positions import flat_to_coo
from paramsel.wire.streams import SparseOut, write_frames

if TYPE_CHECKING:  # calls imports this module
    from paramsel.server.calls import Aggregated

RESULT = tensor_pb2.SECTION_RESULT


def chunk_size(requested: int, default: int = DEFAULT_CHUNK_SIZE_BYTES) -> int:
    """The response chunk size a call asked for (0: the server default)."""
    if requested < 0 or requested > MAX_CHUNK_SIZE_BYTES:
        raise WireError(f"response_chunk_size_bytes must be in [0, {MAX_CHUNK_SIZE_BYTES}], got {requested}")
    return requested or default


def selection_header(selection: Selection) -> service_pb2.SelectionHeader:
    if selection.top_k is not None:
        r = selection.top_k
        return service_pb2.SelectionHeader(
            kind=selection.kind,
            top_k=service_pb2.TopKSummary(
                total_entries=r.total_entries,
                k=r.k,
                threshold=float(r.threshold),
                selected_entries=r.selected_entries,
                sent_entries=sum(t.values.numel() for t in r.tensors),
            ),
        )
    assert selection.layers is not None
    layers = selection.layers
    return service_pb2.SelectionHeader(
        kind=selection.kind,
        layers=service_pb2.LayerSummary(
            total_layers=selection.total_entries,
            drifts=[layers.drifts[name] for name in layers.names if name in layers.drifts],
            seed=selection.seed,
        ),
    )


def cast_values(values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return values.to(dtype) if dtype is not None and values.is_floating_point() else values


def _cast_need(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> budget.Need | None:
    """The copy :func:`cast_values` makes of ``tensor`` (held until the answer is sent), if it makes one."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return None
    size = budget.itemsize(dtype)
    return budget.Need(name, tensor.numel() * size, 0, f"{tensor.numel()} values sent at {size} bytes each")


_SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
# Requests a random-k answer is written in SEEDED for: the smallest encoding there is (no bytes).
_SEEDED_ON_REQUEST = (tensor_pb2.POSITION_ENCODING_COMPACT, _SEEDED)


def seeded(selection: Selection, name: str, encoding: int) -> int | None:
    """The seed a sparse tensor of the answer is declared with, when it is written in SEEDED: a random-k
    tensor (its positions drawn from that seed) asked for COMPACT or SEEDED; None otherwise."""
    top_k = selection.top_k
    if encoding not in _SEEDED_ON_REQUEST or not isinstance(top_k, engine.SparseUpdateResult):
        return None
    return top_k.seeds.get(name)


def select_answer_work(selection: Selection, encoding: int, value_dtype: torch.dtype | None) -> budget.Work:
    """What :func:`select_frames` builds beside the selection, held until the answer is sent: positions
    encoded (each tensor's encoding as ``encoding`` resolves for its entries; none for a random-k
    tensor sent SEEDED) and values cast to ``value_dtype``. Known once the selection is made, reserved
    before the answer is built."""
    needs: list[budget.Need | None] = []
    if selection.top_k is not None:
        for t in selection.top_k.tensors:
            entries = t.values.numel()
            try:
                is_seeded = seeded(selection, t.name, encoding) is not None
                chosen = _SEEDED if is_seeded else choose_encoding(encoding, entries, t.shape)
            except WireError:  # refused when the answer is built; until then, count the costliest
                chosen = tensor_pb2.POSITION_ENCODING_COMPACT
            needs += [
                encode_need(t.name, entries, t.shape, chosen),
                _cast_need(t.name, t.values, value_dtype),
            ]
    elif selection.layers is not None:
        layers = selection.layers
        needs += [_cast_need(n, t, value_dtype) for n, t in zip(layers.names, layers.tensors, strict=True)]
    return budget.Work(tuple(n for n in needs if n is not None))


def push_answer_work(selection: Selection, value_dtype: torch.dtype | None = None) -> budget.Work:
    """What :func:`push_frames` builds beside the selection: a top-k (or sparse update) selection's
    positions as FL4Health's (entries, ndim) int64 indices, and float values or whole tensors cast to
    ``value_dtype`` (masks are sent as they are)."""
    needs: list[budget.Need | None] = []
    if selection.top_k is not None:
        for t in selection.top_k.tensors:
            needs += [
                encode_need(t.name, t.values.numel(), t.shape, tensor_pb2.POSITION_ENCODING_COO_INT64),
                _cast_need(t.name, t.values, value_dtype),
            ]
    elif selection.layers is not None:
        layers = selection.layers
        needs += [_cast_need(n, t, value_dtype) for n, t in zip(layers.names, layers.tensors, strict=True)]
    return budget.Work(tuple(n for n in needs if n is not None))


def select_frames(
    selection: Selection, encoding: int, size: int, value_dtype: torch.dtype | None = None
) -> Iterator[service_pb2.SelectResponse]:
    """Select's response: typed sparse tensors (a random-k tensor asked for COMPACT or SEEDED in SEEDED,
    with its seed), or whole tensors (values cast to ``value_dtype``)."""
    header = ("header", selection_header(selection))
    if selection.top_k is not None:
        sparse = []
        for t in selection.top_k.tensors:
            seed = seeded(selection, t.name, encoding)
            sparse.append(
                SparseOut(
                    t.name,
                    t.shape,
                    cast_values(t.values, value_dtype),
                    t.positions,
                    encoding=None if seed is None else _SEEDED,
                    position_seed=seed,
                )
            )
        yield from write_frames(
            service_pb2.SelectResponse,
            header,
            chunk_size=size,
            encoded_chunks=True,
            sparse=[(RESULT, sparse, encoding)],
        )
        return
    assert selection.layers is not None
    named = [
        (n, cast_values(t, value_dtype))
        for n, t in zip(selection.layers.names, selection.layers.tensors, strict=True)
    ]
    yield from write_frames(
        service_pb2.SelectResponse, header, chunk_size=size, encoded_chunks=True, dense=[(RESULT, named)]
    )


def packed_arrays(
    selection: Selection, value_dtype: torch.dtype | None = None
) -> list[tuple[str, torch.Tensor]]:
    """FL4Health's packed list, without its final names array: each array named after its tensor; float
    values and whole tensors cast to ``value_dtype`` (indices, shapes and masks never are)."""
    if selection.top_k is not None:
        tensors = selection.top_k.tensors
        values = [(t.name, cast_values(t.values, value_dtype)) for t in tensors]
        indices = [(t.name, torch.from_numpy(flat_to_coo(t.positions, t.shape))) for t in tensors]
        shapes = [(t.name, torch.tensor(list(t.shape), dtype=torch.int64)) for t in tensors]
        return values + indices + shapes
    assert selection.layers is not None
    return [
        (n, cast_values(t, value_dtype))
        for n, t in zip(selection.layers.names, selection.layers.tensors, strict=True)
    ]


def push_frames(
    selection: Selection, size: int, value_dtype: torch.dtype | None = None
) -> Iterator[service_pb2.PushResponse]:
    """Push's response. Names repeat (values, indices and shapes of one tensor), so they are not unique."""
    yield from write_frames(
        service_pb2.PushResponse,
        ("header", selection_header(selection)),
        chunk_size=size,
        encoded_chunks=True,
        dense=[(RESULT, packed_arrays(selection, value_dtype))],
    )


def pull_frames(changed: dict[str, torch.Tensor], size: int) -> Iterator[service_pb2.PullResponse]:
    yield from write_frames(
        service_pb2.PullResponse,
        ("header", service_pb2.PullHeader(changed_tensors=len(changed))),
        chunk_size=size,
        encoded_chunks=True,
        dense=[(RESULT, list(changed.items()))],
    )


def aggregate_frames(
    contributions: int,
    size: int,
    *,
    sparse: list[engine.SparseTensor] | None = None,
    encoding: int = tensor_pb2.POSITION_ENCODING_COO_INT64,
    layers: list[tuple[str, torch.Tensor]] | None = None,
    value_dtype: torch.dtype | None = None,
    seeds: Mapping[str, tuple[int, int]] | None = None,
) -> Iterator[service_pb2.AggregateResponse]:
    """Aggregate's response: the sparse aggregate (positions in ``encoding``) or the layer aggregate,
    float values rounded to ``value_dtype`` (:func:`paramsel.engine.round_float`). ``seeds``: per name,
    the (position_seed, nnz) of the seeded positions every contribution sent it with, whose
    per-coordinate average is sent in POSITION_ENCODING_SEEDED."""
    count = len(sparse) if sparse is not None else len(layers or [])
    header = ("header", service_pb2.AggregateHeader(contributions=contributions, tensors=count))
    if sparse is not None:
        out = [aggregate_out(t, value_dtype, (seeds or {}).get(t.name)) for t in sparse]
        yield from write_frames(
            service_pb2.AggregateResponse,
            header,
            chunk_size=size,
            encoded_chunks=True,
            sparse=[(RESULT, out, encoding)],
        )
        return
    yield from write_frames(
        service_pb2.AggregateResponse,
        header,
        chunk_size=size,
        encoded_chunks=True,
        dense=[(RESULT, [(n, rounded(t, value_dtype)) for n, t in layers or []])],
    )


def aggregate_answer(done: Aggregated) -> Iterator[service_pb2.AggregateResponse]:
    """The answer of an Aggregate (:func:`paramsel.server.calls.aggregate`)."""
    if done.sparse is not None:
        return aggregate_frames(
            done.contributions,
            done.size,
            sparse=done.sparse,
            encoding=done.encoding,
            value_dtype=done.value_dtype,
            seeds=done.seeds,
        )
    return aggregate_frames(done.contributions, done.size, layers=done.layers, value_dtype=done.value_dtype)


def rounded(values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """An aggregate's float values rounded to ``dtype`` once (from float64 too; integers untouched)."""
    return values if dtype is None else engine.round_float(values, dtype)


def aggregate_out(
    t: engine.SparseTensor, value_dtype: torch.dtype | None, seeded: tuple[int, int] | None
) -> SparseOut:
    values = rounded(t.values, value_dtype)
    if seeded is not None and seeded[1] == t.values.numel():
        return SparseOut(t.name, t.shape, values, t.positions, tensor_pb2.POSITION_ENCODING_SEEDED, seeded[0])
    return SparseOut(t.name, t.shape, values, t.positions)
