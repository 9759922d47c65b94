"""Seeded random-k's positions worked out the slow, obvious way: SplitMix64 in scalar Python integers,
exactly as proto/paramsel/v1/criteria.proto (UPDATE_SELECTION_RANDOM_K) writes it, and a full sort.

The tests hold the vectorised code (paramsel.wire.seeded) and the server's answers to this. It shares
nothing with them but the constants the contract prints.
"""

from __future__ import annotations

MASK = (1 << 64) - 1


def splitmix64(seed: int, i: int) -> int:
    """SplitMix64's output number ``i`` (from 0) when seeded with ``seed``."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def reference_positions(seed: int, numel: int, count: int) -> list[int]:
    """The ``count`` positions of smallest key among ``numel``, in increasing order."""
    by_key = sorted(range(numel), key=lambda i: splitmix64(seed, i))
    return sorted(by_key[:count])


LITERAL_SEED, LITERAL_NUMEL, LITERAL_COUNT = 42, 20, 5
LITERAL_POSITIONS = [1, 4, 15, 16, 18]
"""seeded positions (42, 20, 5), computed once with :func:`reference_positions` and pinned: every
client (the Node one too) must draw exactly these."""
