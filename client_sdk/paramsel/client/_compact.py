"""The compact payload: a selection as one blob (SelectionPayload), and its expansion to FL4Health's lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from paramsel.client._client import read_selection
from paramsel.client._errors import ParamselError, StatusCode
from paramsel.client._packing import SparseInfo, pack_layers, pack_sparse
from paramsel.client._state import NDArrays, to_numpy
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.fastframes import ChunkFrame
from paramsel.wire.positions import flat_to_coo
from paramsel.wire.streams import SparseData


def fl4health_sparse(sparse: Sequence[SparseData]) -> tuple[NDArrays, SparseInfo]:
    """(values, (indices, shapes, names)) as FL4Health's select_parameters returns them."""
    values = [to_numpy(s.values) for s in sparse]
    indices = [flat_to_coo(s.positions, s.decl.shape) for s in sparse]
    shapes = [np.array(list(s.decl.shape), dtype=np.int64) for s in sparse]
    return values, (indices, shapes, [s.decl.name for s in sparse])


def compact_payload(frames: Sequence[Any]) -> bytes:
    """A SelectionPayload of the frames a Select answered with (chunk frames may still be encoded)."""
    messages = [
        service_pb2.SelectResponse.FromString(f.encoded) if isinstance(f, ChunkFrame) else f for f in frames
    ]
    return service_pb2.SelectionPayload(frames=messages).SerializeToString()


def unpack_compact(payload: bytes) -> NDArrays:
    """FL4Health's packed list from a compact payload: [values..., indices..., shapes..., names] for a
    sparse selection, [arrays..., names] for whole layers."""
    try:
        frames = service_pb2.SelectionPayload.FromString(payload).frames
        got = read_selection(frames)
    except (WireError, DecodeError) as error:
        raise ParamselError(StatusCode.INVALID_ARGUMENT, f"not a paramsel compact payload: {error}") from None
    sparse = got.sparse.get(tensor_pb2.SECTION_RESULT, [])
    if sparse:
        return pack_sparse(*fl4health_sparse(sparse))
    dense = got.dense.get(tensor_pb2.SECTION_RESULT, [])
    return pack_layers([to_numpy(t) for _, t in dense], [d.name for d, _ in dense])
