"""Per-coordinate averaging of sparse contributions (beyond FL4Health): each position averaged over the
contributions that sent it.

FL4Health's FedAvgSparseCooTensor (:func:`~paramsel.engine.aggregate_sparse`) divides each tensor's sum
by the weight of every client that sent the *tensor*, so a position few clients sent is pulled towards
zero by the others. Here each position ``p`` of a name is averaged over the contributions ``c`` that
sent ``p``: weighted, ``sum(x_c[p] * n_c) / sum(n_c)``; unweighted, ``sum(x_c[p]) / count``.

The arithmetic is fixed to the bit, so that any language can reproduce it: contributions in FL4Health's
order (:func:`~paramsel.engine.aggregate.fl4health_order`); a contribution sends a position when its
positions list it (zero values included; values listed for one position more than once are first
summed in the values' dtype, in the order listed, and count once); each value widened to float64
exactly (integers past 2**53 rounded to nearest), ``n_c`` as float64, products and sums rounded in
float64 left to right, one division; then one rounding, to nearest even, to the answer's dtype: the
``value_dtype`` asked for, else ``torch.promote_types`` of the name's contribution dtypes (float32 when
that is an integer type or bool). The answer lists every position some contribution sent, in increasing
order, zero averages included. One name's contributions must have one shape.

Vectorised: one pass per contribution (a scatter-add into float64 accumulators, whose positions are
distinct within a contribution, so every position's sum is taken left to right in contribution order),
none per entry. The accumulators are dense over the name's shape when the contributions sent at least
half as many entries as it has (:func:`dense_accumulators`), else over the distinct positions sent only
(found by sorting them); both give the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .aggregate import Contribution, _checked_counts, _checked_entries, _checked_shape, fl4health_order
from .errors import InvalidArgument
from .rounding import round_float
from .topk import SparseTensor


@dataclass(frozen=True)
class _Sent:
    """One declaration of a name: where it came from, its weight and its (checked) entries."""

    index: int
    count: int
    shape: tuple[int, ...]
    values: torch.Tensor
    positions: torch.Tensor


def dense_accumulators(numel: int, entries: int) -> bool:
    """Whether a name of ``numel`` elements, of which its contributions sent ``entries`` entries in all
    (repeats included), is averaged in accumulators over all its elements (else over the positions
    sent). Dense costs about 17 bytes per element, sparse about 17 per entry and 17 per position sent."""
    return numel <= 2 * entries


def answer_dtype(dtypes: Sequence[torch.dtype], value_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a name's per-coordinate average: ``value_dtype`` when given, else the promoted dtype
    of its contributions' values, float32 when that is an integer type or bool."""
    if value_dtype is not None:
        return value_dtype
    promoted = dtypes[0]
    for dtype in dtypes[1:]:
        promoted = torch.promote_types(promoted, dtype)
    return promoted if promoted.is_floating_point else torch.float32


def aggregate_per_coordinate(
    contributions: Sequence[Contribution],
    *,
    weighted: bool = True,
    value_dtype: torch.dtype | None = None,
) -> list[SparseTensor]:
    """Per name, each position averaged over the contributions that sent it (see the module's doc).

    Names come in order of first appearance (FL4Health's sorted order, then each contribution's tensor
    order), as :func:`~paramsel.engine.aggregate_sparse` gives them; a name that no contribution sent an
    entry of is listed with none. A name a contribution carries more than once counts as one more
    contribution per occurrence, as it does in FL4Health's average. ``value_dtype`` (a float dtype)
    replaces the answer's dtype. :class:`InvalidArgument` for no contributions, example counts that are
    not integers > 0 (or add up past int64), whole layers, shapes that differ within a name, positions
    out of range.
    """
    if value_dtype is not None and not value_dtype.is_floating_point:
        raise InvalidArgument(f"value_dtype must be a floating-point dtype, got {value_dtype}")
    counts = _checked_counts(contributions, "sparse")
    groups: dict[str, list[_Sent]] = {}
    for index in fl4health_order(contributions):
        for item in contributions[index].sparse:
            shape = _checked_shape(index, item)
            values, positions = _checked_entries(index, item, shape)
            groups.setdefault(item.name, []).append(_Sent(index, counts[index], shape, values, positions))
    with torch.no_grad():
        return [_average(name, sent, weighted, value_dtype) for name, sent in groups.items()]


def _average(name: str, sent: list[_Sent], weighted: bool, value_dtype: torch.dtype | None) -> SparseTensor:
    first = sent[0]
    for s in sent[1:]:
        if s.shape != first.shape:
            raise InvalidArgument(
                f"tensor {name!r} has shape {s.shape} in contributions[{s.index}] but {first.shape} in "
                f"contributions[{first.index}]: per-coordinate averaging needs one shape per name"
            )
    shape = first.shape
    numel = _numel(shape)
    dtype = answer_dtype([s.values.dtype for s in sent], value_dtype)
    entries = sum(s.positions.numel() for s in sent)
    if dense_accumulators(numel, entries):
        slots: np.ndarray | None = None  # a position is its own slot
        size = numel
    else:
        slots = np.unique(np.concatenate([s.positions.numpy() for s in sent]))  # sorted, distinct
        size = slots.size
    # -0.0 is the identity of IEEE addition (0.0 is not: 0.0 + -0.0 = 0.0), so each slot's sum is its
    # terms' sum left to right, the sign of a zero included.
    sums = np.full(size, -0.0)
    weights = np.zeros(size)
    for s in sent:
        positions, values = _distinct(s.values, s.positions)
        where = positions.numpy() if slots is None else np.searchsorted(slots, positions.numpy())
        wide = values.to(torch.float64).numpy()
        weight = float(s.count) if weighted else 1.0
        # Positions are distinct within a contribution: a plain fancy-indexed add is one term per slot.
        sums[where] += wide * weight if weighted else wide
        weights[where] += weight
    if slots is None:
        kept = np.flatnonzero(weights)  # every weight is > 0: sent exactly where it is not 0
        quotient = sums[kept] / weights[kept]
        positions_out = torch.from_numpy(kept.astype(np.int64, copy=False))
    else:
        quotient = sums / weights
        positions_out = torch.from_numpy(slots.astype(np.int64, copy=False))
    del sums, weights
    values_out = round_float(torch.from_numpy(quotient), dtype)
    return SparseTensor(name, shape, values_out, positions_out)


def _distinct(values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct positions and their values: a position listed more than once gets its values' sum, in
    their dtype, in the order listed."""
    if positions.numel() < 2 or bool((positions[1:] > positions[:-1]).all()):
        return positions, values
    unique, inverse = torch.unique(positions, sorted=True, return_inverse=True)
    # Accumulating onto -0.0 (the identity of addition; 0 or False for integers and bool) adds the
    # values one by one in the order listed (torch's CPU index_put_ with accumulate runs serially).
    summed = torch.full((unique.numel(),), -0.0, dtype=values.dtype)
    summed.index_put_((inverse,), values, accumulate=True)
    return unique, summed


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
