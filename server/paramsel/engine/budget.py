"""What a computation will allocate, worked out from what a request declares, before anything is built.

A request of a few dozen bytes can declare a sparse tensor of 2**31 entries: aggregating it builds a
dense accumulator of that shape, pulling it a dense tensor. These functions give, from the declarations
alone (names, dtypes, shapes, entry counts), an upper bound of the bytes the matching engine function
holds at its peak - its answer and its scratch - at the dtypes it computes in, so that a server can
reserve them, or refuse the call, first. Nothing here allocates more than a few empty tensors: the
dtypes a computation promotes to are found by running its own promotion (torch's, or this process's
numpy's) on empty stand-ins.

Each tensor's figure is a :class:`Need`: ``held`` bytes stay until the call ends (the answer, and what
it is built from), ``scratch`` bytes only while that tensor is computed. The engine computes one tensor
at a time, so a :class:`Work` is the sum of every ``held`` plus the largest ``scratch``.

A selection (Select, Push) is planned here too: scores, the k-th search's fixed scratch, drift norms,
FedPM masks. What only its data decides (the k-th search's candidates, the selected entries, ties) the
engine reserves itself as it computes, from counts it has just taken (see :mod:`paramsel.engine.needs`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fedpm import is_fedpm_score
from .kth import partition_entry_bytes, sample_bytes, samples
from .needs import Need as Need  # re-exported: defined beside the engine's own reservations
from .needs import Work as Work
from .per_coordinate import answer_dtype, dense_accumulators
from .pull import PullMode
from .random_k import random_k_count
from .rounding import ROUNDING_SCRATCH_BYTES
from .scores import ScoreFunction, formula, written_over_initial
from .state import TensorSpec
from .updates import UpdateSelection

# Scratch per sent entry of the tensor being computed, on top of the entries' own dtype (``w`` bytes
# each): masks, sort and unique buffers, index copies. An upper bound of what the O(nnz) steps of the
# sparse aggregation and of a sparse pull hold at once.
ENTRY_SCRATCH_BYTES = 32
ENTRY_SCRATCH_VALUES = 4
# Dense scratch of a sparse aggregation, in accumulators of the widest dtype: the accumulator and one
# more of its size (its cast to a wider dtype, or its != 0 mask) when every shape agrees; with
# broadcasting, the densified contribution and its weighted copy beside the old and the new sum.
SAME_SHAPE_ACCUMULATORS = 2
BROADCAST_ACCUMULATORS = 4
# A layer aggregation holds the running sum, the next weighted term and the new sum (weighted), or the
# two sums (unweighted), at most.
WEIGHTED_LAYER_ARRAYS = 3
UNWEIGHTED_LAYER_ARRAYS = 2
# FedPM's pull, -log(1 / x - 1), holds two whole intermediate tensors at a time.
FEDPM_INTERMEDIATES = 2
# Score tensors each formula makes beside the scores themselves: |w| - |w0| computes |w0| apart (and,
# written over w0, |w|).
SCORE_TEMPORARIES = {
    ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE: 1,
    ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE: 1,
}
# Bool masks over one tensor's entries that a top-k selection holds at once: the k-th search's counting
# pass keeps one beside each comparison, exact_k the strictly-above mask beside the tied one.
SELECTION_MASKS = 2
# Per-coordinate averaging, per slot (an element of the name's shape, or one of the distinct positions
# sent): float64 sums and weights, and the weights' != 0 mask. Per entry sent, when the slots are the
# distinct positions: all positions joined, np.unique's sorted copy and its mask. Per answer entry, beside
# the answer: the sums and weights gathered there and their float64 quotient.
PER_COORDINATE_SLOT_BYTES = 8 + 8 + 1
PER_COORDINATE_JOIN_BYTES = 8 + 8 + 1
PER_COORDINATE_QUOTIENT_BYTES = 3 * 8
# FedPM's masks: int64 (held). Beside one, per entry of its score tensor: its float64 probability, as
# many uniform draws and their bool comparison, less the mask itself (counted as held); before the draws,
# the sigmoid in the tensor's own float dtype and its float64 copy take less.
FEDPM_MASK_BYTES = 8
FEDPM_SCRATCH_BYTES = 8 + 8 + 1 - FEDPM_MASK_BYTES
# Packed (1 bit per entry, held): the bool comparison is packed, so the probabilities, draws and
# comparison are all scratch.
FEDPM_PACKED_SCRATCH_BYTES = 8 + 8 + 1


@dataclass(frozen=True)
class SparseSpec:
    """A declared sparse tensor: ``nnz`` values of ``dtype`` in a dense ``shape``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nnz: int


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def broadcast_shape(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...] | None:
    """numpy's (and torch's) broadcast of ``shapes``; None when they do not broadcast together."""
    joined: tuple[int, ...] = ()
    for shape in shapes:
        out: list[int] = []
        for index in range(1, max(len(joined), len(shape)) + 1):
            x = joined[-index] if index <= len(joined) else 1
            y = shape[-index] if index <= len(shape) else 1
            if x != y and x != 1 and y != 1:
                return None
            out.append(y if x == 1 else x)
        joined = tuple(reversed(out))
    return joined


