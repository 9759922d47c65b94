"""FL4Health's selection criteria under their own names, carried out by the paramsel service.

The six score functions compute their scores locally when called (as FL4Health's do); passed to
:class:`SparseCooParameterExchanger`, they only name the criterion the server applies. The layer
selection functions and ``select_scores_and_sample_masks`` call the service when called. Any other
score or layer selection function (a user's own) is called here, and its selection made in this
process by the engine the server runs.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch
from torch import nn

from paramsel import engine
from paramsel.client._client import Client
from paramsel.client._connection import Connection, with_target
from paramsel.client._errors import local_errors
from paramsel.client._state import NDArrays, state_of, to_numpy
from paramsel.v1 import criteria_pb2

_SCORE_PROTO: dict[engine.ScoreFunction, int] = {
    engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE: criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE,
    engine.ScoreFunction.SMALLEST_FINAL_MAGNITUDE: criteria_pb2.SCORE_FUNCTION_SMALLEST_FINAL_MAGNITUDE,
    engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE: criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE,
    engine.ScoreFunction.SMALLEST_MAGNITUDE_CHANGE: criteria_pb2.SCORE_FUNCTION_SMALLEST_MAGNITUDE_CHANGE,
    engine.ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE: criteria_pb2.SCORE_FUNCTION_LARGEST_INCREASE_IN_MAGNITUDE,
    engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE: criteria_pb2.SCORE_FUNCTION_SMALLEST_INCREASE_IN_MAGNITUDE,
}


def _scores(
    kind: engine.ScoreFunction, model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    with local_errors():
        return engine.score_tensors(kind, state_of(model), state_of(initial_model) if initial_model else None)


def largest_final_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w| for every state entry."""
    return _scores(engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE, model, initial_model)


def smallest_final_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-|w| for every state entry."""
    return _scores(engine.ScoreFunction.SMALLEST_FINAL_MAGNITUDE, model, initial_model)


def largest_magnitude_change_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w - w0| for every state entry; needs the initial model."""
    return _scores(engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE, model, initial_model)


def smallest_magnitude_change_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-|w - w0| for every state entry; needs the initial model."""
    return _scores(engine.ScoreFunction.SMALLEST_MAGNITUDE_CHANGE, model, initial_model)


def largest_increase_in_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w| - |w0| for every state entry; needs the initial model."""
    return _scores(engine.ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE, model, initial_model)


def smallest_increase_in_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-(|w| - |w0|) for every state entry; needs the initial model."""
    return _scores(engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE, model, initial_model)


SCORE_FUNCTION_BY_NAME: dict[str, engine.ScoreFunction] = {
    f"{kind.value}_scores": kind for kind in engine.ScoreFunction
}
_OURS: dict[Any, engine.ScoreFunction] = {
    largest_final_magnitude_scores: engine.ScoreFunction.LARGEST_FINAL_MAGNITUDE,
    smallest_final_magnitude_scores: engine.ScoreFunction.SMALLEST_FINAL_MAGNITUDE,
    largest_magnitude_change_scores: engine.ScoreFunction.LARGEST_MAGNITUDE_CHANGE,
    smallest_magnitude_change_scores: engine.ScoreFunction.SMALLEST_MAGNITUDE_CHANGE,
    largest_increase_in_magnitude_scores: engine.ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE,
    smallest_increase_in_magnitude_scores: engine.ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE,
}


def served_score_function(function: Any) -> engine.ScoreFunction | None:
    """Which of the six a score function is: one of ours, or FL4Health's own of the same name (its
    module is fl4health's). None for any other function, even one that borrows a name."""
    if function in _OURS:
        return _OURS[function]
    module = getattr(function, "__module__", None) or ""
    if module == "fl4health" or module.startswith("fl4health."):
        return SCORE_FUNCTION_BY_NAME.get(getattr(function, "__name__", ""))
    return None


def score_criterion(
    score_gen_function: Any, sparsity_level: float, *, exact_k: bool = False
) -> criteria_pb2.Criterion | None:
    """The top-k criterion the server applies for one of the six score functions; None for any other
    function, whose scores are computed, and selected from, in this process."""
    kind = served_score_function(score_gen_function)
    if kind is None:
        return None
    return criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=sparsity_level,
            score_function=_SCORE_PROTO[kind],  # type: ignore[arg-type]
            exact_k=exact_k,
        )
    )


