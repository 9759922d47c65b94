"""The compact payload: a selection as one blob (SelectionPayload), and its expansion to FL4Health's lists
and back."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from paramsel.client._client import SparseTensor, read_selection
from paramsel.client._errors import invalid_argument, local_errors
from paramsel.client._packing import SparseInfo, pack_layers, pack_sparse, unpack_layers
from paramsel.client._state import NDArrays, to_numpy, to_tensor
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES
from paramsel.wire.codec import (
    MAX_NAME_LENGTH,
    DenseDecl,
    dense_decl,
)
from paramsel.wire.fastframes import ChunkFrame
from paramsel.wire.positions import coo_to_flat, flat_to_coo
from paramsel.wire.streams import SparseOut, write_frames

_RESULT = tensor_pb2.SECTION_RESULT
_LOSSY_DTYPES = (torch.float16, torch.bfloat16)


def fl4health_sparse(sparse: Sequence[SparseTensor]) -> tuple[NDArrays, SparseInfo]:
    """(values, (indices, shapes, names)) as FL4Health's select_parameters returns them (of tensors
    with flat positions, as the service answers)."""
    return fl4health_parts([(s.name, s.shape, s.values, s.positions) for s in sparse])


def fl4health_parts(
    parts: Sequence[tuple[str, tuple[int, ...], torch.Tensor, torch.Tensor]],
) -> tuple[NDArrays, SparseInfo]:
    """The same, of (name, shape, values, flat positions) per tensor (e.g. a decoded compact payload)."""
    values = [to_numpy(v) for _, _, v, _ in parts]
    indices = [flat_to_coo(p, shape) for _, shape, _, p in parts]
    shapes = [np.array(list(shape), dtype=np.int64) for _, shape, _, _ in parts]
    return values, (indices, shapes, [name for name, _, _, _ in parts])


def compact_payload(frames: Sequence[Any]) -> bytes:
    """A SelectionPayload of the frames a Select answered with (chunk frames may still be encoded)."""
    messages = [
        service_pb2.SelectResponse.FromString(f.encoded) if isinstance(f, ChunkFrame) else f for f in frames
    ]
    return service_pb2.SelectionPayload(frames=messages).SerializeToString()


def unpack_compact(payload: bytes) -> NDArrays:
    """FL4Health's packed list from a compact payload (``push_compact``'s or ``pack_compact``'s):
    [values..., indices..., shapes..., names] for a sparse selection, [arrays..., names] for whole
    layers.

    A payload that is not one raises :class:`ParamselError`: INVALID_ARGUMENT (also a ValueError), or
    RESOURCE_EXHAUSTED when it declares more than any call may carry, as the server answers."""
    with local_errors("not a paramsel compact payload: "):
        frames = service_pb2.SelectionPayload.FromString(payload).frames
        got = read_selection(frames)
    sparse = got.sparse.get(tensor_pb2.SECTION_RESULT, [])
    if sparse:
        return pack_sparse(
            *fl4health_parts([(s.decl.name, s.decl.shape, s.values, s.positions) for s in sparse])
        )
    dense = got.dense.get(tensor_pb2.SECTION_RESULT, [])
    return pack_layers([to_numpy(t) for _, t in dense], [d.name for d, _ in dense])


def pack_compact(packed: NDArrays, *, value_dtype: torch.dtype | None = None) -> bytes:
    """A compact payload of FL4Health's packed list, encoded here without a server: the inverse of
    ``unpack_compact``, e.g. for an aggregator that sends the aggregate back as compactly as clients
    send their selections with ``push_compact``.

    ``packed`` is a sparse COO list ([values..., indices..., shapes..., names]: 1-d values, (nnz, ndim)
    integer indices, 1-d integer shapes) or a layer list ([arrays..., names]); the number of names says
    which. ``unpack_compact`` gives the list back exactly: same dtypes, shapes, values and names
    (indices and shapes always come back as int64, which FL4Health's are).

    A sparse tensor's positions travel as Elias-Fano codes or a bitmap, whichever is smaller, when its
    coordinates are strictly increasing in row-major order (as FL4Health's selections and paramsel's
    aggregates have them). Otherwise (out of order or repeated) that tensor's indices travel as they
    are, as int64 COO coordinates, so that nothing is reordered or merged. ``value_dtype``
    (torch.float16 or torch.bfloat16) casts floating-point values: lossy and smaller (bfloat16 ones
    come back as float32, as numpy lacks bfloat16).

    A list of neither layout, indices outside their shape, repeated or empty names and dtypes the wire
    lacks raise :class:`ParamselError` with INVALID_ARGUMENT (an :class:`InvalidArgumentError`, also a
    ValueError), as ``unpack_compact`` and the server refuse what is malformed.
    """
    if value_dtype is not None and value_dtype not in _LOSSY_DTYPES:
        raise invalid_argument(
            f"value_dtype must be torch.float16, torch.bfloat16 or None, got {value_dtype}"
        )
    if not packed:
        raise invalid_argument("a packed list ends with the names array; got an empty list")
    names = _checked_names(packed[-1])
    with local_errors("cannot pack the list: "):
        if len(packed) == 3 * len(names) + 1:
            frames = _sparse_frames(packed, names, value_dtype)
        elif len(packed) == len(names) + 1:
            frames = _layer_frames(packed, value_dtype)
        else:
            raise invalid_argument(
                f"{len(names)} names go with {3 * len(names) + 1} arrays (sparse COO: values, indices, "
                f"shapes, names) or {len(names) + 1} (layers: arrays, names); got {len(packed)} arrays"
            )
    return service_pb2.SelectionPayload(frames=frames).SerializeToString()


def _checked_names(array: np.ndarray) -> list[str]:
    """The names, which the wire needs unique, non-empty and at most MAX_NAME_LENGTH long."""
    names = np.asarray(array)
    if names.ndim != 1 or (names.size and names.dtype.kind != "U"):
        raise invalid_argument(
            f"the last array must be the 1-d array of names, got {names.dtype} {names.shape}"
        )
    _, listed = unpack_layers([names])
    seen: set[str] = set()
    for name in listed:
        if not 0 < len(name) <= MAX_NAME_LENGTH:
            raise invalid_argument(f"tensor names must have 1 to {MAX_NAME_LENGTH} characters, got {name!r}")
        if name in seen:
            raise invalid_argument(f"tensor '{name}' is named twice")
        seen.add(name)
    return listed


def _tensor(array: np.ndarray, what: str, value_dtype: torch.dtype | None) -> torch.Tensor:
    try:
        tensor = to_tensor(np.asarray(array))
    except (TypeError, ValueError) as error:  # what torch lacks: strings, objects, big-endian, ...
        raise invalid_argument(f"{what}: {error}") from None
    return tensor.to(value_dtype) if value_dtype is not None and tensor.is_floating_point() else tensor


def _int_array(array: np.ndarray, ndim: int, what: str) -> np.ndarray:
    out = np.asarray(array)
    if out.ndim != ndim or (out.size and out.dtype.kind not in "iu"):
        raise invalid_argument(f"{what} must be a {ndim}-d integer array, got {out.dtype} {out.shape}")
    return out


def _sparse_frames(
    packed: NDArrays, names: list[str], value_dtype: torch.dtype | None
) -> list[service_pb2.SelectResponse]:
    """A Select response's frames, each tensor's positions in COMPACT's pick when they strictly
    increase, else in COO_INT64, as given."""
    n = len(names)
    tensors: list[SparseOut] = []
    for i, name in enumerate(names):
        what = f"sparse tensor {i} '{name}'"
        values = _tensor(packed[i], f"{what}: values", value_dtype)
        if values.dim() != 1:
            raise invalid_argument(f"{what}: values must be a 1-d array, got shape {tuple(values.shape)}")
        shape = tuple(int(d) for d in _int_array(packed[2 * n + i], 1, f"{what}: the shape"))
        # The checks a reader makes of a declaration: the dtype, negative or overflowing dimensions.
        dense_decl(DenseDecl(name, values.dtype, shape).to_proto(), what=what)
        nnz = values.numel()
        coords = _int_array(packed[n + i], 2, f"{what}: the indices")
        if coords.shape != (nnz, len(shape)):
            raise invalid_argument(
                f"{what}: {nnz} values of a {len(shape)}-d tensor need ({nnz}, {len(shape)}) indices, "
                f"got {coords.shape}"
            )
        flat = coo_to_flat(coords, shape, what=what)  # refuses coordinates outside the shape
        if bool((flat[1:] > flat[:-1]).all()):
            out = SparseOut(name, shape, values, torch.from_numpy(flat))  # the section's COMPACT
        else:
            coo = torch.from_numpy(np.ascontiguousarray(coords, dtype=np.int64))
            out = SparseOut(name, shape, values, coo, tensor_pb2.POSITION_ENCODING_COO_INT64)
        tensors.append(out)
    header = service_pb2.SelectionHeader(
        kind=service_pb2.SELECTION_KIND_SPARSE_COO,
        top_k=service_pb2.TopKSummary(sent_entries=sum(t.values.numel() for t in tensors)),
    )
    return list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", header),
            chunk_size=DEFAULT_CHUNK_SIZE_BYTES,
            sparse=[(_RESULT, tensors, tensor_pb2.POSITION_ENCODING_COMPACT)],
        )
    )


def _layer_frames(packed: NDArrays, value_dtype: torch.dtype | None) -> list[service_pb2.SelectResponse]:
    """A Select response's frames for whole layers, as the server writes them."""
    arrays, names = unpack_layers(packed)
    named = [
        (name, _tensor(a, f"layer {i} '{name}'", value_dtype))
        for i, (a, name) in enumerate(zip(arrays, names, strict=True))
    ]
    header = service_pb2.SelectionHeader(
        kind=service_pb2.SELECTION_KIND_LAYERS, layers=service_pb2.LayerSummary()
    )
    return list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", header),
            chunk_size=DEFAULT_CHUNK_SIZE_BYTES,
            dense=[(_RESULT, named)],
        )
    )


def unpack_masks(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A FedPM mask sent at 1 bit per entry (``FedPm(packed_masks=True)``) as FL4Health's int64 0/1 mask
    of ``shape`` (its score tensor's): entry i is bit i % 8, least significant first, of byte i / 8."""
    dims = tuple(int(d) for d in shape)
    numel = math.prod(dims)
    data = packed.detach().cpu()
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != (numel + 7) // 8:
        raise invalid_argument(
            f"a packed mask of shape {dims} is a 1-d uint8 tensor of {(numel + 7) // 8} bytes, "
            f"got {data.dtype} of shape {tuple(data.shape)}"
        )
    bits = np.unpackbits(data.numpy(), count=numel, bitorder="little")
    return torch.from_numpy(bits.astype(np.int64)).reshape(dims)