def entry_scratch(entries: int, widest: int) -> int:
    """Scratch of the O(nnz) steps over ``entries`` entries computed in ``widest``-byte values."""
    return entries * (ENTRY_SCRATCH_BYTES + ENTRY_SCRATCH_VALUES * widest)


def _over(shape: tuple[int, ...], element_bytes: int) -> str:
    return f"over shape {list(shape)} at {_bytes(element_bytes)} per element"


def _bytes(count: int) -> str:
    return f"{count} byte" if count == 1 else f"{count} bytes"


# --- Aggregate --------------------------------------------------------------------------------------


def aggregate_sparse_work(
    contributions: Sequence[tuple[int, Sequence[SparseSpec]]],
    *,
    weighted: bool = True,
    value_dtype: torch.dtype | None = None,
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.aggregate_sparse` holds, per tensor name.

    ``contributions`` is (num_examples, sparse tensors) per client. Per name: the dense accumulators
    over the (broadcast) shape, at the widest dtype the average passes through (values, weighted terms,
    sums, quotient), as scratch; the answer - at most as many entries as all contributions sent
    (broadcasting repeats entries), values and flat int64 positions - as held; and the O(nnz) scratch.
    With ``value_dtype``, the answer's values rounded to it too (held; :func:`value_cast_need`).
    Names whose shapes do not broadcast need nothing: the engine refuses them before it allocates.
    """
    groups: dict[str, list[tuple[int, SparseSpec]]] = {}
    for count, tensors in contributions:
        for spec in tensors:
            groups.setdefault(spec.name, []).append((count, spec))
    needs = []
    for name, sent in groups.items():
        shapes = [spec.shape for _, spec in sent]
        same = all(shape == shapes[0] for shape in shapes)
        out = shapes[0] if same else broadcast_shape(shapes)
        if out is None:
            continue
        size = numel(out)
        widest, quotient = _sparse_dtypes(sent, weighted, same)
        entries = sum(spec.nnz * (size // max(numel(spec.shape), 1)) for _, spec in sent)
        answer_entries = min(size, entries)
        accumulators = SAME_SHAPE_ACCUMULATORS if same else BROADCAST_ACCUMULATORS
        largest = max(spec.nnz for _, spec in sent)
        held = answer_entries * (itemsize(quotient) + 8)
        scratch = (
            accumulators * size * widest + answer_entries * (9 + 2 * widest) + entry_scratch(largest, widest)
        )
        what = (
            f"{accumulators} dense accumulators {_over(out, widest)} (the widest dtype of the average), "
            f"and an answer of up to {answer_entries} entries"
        )
        needs.append(Need(name, held, scratch, what, answer_entries, out))
        cast = value_cast_need(name, answer_entries, quotient, value_dtype)
        if cast is not None:
            needs.append(cast)
    return Work(tuple(needs))


def value_cast_need(
    name: str, entries: int, dtype: torch.dtype, value_dtype: torch.dtype | None
) -> Need | None:
    """An answer's ``entries`` values of ``dtype`` rounded to ``value_dtype``
    (:func:`~paramsel.engine.round_float`): the copy (held until sent) and, from float64, the rounding's
    scratch; None when no copy is made (no value_dtype, the same dtype, or values that are not floats)."""
    if value_dtype is None or entries <= 0 or dtype == value_dtype or not dtype.is_floating_point:
        return None
    size = itemsize(value_dtype)
    scratch = entries * ROUNDING_SCRATCH_BYTES if dtype == torch.float64 and size < 4 else 0
    what = f"{entries} answer values rounded to {str(value_dtype).removeprefix('torch.')}"
    return Need(name, entries * size, scratch, what)


def aggregate_per_coordinate_work(
    contributions: Sequence[tuple[int, Sequence[SparseSpec]]], *, value_dtype: torch.dtype | None = None
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.aggregate_per_coordinate` holds, per tensor name.

    ``contributions`` is (num_examples, sparse tensors) per client. Per name, with ``entries`` the
    entries all its contributions sent: the answer - at most min(numel, entries) entries, values in the
    answer's dtype and flat int64 positions - as held; as scratch, float64 sums and weights and a mask
    over every element of its shape, or, when the engine averages over the positions sent
    (:func:`~paramsel.engine.per_coordinate.dense_accumulators`), over those positions, with the joined
    positions sorted; the gathered sums and weights and their quotient per answer entry, rounded to the
    answer's dtype (from float64 to a 2-byte float, with the rounding's scratch); and the O(nnz)
    scratch of one contribution at a time in float64. Names whose shapes differ need nothing: the engine
    refuses them before it allocates.
    """
    groups: dict[str, list[SparseSpec]] = {}
    for _, tensors in contributions:
        for spec in tensors:
            groups.setdefault(spec.name, []).append(spec)
    needs = []
    for name, specs in groups.items():
        shape = specs[0].shape
        if any(spec.shape != shape for spec in specs):
            continue
        size = numel(shape)
        entries = sum(spec.nnz for spec in specs)
        answer_entries = min(size, entries)
        dtype = answer_dtype([spec.dtype for spec in specs], value_dtype)
        dense = dense_accumulators(size, entries)
        slots = size if dense else answer_entries
        rounding = ROUNDING_SCRATCH_BYTES if itemsize(dtype) < 4 else 0
        scratch = (
            PER_COORDINATE_SLOT_BYTES * slots
            + (0 if dense else PER_COORDINATE_JOIN_BYTES * entries)
            + answer_entries * (PER_COORDINATE_QUOTIENT_BYTES + rounding)
            + entry_scratch(max(spec.nnz for spec in specs), 8)
        )
        over = f"over shape {list(shape)}" if dense else f"over the {answer_entries} positions sent at most"
        what = (
            f"float64 sums and weights {over}, and an answer of up to {answer_entries} entries in "
            f"{str(dtype).removeprefix('torch.')}"
        )
        held = answer_entries * (itemsize(dtype) + 8)
        needs.append(Need(name, held, scratch, what, answer_entries, shape))
    return Work(tuple(needs))


def _probe(dtype: torch.dtype, ndim: int) -> torch.Tensor:
    """An empty tensor that promotes as a tensor of ``ndim`` dimensions does (0-d ones defer)."""
    return torch.empty((0,) * ndim, dtype=dtype) if ndim else torch.zeros((), dtype=dtype)


def _sparse_dtypes(
    sent: Sequence[tuple[int, SparseSpec]], weighted: bool, same: bool
) -> tuple[int, torch.dtype]:
    """(the widest itemsize the sparse average passes through, the answer's dtype)."""
    widest = 1
    acc: torch.Tensor | None = None
    total = 0
    for count, spec in sent:
        # Same shapes: the engine weighs the flat summed values (1-d); otherwise the dense tensor.
        values = _probe(spec.dtype, 1 if same else len(spec.shape))
        term = values * count if weighted else values
        total += count if weighted else 1
        if acc is None:
            acc = term
        elif same:
            acc = acc.to(torch.promote_types(acc.dtype, term.dtype))
        else:
            acc = torch.add(acc, term)
        widest = max(widest, values.element_size(), term.element_size(), acc.element_size())
    assert acc is not None
    quotient = acc / max(total, 1)
    return max(widest, quotient.element_size()), quotient.dtype


def aggregate_layers_work(
    contributions: Sequence[tuple[int, Sequence[TensorSpec]]],
    *,
    weighted: bool = True,
    value_dtype: torch.dtype | None = None,
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.aggregate_layers` holds, per tensor name.

    Per name: the answer over the broadcast shape in the quotient's dtype (held), and the running sum,
    the next weighted term and the new sum at the widest dtype the average passes through (scratch),
    with this process's numpy promotion (torch's for bfloat16). With ``value_dtype``, the answer rounded
    to it too (held, as a float64 answer's, with the rounding's scratch, whatever the quotient's
    dtype: an upper bound).
    """
    groups: dict[str, list[tuple[int, TensorSpec]]] = {}
    for count, tensors in contributions:
        for spec in tensors:
            groups.setdefault(spec.name, []).append((count, spec))
    needs = []
    for name, sent in groups.items():
        out = broadcast_shape([spec.shape for _, spec in sent])
        if out is None:
            continue
        size = numel(out)
        widest, quotient = _layer_dtypes(sent, weighted)
        arrays = WEIGHTED_LAYER_ARRAYS if weighted else UNWEIGHTED_LAYER_ARRAYS
        what = f"its average and {arrays} sums {_over(out, widest)} (the widest dtype of the average)"
        needs.append(Need(name, size * quotient, arrays * size * widest, what))
        cast = value_cast_need(name, size, torch.float64, value_dtype)
        if cast is not None:
            needs.append(cast)
    return Work(tuple(needs))


def _layer_dtypes(sent: Sequence[tuple[int, TensorSpec]], weighted: bool) -> tuple[int, int]:
    """(the widest itemsize a layer average passes through, the answer's itemsize)."""
    ndims = {len(spec.shape) for _, spec in sent}
    if 0 in ndims and len(ndims) > 1:
        # numpy 1 promotes a 0-d array beside a dimensioned one by its value, which an empty stand-in
        # lacks: count the widest dtype there is.
        return 8, 8
    if any(spec.dtype == torch.bfloat16 for _, spec in sent):
        torch_widest, torch_quotient = _sparse_dtypes(
            [(count, SparseSpec(spec.name, spec.dtype, spec.shape, 0)) for count, spec in sent],
            weighted,
            same=False,
        )
        return torch_widest, itemsize(torch_quotient)
    widest = 1
    acc: np.ndarray | None = None
    total = 0
    with np.errstate(all="ignore"):
        for count, spec in sent:
            array = np.empty((0,) * len(spec.shape), dtype=_numpy_dtype(spec.dtype))
            try:
                term = array * count if weighted else array
            except OverflowError:  # the engine refuses it; count the widest dtype there is
                return 8, 8
            total += count if weighted else 1
            acc = term if acc is None else np.add(acc, term)
            widest = max(widest, array.itemsize, np.asarray(term).itemsize, np.asarray(acc).itemsize)
        assert acc is not None
        quotient = np.asarray(acc / max(total, 1)).itemsize
    return max(widest, quotient), quotient


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


# --- Pull -------------------------------------------------------------------------------------------


def _matching(
    model: Sequence[TensorSpec], entries: Iterable[tuple[str, tuple[int, ...]]]
) -> dict[str, TensorSpec]:
    """The model's specs of the payload entries the engine will compute: a name the model lacks or a
    shape it disagrees with is refused before anything is allocated, and needs nothing."""
    specs = {spec.name: spec for spec in model}
    return {
        name: specs[name] for name, shape in entries if name in specs and tuple(specs[name].shape) == shape
    }


def pull_sparse_work(
    model: Sequence[TensorSpec], payload: Sequence[SparseSpec], *, mode: PullMode = PullMode.REPLACE
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.pull_sparse` holds.

    Per payload tensor: the answer, the model's tensor in its dtype (held); in REPLACE and ADD modes
    the tensor densified in the payload values' dtype when that is not the model's (scratch: ADD adds
    the base into the densified tensor cast to the model's dtype, which is the answer); and the O(nnz)
    scratch.
    """
    specs = _matching(model, ((item.name, item.shape) for item in payload))
    needs = []
    for item in payload:
        spec = specs.get(item.name)
        if spec is None:
            continue
        size = numel(spec.shape)
        held = size * itemsize(spec.dtype)
        widest = max(itemsize(item.dtype), itemsize(spec.dtype))
        densified = (
            size * itemsize(item.dtype) if mode is not PullMode.SCATTER and item.dtype != spec.dtype else 0
        )
        what = f"its answer {_over(spec.shape, itemsize(spec.dtype))}"
        if densified:
            what += f", and the payload densified first at {_bytes(itemsize(item.dtype))} per element"
        needs.append(Need(item.name, held, densified + entry_scratch(item.nnz, widest), what))
    return Work(tuple(needs))


def pull_layers_work(model: Sequence[TensorSpec], payload: Sequence[TensorSpec]) -> Work:
    """An upper bound of what :func:`~paramsel.engine.pull_layers` holds: each answer in the model's
    dtype (counted even where it is the payload tensor itself, uncopied)."""
    specs = _matching(model, ((item.name, item.shape) for item in payload))
    return Work(
        tuple(
            Need(
                item.name,
                numel(spec.shape) * itemsize(spec.dtype),
                0,
                f"its answer {_over(spec.shape, itemsize(spec.dtype))}",
            )
            for item in payload
            if (spec := specs.get(item.name)) is not None
        )
    )


def pull_fedpm_work(model: Sequence[TensorSpec], payload: Sequence[TensorSpec]) -> Work:
    """An upper bound of what :func:`~paramsel.engine.pull_fedpm` holds: each answer in the model's
    dtype, and two intermediates of ``-log(1 / x - 1)`` in the dtype ``1 / x`` gives."""
    specs = _matching(model, ((item.name, item.shape) for item in payload))
    needs = []
    for item in payload:
        spec = specs.get(item.name)
        if spec is None:
            continue
        size = numel(spec.shape)
        inverse = (1 / _probe(item.dtype, 1)).element_size()
        what = (
            f"its answer {_over(spec.shape, itemsize(spec.dtype))}, and {FEDPM_INTERMEDIATES} intermediates "
            f"of -log(1 / x - 1) at {_bytes(inverse)} per element"
        )
        needs.append(Need(item.name, size * itemsize(spec.dtype), FEDPM_INTERMEDIATES * size * inverse, what))
    return Work(tuple(needs))


def pull_work(
    model: Sequence[TensorSpec],
    *,
    sparse: Sequence[SparseSpec] = (),
    dense: Sequence[TensorSpec] = (),
    mode: PullMode = PullMode.REPLACE,
    fedpm: bool = False,
) -> Work:
    """The work of a pull of ``sparse`` or ``dense`` (FedPM probabilities when ``fedpm``) payloads."""
    work = pull_sparse_work(model, sparse, mode=mode)
    return work + (pull_fedpm_work(model, dense) if fedpm else pull_layers_work(model, dense))


# --- Select and Push --------------------------------------------------------------------------------


def score_dtype(fn: ScoreFunction, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of ``fn``'s scores of a ``dtype`` tensor, found by running its formula on empty
    stand-ins; None when torch cannot score that dtype (the engine refuses it before scoring it)."""
    if dtype == torch.bool:
        return None
    probe = torch.empty(0, dtype=dtype)
    try:
        return formula(fn)(probe, probe).dtype
    except RuntimeError:
        return None


def top_k_work(
    model: Sequence[TensorSpec],
    fn: ScoreFunction,
    *,
    overwrite_initial: bool = False,
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.select_top_k` holds that the shapes decide.

    Per tensor, in state order: its scores in the dtype ``fn``'s formula gives (held; none when they are
    written over the initial model's tensor), a temporary of their size for ``|w| - |w0|`` (scratch),
    and, when the scores of all tensors promote to a wider dtype than its own, their copy in that dtype
    (held while the k-th largest is searched). Beside them the k-th search's sample (held), and the
    larger of two scratches: every score joined in the promoted dtype to be partitioned, when there are
    too few to sample; :data:`SELECTION_MASKS` bool masks over the largest tensor (the k-th search's
    counting pass, and ``exact_k``'s selection, hold that many).

    The rest depends on the scores, not on their shapes - how many lie near the k-th largest, how many
    entries are selected (every one at or above it: ties decide) - and the engine reserves it as it
    computes (see :mod:`paramsel.engine.needs`). Tensors from the first one ``fn`` cannot score need
    nothing: the engine refuses it before scoring it.
    """
    needs: list[Need] = []
    dtypes: list[torch.dtype] = []
    for spec in model:
        dtype = score_dtype(fn, spec.dtype)
        if dtype is None:
            return Work(tuple(needs))
        size = numel(spec.shape)
        in_place = overwrite_initial and written_over_initial(fn, spec.dtype)
        score_bytes = itemsize(dtype)
        temporary = size * SCORE_TEMPORARIES.get(fn, 0) * (itemsize(spec.dtype) if in_place else score_bytes)
        if in_place:
            what = "its scores, written over the initial model's tensor"
        else:
            what = f"its scores {_over(spec.shape, score_bytes)}"
        if temporary:
            what += ", and |w0| (or |w|) beside them"
        needs.append(Need(spec.name, 0 if in_place else size * score_bytes, temporary, what))
        dtypes.append(dtype)
    scores = [TensorSpec(spec.name, dtype, spec.shape) for spec, dtype in zip(model, dtypes, strict=True)]
    return Work(tuple(needs)) + _threshold_search_work(scores)


def supplied_scores_work(scores: Sequence[TensorSpec]) -> Work:
    """An upper bound of what :func:`~paramsel.engine.select_top_k_by_scores` holds that the shapes
    decide, for scores a caller supplied (``scores``: their declarations, one per model tensor).

    The scores themselves are the caller's (a server counts them as upload); beside them, as for
    :func:`top_k_work`, their copies in the dtype every tensor's scores are compared in, where that is
    wider than their own, and the k-th search's sample or partition and its bool masks.
    """
    return _threshold_search_work(scores)


def _threshold_search_work(scores: Sequence[TensorSpec]) -> Work:
    """The copies of the score tensors (``scores``: each one's name, dtype and shape) in the dtype they
    are all compared in, where wider than their own, and the k-th search over them; nothing when there
    are no entries (refused: nothing to select)."""
    needs: list[Need] = []
    sizes = [numel(spec.shape) for spec in scores]
    total = sum(sizes)
    if total == 0:
        return Work()  # refused: nothing to select
    try:
        promoted = functools.reduce(torch.promote_types, (spec.dtype for spec in scores))
    except RuntimeError:
        return Work()  # refused: the engine cannot combine these dtypes
    wide = itemsize(promoted)
    for spec, size in zip(scores, sizes, strict=True):
        if spec.dtype != promoted:
            needs.append(
                Need(
                    spec.name,
                    size * wide,
                    0,
                    f"its scores copied {_over(spec.shape, wide)} ({promoted}, the dtype every tensor's "
                    "scores are compared in)",
                )
            )
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    masks = SELECTION_MASKS * sizes[largest]
    if samples(total):
        held, joined = sample_bytes(len(sizes)), 0
        what = f"the k-th search's sample, and {SELECTION_MASKS} bool masks over its {sizes[largest]} entries"
    else:
        held, joined = 0, total * partition_entry_bytes(promoted)
        what = (
            f"the k-th search: all {total} scores joined and partitioned at "
            f"{_bytes(partition_entry_bytes(promoted))} each, or {SELECTION_MASKS} bool masks over its entries"
        )
    needs.append(Need(scores[largest].name, held, max(masks, joined), what))
    return Work(tuple(needs))


def sparse_update_work(
    model: Sequence[TensorSpec],
    *,
    selection: UpdateSelection,
    sparsity_level: float,
    draw_nbytes: Callable[[int, int], int],
    overwrite_initial: bool = False,
) -> Work:
    """An upper bound of what :func:`~paramsel.engine.select_sparse_update` holds that the shapes decide.

    Top-k: per tensor, the update u in its dtype (held; none when written over the initial model's
    tensor), then what :func:`top_k_work` counts for top-k over u by |u| (the scores |u| and the k-th
    search); the selected entries are reserved by the engine as for top-k. Random-k, which the shapes
    decide entirely: per tensor, its k_t answer entries (int64 positions and values, held) and, one
    tensor at a time, the draw's work (``draw_nbytes(numel, k_t)``: the keys of every entry) and the
    entries of w, w0 and r gathered at the positions (scratch). Nothing for a model the engine refuses
    before it computes anything (a bool tensor, a sparsity level out of range).
    """
    if any(spec.dtype == torch.bool for spec in model):
        return Work()
    if not (math.isfinite(sparsity_level) and 0.0 < sparsity_level <= 1.0):
        return Work()
    needs: list[Need] = []
    if selection is UpdateSelection.RANDOM_K:
        for spec in model:
            count = random_k_count(spec.shape, sparsity_level)
            if count == 0:
                continue
            size, value = numel(spec.shape), itemsize(spec.dtype)
            what = (
                f"{count} random-k entries (int64 positions and {_bytes(value)} values), drawn by keys "
                f"over its {size} entries, and w, w0 and r gathered at them"
            )
            needs.append(
                Need(spec.name, count * (8 + value), draw_nbytes(size, count) + 3 * count * value, what)
            )
        return Work(tuple(needs))
    for spec in model:
        probe = torch.empty(0, dtype=spec.dtype)
        try:
            _ = probe - probe
        except RuntimeError:  # no subtraction for this dtype: refused when its update is computed
            return Work(tuple(needs))
        held = 0 if overwrite_initial else numel(spec.shape) * itemsize(spec.dtype)
        what = (
            "its update u, written over the initial model's tensor"
            if overwrite_initial
            else f"its update u {_over(spec.shape, itemsize(spec.dtype))}"
        )
        needs.append(Need(spec.name, held, 0, what))
    return Work(tuple(needs)) + top_k_work(model, ScoreFunction.LARGEST_FINAL_MAGNITUDE)


def drift_work(model: Sequence[TensorSpec]) -> Work:
    """An upper bound of what :func:`~paramsel.engine.drift_norms` holds: one tensor at a time,
    ``w - w0`` in its dtype and its float32 copy when that dtype is not float32 (scratch)."""
    needs = []
    for spec in model:
        probe = torch.empty(0, dtype=spec.dtype)
        try:
            difference = probe - probe
            widened = difference.float()
        except RuntimeError:  # bool: refused before anything is computed
            break
        per = difference.element_size() + (widened.element_size() if widened.dtype != difference.dtype else 0)
        what = f"w - w0 {_over(spec.shape, difference.element_size())}"
        if widened.dtype != difference.dtype:
            what += ", and its float32 copy"
        needs.append(Need(spec.name, 0, numel(spec.shape) * per, what))
    return Work(tuple(needs))


def fedpm_work(model: Sequence[TensorSpec], *, packed: bool = False) -> Work:
    """An upper bound of what :func:`~paramsel.engine.sample_fedpm_masks` holds: per score tensor, its
    int64 mask (held; ``packed``: its 1-bit mask, a byte per 8 entries) and, one tensor at a time, its
    float64 probabilities, draws and their comparison (scratch)."""
    if packed:
        return _fedpm_packed_work(model)
    needs = []
    for spec in model:
        if not is_fedpm_score(spec.name):
            continue
        if spec.dtype == torch.bool:
            break  # refused before it is sampled
        size = numel(spec.shape)
        what = (
            f"its int64 mask {_over(spec.shape, FEDPM_MASK_BYTES)}, and float64 probabilities and draws "
            "beside it"
        )
        needs.append(Need(spec.name, size * FEDPM_MASK_BYTES, size * FEDPM_SCRATCH_BYTES, what))
    return Work(tuple(needs))


def _fedpm_packed_work(model: Sequence[TensorSpec]) -> Work:
    needs = []
    for spec in model:
        if not is_fedpm_score(spec.name):
            continue
        if spec.dtype == torch.bool:
            break  # refused before it is sampled
        size = numel(spec.shape)
        what = (
            f"its 1-bit mask of {_bytes((size + 7) // 8)}, and float64 probabilities and draws "
            f"{_over(spec.shape, FEDPM_PACKED_SCRATCH_BYTES)} beside it"
        )
        needs.append(Need(spec.name, (size + 7) // 8, size * FEDPM_PACKED_SCRATCH_BYTES, what))
    return Work(tuple(needs))