class LayerSelectionFunction:
    """A layer selection function, callable as FL4Health's: ``(model, initial_model) -> (arrays, names)``.

    Like the ``functools.partial`` FL4Health's constructor builds, it holds the values it was built
    with; its ``criterion`` is read at each call.
    """

    def __init__(
        self,
        criterion: criteria_pb2.Criterion,
        *,
        target: str | None = None,
        connection: Connection | None = None,
    ) -> None:
        self.criterion = criterion
        self.target = target
        self.connection = connection

    def __call__(
        self, model: nn.Module, initial_model: nn.Module | None = None
    ) -> tuple[NDArrays, list[str]]:
        return select_layers(
            self.criterion, model, initial_model, Client(target=self.target, connection=self.connection)
        )

    def __repr__(self) -> str:
        return f"LayerSelectionFunction({self.criterion.WhichOneof('kind')})"


def layers_served(criterion: criteria_pb2.Criterion) -> bool:
    """Whether the service takes the criterion's values. FL4Health checks ``norm_threshold > 0`` and
    ``0 < exchange_percentage <= 1`` only when its constructor is built, so values assigned to the
    constructor afterwards (or bound by hand) still select there; such a selection is made in this
    process instead, with FL4Health's rules."""
    kind = criterion.WhichOneof("kind")
    if kind == "drift_threshold":
        return criterion.drift_threshold.norm_threshold > 0  # NaN is not served either
    if kind == "drift_percentage":
        percentage = criterion.drift_percentage.exchange_percentage
        return math.isfinite(percentage) and 0 < percentage <= 1
    return True


def select_layers(
    criterion: criteria_pb2.Criterion, model: nn.Module, initial_model: nn.Module | None, client: Client
) -> tuple[NDArrays, list[str]]:
    if not layers_served(criterion):
        return _select_layers_here(criterion, model, initial_model)
    result = client.select(criterion, state_of(model), state_of(initial_model) if initial_model else None)
    return [to_numpy(t) for _, t in result.tensors], [name for name, _ in result.tensors]


def _select_layers_here(
    criterion: criteria_pb2.Criterion, model: nn.Module, initial_model: nn.Module | None
) -> tuple[NDArrays, list[str]]:
    """A drift selection with values the service refuses (see :func:`layers_served`), as FL4Health
    makes it: any threshold compares; ``ceil(L * exchange_percentage)`` slices the ranking as a Python
    list is sliced (nothing at 0, all of it above 1, the tail cut off when negative), and a NaN or
    infinite percentage raises ValueError or OverflowError from ``math.ceil``."""
    threshold = criterion.WhichOneof("kind") == "drift_threshold"
    rule = criterion.drift_threshold if threshold else criterion.drift_percentage
    normalize = rule.normalize if rule.HasField("normalize") else True
    more = rule.select_drift_more if rule.HasField("select_drift_more") else True
    state = state_of(model)
    with local_errors():
        if initial_model is None:
            raise engine.FailedPrecondition(
                f"select_layers_by_{'threshold' if threshold else 'percentage'} needs the initial model, but none was given"
            )
        drifts = engine.drift_norms(state, state_of(initial_model), normalize=normalize)
    if threshold:
        norm_threshold = criterion.drift_threshold.norm_threshold
        names = [
            name
            for name, drift in drifts.items()
            if (drift > norm_threshold if more else drift <= norm_threshold)
        ]
    else:
        count = math.ceil(len(drifts) * criterion.drift_percentage.exchange_percentage)
        # NaN drifts (empty tensors, normalised) rank last either way, as the service ranks them.
        ranked = sorted(
            (name for name, drift in drifts.items() if not math.isnan(drift)),
            key=drifts.__getitem__,
            reverse=more,
        )
        ranked += [name for name, drift in drifts.items() if math.isnan(drift)]
        names = ranked[:count]
    return [to_numpy(state[name]) for name in names], names


def _threshold_criterion(
    norm_threshold: float, normalize: bool, select_drift_more: bool
) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        drift_threshold=criteria_pb2.DriftThresholdCriterion(
            norm_threshold=float(norm_threshold),
            normalize=bool(normalize),
            select_drift_more=bool(select_drift_more),
        )
    )


def _percentage_criterion(
    exchange_percentage: float, normalize: bool, select_drift_more: bool
) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        drift_percentage=criteria_pb2.DriftPercentageCriterion(
            exchange_percentage=float(exchange_percentage),
            normalize=bool(normalize),
            select_drift_more=bool(select_drift_more),
        )
    )


