"""Criterion messages -> engine calls. The only place that knows both the proto enums and the engine's."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch

from paramsel import engine
from paramsel.engine import budget
from paramsel.engine.needs import Reserve
from paramsel.v1 import criteria_pb2, service_pb2
from paramsel.wire import WireError
from paramsel.wire.seeded import seeded_positions, seeded_positions_nbytes

SCORE_FUNCTIONS: dict[int, engine.ScoreFunction] = {
    criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE: engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
    criteria_pb2.SCORE_FUNCTION_SMALLEST_FINAL_MAGNITUDE: engine.ScoreFunction.SMALLEST_FINAL_MAGNITUDE,
    criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE: engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE,
    criteria_pb2.SCORE_FUNCTION_SMALLEST_MAGNITUDE_CHANGE: engine.ScoreFunction.SMALLEST_MAGNITUDE_CHANGE,
    criteria_pb2.SCORE_FUNCTION_LARGEST_INCREASE_IN_MAGNITUDE: engine.ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE,
    criteria_pb2.SCORE_FUNCTION_SMALLEST_INCREASE_IN_MAGNITUDE: engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE,
}
# The caller's own scores, sent in SECTION_SCORES: top-k over them, no score function applied here.
SUPPLIED = criteria_pb2.SCORE_FUNCTION_SUPPLIED
SERVED_SCORE_FUNCTIONS = frozenset({*SCORE_FUNCTIONS, SUPPLIED})
"""Every ScoreFunction a TopKCriterion may name (GetServerInfo lists them)."""
UPDATE_SELECTIONS: dict[int, engine.UpdateSelection] = {
    criteria_pb2.UPDATE_SELECTION_UNSPECIFIED: engine.UpdateSelection.TOP_K,
    criteria_pb2.UPDATE_SELECTION_TOP_K: engine.UpdateSelection.TOP_K,
    criteria_pb2.UPDATE_SELECTION_RANDOM_K: engine.UpdateSelection.RANDOM_K,
}


@dataclass(frozen=True)
class Selection:
    """What a criterion produced, with the kind the response header announces."""

    kind: service_pb2.SelectionKind.ValueType
    top_k: engine.TopKResult | None = None
    layers: engine.LayerResult | None = None
    seed: int = 0
    total_entries: int = 0


def _flag(message: Any, name: str) -> bool:
    """An ``optional bool`` that defaults to true, as FL4Health's keyword arguments do."""
    return bool(getattr(message, name)) if message.HasField(name) else True


def is_sparse_update(criterion: criteria_pb2.Criterion | None) -> bool:
    """Whether the criterion is SparseUpdateCriterion (the only one that takes SECTION_RESIDUAL)."""
    return criterion is not None and criterion.WhichOneof("kind") == "sparse_update"


def update_selection(criterion: criteria_pb2.SparseUpdateCriterion) -> engine.UpdateSelection:
    selection = UPDATE_SELECTIONS.get(criterion.selection)
    if selection is None:
        raise WireError(
            f"criterion.sparse_update.selection: unknown value {criterion.selection} "
            "(expected UPDATE_SELECTION_TOP_K or UPDATE_SELECTION_RANDOM_K)"
        )
    return selection


def is_random_k(criterion: criteria_pb2.Criterion | None) -> bool:
    """Whether the criterion is a seeded random-k sparse update (its answers may be SEEDED)."""
    return (
        is_sparse_update(criterion)
        and criterion is not None
        and UPDATE_SELECTIONS.get(criterion.sparse_update.selection) is engine.UpdateSelection.RANDOM_K
    )


def supplies_scores(criterion: criteria_pb2.Criterion | None) -> bool:
    """Whether the criterion is top-k by the caller's own scores (SCORE_FUNCTION_SUPPLIED)."""
    return (
        criterion is not None
        and criterion.WhichOneof("kind") == "top_k"
        and criterion.top_k.score_function == SUPPLIED
    )


