"""Positions of sparse values: flat row-major int64 in memory, encoded per PositionEncoding on the wire."""

from __future__ import annotations

import math

import numpy as np
import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire.errors import WireError


def flat_to_coo(flat: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """(nnz, ndim) int64 coordinates of flat row-major positions (FL4Health's index layout)."""
    if not shape:
        return np.zeros((flat.numel(), 0), dtype=np.int64)
    numel = math.prod(shape)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
        raise WireError(f"position out of range for a tensor of shape {list(shape)} ({numel} elements)")
    coords = np.unravel_index(flat.numpy(), shape)
    return np.stack(coords, axis=1).astype(np.int64, copy=False)


def coo_to_flat(coords: np.ndarray, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """Flat positions of (nnz, ndim) coordinates; every coordinate must lie inside ``shape``."""
    if coords.shape[0] and shape:
        low = coords.min(axis=0)
        high = coords.max(axis=0)
        for axis, dim in enumerate(shape):
            if low[axis] < 0 or high[axis] >= dim:
                bad = int(low[axis]) if low[axis] < 0 else int(high[axis])
                raise WireError(
                    f"{what}: coordinate {bad} on axis {axis} is out of range for shape {list(shape)}"
                )
    if not shape:
        return np.zeros(coords.shape[0], dtype=np.int64)
    flat: np.ndarray = np.ravel_multi_index(tuple(coords.T), shape).astype(np.int64, copy=False)
    return flat


def encode_positions(flat: torch.Tensor, shape: tuple[int, ...], encoding: int) -> memoryview:
    """Bytes of ``flat`` positions in ``encoding``.

    For COO_INT64, ``flat`` may also be an (nnz, ndim) coordinate array already in COO form; it is sent
    as it is, so that the receiver checks each coordinate against the shape.
    """
    if encoding == tensor_pb2.POSITION_ENCODING_FLAT_INT64 or (
        encoding == tensor_pb2.POSITION_ENCODING_COO_INT64 and flat.dim() == 2
    ):
        array = flat.to(torch.int64).contiguous().numpy()
    elif encoding == tensor_pb2.POSITION_ENCODING_COO_INT64:
        array = np.ascontiguousarray(flat_to_coo(flat.to(torch.int64), shape))
    else:
        raise WireError(f"unknown position encoding {encoding}")
    return memoryview(array.view(np.uint8).reshape(-1)).cast("B")  # type: ignore[arg-type]


def decode_positions(
    data: torch.Tensor, nnz: int, shape: tuple[int, ...], encoding: int, *, what: str
) -> torch.Tensor:
    """Flat int64 positions from their encoded bytes (``data``: 1-D uint8), checked against ``shape``."""
    raw = data.numpy().view(np.int64) if data.numel() else np.zeros(0, dtype=np.int64)
    if encoding == tensor_pb2.POSITION_ENCODING_COO_INT64:
        flat = coo_to_flat(raw.reshape(nnz, len(shape)), shape, what=what)
    elif encoding == tensor_pb2.POSITION_ENCODING_FLAT_INT64:
        flat = raw
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if nnz and (flat.min() < 0 or flat.max() >= numel):
            bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
            raise WireError(f"{what}: position {bad} is out of range for a tensor of {numel} elements")
    else:
        raise WireError(f"{what}: unknown position encoding {encoding}")
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64))