class LayerSelectionFunctionConstructor:
    """Builds layer selection functions, as FL4Health's class of the same name does.

    ``0 < exchange_percentage <= 1`` and ``norm_threshold > 0`` are required (ValueError otherwise).
    As in FL4Health, ``select_by_threshold()`` and ``select_by_percentage()`` read the attributes when
    they are called, and the function each builds keeps the values it was built with (assigning an
    attribute later changes only the functions built after). The functions are carried out by the
    service.
    """

    def __init__(
        self,
        norm_threshold: float,
        exchange_percentage: float,
        normalize: bool = True,
        select_drift_more: bool = True,
        *,
        target: str | None = None,
        connection: Connection | None = None,
    ) -> None:
        if not 0 < exchange_percentage <= 1:
            raise ValueError(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")
        if not norm_threshold > 0:  # written so that NaN fails too; +inf is a threshold no drift exceeds
            raise ValueError(f"norm_threshold must be > 0, got {norm_threshold}")
        self.norm_threshold = norm_threshold
        self.exchange_percentage = exchange_percentage
        self.normalize = normalize
        self.select_drift_more = select_drift_more
        self.target = target
        self.connection = connection

    def select_by_threshold(self) -> LayerSelectionFunction:
        return LayerSelectionFunction(
            _threshold_criterion(self.norm_threshold, self.normalize, self.select_drift_more),
            target=self.target,
            connection=self.connection,
        )

    def select_by_percentage(self) -> LayerSelectionFunction:
        return LayerSelectionFunction(
            _percentage_criterion(self.exchange_percentage, self.normalize, self.select_drift_more),
            target=self.target,
            connection=self.connection,
        )


def select_layers_by_threshold(
    threshold: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module | None,
) -> tuple[NDArrays, list[str]]:
    """The layers whose drift from ``initial_model`` (l2 norm, divided by the entry count when
    ``normalize``) is above ``threshold``, or at most it; FL4Health's function of the same name,
    carried out by the service."""
    return select_layers(
        _threshold_criterion(threshold, normalize, select_drift_more), model, initial_model, Client()
    )


def select_layers_by_percentage(
    exchange_percentage: float,
    normalize: bool,
    select_drift_more: bool,
    model: nn.Module,
    initial_model: nn.Module | None,
) -> tuple[NDArrays, list[str]]:
    """The ``ceil(layers * exchange_percentage)`` layers that drifted most (or least) from
    ``initial_model``; FL4Health's function of the same name, carried out by the service."""
    return select_layers(
        _percentage_criterion(exchange_percentage, normalize, select_drift_more),
        model,
        initial_model,
        Client(),
    )


def fedpm_criterion(seed: int | None = None) -> criteria_pb2.Criterion:
    fed_pm = criteria_pb2.FedPmCriterion() if seed is None else criteria_pb2.FedPmCriterion(seed=seed)
    return criteria_pb2.Criterion(fed_pm=fed_pm)


select_scores_and_sample_masks = LayerSelectionFunction(fedpm_criterion())
"""FedPM's selection: every ``weight_scores`` / ``bias_scores`` tensor as a Bernoulli(sigmoid) mask."""

# Stand-ins for the (model, initial_model) an exchanger passes, to see where Python binds them.
_MODEL, _INITIAL = object(), object()
# The values a layer selection function takes before (model, initial_model), by function name.
_BOUND_FIRST = {
    "select_layers_by_threshold": ("threshold", _threshold_criterion),
    "select_layers_by_percentage": ("exchange_percentage", _percentage_criterion),
}


def layer_criterion(function: Any) -> tuple[criteria_pb2.Criterion | None, Connection | None]:
    """The criterion of a layer selection function (ours, or one FL4Health's constructor built), and
    the connection it was built with, if any; no criterion for any other function, which is called.

    Read afresh at each call of an exchanger, so that assigning its ``layer_selection_function`` (or
    the ``criterion`` of one of ours) takes effect at the next call, as in FL4Health."""
    if isinstance(function, LayerSelectionFunction):
        if function.target is None and function.connection is None:
            return function.criterion, None
        return function.criterion, with_target(function.connection, function.target)
    partial = isinstance(function, functools.partial)
    inner = function.func if partial else function
    module = getattr(inner, "__module__", None) or ""
    ours = inner in (select_layers_by_threshold, select_layers_by_percentage)
    if not (ours or module == "fl4health" or module.startswith("fl4health.")):
        return None, None  # a function of the caller's own, even one that borrows a name
    name = getattr(inner, "__name__", "")
    if name == "select_scores_and_sample_masks" and not partial:
        return fedpm_criterion(), None
    if not partial or name not in _BOUND_FIRST:
        return None, None
    first, build = _BOUND_FIRST[name]
    try:  # the call the exchanger makes, partial(model, initial_model), bound as Python binds it
        bound = inspect.signature(inner).bind(*function.args, _MODEL, _INITIAL, **function.keywords).arguments
    except TypeError:
        return None, None  # a call that cannot bind: the function is called, and fails as it fails
    if bound.get("model") is not _MODEL or bound.get("initial_model") is not _INITIAL:
        return None, None
    try:
        return build(bound[first], bound["normalize"], bound["select_drift_more"]), None
    except (TypeError, ValueError, RuntimeError):
        return None, None  # values no criterion holds: the function is called, and fails as it fails
