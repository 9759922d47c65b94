"""POSITION_ENCODING_SEEDED: the positions seeded random-k draws, from (seed, numel, count) alone.

proto/paramsel/v1/criteria.proto (UPDATE_SELECTION_RANDOM_K) states the rule: the key of flat position
i of a tensor of ``numel`` entries is SplitMix64's output number i (from 0) seeded with ``seed``, and the
``count`` positions of smallest keys are drawn, in increasing order. The keys of one tensor are all
distinct (SplitMix64's output function is a bijection of the distinct states seed + (i + 1) x gamma), so
the draw has exactly one answer.

Both the engine's random-k (through the servicer, which hands it this function: the engine imports
nothing of paramsel.wire) and the position decoder use :func:`seeded_positions`, so that what a server
selects and what a receiver decodes are the same positions by construction.

Vectorised numpy uint64 (arithmetic mod 2^64 is numpy's uint64 wraparound), never a Python loop over
entries. Memory: the keys (8 bytes per entry), the answer (8 bytes per position) and
:data:`SEEDED_WORK_CHUNK`-entry temporaries; :func:`seeded_positions_nbytes` says how much in all.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from paramsel.wire.errors import WireError

GAMMA = 0x9E3779B97F4A7C15
"""SplitMix64's increment (the golden ratio's fractional part, 64 bits)."""
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
"""SplitMix64's two multipliers."""

SEEDED_WORK_CHUNK = 1 << 16
"""Entries whose keys are computed at once (bounds the temporaries)."""

_U64 = 1 << 64
# Bytes per entry of a chunk's temporaries: the state, a shifted copy, the comparison mask and at worst
# the positions flatnonzero returns.
_CHUNK_BYTES_PER_ENTRY = 8 + 8 + 1 + 8


def seeded_positions_nbytes(numel: int, count: int) -> int:
    """Bytes :func:`seeded_positions` allocates at most for ``count`` of ``numel`` positions: the keys of
    every entry (uint64), the answer (int64) and one chunk's temporaries."""
    if count <= 0 or count >= numel:
        return 8 * max(count, 0)  # nothing drawn: none or all of them, np.arange
    return 8 * numel + 8 * count + _CHUNK_BYTES_PER_ENTRY * min(numel, SEEDED_WORK_CHUNK)


def splitmix64_keys(seed: int, start: int, stop: int) -> npt.NDArray[np.uint64]:
    """The keys of flat positions ``start`` to ``stop - 1``: SplitMix64's outputs number start.. stop-1
    when seeded with ``seed`` (0 <= seed < 2^64)."""
    z = np.arange(start + 1, stop + 1, dtype=np.uint64)
    z *= np.uint64(GAMMA)
    z += np.uint64(seed)
    tmp = np.empty_like(z)
    np.right_shift(z, np.uint64(30), out=tmp)
    z ^= tmp
    z *= np.uint64(MIX1)
    np.right_shift(z, np.uint64(27), out=tmp)
    z ^= tmp
    z *= np.uint64(MIX2)
    np.right_shift(z, np.uint64(31), out=tmp)
    z ^= tmp
    return z


def seeded_positions(seed: int, numel: int, count: int) -> npt.NDArray[np.int64]:
    """The ``count`` flat positions of a ``numel``-entry tensor whose SplitMix64 keys (seeded with
    ``seed``) are smallest, as an increasing int64 array.

    Raises :class:`WireError` unless 0 <= seed < 2^64 and 0 <= count <= numel.
    """
    if not 0 <= seed < _U64:
        raise WireError(f"a position seed is a uint64, not {seed}")
    if numel < 0 or not 0 <= count <= numel:
        raise WireError(f"seeded positions draw 0 to {max(numel, 0)} positions, not {count}")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if count == numel:
        return np.arange(numel, dtype=np.int64)
    keys = np.empty(numel, dtype=np.uint64)
    for start in range(0, numel, SEEDED_WORK_CHUNK):
        stop = min(start + SEEDED_WORK_CHUNK, numel)
        keys[start:stop] = splitmix64_keys(seed, start, stop)
    # The count-th smallest key, found in place (the keys are distinct, so exactly count are <= it)...
    keys.partition(count - 1)
    threshold = keys[count - 1]
    # ...then the keys again, chunk by chunk (cheaper than an index array of numel), and the positions
    # whose key is at most the threshold come out in increasing order.
    del keys
    positions = np.empty(count, dtype=np.int64)
    filled = 0
    for start in range(0, numel, SEEDED_WORK_CHUNK):
        stop = min(start + SEEDED_WORK_CHUNK, numel)
        found = np.flatnonzero(splitmix64_keys(seed, start, stop) <= threshold)
        positions[filled : filled + found.size] = found + start
        filled += found.size
    if filled != count:  # pragma: no cover - SplitMix64's keys of one tensor are distinct
        raise AssertionError(f"seeded positions: {filled} keys at most the threshold, not {count}")
    return positions
