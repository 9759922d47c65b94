"""The k-th largest of many score tensors, as one value of their promoted dtype, in O(N).

FL4Health reads the threshold as ``torch.cat(flat scores).sort(descending=True)[k - 1].item()``. The
same value is found here without the sort and, for large N, without even concatenating: a small
sample brackets the k-th largest in a band [lo, hi]; one pass counts the entries above hi and collects
those inside the band, and the answer is then the right order statistic of the (small) band. The
sample only decides how fast this is, never the answer: when the band misses, a full partition
decides.

When the band is narrow and near the top (the usual sparsity levels), that one pass instead keeps
every entry at or above the band's lower bound, as flat positions and scores: the counts and the band
come from those few, and the caller picks its selection from them too, without another pass over N.

How many entries the band or the candidates hold depends on the scores, not on their shapes: with a
``reserve`` callback (see :mod:`paramsel.engine.needs`), each is counted and reserved before it is
copied out, and so is the whole partition a band that missed falls back to. What the shapes alone
decide (the promoted copies, the masks, the sample, the whole partition of a search too small to
sample) is for the caller to reserve first (:func:`paramsel.engine.budget.top_k_work`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidArgument
from .needs import (
    Reserve,
    between_need,
    candidate_band_need,
    candidates_need,
    partition_need,
)

# Below this many entries a plain partition of everything is already fast.
_SAMPLING_MIN_ENTRIES = 1 << 20
_SAMPLE_SIZE = 1 << 16
# Sample ranks scatter by at most sqrt(m)/2 (one standard deviation); 8 of those on each side make a
# miss a freak event while keeping the band near 1/32 of the entries.
_BAND_HALF_WIDTH = 4 * math.isqrt(_SAMPLE_SIZE)
# Entries kept as candidates cost 12 bytes or more each (position and score): above this share of
# them, by the sample's estimate, the counting pass runs instead.
_MAX_CANDIDATE_SHARE = 0.25
# numpy compares these in place, with the same rounding as torch.
_CANDIDATE_DTYPES = (torch.float32, torch.float64)
# Bytes per sampled entry, at most: its pick (int64), its score picked and joined, the sort's values,
# indices and buffers (measured at 34 bytes for float32 scores).
SAMPLE_ENTRY_BYTES = 64

Candidates = list[
    tuple["np.ndarray[tuple[int], np.dtype[np.intp]]", "np.ndarray[tuple[int], np.dtype[np.floating]]"]
]
"""Per score tensor: the flat positions and (promoted) scores of every entry at or above some bound
that is at most the k-th largest, positions increasing."""


@dataclass(frozen=True)
class Kth:
    """The k-th largest, and what was learnt finding it."""

    value: int | float
    """As ``Tensor.item()`` gives it."""
    dtype: torch.dtype
    """The promoted dtype the scores were compared in."""
    candidates: Candidates | None
    """Every entry scoring at least ``value`` is among these; None when they were not collected."""


def promoted_dtype(scores: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype ``torch.cat`` gives these tensors."""
    try:
        return functools.reduce(torch.promote_types, (score.dtype for score in scores))
    except RuntimeError as err:
        raise InvalidArgument(f"the model's score dtypes cannot be combined: {err}") from err


def kth_largest(scores: Sequence[torch.Tensor], k: int) -> int | float:
    """The k-th largest entry (1-based, ties counted) of all ``scores`` taken as one promoted tensor."""
    return find_kth(scores, k).value


def samples(total: int) -> bool:
    """Whether the search over ``total`` scores samples them; if not, it partitions them all."""
    return total >= _SAMPLING_MIN_ENTRIES


def sample_bytes(tensors: int) -> int:
    """An upper bound of the sample a search over ``tensors`` score tensors holds while it runs."""
    return (_SAMPLE_SIZE + tensors) * SAMPLE_ENTRY_BYTES


def partition_entry_bytes(dtype: torch.dtype) -> int:
    """Bytes per entry of a partition of scores of ``dtype`` joined: their own, and a float32 copy
    beside them when they are narrower floats (numpy has no bfloat16)."""
    size = dtype.itemsize
    return size + 4 if _widened(dtype) else size


