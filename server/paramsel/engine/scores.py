"""The six FL4Health score functions: one score per model entry, higher means more worth sending."""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch

from .errors import FailedPrecondition, InvalidArgument
from .state import State, check_same_layout, require_not_bool


class ScoreFunction(enum.Enum):
    """How an entry is scored; ``w`` is its current value and ``w0`` its value in the initial model."""

    LARGEST_FINAL_MAGNITUDE = "largest_final_magnitude"
    """``|w|``"""
    SMALLEST_FINAL_MAGNITUDE = "smallest_final_magnitude"
    """``-|w|``"""
    LARGEST_MAGNITUDE_CHANGE = "largest_magnitude_change"
    """``|w - w0|``"""
    SMALLEST_MAGNITUDE_CHANGE = "smallest_magnitude_change"
    """``-|w - w0|``"""
    LARGEST_INCREASE_IN_MAGNITUDE = "largest_increase_in_magnitude"
    """``|w| - |w0|``"""
    SMALLEST_INCREASE_IN_MAGNITUDE = "smallest_increase_in_magnitude"
    """``-(|w| - |w0|)``"""

    @property
    def needs_initial_model(self) -> bool:
        return self not in (ScoreFunction.LARGEST_FINAL_MAGNITUDE, ScoreFunction.SMALLEST_FINAL_MAGNITUDE)


# Each formula is applied with torch ops in the tensor's own dtype, as FL4Health does, so integer
# buffers score as integers and unsigned ones wrap exactly as torch wraps them. The trailing in-place
# ops give the same bits as their out-of-place forms while sparing an N-sized temporary.
_FORMULAS: dict[ScoreFunction, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ScoreFunction.LARGEST_FINAL_MAGNITUDE: lambda w, w0: torch.abs(w),
    ScoreFunction.SMALLEST_FINAL_MAGNITUDE: lambda w, w0: torch.abs(w).neg_(),
    ScoreFunction.LARGEST_MAGNITUDE_CHANGE: lambda w, w0: torch.sub(w, w0).abs_(),
    ScoreFunction.SMALLEST_MAGNITUDE_CHANGE: lambda w, w0: torch.sub(w, w0).abs_().neg_(),
    ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE: lambda w, w0: torch.abs(w).sub_(torch.abs(w0)),
    ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE: lambda w, w0: torch.abs(w).sub_(torch.abs(w0)).neg_(),
}


# The same scores written over w0, for a caller that no longer needs the initial model: no N-sized
# allocation at all for the change functions. Each gives the bits of its formula above, signed zeros
# included: a - b is a + (-b) exactly, and IEEE addition commutes.
_OVER_INITIAL: dict[ScoreFunction, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    ScoreFunction.LARGEST_MAGNITUDE_CHANGE: lambda w, w0: torch.sub(w, w0, out=w0).abs_(),
    ScoreFunction.SMALLEST_MAGNITUDE_CHANGE: lambda w, w0: torch.sub(w, w0, out=w0).abs_().neg_(),
    ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE: lambda w, w0: w0.abs_().neg_().add_(torch.abs(w)),
    ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE: lambda w, w0: w0.abs_().neg_().add_(torch.abs(w)).neg_(),
}


def formula(fn: ScoreFunction) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``fn``'s formula as :func:`score_tensors` applies it out of place (``w0`` is ``w`` for the
    final-magnitude functions)."""
    return _FORMULAS[fn]


def written_over_initial(fn: ScoreFunction, dtype: torch.dtype) -> bool:
    """Whether ``score_tensors(..., overwrite_initial=True)`` writes ``fn``'s scores of a tensor of
    ``dtype`` over the initial model's tensor instead of a new one."""
    return fn in _OVER_INITIAL and dtype.is_floating_point


def require_initial(fn_name: str, initial: State | None) -> State:
    if initial is None:
        raise FailedPrecondition(f"{fn_name} needs the initial model, but none was given")
    return initial


def score_tensors(
    fn: ScoreFunction, current: State, initial: State | None, *, overwrite_initial: bool = False
) -> dict[str, torch.Tensor]:
    """Score every entry of ``current``, in state order; each score tensor has its tensor's shape.

    ``initial`` is ignored by the final-magnitude functions, as in FL4Health. With
    ``overwrite_initial`` the change functions write the scores over the initial model's tensors,
    for a caller that has no further use for them (a server scoring a model it was just sent).
    """
    if fn.needs_initial_model:
        initial = require_initial(fn.value, initial)
        check_same_layout(current, initial)
    out_of_place = _FORMULAS[fn]
    scores: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tensor in current.items():
            require_not_bool(name, tensor)
            w = tensor.detach()
            # The final-magnitude formulas never read w0; passing w keeps one signature for all six.
            w0 = initial[name].detach() if initial is not None and fn.needs_initial_model else w
            try:
                # In place only where the result has w0's dtype and shape: floats (ints wrap the same,
                # but torch has no in-place abs for every integer dtype; keep those out of it).
                if overwrite_initial and w0.dtype == w.dtype and written_over_initial(fn, w.dtype):
                    scores[name] = _OVER_INITIAL[fn](w, w0)
                else:
                    scores[name] = out_of_place(w, w0)
            except RuntimeError as err:
                # e.g. torch has no abs for uint16/32/64: a dtype the caller cannot use with this criterion.
                raise InvalidArgument(f"tensor {name!r} of dtype {w.dtype} cannot be scored: {err}") from err
    return scores
