"""Server-side aggregation: FL4Health's FedAvgSparseCooTensor and FedAvgDynamicLayer on decoded payloads.

Each name is averaged over the contributions that sent it, weighted by ``num_examples`` or uniformly,
with the torch ops FL4Health's sparse strategy uses (``dense * n``, a ``torch.add`` reduction in
contribution order, ``/ total``), in the payload's dtype. Results come out in order of first appearance
(contribution order, then each contribution's tensor order).

Contributions are aggregated in the order given. FL4Health's FedAvgSparseCooTensor first pseudo-sorts
its results (``decode_and_pseudo_sort_results``), which decides both the summation order and the output
order; a caller that wants that order passes the contributions already sorted, as the SDK's
``aggregate_sparse_coo`` and ``aggregate_layers`` do.

The sparse average never builds the per-contribution dense tensors: it scatters each contribution's
weighted values into one accumulator. Off the sent positions FL4Health adds ``0 * n = 0``, which
changes nothing (``x + 0 == x``), and every op is elementwise, so the figures are bit for bit the
ones the dense computation gives, at O(sent entries) per contribution plus one O(numel) pass per name.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidArgument
from .topk import SparseTensor

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Contribution:
    """One client's payload for one round, and the weight it carries."""

    num_examples: int
    """The client's example count: the weight of a weighted average; must be > 0 in every mode."""
    sparse: Sequence[SparseTensor] = ()
    """The sparse COO tensors the client sent (FedAvgSparseCooTensor input)."""
    layers: Sequence[tuple[str, torch.Tensor]] = ()
    """The whole layers the client sent (FedAvgDynamicLayer input)."""


def aggregate_sparse(contributions: Sequence[Contribution], *, weighted: bool = True) -> list[SparseTensor]:
    """FedAvgSparseCooTensor's aggregation, re-sparsified.

    For each name: every sending contribution's tensor is densified (zeros where nothing was sent,
    duplicate positions summed as ``to_dense()`` sums them) in its values' dtype; weighted, the
    average is ``sum(dense * num_examples) / sum(num_examples)``, unweighted ``sum(dense) / count``,
    both over the contributions that sent the name. The result keeps its non-zero entries (NaN
    included, ``-0.0`` not): values in row-major order, flat int64 positions strictly increasing.
    A name whose average is all zeros is still listed, with no entries, as FL4Health keeps it.

    The dtype is whatever torch gives: float16 stays float16 (and can overflow to inf when
    ``value * num_examples`` exceeds 65504, as FL4Health's does); integer values divide to the
    default float dtype (float32).
    """
    counts = _checked_counts(contributions, "sparse")
    groups: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    firsts: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for index, (contribution, count) in enumerate(zip(contributions, counts, strict=True)):
        seen: set[str] = set()
        for item in contribution.sparse:
            _check_unique(index, item.name, seen)
            shape = _checked_shape(index, item)
            values, positions = _checked_entries(index, item, shape)
            _check_consistent(firsts, index, item.name, shape, values.dtype)
            groups.setdefault(item.name, []).append((count, values, positions))
    with torch.no_grad():
        return [_average_sparse(name, firsts[name][1], entries, weighted) for name, entries in groups.items()]