def _widened(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize < 4


def find_kth(
    scores: Sequence[torch.Tensor],
    k: int,
    *,
    collect: bool = False,
    reserve: Reserve | None = None,
    names: Sequence[str] | None = None,
) -> Kth:
    """:func:`kth_largest`, with the candidates it kept when ``collect`` asks for them and they are cheap.

    ``reserve`` is given what the scores decide before it is allocated (see the module's docstring);
    ``names`` name the tensors in its figures.
    """
    promoted = promoted_dtype(scores)
    total = sum(score.numel() for score in scores)
    if not 1 <= k <= total:
        raise ValueError(f"k={k} is outside [1, {total}]")
    labels = list(names) if names is not None else [f"scores {i}" for i in range(len(scores))]
    # The comparisons below must happen in the promoted dtype, as they would inside torch.cat's output.
    promoted_scores = [score.reshape(-1).to(promoted) for score in scores]
    value = None
    candidates = None
    if total >= _SAMPLING_MIN_ENTRIES:
        value, candidates = _kth_by_band(
            promoted_scores, total, k, collect=collect, reserve=reserve, names=labels
        )
        if value is None and reserve is not None:
            # The band missed: everything is partitioned after all (too few scores to sample: that is
            # the plan from the start, known from the shapes).
            reserve(
                partition_need(
                    _largest(labels, promoted_scores),
                    total,
                    partition_entry_bytes(promoted),
                    "the k-th search partitions every score (the sample's band missed)",
                )
            )
    if value is None:
        value = _kth_by_partition(torch.cat(promoted_scores), k)
    return Kth(_as_python_number(value), promoted, candidates)


def _largest(names: Sequence[str], scores: Sequence[torch.Tensor]) -> str:
    """The name of the tensor with the most scores: the one a figure over all of them is told under."""
    return max(zip(names, scores, strict=True), key=lambda pair: pair[1].numel())[0]


def _kth_by_band(
    scores: Sequence[torch.Tensor],
    total: int,
    k: int,
    *,
    collect: bool = False,
    reserve: Reserve | None = None,
    names: Sequence[str] = (),
) -> tuple[torch.Tensor | None, Candidates | None]:
    descending = _sample(scores, total).sort(descending=True).values
    size = descending.numel()
    rank = k * size / total  # where the answer sits among the sorted sample, give or take
    upper = math.floor(rank) - _BAND_HALF_WIDTH
    lower = math.ceil(rank) + _BAND_HALF_WIDTH
    # A bound past the end of the sample is no bound: the band reaches to that end of the scores.
    hi = descending[upper] if upper >= 0 else None
    lo = descending[lower] if lower < size else None
    # Scores split into: above hi | equal to hi | strictly between | equal to lo | below lo. Ties at the
    # bounds are only counted, so a large mass of equal scores (unchanged weights all scoring 0, say)
    # is never collected and partitioned; when lo == hi nothing is strictly between.
    distinct = hi is None or lo is None or bool(lo < hi)
    if (
        collect
        and lo is not None
        and distinct
        and descending.dtype in _CANDIDATE_DTYPES
        and int(torch.count_nonzero(descending >= lo)) <= _MAX_CANDIDATE_SHARE * size
    ):
        return _kth_by_candidates(scores, k, hi, lo, reserve=reserve, names=names)
    return _kth_by_counting(scores, k, hi, lo, distinct, descending[:0], reserve=reserve, names=names), None


def _kth_by_counting(
    scores: Sequence[torch.Tensor],
    k: int,
    hi: torch.Tensor | None,
    lo: torch.Tensor | None,
    distinct: bool,
    empty: torch.Tensor,
    *,
    reserve: Reserve | None = None,
    names: Sequence[str] = (),
) -> torch.Tensor | None:
    above = at_hi = at_lo = 0
    between: list[torch.Tensor] = []
    for index, score in enumerate(scores):
        keep = None
        if hi is not None:
            above += int(torch.count_nonzero(score > hi))
            at_hi += int(torch.count_nonzero(score == hi))
            keep = score < hi
        if lo is not None and distinct:
            at_lo += int(torch.count_nonzero(score == lo))
            keep = score > lo if keep is None else keep.logical_and_(score > lo)
        if distinct:
            if keep is not None and reserve is not None:
                count = int(torch.count_nonzero(keep))
                reserve(between_need(names[index], count, score.element_size(), score.numel()))
            between.append(score if keep is None else score[keep])
        del keep  # each tensor's mask goes before the next one's is made
    if k <= above:
        return None
    if hi is not None and k <= above + at_hi:
        return hi.reshape(1)
    if between and reserve is not None:
        reserve(
            partition_need(
                _largest(names, scores),
                sum(part.numel() for part in between),
                partition_entry_bytes(empty.dtype),
                "the k-th search's band joined and partitioned",
            )
        )
    band = torch.cat(between) if between else empty
    if k <= above + at_hi + band.numel():
        return _kth_by_partition(band, k - above - at_hi)
    if lo is not None and k <= above + at_hi + band.numel() + at_lo:
        return lo.reshape(1)
    return None


def _kth_by_candidates(
    scores: Sequence[torch.Tensor],
    k: int,
    hi: torch.Tensor | None,
    lo: torch.Tensor,
    *,
    reserve: Reserve | None = None,
    names: Sequence[str] = (),
) -> tuple[torch.Tensor | None, Candidates | None]:
    """The band search over the entries at or above ``lo`` only, which are kept and returned."""
    # numpy scalars of the scores' own dtype, not Python floats: the comparisons then run in that dtype
    # on every numpy (numpy 1.x casts Python scalars by value, numpy 2 by NEP 50), and no rounding occurs.
    low = _numpy_scalar(lo)
    candidates: Candidates = []
    for index, score in enumerate(scores):
        array = score.numpy()
        kept_mask = array >= low
        if reserve is not None:
            count = int(np.count_nonzero(kept_mask))
            reserve(candidates_need(names[index], count, array.itemsize))
        positions = np.flatnonzero(kept_mask)
        del kept_mask
        candidates.append((positions, array[positions]))
    if reserve is not None:
        count = sum(positions.size for positions, _ in candidates)
        reserve(candidate_band_need(_largest(names, scores), count, scores[0].element_size()))
    kept = np.concatenate([values for _, values in candidates])
    above = at_hi = 0
    if hi is not None:
        high = _numpy_scalar(hi)
        above = int(np.count_nonzero(kept > high))
        at_hi = int(np.count_nonzero(kept == high))
        band = kept[(kept > low) & (kept < high)]
    else:
        band = kept[kept > low]
    at_lo = int(np.count_nonzero(kept == low))
    if k <= above:  # a miss above the band: the candidates still hold every entry at or above the answer
        return None, candidates
    if hi is not None and k <= above + at_hi:
        return hi.reshape(1), candidates
    if k <= above + at_hi + band.size:
        return _kth_by_partition(torch.from_numpy(band), k - above - at_hi), candidates
    if k <= above + at_hi + band.size + at_lo:
        return lo.reshape(1), candidates
    return None, None  # a miss below the band: the answer is below lo, among entries not kept


def _sample(scores: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    # Fixed seed: the same request takes the same path, which keeps timings reproducible.
    rng = np.random.Generator(np.random.PCG64(0x5EED))
    parts = []
    for score in scores:
        count = math.ceil(_SAMPLE_SIZE * score.numel() / total)
        if score.numel() and count:
            picks = torch.from_numpy(rng.integers(0, score.numel(), count, dtype=np.int64))
            parts.append(score.index_select(0, picks))
    return torch.cat(parts)


def _kth_by_partition(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of ``flat`` as a 1-element tensor; ``flat`` is reordered in place."""
    # numpy has no bfloat16 or float8; every such value is exact in float32 and widening keeps the
    # order, so the k-th largest comes back unchanged when narrowed again.
    array = (flat.to(torch.float32) if _widened(flat.dtype) else flat).numpy()
    rank = array.size - k  # ascending index of the k-th largest
    array.partition(rank)
    return torch.from_numpy(array[rank : rank + 1]).to(flat.dtype)


def _numpy_scalar(value: torch.Tensor) -> np.generic:
    """A 1-element tensor as a numpy scalar of its own dtype (float32 stays float32)."""
    scalar: np.generic = value.reshape(1).numpy()[0]
    return scalar


def _as_python_number(value: torch.Tensor) -> int | float:
    number = value.item()
    if isinstance(number, complex):  # unreachable: scores are real even for complex tensors
        raise InvalidArgument("complex scores have no order")
    return number
