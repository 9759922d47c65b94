"""Server-side aggregation: FL4Health's FedAvgSparseCooTensor and FedAvgDynamicLayer on decoded payloads.

Each name is averaged over the contributions that sent it, weighted by ``num_examples`` or uniformly,
with the ops FL4Health's strategies use and therefore their promotion rules: torch's for the sparse
strategy (``dense * n``, a ``torch.add`` reduction in contribution order, ``/ total``), numpy's for the
layer strategy (``layer * n``, ``np.add``, ``/ total``). A name's contributions may differ in dtype
(float16 with float32, ints with floats, ...) and in shape, as long as the shapes broadcast together,
exactly as those reductions allow; what they refuse (shapes that do not broadcast, and under numpy 2
an example count the layer's integer dtype cannot hold) is an :class:`InvalidArgument`. numpy 1 and
numpy 2 promote Python ints differently (value-based casting vs NEP 50): the layer average is computed
by the numpy of this process, so it is FL4Health's in the same environment.

Contributions are first put in FL4Health's order (:func:`fl4health_order`, the stable sort of its
``decode_and_pseudo_sort_results``), whatever order they arrive in: that order decides both the
summation order (so the last bits of every average) and the output order, names in order of first
appearance (sorted contribution order, then each contribution's tensor order). A name a contribution
carries more than once counts once per occurrence (one more term and one more count), as FL4Health
counts a name a client's packed list repeats.

When a name's shapes all agree, the sparse average never builds the per-contribution dense tensors:
it scatters each contribution's weighted values into one accumulator. Off the sent positions
FL4Health adds ``0 * n = 0``, which changes nothing but the sign of a zero (and zeros are not kept),
and every op is elementwise, so the figures are bit for bit the ones the dense computation gives, at
O(sent entries) per contribution plus one O(numel) pass per name. A dtype change along the way casts
the accumulator, as ``torch.add`` casts both operands to their common dtype. Shapes that differ
(broadcasting) take FL4Health's dense computation itself.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class _Sent:
    """One contribution's tensor of a name: where it came from, its weight and its (checked) data."""

    index: int
    count: int
    shape: tuple[int, ...]
    values: torch.Tensor
    """The whole layer, or a sparse tensor's values."""
    positions: torch.Tensor | None = None
    """A sparse tensor's flat int64 positions."""


def sort_key(contribution: Contribution) -> Any:
    """FL4Health's ``pseudo_sort_scoring_function`` of one contribution, with numpy's arithmetic.

    The first entry (index 0 in every dimension, i.e. the first in row-major order; for a sparse
    tensor the first value as sent) of each floating-point tensor, in the contribution's tensor order,
    summed by ``np.sum`` in their promoted dtype, plus ``num_examples``. bfloat16 (which numpy lacks,
    so FL4Health never sees it) is read as the float32 it widens to exactly. Tensors with no entries are
    skipped (FL4Health's pseudo-sort fails on an empty floating-point array; the SDK refuses them
    first), and so are integer and bool tensors, whose arrays FL4Health skips too.
    """
    values = [item.values for item in contribution.sparse] + [layer for _, layer in contribution.layers]
    firsts = [_first_entry(v) for v in values if v.dtype.is_floating_point and v.numel() > 0]
    return np.sum(firsts) + contribution.num_examples


def _first_entry(values: torch.Tensor) -> np.generic:
    first = values.detach().reshape(-1)[:1].cpu()
    if first.dtype == torch.bfloat16:
        first = first.float()
    entry: np.generic = first.numpy()[0]
    return entry


def fl4health_order(contributions: Sequence[Contribution]) -> list[int]:
    """The indices of ``contributions`` in the order FL4Health's strategies aggregate them.

    ``sorted(..., key=sort_key)``, as ``decode_and_pseudo_sort_results`` sorts: ascending keys, and
    Python's sort is stable, so contributions with equal keys keep their arrival order - the one case
    (with NaN keys, which compare neither below nor above any key) where the arrival order still
    decides the summation order, and so can change the last bits when such contributions differ.
    """
    keys = [sort_key(c) for c in contributions]
    return sorted(range(len(contributions)), key=lambda index: keys[index])