def aggregate_layers(
    contributions: Sequence[Contribution], *, weighted: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """FedAvgDynamicLayer's aggregation: per name, ``sum(layer * n) / sum(n)`` or ``sum(layer) / count``.

    Over the contributions that sent the name, in order of first appearance; the inputs are left
    untouched and never returned as they are.

    Computed as FL4Health computes it, in numpy: ``layer * n`` per contribution, summed in order with
    ``np.add``, divided by the total, with numpy's promotion rules (integer layers divide to float64;
    in float16 ``n`` and the total are first rounded to float16, so 1000 examples of a 100.0 make inf).
    Two corners numpy cannot do are computed with the same formula in torch: bfloat16, which numpy
    lacks, and a count too large for the layer's integer dtype (numpy refuses ``uint8 * 300``).
    """
    counts = _checked_counts(contributions, "layers")
    groups: dict[str, list[tuple[int, torch.Tensor]]] = {}
    firsts: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
    for index, (contribution, count) in enumerate(zip(contributions, counts, strict=True)):
        seen: set[str] = set()
        for name, layer in contribution.layers:
            _check_unique(index, name, seen)
            _check_consistent(firsts, index, name, tuple(layer.shape), layer.dtype)
            groups.setdefault(name, []).append((count, layer.detach()))
    with torch.no_grad():
        return [(name, _average_layer(entries, weighted)) for name, entries in groups.items()]


def _average_layer(entries: list[tuple[int, torch.Tensor]], weighted: bool) -> torch.Tensor:
    if entries[0][1].dtype != torch.bfloat16:
        try:
            return _average_layer_numpy(entries, weighted)
        except OverflowError:
            pass  # an example count beyond the integer dtype: numpy refuses, torch wraps
    total = 0
    acc: torch.Tensor | None = None
    for count, layer in entries:
        term = layer * count if weighted else layer
        total += count if weighted else 1
        acc = term if acc is None else torch.add(acc, term)
    assert acc is not None  # every group has at least one entry
    return acc / total


def _average_layer_numpy(entries: list[tuple[int, torch.Tensor]], weighted: bool) -> torch.Tensor:
    total = 0
    acc: np.ndarray | None = None
    # Overflow to inf (float16 weighting, say) is part of the result, not something to warn about.
    with np.errstate(over="ignore", invalid="ignore"):
        for count, layer in entries:
            array = layer.cpu().numpy()
            term = array * count if weighted else array
            total += count if weighted else 1
            acc = term if acc is None else np.add(acc, term)
        assert acc is not None  # every group has at least one entry
        # A 0-d array divides to a numpy scalar: asarray makes it an array again, torch needs one.
        return torch.from_numpy(np.asarray(acc / total))


def _average_sparse(
    name: str, shape: tuple[int, ...], entries: list[tuple[int, torch.Tensor, torch.Tensor]], weighted: bool
) -> SparseTensor:
    numel = _numel(shape)
    total = 0
    acc: torch.Tensor | None = None
    for count, values, positions in entries:
        unique, summed = _coalesced(values, positions, numel)
        term = summed * count if weighted else summed
        total += count if weighted else 1
        if acc is None:
            # dense * n: zero everywhere but the sent positions (0 * n is 0 in every dtype).
            acc = torch.zeros(numel, dtype=term.dtype)
            acc.index_copy_(0, unique, term)
        else:
            # torch.add(acc, dense * n): only the sent positions change, the rest add an exact 0.
            acc.index_copy_(0, unique, torch.add(acc.index_select(0, unique), term))
    assert acc is not None  # every group has at least one entry
    nonzero = torch.from_numpy(np.flatnonzero((acc != 0).numpy()).astype(np.int64, copy=False))
    quotient = acc.index_select(0, nonzero) / total
    kept = quotient != 0  # a quotient can underflow to zero; FL4Health's nonzero() drops it
    if not bool(kept.all()):
        nonzero, quotient = nonzero[kept], quotient[kept]
    return SparseTensor(name, shape, quotient, nonzero)


def _coalesced(
    values: torch.Tensor, positions: torch.Tensor, numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct positions and the values densifying gives there (duplicates summed in the values' dtype)."""
    if positions.numel() < 2 or bool((positions[1:] > positions[:-1]).all()):
        return positions, values
    # Repeated or unordered positions (rare): densify as FL4Health does - index_put_ with accumulate
    # sums exactly as sparse_coo_tensor(...).to_dense() does - and read back the distinct positions.
    dense = torch.zeros(numel, dtype=values.dtype).index_put_((positions,), values, accumulate=True)
    unique = torch.unique(positions)
    return unique, dense.index_select(0, unique)


def _checked_counts(contributions: Sequence[Contribution], kind: str) -> list[int]:
    if len(contributions) == 0:
        raise InvalidArgument("there are no contributions to aggregate")
    counts: list[int] = []
    for index, contribution in enumerate(contributions):
        if contribution.sparse and contribution.layers:
            raise InvalidArgument(f"contributions[{index}] carries both sparse tensors and whole layers")
        if kind == "sparse" and contribution.layers:
            raise InvalidArgument(
                f"contributions[{index}] carries whole layers, but a sparse aggregation takes sparse tensors"
            )
        if kind == "layers" and contribution.sparse:
            raise InvalidArgument(
                f"contributions[{index}] carries sparse tensors, but a layer aggregation takes whole layers"
            )
        raw = contribution.num_examples
        try:
            count = None if isinstance(raw, bool) else operator.index(raw)
        except TypeError:
            count = None
        if count is None or count <= 0:
            raise InvalidArgument(f"contributions[{index}].num_examples must be an integer > 0, got {raw!r}")
        counts.append(count)
    if sum(counts) > _INT64_MAX:
        raise InvalidArgument(f"the contributions' num_examples add up to {sum(counts)}, beyond int64")
    return counts


def _check_unique(index: int, name: str, seen: set[str]) -> None:
    if name in seen:
        raise InvalidArgument(f"contributions[{index}] names tensor {name!r} more than once")
    seen.add(name)


def _check_consistent(
    firsts: dict[str, tuple[int, tuple[int, ...], torch.dtype]],
    index: int,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> None:
    """Record the first layout seen for ``name``; refuse a later contribution that disagrees with it."""
    first = firsts.setdefault(name, (index, shape, dtype))
    if first[1] != shape:
        raise InvalidArgument(
            f"tensor {name!r} has shape {shape} in contributions[{index}] "
            f"but {first[1]} in contributions[{first[0]}]"
        )
    if first[2] != dtype:
        raise InvalidArgument(
            f"tensor {name!r} has dtype {dtype} in contributions[{index}] "
            f"but {first[2]} in contributions[{first[0]}]"
        )


def _checked_shape(index: int, item: SparseTensor) -> tuple[int, ...]:
    shape = tuple(item.shape)
    if not all(isinstance(size, int) and not isinstance(size, bool) and size >= 0 for size in shape):
        raise InvalidArgument(
            f"sparse tensor {item.name!r} in contributions[{index}] has shape {shape}: "
            "sizes must be integers >= 0"
        )
    return shape


def _checked_entries(
    index: int, item: SparseTensor, shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"sparse tensor {item.name!r} in contributions[{index}]"
    values, positions = item.values.detach(), item.positions.detach()
    if values.dim() != 1 or positions.dim() != 1:
        raise InvalidArgument(f"{where}: values and positions must be 1-D")
    if values.numel() != positions.numel():
        raise InvalidArgument(f"{where} has {values.numel()} values but {positions.numel()} positions")
    if positions.dtype.is_floating_point or positions.is_complex() or positions.dtype == torch.bool:
        raise InvalidArgument(f"{where}: positions must be integers, not {positions.dtype}")
    positions = positions.to(torch.int64)
    numel = _numel(shape)
    if positions.numel():
        low, high = torch.aminmax(positions)
        bad = int(low) if int(low) < 0 else int(high) if int(high) >= numel else None
        if bad is not None:
            raise InvalidArgument(f"{where} has position {bad}, outside [0, {numel}) for its shape {shape}")
    return values, positions


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
