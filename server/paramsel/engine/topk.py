"""Top-k selection of individual entries, as FL4Health's SparseCooParameterExchanger selects them.

FL4Health sorts all N scores to read off the k-th largest; the same value is found in O(N) (see
``kth.py``), which is what makes 50M-entry models cheap. Everything else (the per-tensor comparison,
which entries are sent) uses the very torch ops FL4Health uses, so the selection is identical, ties
and rounding included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from .errors import InvalidArgument
from .kth import find_kth
from .needs import Reserve, dropped_zeros_need, selected_need, ties_need
from .scores import ScoreFunction, score_tensors
from .state import State, require_fraction, require_nonempty


@dataclass(frozen=True)
class SparseTensor:
    """The sent entries of one model tensor, in flat row-major coordinates."""

    name: str
    """The state-dict key of the tensor."""
    shape: tuple[int, ...]
    """The full (dense) shape of the tensor."""
    values: torch.Tensor
    """1-D, in the tensor's dtype, in row-major order."""
    positions: torch.Tensor
    """1-D int64 flat row-major positions; strictly increasing when produced by a selection."""


@dataclass(frozen=True)
class TopKResult:
    """What a top-k selection sends, and the figures that explain it."""

    tensors: list[SparseTensor]
    """In state order; only tensors with at least one sent entry."""
    total_entries: int
    """N: the entries of every state tensor, 0-d and empty ones included."""
    k: int
    """``ceil(N * sparsity_level)``."""
    threshold: float
    """The k-th largest score; a Python int when every score is integral, as ``Tensor.item()`` gives."""
    selected_entries: int
    """Entries whose score is >= threshold over the whole state, including those that are not sent."""


def select_top_k(
    current: State,
    initial: State | None,
    *,
    sparsity_level: float,
    score_function: ScoreFunction,
    exact_k: bool = False,
    overwrite_initial: bool = False,
    reserve: Reserve | None = None,
) -> TopKResult:
    """Select the entries whose score is at least the k-th largest; see DESIGN.md "Semantics".

    ``exact_k`` (beyond FL4Health) selects exactly k: of the entries tied at the threshold, only the
    earliest in the state (state order, then row-major) are taken, as many as k leaves room for.
    ``overwrite_initial`` lets the scores be written over ``initial``'s tensors (see ``score_tensors``).
    ``reserve`` is given, before each is allocated, what only the scores decide: the k-th search's
    candidates and band, and each tensor's selected entries (see :mod:`paramsel.engine.needs`); what the
    shapes decide is :func:`paramsel.engine.budget.top_k_work`.
    """
    require_fraction("sparsity_level", sparsity_level)
    require_nonempty(current)
    scores = score_tensors(score_function, current, initial, overwrite_initial=overwrite_initial)
    return select_top_k_by_scores(
        current, scores, sparsity_level=sparsity_level, exact_k=exact_k, reserve=reserve
    )


