"""BITMAP and ELIAS_FANO, the compact position encodings, byte for byte as proto/paramsel/v1 lays them out.

Both code strictly increasing flat positions p_0 < ... < p_{n-1} < U (U = numel of the dense shape) and
pack bits least significant first. Everything is vectorised numpy: the only Python loop runs over the
at most 2 L + 8 (byte, field) overlaps of a group of 8 L-bit fields, never over positions. Decoders
check everything a sender could get wrong and refuse it with :class:`WireError`, so that what they
return is always nnz strictly increasing positions inside ``[0, U)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from paramsel.wire.errors import WireError

Bytes = npt.NDArray[np.uint8]
Positions = npt.NDArray[np.int64]

# numpy (2.x) walks a bool array branch-free in nonzero() only when more than 10 % of it is True; below
# that it hops from True to True, slow when they are close but not dense (see _set_bits). Speed only:
# both paths of _set_bits give the same answer.
_BRANCHLESS_DENSITY = 0.1


def bitmap_nbytes(numel: int) -> int:
    """Bytes of a BITMAP over ``numel`` positions: ceil(numel / 8), whatever nnz is."""
    return (numel + 7) // 8


def elias_fano_layout(nnz: int, numel: int) -> tuple[int, int, int]:
    """(L, low bytes, high bits) of the ELIAS_FANO code of ``nnz`` of ``numel`` positions (nnz >= 1).

    L = floor(log2(U / n)) is the largest L with n 2^L <= U (0 when U < 2n); the low part is n fields of
    L bits; the high part is a bitmap of n + ((U - 1) >> L) + 1 bits.
    """
    if nnz < 1 or nnz > numel:
        raise WireError(f"ELIAS_FANO codes 1 to {numel} positions, not {nnz}")
    low_bits = (numel // nnz).bit_length() - 1
    return low_bits, (nnz * low_bits + 7) // 8, nnz + ((numel - 1) >> low_bits) + 1


def elias_fano_nbytes(nnz: int, numel: int) -> int:
    """Bytes of the ELIAS_FANO code of ``nnz`` distinct positions among ``numel``; 0 when nnz = 0."""
    if nnz == 0:
        return 0
    _, low_nbytes, high_nbits = elias_fano_layout(nnz, numel)
    return low_nbytes + (high_nbits + 7) // 8


def check_distinct(nnz: int, numel: int, name: str) -> None:
    """BITMAP and ELIAS_FANO code sets: more positions than the tensor has elements cannot be sent."""
    if nnz > numel:
        raise WireError(
            f"{name} codes distinct positions, but nnz {nnz} exceeds the tensor's {numel} elements"
        )


# --- encoding -------------------------------------------------------------------------------------------


def check_increasing(flat: Positions, numel: int, name: str) -> None:
    """Refuses positions that are not strictly increasing inside [0, numel), naming the first culprit."""
    if flat.ndim != 1:
        raise WireError(f"{name} takes flat positions (a 1-d array), not a {flat.ndim}-d array")
    if not flat.size:
        return
    bad = np.flatnonzero(flat[1:] <= flat[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise WireError(
            f"{name} needs strictly increasing positions, but position {int(flat[i])} at index {i} "
            f"follows {int(flat[i - 1])}"
        )
    if flat[0] < 0 or flat[-1] >= numel:
        bad_pos = int(flat[0]) if flat[0] < 0 else int(flat[-1])
        raise WireError(f"position {bad_pos} is out of range for a tensor of {numel} elements")


def _pack_set_bits(indices: Positions, nbits: int) -> Bytes:
    """Bytes of an ``nbits``-bit little-endian bitmap with ``indices`` (in [0, nbits)) set."""
    bits = np.zeros(nbits, dtype=np.bool_)
    bits[indices] = True
    packed: Bytes = np.packbits(bits, bitorder="little")
    return packed


def _field_pairs(low_bits: int) -> list[tuple[int, int, int]]:
    """(byte, field, shift) of each overlap in a group of 8 fields of ``low_bits`` bits = low_bits bytes.

    Field k holds bits [k L, k L + L) of the group, byte b bits [8 b, 8 b + 8); where they overlap, byte
    b takes field k shifted left by ``shift`` = k L - 8 b (a right shift when negative).
    """
    return [
        (b, k, k * low_bits - 8 * b)
        for b in range(low_bits)
        for k in range(8)
        if k * low_bits < 8 * b + 8 and k * low_bits + low_bits > 8 * b
    ]


def _field_dtype(low_bits: int) -> np.dtype[np.unsignedinteger[Any]]:
    """The narrowest unsigned dtype holding ``low_bits`` bits: every shift below stays under its width."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if low_bits <= np.iinfo(dtype).bits:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _shift(values: npt.NDArray[Any], shift: int) -> npt.NDArray[Any]:
    kind = values.dtype.type
    shifted: npt.NDArray[Any] = values << kind(shift) if shift >= 0 else values >> kind(-shift)
    return shifted