def aggregate_sparse(contributions: Sequence[Contribution], *, weighted: bool = True) -> list[SparseTensor]:
    """FedAvgSparseCooTensor's aggregation, re-sparsified.

    Contributions are taken in FL4Health's order (:func:`fl4health_order`). For each name: every
    sending contribution's tensor is densified (zeros where nothing was sent,
    duplicate positions summed as ``to_dense()`` sums them) in its values' dtype; weighted, the
    average is ``sum(dense * num_examples) / sum(num_examples)``, unweighted ``sum(dense) / count``,
    both over the contributions that sent the name, with torch's promotion (float16 and float32 sum
    to float32, int64 and float16 to float16, a 0-d tensor defers to a dimensioned one) and
    broadcasting (a (1,) tensor and a (3,) one average to (3,)). The result keeps its non-zero
    entries (NaN included, ``-0.0`` not): values in row-major order, flat int64 positions strictly
    increasing. A name whose average is all zeros is still listed, with no entries, as FL4Health
    keeps it.

    The dtype is whatever torch gives: float16 stays float16 (and can overflow to inf when
    ``value * num_examples`` exceeds 65504, as FL4Health's does); integer weighting wraps as torch's
    does; integer or bool values divide to the default float dtype (float32).
    """
    counts = _checked_counts(contributions, "sparse")
    groups: dict[str, list[_Sent]] = {}
    for index in fl4health_order(contributions):
        contribution, count = contributions[index], counts[index]
        for item in contribution.sparse:
            shape = _checked_shape(index, item)
            values, positions = _checked_entries(index, item, shape)
            groups.setdefault(item.name, []).append(_Sent(index, count, shape, values, positions))
    with torch.no_grad():
        return [_average_sparse(name, sent, weighted) for name, sent in groups.items()]


def aggregate_layers(
    contributions: Sequence[Contribution], *, weighted: bool = True
) -> list[tuple[str, torch.Tensor]]:
    """FedAvgDynamicLayer's aggregation: per name, ``sum(layer * n) / sum(n)`` or ``sum(layer) / count``.

    Over the contributions that sent the name, in FL4Health's order (:func:`fl4health_order`), names in
    order of first appearance; the inputs are left
    untouched and never returned as they are.

    Computed as FL4Health computes it, in numpy: ``layer * n`` per contribution, summed in order with
    ``np.add``, divided by the total, with the promotion rules of this process's numpy (integer
    layers divide to float64; float16 and float32 sum to float32; in float16 under numpy 2 ``n`` is
    first rounded to float16, so 1000 examples of a 100.0 make inf, while numpy 1 widens the float16
    layer for an ``n`` above 255) and its broadcasting. Under numpy 2 a count the layer's integer
    dtype cannot hold (``uint8 * 300``) is refused, as FL4Health fails on it. A name any of whose
    layers is bfloat16, which numpy lacks (so FL4Health never sees one), is computed with the same
    formula in torch, with torch's promotion.
    """
    counts = _checked_counts(contributions, "layers")
    groups: dict[str, list[_Sent]] = {}
    for index in fl4health_order(contributions):
        contribution, count = contributions[index], counts[index]
        for name, layer in contribution.layers:
            groups.setdefault(name, []).append(_Sent(index, count, tuple(layer.shape), layer.detach()))
    with torch.no_grad():
        return [(name, _average_layer(name, sent, weighted)) for name, sent in groups.items()]


def _average_layer(name: str, sent: list[_Sent], weighted: bool) -> torch.Tensor:
    _check_broadcast(name, sent)
    if any(s.values.dtype == torch.bfloat16 for s in sent):
        return _average_layer_torch(sent, weighted)
    return _average_layer_numpy(name, sent, weighted)


def _average_layer_torch(sent: list[_Sent], weighted: bool) -> torch.Tensor:
    total = 0
    acc: torch.Tensor | None = None
    for s in sent:
        term = s.values * s.count if weighted else s.values
        total += s.count if weighted else 1
        acc = term if acc is None else torch.add(acc, term)
    assert acc is not None  # every group has at least one entry
    return acc / total


def _average_layer_numpy(name: str, sent: list[_Sent], weighted: bool) -> torch.Tensor:
    total = 0
    acc: np.ndarray | None = None
    # Overflow to inf (float16 weighting, say) is part of the result, not something to warn about.
    with np.errstate(all="ignore"):
        for s in sent:
            # A 0-d layer stays a 0-d array, as FL4Health receives it: numpy 1 promotes those as scalars.
            array = s.values.cpu().numpy()
            try:
                term = array * s.count if weighted else array
            except OverflowError as error:  # NEP 50: the count must fit the layer's integer dtype
                raise InvalidArgument(
                    f"tensor {name!r} in contributions[{s.index}] is {array.dtype}, which cannot hold its "
                    f"num_examples {s.count}: FL4Health's FedAvgDynamicLayer fails on layer * num_examples "
                    f"with this numpy ({error})"
                ) from None
            total += s.count if weighted else 1
            acc = term if acc is None else np.add(acc, term)
        assert acc is not None  # every group has at least one entry
        # A 0-d array divides to a numpy scalar: asarray makes it an array again, torch needs one.
        return torch.from_numpy(np.asarray(acc / total))