def run_criterion(
    criterion: criteria_pb2.Criterion,
    model: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor] | None,
    *,
    scores: dict[str, torch.Tensor] | None = None,
    residual: dict[str, torch.Tensor] | None = None,
    initial_is_scratch: bool = False,
    reserve: Reserve | None = None,
) -> Selection:
    """Runs the criterion; ``scores`` are the caller's (SECTION_SCORES), for SCORE_FUNCTION_SUPPLIED
    only, and checked against the model beforehand (``inbound.check_scores``); ``residual`` is the
    caller's (SECTION_RESIDUAL), for SparseUpdateCriterion only (``inbound.check_residual``). ``initial_is_scratch``
    says nothing reads ``initial`` afterwards, so top-k may write its scores over it. ``reserve`` is
    given what only the data decide (a top-k selection's candidates and selected entries) before it is
    allocated; :func:`criterion_work` is the rest."""
    kind = criterion.WhichOneof("kind")
    if kind == "top_k":
        top_k = criterion.top_k
        if top_k.score_function == SUPPLIED:
            if scores is None:
                raise WireError(
                    "criterion.top_k.score_function SCORE_FUNCTION_SUPPLIED needs the scores in SECTION_SCORES"
                )
            result = engine.select_top_k_by_scores(
                model, scores, sparsity_level=top_k.sparsity_level, exact_k=top_k.exact_k, reserve=reserve
            )
            return Selection(kind=service_pb2.SELECTION_KIND_SPARSE_COO, top_k=result)
        if top_k.score_function not in SCORE_FUNCTIONS:
            raise WireError(
                f"criterion.top_k.score_function: unknown value {top_k.score_function} "
                "(expected SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE ... SMALLEST_INCREASE_IN_MAGNITUDE, "
                "or SUPPLIED)"
            )
        result = engine.select_top_k(
            model,
            initial,
            sparsity_level=top_k.sparsity_level,
            score_function=SCORE_FUNCTIONS[top_k.score_function],
            exact_k=top_k.exact_k,
            overwrite_initial=initial_is_scratch,
            reserve=reserve,
        )
        return Selection(kind=service_pb2.SELECTION_KIND_SPARSE_COO, top_k=result)
    if kind == "drift_threshold":
        c = criterion.drift_threshold
        layers = engine.select_layers_by_threshold(
            model,
            initial,
            norm_threshold=c.norm_threshold,
            normalize=_flag(c, "normalize"),
            select_drift_more=_flag(c, "select_drift_more"),
        )
        return Selection(kind=service_pb2.SELECTION_KIND_LAYERS, layers=layers, total_entries=len(model))
    if kind == "drift_percentage":
        p = criterion.drift_percentage
        layers = engine.select_layers_by_percentage(
            model,
            initial,
            exchange_percentage=p.exchange_percentage,
            normalize=_flag(p, "normalize"),
            select_drift_more=_flag(p, "select_drift_more"),
        )
        return Selection(kind=service_pb2.SELECTION_KIND_LAYERS, layers=layers, total_entries=len(model))
    if kind == "fed_pm":
        seed = criterion.fed_pm.seed if criterion.fed_pm.HasField("seed") else secrets.randbits(63)
        masks = engine.sample_fedpm_masks(model, seed=seed, packed=criterion.fed_pm.packed_masks)
        return Selection(
            kind=service_pb2.SELECTION_KIND_FEDPM_MASKS, layers=masks, seed=seed, total_entries=len(model)
        )
    if kind == "sparse_update":
        u = criterion.sparse_update
        update = engine.select_sparse_update(
            model,
            initial,
            residual,
            sparsity_level=u.sparsity_level,
            selection=update_selection(u),
            exact_k=u.exact_k,
            seed=u.seed,
            draw=seeded_positions,
            overwrite_initial=initial_is_scratch,
            reserve=reserve,
        )
        return Selection(kind=service_pb2.SELECTION_KIND_SPARSE_UPDATE, top_k=update)
    raise WireError(
        "criterion: none is set (expected one of top_k, drift_threshold, drift_percentage, fed_pm, "
        "sparse_update)"
    )


def criterion_work(
    criterion: criteria_pb2.Criterion | None,
    model: list[engine.TensorSpec],
    *,
    initial_is_scratch: bool,
    scores: list[engine.TensorSpec] | None = None,
) -> budget.Work:
    """What running ``criterion`` on a model of these declared tensors (and the caller's declared
    ``scores``, for SCORE_FUNCTION_SUPPLIED) builds, as far as their shapes decide it
    (:mod:`paramsel.engine.budget`); nothing for a criterion the engine refuses outright."""
    kind = criterion.WhichOneof("kind") if criterion is not None else None
    if kind == "top_k":
        assert criterion is not None
        if criterion.top_k.score_function == SUPPLIED:
            return budget.supplied_scores_work(scores or [])
        function = SCORE_FUNCTIONS.get(criterion.top_k.score_function)
        if function is None:
            return budget.Work()
        return budget.top_k_work(model, function, overwrite_initial=initial_is_scratch)
    if kind in ("drift_threshold", "drift_percentage"):
        return budget.drift_work(model)
    if kind == "fed_pm":
        assert criterion is not None
        return budget.fedpm_work(model, packed=criterion.fed_pm.packed_masks)
    if kind == "sparse_update":
        assert criterion is not None
        selection = UPDATE_SELECTIONS.get(criterion.sparse_update.selection)
        if selection is None:
            return budget.Work()
        return budget.sparse_update_work(
            model,
            selection=selection,
            sparsity_level=criterion.sparse_update.sparsity_level,
            draw_nbytes=seeded_positions_nbytes,
            overwrite_initial=initial_is_scratch,
        )
    return budget.Work()