def select_top_k_by_scores(
    current: State,
    scores: Mapping[str, torch.Tensor],
    *,
    sparsity_level: float,
    exact_k: bool = False,
    reserve: Reserve | None = None,
) -> TopKResult:
    """:func:`select_top_k` with scores computed elsewhere (a caller's own score function, or scores
    a client sent with ``SCORE_FUNCTION_SUPPLIED``).

    As FL4Health does with whatever its score function returns: the threshold is the k-th largest of
    all of ``scores``' entries, and each state tensor is masked by ``scores[name]``. ``scores`` must
    hold exactly one tensor per state tensor, of its name and shape (any dtype; several are compared as
    :func:`paramsel.engine.kth.find_kth` compares them); anything else is :class:`InvalidArgument`.
    """
    require_fraction("sparsity_level", sparsity_level)
    require_nonempty(current)
    scores = dict(scores)  # emptied below as tensors are done; the caller's mapping stays whole
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor):
            raise InvalidArgument(f"the score of {name!r} is a {type(score).__name__}, not a tensor")
        if name not in current:
            raise InvalidArgument(
                f"the scores have a tensor for {name!r}, which the model state does not have"
            )
    for name, tensor in current.items():
        if name not in scores:
            raise InvalidArgument(f"the scores have no tensor for {name!r}, which the model state has")
        if tuple(scores[name].shape) != tuple(tensor.shape):
            raise InvalidArgument(
                f"the score of {name!r} has shape {tuple(scores[name].shape)}, but the tensor has "
                f"{tuple(tensor.shape)}"
            )
    for name, score in scores.items():
        score = scores[name] = score.detach()
        _reject_non_finite(name, score)
    total = sum(score.numel() for score in scores.values())
    if total == 0:
        raise InvalidArgument("every tensor of the model state is empty: there are no entries to select")
    k = math.ceil(total * sparsity_level)
    kth = find_kth(list(scores.values()), k, collect=not exact_k, reserve=reserve, names=list(scores))
    threshold = kth.value
    candidates = dict(zip(scores, kth.candidates, strict=True)) if kth.candidates is not None else {}

    sent: list[SparseTensor] = []
    selected_entries = 0
    with torch.no_grad():
        # Room left for tied entries under exact_k: k minus everything strictly above the threshold.
        # (count_nonzero, not sum: a bool sum widens the mask to int64 first.)
        room = (
            k - sum(int(torch.count_nonzero(score > threshold)) for score in scores.values())
            if exact_k
            else 0
        )
        for name, tensor in current.items():
            # A Python scalar on the right makes torch round it to the tensor's dtype (float16, say)
            # or compare integers in the default float dtype, exactly as FL4Health's comparison does.
            score = scores.pop(name)  # each score goes as soon as its tensor is done
            value_size = tensor.element_size()
            if exact_k:
                positions, room = _exactly(name, score, threshold, room, value_size, reserve)
            elif name in candidates and score.dtype == kth.dtype:
                # Every entry at or above the threshold is a candidate, and compared in the same dtype.
                kept, kept_scores = candidates.pop(name)
                # The threshold is exact in their dtype; as a scalar of that dtype it compares the same
                # way on numpy 1.x (value-based casting) and 2.x (NEP 50).
                positions = _where(
                    name, kept_scores >= kept_scores.dtype.type(threshold), value_size, reserve, kept
                )
                del kept, kept_scores
            else:
                positions = _where(name, (score >= threshold).reshape(-1).numpy(), value_size, reserve)
            selected_entries += positions.size
            if tensor.dim() == 0 or positions.size == 0:
                continue
            sparse = _sent_entries(name, tensor.detach(), positions, reserve)
            del positions  # with zeros dropped, these are not the answer's: freed before the next tensor's
            if sparse is not None:
                sent.append(sparse)
    return TopKResult(sent, total, k, threshold, selected_entries)


Positions = np.ndarray[tuple[int], np.dtype[np.intp]]


def _where(
    name: str,
    mask: np.ndarray[tuple[int], np.dtype[np.bool_]],
    value_size: int,
    reserve: Reserve | None,
    among: Positions | None = None,
) -> Positions:
    """The positions ``mask`` selects (of ``among``, else flat ones), their answer reserved first."""
    if reserve is not None:
        reserve(selected_need(name, int(np.count_nonzero(mask)), value_size, mask.nbytes))
    return np.flatnonzero(mask) if among is None else among[mask]


def _exactly(
    name: str, score: torch.Tensor, threshold: float, room: int, value_size: int, reserve: Reserve | None
) -> tuple[Positions, int]:
    """Positions above the threshold plus the first ``room`` tied ones; returns the room left."""
    flat = score.reshape(-1)
    mask = (flat > threshold).numpy()
    if room > 0:
        tied = (flat == threshold).numpy()
        ties = int(np.count_nonzero(tied))
        if ties <= room:
            mask |= tied  # every tie fits: no positions needed
        else:  # only the first ``room`` ties: once per call, as no room is left after
            if reserve is not None:
                reserve(ties_need(name, ties, flat.numel()))
            mask[np.flatnonzero(tied)[:room]] = True  # a mask, not a merge of sorted lists: O(n), no sort
        room -= min(ties, room)
        del tied
    return _where(name, mask, value_size, reserve), room


def _reject_non_finite(name: str, score: torch.Tensor) -> None:
    if score.numel() == 0 or not (score.is_floating_point() or score.is_complex()):
        return
    # One pass, no mask: min and max both turn NaN when any entry is NaN, and are infinite
    # exactly when some entry is.
    low, high = torch.aminmax(score)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise InvalidArgument(f"tensor {name!r} has a NaN or infinite score; no threshold can be taken")


def _sent_entries(
    name: str,
    tensor: torch.Tensor,
    selected: np.ndarray[tuple[int], np.dtype[np.intp]],
    reserve: Reserve | None = None,
) -> SparseTensor | None:
    positions = torch.from_numpy(selected.astype(np.int64, copy=False))
    values = tensor.reshape(-1).index_select(0, positions)
    # FL4Health masks unselected entries to zero and sends the non-zeros, so a selected zero
    # (or -0.0) is dropped; checking only the selected values keeps this O(k), not O(N).
    nonzero = values != 0
    if not bool(nonzero.all()):
        if reserve is not None:
            reserve(dropped_zeros_need(name, positions.numel(), values.element_size()))
        positions = positions[nonzero]
        values = values[nonzero]
        if positions.numel() == 0:
            return None
    return SparseTensor(name, tuple(tensor.shape), values, positions)