def _average_sparse(name: str, sent: list[_Sent], weighted: bool) -> SparseTensor:
    if any(s.shape != sent[0].shape for s in sent):
        return _average_sparse_dense(name, sent, weighted)
    shape = sent[0].shape
    numel = _numel(shape)
    total = 0
    acc: torch.Tensor | None = None
    for s in sent:
        assert s.positions is not None
        unique, summed = _coalesced(s.values, s.positions, numel)
        term = summed * s.count if weighted else summed
        total += s.count if weighted else 1
        if acc is None:
            # dense * n: zero everywhere but the sent positions (0 * n is 0 in every dtype).
            acc = torch.zeros(numel, dtype=term.dtype)
            acc.index_copy_(0, unique, term)
            continue
        # torch.add(acc, dense * n) in their common dtype (both have the same shape, so torch's
        # promotion is promote_types'): both operands are cast to it, then only the sent positions
        # change; the rest add an exact 0.
        common = torch.promote_types(acc.dtype, term.dtype)
        acc, term = acc.to(common), term.to(common)
        acc.index_copy_(0, unique, torch.add(acc.index_select(0, unique), term))
    assert acc is not None  # every group has at least one entry
    nonzero = torch.from_numpy(np.flatnonzero((acc != 0).numpy()).astype(np.int64, copy=False))
    quotient = acc.index_select(0, nonzero) / total
    kept = quotient != 0  # a quotient can underflow to zero; FL4Health's nonzero() drops it
    if not bool(kept.all()):
        nonzero, quotient = nonzero[kept], quotient[kept]
    return SparseTensor(name, shape, quotient, nonzero)


def _average_sparse_dense(name: str, sent: list[_Sent], weighted: bool) -> SparseTensor:
    """Shapes that differ: FL4Health's own dense computation, broadcasting and all."""
    _check_broadcast(name, sent)
    total = 0
    acc: torch.Tensor | None = None
    for s in sent:
        term = _dense_term(s, weighted)
        total += s.count if weighted else 1
        acc = term if acc is None else torch.add(acc, term)
        del term  # freed before the next contribution's is built: the server reserves one at a time
    assert acc is not None  # every group has at least one entry
    flat = (acc / total).reshape(-1)
    nonzero = torch.nonzero(flat, as_tuple=True)[0]
    return SparseTensor(name, tuple(acc.shape), flat.index_select(0, nonzero), nonzero)


def _dense_term(s: _Sent, weighted: bool) -> torch.Tensor:
    """One contribution densified (``to_dense()``, repeats summed) and weighted, as FL4Health does."""
    assert s.positions is not None
    dense = torch.zeros(_numel(s.shape), dtype=s.values.dtype)
    dense.index_put_((s.positions,), s.values, accumulate=True)  # sums repeats as to_dense() does
    dense = dense.reshape(s.shape)
    return dense * s.count if weighted else dense


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


def _check_broadcast(name: str, sent: list[_Sent]) -> None:
    """Refuse shapes that do not broadcast together (np.add and torch.add fail on them)."""
    shape: tuple[int, ...] = ()
    for position, s in enumerate(sent):
        joined = _broadcast(shape, s.shape)
        if joined is None:
            # Some earlier contribution's shape clashes with this one (the joined shape got each of
            # its sizes above 1 from one of them): name the first.
            other = next(e for e in sent[:position] if _broadcast(e.shape, s.shape) is None)
            raise InvalidArgument(
                f"tensor {name!r} has shape {s.shape} in contributions[{s.index}] "
                f"but {other.shape} in contributions[{other.index}], and the two do not broadcast together"
            )
        shape = joined


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy's (and torch's) broadcast of two shapes; None when they do not broadcast."""
    joined: list[int] = []
    for index in range(1, max(len(a), len(b)) + 1):
        x = a[-index] if index <= len(a) else 1
        y = b[-index] if index <= len(b) else 1
        if x != y and x != 1 and y != 1:
            return None
        joined.append(y if x == 1 else x)
    return tuple(reversed(joined))


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
