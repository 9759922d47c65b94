"""What a computation holds, tensor by tensor, and what the engine reserves while it computes.

A :class:`Need` is one tensor's figure: ``held`` bytes stay until the call ends (the answer, and what it
is built from), ``scratch`` bytes only while that step runs. The engine runs one step at a time, so a
:class:`Work` is the sum of every ``held`` plus the largest ``scratch``.

Most of a computation's bytes follow from what a request declares, and :mod:`paramsel.engine.budget`
works them out before anything is built. The rest follows only from the data: how many scores lie near
the k-th largest, how many entries a top-k selection keeps (FL4Health sends every entry at or above the
k-th largest score, so ties at the threshold decide), how many of them tie. The engine counts those
first and hands the figure below to a :data:`Reserve` callback before it allocates them; a server
counts it against its limits there, or refuses the call. Nothing here imports more than the standard
library.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Flat positions are int64 (numpy's intp on every 64-bit platform paramsel runs on).
POSITION_BYTES = 8
# FL4Health drops selected zeros: per selected entry a bool (is it zero?) and, when some are, per entry
# kept the new copy of its position and value and the int64 index torch's boolean indexing builds.
NONZERO_MASK_BYTES = 1
DROPPED_ZEROS_SCRATCH_BYTES = 2 * POSITION_BYTES
# Beside each candidate of the k-th search (kept, joined): the masks of the band's comparisons.
CANDIDATE_MASKS = 3


@dataclass(frozen=True)
class Need:
    """The bytes one tensor's computation holds at most, and how the figure is made (for messages)."""

    name: str
    held: int
    """Kept until the call ends: the answer, and what it is built from."""
    scratch: int
    """Held only while this tensor is computed."""
    what: str
    answer_entries: int = 0
    """For a sparse answer: at most how many entries it has (their encoding is the server's to count)."""
    answer_shape: tuple[int, ...] = ()
    """For a sparse answer: its dense shape."""

    @property
    def nbytes(self) -> int:
        return self.held + self.scratch


@dataclass(frozen=True)
class Work:
    """The needs of one call's computation: every ``held`` at once, plus the largest ``scratch``."""

    needs: tuple[Need, ...] = ()

    @property
    def held(self) -> int:
        return sum(n.held for n in self.needs)

    @property
    def scratch(self) -> int:
        return max((n.scratch for n in self.needs), default=0)

    @property
    def nbytes(self) -> int:
        return self.held + self.scratch

    def largest(self) -> Need | None:
        """The tensor that needs the most bytes (its needs merged: held summed, the largest scratch),
        described by its largest need; the first of them on a tie; None when there are none."""
        merged: dict[str, Need] = {}
        for need in self.needs:
            seen = merged.get(need.name)
            if seen is None:
                merged[need.name] = need
                continue
            what = need.what if need.nbytes > seen.nbytes else seen.what
            merged[need.name] = Need(need.name, seen.held + need.held, max(seen.scratch, need.scratch), what)
        return max(merged.values(), key=lambda n: n.nbytes, default=None)

    def __add__(self, other: Work) -> Work:
        return Work(self.needs + other.needs)


Reserve = Callable[[Need], None]
"""Counts a :class:`Need` before the engine allocates it, or raises to stop the computation there.

Needs reserved one after another add up as a :class:`Work` of them all does: every ``held``, and the
largest ``scratch`` once (a step's scratch is gone before the next step's is made)."""


def plural(count: int, noun: str) -> str:
    """``1 entry``, ``2 entries``, ``4 bytes``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun[:-1]}ies" if noun.endswith("y") else f"{count} {noun}s"


# --- The k-th largest score -------------------------------------------------------------------------


def candidates_need(name: str, count: int, itemsize: int) -> Need:
    """The candidates the k-th search keeps of one tensor: flat positions and scores, ``itemsize`` each."""
    return Need(
        name,
        count * (POSITION_BYTES + itemsize),
        0,
        f"{plural(count, 'candidate')} for the k-th largest score: int64 positions and "
        f"{plural(itemsize, 'byte')} scores",
    )


def candidate_band_need(name: str, count: int, itemsize: int) -> Need:
    """The search among ``count`` candidates (of every tensor): their scores joined, the band between
    the sample's bounds copied out of them, and the masks that pick it."""
    return Need(
        name,
        0,
        count * (2 * itemsize + CANDIDATE_MASKS),
        f"the k-th search among {plural(count, 'candidate')}: their scores joined and the band copied "
        f"out at {plural(itemsize, 'byte')} each, and {CANDIDATE_MASKS} masks",
    )


def between_need(name: str, count: int, itemsize: int, numel: int) -> Need:
    """The scores of one tensor that lie strictly inside the k-th search's band, copied out (held until
    the band is searched), and the masks and int64 index torch's boolean indexing takes to pick them."""
    return Need(
        name,
        count * itemsize,
        2 * numel + POSITION_BYTES * count,
        f"{plural(count, 'score')} inside the k-th search's band at {plural(itemsize, 'byte')} each, "
        f"picked by 2 masks over {plural(numel, 'entry')}",
    )


def partition_need(name: str, count: int, entry_bytes: int, what: str) -> Need:
    """``count`` scores joined into one tensor to be partitioned (``entry_bytes`` each: the promoted
    dtype, and float32 beside it when the scores are narrower floats)."""
    return Need(name, 0, count * entry_bytes, f"{what}: {plural(count, 'score')} at {entry_bytes} bytes each")


# --- The selection ----------------------------------------------------------------------------------


def ties_need(name: str, count: int, numel: int) -> Need:
    """``exact_k``: the positions of one tensor's ``count`` entries tied at the threshold, of which only
    the earliest are taken, beside the two masks over its ``numel`` entries."""
    return Need(
        name,
        0,
        2 * numel + POSITION_BYTES * count,
        f"the int64 positions of {plural(count, 'entry')} tied at the threshold, and 2 masks over "
        f"{plural(numel, 'entry')}",
    )


def selected_need(name: str, count: int, value_itemsize: int, mask_bytes: int) -> Need:
    """The ``count`` selected entries of one tensor, held as the answer (int64 positions and values of
    ``value_itemsize`` bytes), and, while they are found and checked for zeros, the mask that found them
    (``mask_bytes``) and a bool per entry."""
    return Need(
        name,
        count * (POSITION_BYTES + value_itemsize),
        mask_bytes + count * NONZERO_MASK_BYTES,
        f"{plural(count, 'selected entry')} (ties at the threshold included): int64 positions and "
        f"{plural(value_itemsize, 'byte')} values",
        answer_entries=count,
    )


def dropped_zeros_need(name: str, count: int, value_itemsize: int) -> Need:
    """Dropping the zeros among one tensor's ``count`` selected entries (reserved only when there are
    some): the copies of the entries kept, and torch's index of them, beside the bool per entry."""
    return Need(
        name,
        0,
        count * (NONZERO_MASK_BYTES + DROPPED_ZEROS_SCRATCH_BYTES + value_itemsize),
        f"{plural(count, 'selected entry')} copied to drop the zeros among them (FL4Health sends none)",
    )
