"""Seeded random-k (UPDATE_SELECTION_RANDOM_K in proto/paramsel/v1/criteria.proto), per tensor.

Of every tensor with at least one dimension and n >= 1 entries, k_t = ceil(n x sparsity_level) flat
row-major positions are drawn (the product rounded as top-k's k is, in binary64), all of them sent, zeros
included, in increasing order. Tensor j (its index in state order, every tensor counted from 0) draws
with seed s_j = (seed + j) mod 2^64, so that every client of a round that shares ``seed`` sends the same
positions, and a receiver can draw them again from (s_j, n, k_t) instead of reading them.

The draw itself - SplitMix64 keys, the k_t smallest - is the wire codec's
(:func:`paramsel.wire.seeded.seeded_positions`), which both this selection and the position decoder
must use, and which the engine may not import (it imports nothing of paramsel but itself): the caller
hands it in as ``draw``, a :data:`PositionDraw`. One implementation, so that what is selected and what is
decoded cannot drift apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidArgument
from .state import State, require_fraction, require_nonempty
from .topk import SparseTensor, TopKResult

PositionDraw = Callable[[int, int, int], npt.NDArray[np.int64]]
"""``draw(seed, numel, count)``: the ``count`` strictly increasing int64 flat positions of seeded
random-k among ``numel`` (see the module docstring); the servicer passes
:func:`paramsel.wire.seeded.seeded_positions`."""

ValuesAt = Callable[[str, torch.Tensor], torch.Tensor]
"""``values_at(name, positions)``: the values to send of tensor ``name`` at flat int64 ``positions``."""

SEED_MODULUS = 1 << 64


@dataclass(frozen=True)
class SparseUpdateResult(TopKResult):
    """A sparse update's selection: a :class:`~paramsel.engine.TopKResult` of the update's entries.

    For random-k, ``threshold`` is 0 and ``k`` and ``selected_entries`` are the sum of the tensors'
    k_t, all of which are sent; ``seeds`` gives each sent tensor's s_j (empty for top-k)."""

    seeds: Mapping[str, int] = field(default_factory=dict)
    """Random-k: the seed each sent tensor's positions were drawn from, by name."""


def tensor_seed(seed: int, index: int) -> int:
    """s_j = (seed + j) mod 2^64: the seed of the tensor at ``index`` in state order."""
    return (seed + index) % SEED_MODULUS


def random_k_count(shape: tuple[int, ...], sparsity_level: float) -> int:
    """k_t: ``ceil(n x sparsity_level)`` of a tensor of ``shape`` (n its entries); 0 for a 0-d or an
    empty tensor, which random-k skips."""
    numel = math.prod(shape)
    if not shape or numel == 0:
        return 0
    return math.ceil(numel * sparsity_level)


def require_seed(seed: int) -> None:
    if not 0 <= seed < SEED_MODULUS:
        raise InvalidArgument(f"seed must be a uint64 (0 to 2^64 - 1), got {seed}")


def select_random_k(
    current: State,
    values_at: ValuesAt,
    *,
    sparsity_level: float,
    seed: int,
    draw: PositionDraw,
) -> SparseUpdateResult:
    """Random-k of the tensors of ``current`` (their names, shapes and order; ``values_at`` gives the
    values sent at the positions drawn). Everything it allocates follows from the shapes:
    :func:`paramsel.engine.budget.sparse_update_work`."""
    require_fraction("sparsity_level", sparsity_level)
    require_nonempty(current)
    require_seed(seed)
    total = sum(t.numel() for t in current.values())
    if total == 0:
        raise InvalidArgument("every tensor of the model state is empty: there are no entries to select")
    sent: list[SparseTensor] = []
    seeds: dict[str, int] = {}
    k = 0
    for index, (name, tensor) in enumerate(current.items()):
        shape = tuple(tensor.shape)
        count = random_k_count(shape, sparsity_level)
        if count == 0:
            continue
        s_j = tensor_seed(seed, index)
        positions = torch.from_numpy(np.ascontiguousarray(draw(s_j, tensor.numel(), count), dtype=np.int64))
        if positions.numel() != count:  # pragma: no cover - a draw that breaks its contract
            raise AssertionError(f"{name!r}: {positions.numel()} positions drawn, not {count}")
        sent.append(SparseTensor(name, shape, values_at(name, positions), positions))
        seeds[name] = s_j
        k += count
    return SparseUpdateResult(sent, total, k, 0, k, seeds)
