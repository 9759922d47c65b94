"""Sparse updates with error feedback (SparseUpdateCriterion in proto/paramsel/v1/criteria.proto).

Beyond FL4Health: instead of entries of the model w, entries of the update u = (w - w0) + r are sent, w0
the initial model and r the residual the caller carried from its previous round (zero for a tensor it
has none of). Arithmetic per tensor in the model tensor's dtype, as torch computes it elementwise: first
w - w0, rounded to that dtype, then + r, rounded again; bool tensors are refused (torch has no
subtraction for them).

Which entries: top-k by |u| over the whole state (TopKCriterion's rule, with |u| as the scores, so
:func:`~paramsel.engine.select_top_k` over u with LARGEST_FINAL_MAGNITUDE), or seeded random-k per
tensor (:mod:`paramsel.engine.random_k`). Random-k computes u only at the positions it draws: an
elementwise formula gives the same bits on the gathered entries as on the whole tensor.

The engine keeps nothing between calls: the caller computes its next residual from what it sent.
"""

from __future__ import annotations

import enum

import torch

from .errors import InvalidArgument
from .needs import Reserve
from .random_k import PositionDraw, SparseUpdateResult, require_seed, select_random_k
from .scores import ScoreFunction, require_initial
from .state import State, check_same_layout, require_fraction, require_nonempty, require_not_bool
from .topk import select_top_k

CRITERION = "sparse_update"
"""The criterion's name in messages (the Criterion oneof's field)."""


class UpdateSelection(enum.Enum):
    """Which entries of the update are sent."""

    TOP_K = "top_k"
    """The k = ceil(N x sparsity_level) entries of largest |u| over the whole state (ties as top-k's)."""
    RANDOM_K = "random_k"
    """Seeded random-k, per tensor (see :mod:`paramsel.engine.random_k`)."""


def check_update_inputs(current: State, initial: State | None, residual: State | None) -> State:
    """The initial model (required: :class:`FailedPrecondition` without it), checked against the current
    one; the residual's tensors checked against the model's (names, dtypes, shapes); no bool tensors."""
    initial = require_initial(CRITERION, initial)
    check_same_layout(current, initial)
    for name, tensor in current.items():
        require_not_bool(name, tensor)
    for name, r in (residual or {}).items():
        w = current.get(name)
        if w is None:
            raise InvalidArgument(f"the residual has a tensor {name!r}, which the model state does not have")
        if r.dtype != w.dtype:
            raise InvalidArgument(
                f"the residual of {name!r} has dtype {r.dtype}, but the tensor has {w.dtype}"
            )
        if tuple(r.shape) != tuple(w.shape):
            raise InvalidArgument(
                f"the residual of {name!r} has shape {tuple(r.shape)}, but the tensor has {tuple(w.shape)}"
            )
    return initial


def update_of(
    name: str, w: torch.Tensor, w0: torch.Tensor, r: torch.Tensor | None, *, overwrite_initial: bool = False
) -> torch.Tensor:
    """u = (w - w0) + r of one tensor (any shape: whole, or entries gathered from each), in its dtype.

    ``overwrite_initial`` writes u over ``w0`` (same bits: a - b into a's or b's memory is a - b).
    """
    try:
        with torch.no_grad():
            u = torch.sub(w, w0, out=w0) if overwrite_initial else torch.sub(w, w0)
            if r is not None:
                u.add_(r)
    except RuntimeError as err:
        # e.g. torch has no subtraction for uint16/32/64.
        raise InvalidArgument(f"tensor {name!r} of dtype {w.dtype} has no update w - w0: {err}") from err
    return u


def select_sparse_update(
    current: State,
    initial: State | None,
    residual: State | None = None,
    *,
    sparsity_level: float,
    selection: UpdateSelection = UpdateSelection.TOP_K,
    exact_k: bool = False,
    seed: int = 0,
    draw: PositionDraw | None = None,
    overwrite_initial: bool = False,
    reserve: Reserve | None = None,
) -> SparseUpdateResult:
    """Selects entries of the update u = (w - w0) + r (see the module docstring).

    ``residual`` holds at most one tensor per model tensor, of its name, dtype and shape; ``exact_k`` is
    top-k's; ``seed`` and ``draw`` (:func:`paramsel.wire.seeded.seeded_positions`) are random-k's.
    ``overwrite_initial`` lets top-k write u over ``initial``'s tensors (a caller that has no further use
    for them). ``reserve`` is top-k's (what only the scores decide); the rest is
    :func:`paramsel.engine.budget.sparse_update_work`.
    """
    require_fraction("sparsity_level", sparsity_level)
    require_nonempty(current)
    w0s = check_update_inputs(current, initial, residual)
    residual = residual or {}
    if selection is UpdateSelection.RANDOM_K:
        require_seed(seed)
        if draw is None:
            raise InvalidArgument("random-k needs the position draw (paramsel.wire.seeded.seeded_positions)")

        def values_at(name: str, positions: torch.Tensor) -> torch.Tensor:
            def gathered(tensor: torch.Tensor) -> torch.Tensor:
                return tensor.detach().reshape(-1).index_select(0, positions)

            r = residual.get(name)
            return update_of(
                name,
                gathered(current[name]),
                gathered(w0s[name]),
                None if r is None else gathered(r),
                overwrite_initial=True,  # the gathered copy of w0 is this function's own
            )

        return select_random_k(current, values_at, sparsity_level=sparsity_level, seed=seed, draw=draw)
    updates = {}
    for name, w in current.items():
        r = residual.get(name)
        updates[name] = update_of(
            name,
            w.detach(),
            w0s[name].detach(),
            None if r is None else r.detach(),
            overwrite_initial=overwrite_initial,
        )
    result = select_top_k(
        updates,
        None,
        sparsity_level=sparsity_level,
        score_function=ScoreFunction.LARGEST_FINAL_MAGNITUDE,
        exact_k=exact_k,
        reserve=reserve,
    )
    return SparseUpdateResult(
        result.tensors, result.total_entries, result.k, result.threshold, result.selected_entries
    )
