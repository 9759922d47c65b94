"""Engine results -> response streams: a header, manifests, then chunks of SECTION_RESULT."""

from __future__ import annotations

from collections.abc import Iterator

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


def _as(values: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return values.to(dtype) if dtype is not None and values.is_floating_point() else values


def _cast_need(name: str, tensor: torch.Tensor, dtype: torch.dtype | None) -> budget.Need | None:
    """The copy :func:`_as` makes of ``tensor`` (held until the answer is sent), if it makes one."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return None
    size = budget.itemsize(dtype)
    return budget.Need(name, tensor.numel() * size, 0, f"{tensor.numel()} values sent at {size} bytes each")


def select_answer_work(selection: Selection, encoding: int, value_dtype: torch.dtype | None) -> budget.Work:
    """What :func:`select_frames` builds beside the selection, held until the answer is sent: positions
    encoded (each tensor's encoding as ``encoding`` resolves for its entries) and values cast to
    ``value_dtype``. Known once the selection is made, reserved before the answer is built."""
    needs: list[budget.Need | None] = []
    if selection.top_k is not None:
        for t in selection.top_k.tensors:
            entries = t.values.numel()
            try:
                chosen = choose_encoding(encoding, entries, t.shape)
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


def push_answer_work(selection: Selection) -> budget.Work:
    """What :func:`push_frames` builds beside the selection: a top-k selection's positions as FL4Health's
    (entries, ndim) int64 indices (whole tensors and masks are sent as they are)."""
    if selection.top_k is None:
        return budget.Work()
    needs = [
        encode_need(t.name, t.values.numel(), t.shape, tensor_pb2.POSITION_ENCODING_COO_INT64)
        for t in selection.top_k.tensors
    ]
    return budget.Work(tuple(n for n in needs if n is not None))


def select_frames(
    selection: Selection, encoding: int, size: int, value_dtype: torch.dtype | None = None
) -> Iterator[service_pb2.SelectResponse]:
    """Select's response: typed sparse tensors, or whole tensors (values cast to ``value_dtype``)."""
    header = ("header", selection_header(selection))
    if selection.top_k is not None:
        sparse = [
            SparseOut(t.name, t.shape, _as(t.values, value_dtype), t.positions)
            for t in selection.top_k.tensors
        ]
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
        (n, _as(t, value_dtype))
        for n, t in zip(selection.layers.names, selection.layers.tensors, strict=True)
    ]
    yield from write_frames(
        service_pb2.SelectResponse, header, chunk_size=size, encoded_chunks=True, dense=[(RESULT, named)]
    )


def packed_arrays(selection: Selection) -> list[tuple[str, torch.Tensor]]:
    """FL4Health's packed list, without its final names array: each array named after its tensor."""
    if selection.top_k is not None:
        tensors = selection.top_k.tensors
        values = [(t.name, t.values) for t in tensors]
        indices = [(t.name, torch.from_numpy(flat_to_coo(t.positions, t.shape))) for t in tensors]
        shapes = [(t.name, torch.tensor(list(t.shape), dtype=torch.int64)) for t in tensors]
        return values + indices + shapes
    assert selection.layers is not None
    return list(zip(selection.layers.names, selection.layers.tensors, strict=True))


def push_frames(selection: Selection, size: int) -> Iterator[service_pb2.PushResponse]:
    """Push's response. Names repeat (values, indices and shapes of one tensor), so they are not unique."""
    yield from write_frames(
        service_pb2.PushResponse,
        ("header", selection_header(selection)),
        chunk_size=size,
        encoded_chunks=True,
        dense=[(RESULT, packed_arrays(selection))],
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
) -> Iterator[service_pb2.AggregateResponse]:
    """Aggregate's response: the sparse aggregate (positions in ``encoding``) or the layer aggregate."""
    count = len(sparse) if sparse is not None else len(layers or [])
    header = ("header", service_pb2.AggregateHeader(contributions=contributions, tensors=count))
    if sparse is not None:
        out = [SparseOut(t.name, t.shape, t.values, t.positions) for t in sparse]
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
        dense=[(RESULT, layers or [])],
    )
