"""Positions of sparse values: flat row-major int64 in memory, encoded per PositionEncoding on the wire."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import numpy as np
import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire.codec import choose_encoding, expected_positions_nbytes
from paramsel.wire.compact import decode_bitmap, decode_elias_fano, encode_bitmap, encode_elias_fano
from paramsel.wire.errors import WireError
from paramsel.wire.seeded import seeded_positions


def flat_to_coo(flat: torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    """(nnz, ndim) int64 coordinates of flat row-major positions (FL4Health's index layout)."""
    if not shape:
        return np.zeros((flat.numel(), 0), dtype=np.int64)
    numel = math.prod(shape)
    rest = flat.numpy().astype(np.int64, copy=False)
    # numpy's min and max of int64 are ~50x faster than torch's here.
    if rest.size and (int(rest.min()) < 0 or int(rest.max()) >= numel):
        raise WireError(f"position out of range for a tensor of shape {list(shape)} ({numel} elements)")
    coords = np.empty((rest.size, len(shape)), dtype=np.int64)
    if len(shape) == 1:
        coords[:, 0] = rest
        return coords
    # Peel off one axis at a time, quotient and remainder in one divmod, straight into the columns.
    for axis in range(len(shape) - 1):
        # An int64 scalar, not a Python int: int64 arithmetic on numpy 1.x (value-based casting) and
        # 2.x (NEP 50) alike.
        stride = np.int64(math.prod(shape[axis + 1 :]))
        last = axis == len(shape) - 2
        remainder = coords[:, axis + 1] if last else np.empty_like(rest)
        np.divmod(rest, stride, out=(coords[:, axis], remainder))
        rest = remainder
    return coords


_CHUNK_BYTES = 1 << 19
"""Coordinates handled per step of :func:`coo_to_flat`: a chunk stays in the core's cache between the
range check and the flattening, so the (nnz, ndim) array is read from memory once."""

_LANES = 64
"""Rows a chunk's range check reduces side by side (see :func:`coo_to_flat`): numpy reduces along the
first axis row by row, so the wider the rows, the fewer and longer its inner loops."""


_MIN_SHARE = 16
"""Fewest items a thread of :func:`_in_parallel` takes on."""

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _shared_pool() -> ThreadPoolExecutor:
    """The process's threads for :func:`_in_parallel`, started at the first use and kept (a pool per call
    spent a fifth of a 50M pull starting threads)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="paramsel-coo")
        return _pool


def _forget_pool() -> None:
    """In a forked child: the parent's threads are not there, so a new pool is started when needed."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _in_parallel(count: int, work: Callable[[int, int], None]) -> None:
    """``work(first, last)`` over ``range(count)`` cut into contiguous shares, one per thread, as many
    threads as torch uses (``torch.get_num_threads()``) while each has at least :data:`_MIN_SHARE`
    items: the calling thread takes the first share, the process's pool the others. numpy lets go of
    the GIL in the work's array operations, so the shares run side by side. Returns once every share
    has ended; raises the first failing share's error. (The engine's
    pull has the same helper: it imports nothing of the SDK.)"""
    shares = max(1, min(torch.get_num_threads(), count // _MIN_SHARE))
    if shares == 1:
        work(0, count)
        return
    cuts = [count * i // shares for i in range(shares + 1)]
    others = [_shared_pool().submit(work, first, last) for first, last in pairwise(cuts[1:])]
    error: BaseException | None = None
    try:
        work(cuts[0], cuts[1])
    except BaseException as err:  # the other shares still write: wait for them before raising
        error = err
    for share in others:
        try:
            share.result()
        except BaseException as err:
            error = error or err
    if error is not None:
        raise error


def coo_to_flat(coords: np.ndarray, shape: tuple[int, ...], *, what: str) -> np.ndarray:
    """Flat positions of (nnz, ndim) coordinates; every coordinate must lie inside ``shape``."""
    coords = np.ascontiguousarray(coords, dtype=np.int64)
    ndim = len(shape)
    if not shape:
        return np.zeros(coords.shape[0], dtype=np.int64)
    nnz = coords.shape[0]
    flat = np.empty(nnz, dtype=np.int64)
    unsigned = coords.view(np.uint64)
    highs: list[np.ndarray] = []  # appended to by each thread (list.append is atomic)
    # One fused pass, chunk by chunk: each chunk's range per axis, then its flat positions by Horner's
    # rule while the chunk is still in cache. Seen as uint64, a negative coordinate is huge, so one
    # maximum per axis checks both bounds. numpy reduces an (n, ndim) array along its first axis
    # slowly; viewed as (n / 64, 64 * ndim) rows it reduces fast, and the 64 lanes fold per axis. A chunk
    # with a coordinate out of range flattens to garbage (int64 wraps), which is never returned.
    rows = max(_LANES, _CHUNK_BYTES // (8 * ndim) // _LANES * _LANES)

    def chunks(first: int, last: int) -> None:  # chunks [first, last)
        for start in range(first * rows, min(last * rows, nnz), rows):
            chunk = coords[start : start + rows]
            lanes = chunk.shape[0] // _LANES * _LANES
            if lanes:
                wide = unsigned[start : start + lanes].reshape(-1, _LANES * ndim)
                highs.append(wide.max(axis=0).reshape(_LANES, ndim).max(axis=0))
            if lanes < chunk.shape[0]:
                highs.append(unsigned[start + lanes : start + chunk.shape[0]].max(axis=0))
            out = flat[start : start + rows]
            if ndim == 1:
                out[:] = chunk[:, 0]
                continue
            np.multiply(chunk[:, 0], np.int64(shape[1]), out=out)
            out += chunk[:, 1]
            for axis in range(2, ndim):
                out *= np.int64(shape[axis])
                out += chunk[:, axis]

    _in_parallel(-(-nnz // rows), chunks)
    bounds = np.array([max(int(dim), 0) for dim in shape], dtype=np.uint64)
    if highs and (np.max(highs, axis=0) >= bounds).any():
        # Some coordinate is out of range: name the first axis with one, as its lowest (when
        # negative) or highest coordinate.
        low, high = torch.aminmax(torch.from_numpy(coords), dim=0)
        for axis, dim in enumerate(shape):
            if low[axis] < 0 or high[axis] >= dim:
                bad = int(low[axis]) if low[axis] < 0 else int(high[axis])
                raise WireError(
                    f"{what}: coordinate {bad} on axis {axis} is out of range for shape {list(shape)}"
                )
    return flat


def encode_positions(flat: torch.Tensor, shape: tuple[int, ...], encoding: int) -> memoryview:
    """Bytes of ``flat`` positions in ``encoding``.

    For COO_INT64, ``flat`` may also be an (nnz, ndim) coordinate array already in COO form; it is sent
    as it is, so that the receiver checks each coordinate against the shape. BITMAP and ELIAS_FANO take
    strictly increasing flat positions inside the shape and refuse anything else. COMPACT sends whichever
    of those two :func:`~paramsel.wire.codec.choose_encoding` picks for ``flat.numel()`` positions; call
    it too to learn which, for the tensor's declaration. SEEDED takes no bytes: the positions must be
    :func:`~paramsel.wire.seeded.seeded_positions` of the seed the tensor's declaration carries (the
    caller vouches for it; they are not drawn again here).
    """
    if encoding == tensor_pb2.POSITION_ENCODING_COMPACT:
        encoding = choose_encoding(encoding, flat.numel(), shape)
    if encoding == tensor_pb2.POSITION_ENCODING_FLAT_INT64 or (
        encoding == tensor_pb2.POSITION_ENCODING_COO_INT64 and flat.dim() == 2
    ):
        array = flat.to(torch.int64).contiguous().numpy()
    elif encoding == tensor_pb2.POSITION_ENCODING_COO_INT64:
        array = np.ascontiguousarray(flat_to_coo(flat.to(torch.int64), shape))
    elif encoding == tensor_pb2.POSITION_ENCODING_BITMAP:
        array = encode_bitmap(flat.to(torch.int64).numpy(), math.prod(shape))
    elif encoding == tensor_pb2.POSITION_ENCODING_ELIAS_FANO:
        array = encode_elias_fano(flat.to(torch.int64).numpy(), math.prod(shape))
    elif encoding == tensor_pb2.POSITION_ENCODING_SEEDED:
        return memoryview(b"")
    else:
        raise WireError(f"unknown position encoding {encoding}")
    return memoryview(array.view(np.uint8).reshape(-1)).cast("B")  # type: ignore[arg-type]


def decode_positions(
    data: torch.Tensor, nnz: int, shape: tuple[int, ...], encoding: int, *, what: str, seed: int = 0
) -> torch.Tensor:
    """Flat int64 positions from their encoded bytes (``data``: 1-D uint8), checked against ``shape``.

    BITMAP, ELIAS_FANO and SEEDED positions come back strictly increasing; COO_INT64 and FLAT_INT64 ones
    in the order they were sent. SEEDED ones are drawn from ``seed`` (the spec's position_seed) and take
    no bytes.
    """
    numel = math.prod(shape)
    if encoding == tensor_pb2.POSITION_ENCODING_SEEDED:
        if data.numel():
            raise WireError(
                f"{what}: POSITION_ENCODING_SEEDED takes no position bytes, but {data.numel()} were sent"
            )
        if nnz > numel:
            raise WireError(
                f"{what}: POSITION_ENCODING_SEEDED draws distinct positions, but nnz {nnz} exceeds the "
                f"tensor's {numel} elements"
            )
        try:
            return torch.from_numpy(seeded_positions(seed, numel, nnz))
        except WireError as err:
            raise WireError(f"{what}: {err}") from None
    if encoding == tensor_pb2.POSITION_ENCODING_BITMAP:
        return torch.from_numpy(decode_bitmap(data.numpy(), nnz, numel, what=what))
    if encoding == tensor_pb2.POSITION_ENCODING_ELIAS_FANO:
        return torch.from_numpy(decode_elias_fano(data.numpy(), nnz, numel, what=what))
    if encoding not in (tensor_pb2.POSITION_ENCODING_COO_INT64, tensor_pb2.POSITION_ENCODING_FLAT_INT64):
        try:
            expected_positions_nbytes(encoding, nnz, shape)  # names COMPACT or the unknown value
        except WireError as err:
            raise WireError(f"{what}: {err}") from None
    if data.numel() % 8:
        raise WireError(f"{what}: int64 positions take a multiple of 8 bytes, got {data.numel()}")
    raw = data.numpy().view(np.int64) if data.numel() else np.zeros(0, dtype=np.int64)
    if encoding == tensor_pb2.POSITION_ENCODING_COO_INT64:
        flat = coo_to_flat(raw.reshape(nnz, len(shape)), shape, what=what)
    elif encoding == tensor_pb2.POSITION_ENCODING_FLAT_INT64:
        flat = raw
        if nnz and (flat.min() < 0 or flat.max() >= numel):
            bad = int(flat.min()) if flat.min() < 0 else int(flat.max())
            raise WireError(f"{what}: position {bad} is out of range for a tensor of {numel} elements")
    return torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64))