def pack_fields(values: npt.NDArray[Any], low_bits: int) -> Bytes:
    """The low ``low_bits`` bits of each of ``values`` as packed fields, least significant bit first.

    Eight fields fill ``low_bits`` bytes exactly, so the values are processed as groups of 8; padding
    fields are 0, which keeps the padding bits of the last byte 0.
    """
    n = values.size
    groups = -(-n // 8)
    dtype = _field_dtype(low_bits)
    fields = np.zeros((groups, 8), dtype=dtype)
    fields.reshape(-1)[:n] = values  # wraps modulo the dtype's width; the mask below keeps L bits
    fields &= dtype.type((1 << low_bits) - 1)
    out = np.zeros((groups, low_bits), dtype=np.uint8)
    for b, k, shift in _field_pairs(low_bits):
        # The cast to uint8 keeps the byte's 8 bits; the fields' bits never collide within a byte.
        out[:, b] |= _shift(fields[:, k], shift).astype(np.uint8)
    packed: Bytes = out.reshape(-1)[: (n * low_bits + 7) // 8]
    return packed


def unpack_fields(data: Bytes, n: int, low_bits: int) -> npt.NDArray[Any]:
    """The inverse of :func:`pack_fields`: ``n`` fields of ``low_bits`` bits from ``data``."""
    groups = -(-n // 8)
    dtype = _field_dtype(low_bits)
    group_bytes = np.zeros((groups, low_bits), dtype=np.uint8)
    group_bytes.reshape(-1)[: data.size] = data
    fields = np.zeros((groups, 8), dtype=dtype)
    for b, k, shift in _field_pairs(low_bits):
        fields[:, k] |= _shift(group_bytes[:, b].astype(dtype), -shift)
    fields &= dtype.type((1 << low_bits) - 1)
    return fields.reshape(-1)[:n]


def encode_bitmap(flat: Positions, numel: int) -> Bytes:
    """BITMAP bytes of strictly increasing ``flat`` positions among ``numel``."""
    check_increasing(flat, numel, "BITMAP")
    return _pack_set_bits(flat, numel)


def encode_elias_fano(flat: Positions, numel: int) -> Bytes:
    """ELIAS_FANO bytes of strictly increasing ``flat`` positions among ``numel``: low part, high part."""
    check_increasing(flat, numel, "ELIAS_FANO")
    n = flat.size
    if n == 0:
        return np.zeros(0, dtype=np.uint8)
    low_bits, _, high_nbits = elias_fano_layout(n, numel)
    high = _pack_set_bits((flat >> low_bits) + np.arange(n, dtype=np.int64), high_nbits)
    if low_bits == 0:
        return high
    low = pack_fields(flat, low_bits)
    return np.concatenate([low, high])


# --- decoding -------------------------------------------------------------------------------------------


def _check_nbytes(data: Bytes, expected: int, what: str, name: str) -> None:
    if data.size != expected:
        raise WireError(f"{what}: {name} positions take {expected} bytes, got {data.size}")


def _check_padding(data: Bytes, nbits: int, what: str, part: str) -> None:
    """The bits of the last byte past ``nbits`` are padding and must be 0."""
    used = nbits % 8
    if used and int(data[-1]) >> used:
        raise WireError(f"{what}: {part} has bits set past its {nbits} bits (padding bits must be 0)")


# Bytes per block of the portable popcount: unpackbits makes 8 bytes of each, so a block costs 8 MiB.
_POPCOUNT_BLOCK = 1 << 20

# Set bits of every byte value, computed by Python, the reference both popcounts are checked against.
_BYTE_POPCOUNT: Bytes = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)


def popcount_portable(data: Bytes) -> int:
    """Set bits of the uint8 array ``data``, on every numpy (1.24 on): unpacked a block at a time.

    ``count_nonzero(unpackbits(...))`` is vectorised on numpy 1.x and 2.x alike and measured faster than
    a 256-entry table lookup or a SWAR sum; blocks keep the 8x unpacked copy to a few MiB.
    """
    flat = data.reshape(-1)
    return sum(
        int(np.count_nonzero(np.unpackbits(flat[start : start + _POPCOUNT_BLOCK])))
        for start in range(0, flat.size, _POPCOUNT_BLOCK)
    )


def _native_popcount() -> Callable[[Bytes], npt.NDArray[np.uint8]] | None:
    """numpy's own ``bitwise_count`` (numpy >= 2.0) when it agrees with the table on all 256 bytes."""
    native = getattr(np, "bitwise_count", None)
    if native is None:
        return None
    every_byte = np.arange(256, dtype=np.uint8)
    if not np.array_equal(native(every_byte), _BYTE_POPCOUNT):  # pragma: no cover - a broken numpy
        return None
    checked: Callable[[Bytes], npt.NDArray[np.uint8]] = native
    return checked


_BITWISE_COUNT = _native_popcount()


def popcount(data: Bytes) -> int:
    """Set bits of the uint8 array ``data``: numpy's ``bitwise_count`` where it exists (numpy 2.x, about
    3x faster), else :func:`popcount_portable`; both give the same count."""
    if _BITWISE_COUNT is None:
        return popcount_portable(data)
    return int(_BITWISE_COUNT(data).sum(dtype=np.int64))


def _set_bits(data: Bytes, count: int) -> Positions:
    """Indices, increasing, of the ``count`` set bits of little-endian bitmap ``data``."""
    if count > _BRANCHLESS_DENSITY * 8 * data.size:
        dense: Positions = np.flatnonzero(np.unpackbits(data, bitorder="little").view(np.bool_))
        return dense
    # Sparse: unpack the nonzero bytes only. At least 1 bit in 8 of those is set, which keeps nonzero()
    # branch-free; bit k of them is bit k % 8 of the (k / 8)-th nonzero byte.
    nonzero = np.flatnonzero(data.view(np.bool_))
    found = np.flatnonzero(np.unpackbits(data[nonzero], bitorder="little").view(np.bool_))
    positions: Positions = nonzero[found >> 3]
    positions <<= 3
    found &= 7
    positions += found
    return positions


def decode_bitmap(data: Bytes, nnz: int, numel: int, *, what: str) -> Positions:
    """Increasing flat positions of a BITMAP, after checking its size, padding and popcount."""
    _check_nbytes(data, bitmap_nbytes(numel), what, "BITMAP")
    if not data.size:
        count = 0
    else:
        _check_padding(data, numel, what, "BITMAP")
        count = popcount(data)
    if count != nnz:
        raise WireError(f"{what}: BITMAP has {count} bits set, but nnz is {nnz}")
    return _set_bits(data, count)


def decode_elias_fano(data: Bytes, nnz: int, numel: int, *, what: str) -> Positions:
    """Strictly increasing flat positions of an ELIAS_FANO code, checked against nnz and numel."""
    if nnz == 0:
        _check_nbytes(data, 0, what, "ELIAS_FANO")
        return np.zeros(0, dtype=np.int64)
    if nnz > numel:
        raise WireError(f"{what}: ELIAS_FANO codes distinct positions, but nnz {nnz} exceeds {numel}")
    low_bits, low_nbytes, high_nbits = elias_fano_layout(nnz, numel)
    _check_nbytes(data, low_nbytes + (high_nbits + 7) // 8, what, "ELIAS_FANO")
    low, high = data[:low_nbytes], data[low_nbytes:]
    if low_bits:
        _check_padding(low, nnz * low_bits, what, "ELIAS_FANO low part")
    _check_padding(high, high_nbits, what, "ELIAS_FANO high part")
    count = popcount(high)
    if count != nnz:
        raise WireError(f"{what}: ELIAS_FANO high part has {count} bits set, but nnz is {nnz}")
    # Bit (p_i >> L) + i is set: the i-th set bit, less i, is p_i's high part, non-decreasing in i.
    positions = _set_bits(high, nnz)
    positions -= np.arange(nnz, dtype=np.int64)
    if low_bits:
        positions <<= low_bits
        fields = unpack_fields(low, nnz, low_bits)
        # Fields are below 2^L <= 2^59, so even uint64 ones read the same as int64.
        positions |= fields.view(np.int64) if fields.dtype == np.uint64 else fields
    bad = np.flatnonzero(positions[1:] <= positions[:-1])
    if bad.size:
        i = int(bad[0]) + 1
        raise WireError(
            f"{what}: ELIAS_FANO positions must be strictly increasing, but position {int(positions[i])} "
            f"at index {i} follows {int(positions[i - 1])}"
        )
    if positions[-1] >= numel:
        raise WireError(
            f"{what}: position {int(positions[-1])} is out of range for a tensor of {numel} elements"
        )
    return positions
