"""FL4Health's selection criteria under their own names, carried out by the paramsel service.

The six score functions compute their scores locally when called (as FL4Health's do); passed to
:class:`SparseCooParameterExchanger`, they only name the criterion the server applies. The layer
selection functions and ``select_scores_and_sample_masks`` call the service when called. Any other
score function (a user's own) is called here and its scores sent to the service, which selects their
top-k (``ScoreFunction.SUPPLIED``); any other layer selection function is simply called here.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from paramsel.client import _embedded
from paramsel.client._client import Client
from paramsel.client._compact import unpack_masks
from paramsel.client._connection import Connection, with_target
from paramsel.client._errors import invalid_argument, local_errors
from paramsel.client._state import NDArrays, state_of, to_numpy
from paramsel.client._types import (
    Criterion,
    DriftPercentage,
    DriftThreshold,
    FedPm,
    ScoreFunction,
    TopK,
    as_criterion,
)

# A criterion a layer selection function carries out.
LayerCriterion = DriftThreshold | DriftPercentage | FedPm


def _scores(
    kind: ScoreFunction, model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    with local_errors():
        return _embedded.score_tensors(
            kind, state_of(model), state_of(initial_model) if initial_model else None
        )


def largest_final_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w| for every state entry."""
    return _scores(ScoreFunction.LARGEST_FINAL_MAGNITUDE, model, initial_model)


def smallest_final_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-|w| for every state entry."""
    return _scores(ScoreFunction.SMALLEST_FINAL_MAGNITUDE, model, initial_model)


def largest_magnitude_change_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w - w0| for every state entry; needs the initial model."""
    return _scores(ScoreFunction.LARGEST_MAGNITUDE_CHANGE, model, initial_model)


def smallest_magnitude_change_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-|w - w0| for every state entry; needs the initial model."""
    return _scores(ScoreFunction.SMALLEST_MAGNITUDE_CHANGE, model, initial_model)


def largest_increase_in_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """|w| - |w0| for every state entry; needs the initial model."""
    return _scores(ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE, model, initial_model)


def smallest_increase_in_magnitude_scores(
    model: nn.Module, initial_model: nn.Module | None
) -> dict[str, torch.Tensor]:
    """-(|w| - |w0|) for every state entry; needs the initial model."""
    return _scores(ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE, model, initial_model)


SCORE_FUNCTION_BY_NAME: dict[str, ScoreFunction] = {
    f"{kind.name.lower()}_scores": kind for kind in ScoreFunction if kind is not ScoreFunction.SUPPLIED
}
_OURS: dict[Any, ScoreFunction] = {
    largest_final_magnitude_scores: ScoreFunction.LARGEST_FINAL_MAGNITUDE,
    smallest_final_magnitude_scores: ScoreFunction.SMALLEST_FINAL_MAGNITUDE,
    largest_magnitude_change_scores: ScoreFunction.LARGEST_MAGNITUDE_CHANGE,
    smallest_magnitude_change_scores: ScoreFunction.SMALLEST_MAGNITUDE_CHANGE,
    largest_increase_in_magnitude_scores: ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE,
    smallest_increase_in_magnitude_scores: ScoreFunction.SMALLEST_INCREASE_IN_MAGNITUDE,
}


def served_score_function(function: Any) -> ScoreFunction | None:
    """Which of the six a score function is: one of ours, or FL4Health's own of the same name (its
    module is fl4health's). None for any other function, even one that borrows a name."""
    if function in _OURS:
        return _OURS[function]
    module = getattr(function, "__module__", None) or ""
    if module == "fl4health" or module.startswith("fl4health."):
        return SCORE_FUNCTION_BY_NAME.get(getattr(function, "__name__", ""))
    return None


def score_criterion(score_gen_function: Any, sparsity_level: float, *, exact_k: bool = False) -> TopK | None:
    """The top-k criterion the server applies for one of the six score functions; None for any other
    function, whose scores are computed in this process (and sent with ``ScoreFunction.SUPPLIED``)."""
    kind = served_score_function(score_gen_function)
    if kind is None:
        return None
    return TopK(float(sparsity_level), kind, bool(exact_k))


def layer_criterion_of(value: object, what: str = "criterion") -> LayerCriterion:
    """The criterion of a layer selection function; a ``paramsel.v1.Criterion`` message (the old form)
    is converted, with a DeprecationWarning."""
    criterion = as_criterion(value, what)
    if not isinstance(criterion, (DriftThreshold, DriftPercentage, FedPm)):
        raise invalid_argument(
            f"{what}: a layer selection function takes DriftThreshold, DriftPercentage or FedPm, "
            f"got {type(criterion).__name__}"
        )
    return criterion


class LayerSelectionFunction:
    """A layer selection function, callable as FL4Health's: ``(model, initial_model) -> (arrays, names)``.

    Like the ``functools.partial`` FL4Health's constructor builds, it holds the values it was built
    with; its ``criterion`` (a :class:`DriftThreshold`, :class:`DriftPercentage` or :class:`FedPm`) is
    read at each call. A ``paramsel.v1.Criterion`` message is still taken, with a DeprecationWarning.
    """

    criterion: DriftThreshold | DriftPercentage | FedPm
    """What the function selects; read at each call."""
    target: str | None
    """``host:port`` of the server it calls, if given (else ``connection``'s, else the default)."""
    connection: Connection | None
    """How it calls, if given."""

    def __init__(
        self,
        criterion: DriftThreshold | DriftPercentage | FedPm,
        *,
        target: str | None = None,
        connection: Connection | None = None,
    ) -> None:
        if not isinstance(criterion, (DriftThreshold, DriftPercentage, FedPm)):
            criterion = layer_criterion_of(criterion)
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
        return f"LayerSelectionFunction({self.criterion!r})"


def layers_served(criterion: Criterion) -> bool:
    """Whether the service takes the criterion's values. FL4Health checks ``norm_threshold > 0`` and
    ``0 < exchange_percentage <= 1`` only when its constructor is built, so values assigned to the
    constructor afterwards (or bound by hand) still select there; such a selection is made in this
    process instead, with FL4Health's rules."""
    if isinstance(criterion, DriftThreshold):
        return bool(criterion.norm_threshold > 0)  # NaN is not served either
    if isinstance(criterion, DriftPercentage):
        percentage = criterion.exchange_percentage
        return math.isfinite(percentage) and 0 < percentage <= 1
    return True


def select_layers(
    criterion: LayerCriterion, model: nn.Module, initial_model: nn.Module | None, client: Client
) -> tuple[NDArrays, list[str]]:
    if isinstance(criterion, (DriftThreshold, DriftPercentage)) and not layers_served(criterion):
        return _select_layers_here(criterion, model, initial_model)
    if isinstance(criterion, FedPm):
        return _sampled_masks(criterion, model, client)
    result = client.select(criterion, state_of(model), state_of(initial_model) if initial_model else None)
    return [to_numpy(t) for _, t in result.tensors], [name for name, _ in result.tensors]


def _sampled_masks(criterion: FedPm, model: nn.Module, client: Client) -> tuple[NDArrays, list[str]]:
    """FedPM's int64 masks, as FL4Health returns them, having travelled at 1 bit per entry (the same
    draws: packing changes only how the masks travel)."""
    state = state_of(model)
    result = client.select(FedPm(criterion.seed, packed_masks=True), state, None)
    with local_errors("the server's masks do not fit the model: "):
        masks = [to_numpy(unpack_masks(packed, tuple(state[name].shape))) for name, packed in result.tensors]
    return masks, [name for name, _ in result.tensors]


def _select_layers_here(
    criterion: DriftThreshold | DriftPercentage, model: nn.Module, initial_model: nn.Module | None
) -> tuple[NDArrays, list[str]]:
    """A drift selection with values the service refuses (see :func:`layers_served`), as FL4Health
    makes it: any threshold compares; ``ceil(L * exchange_percentage)`` slices the ranking as a Python
    list is sliced (nothing at 0, all of it above 1, the tail cut off when negative), and a NaN or
    infinite percentage raises ValueError or OverflowError from ``math.ceil``."""
    threshold = isinstance(criterion, DriftThreshold)
    normalize, more = criterion.normalize, criterion.select_drift_more
    state = state_of(model)
    with local_errors():
        drifts = _embedded.drift_norms(
            state,
            state_of(initial_model) if initial_model is not None else None,
            normalize=normalize,
            what=f"select_layers_by_{'threshold' if threshold else 'percentage'}",
        )
    if isinstance(criterion, DriftThreshold):
        norm_threshold = criterion.norm_threshold
        names = [
            name
            for name, drift in drifts.items()
            if (drift > norm_threshold if more else drift <= norm_threshold)
        ]
    else:
        count = math.ceil(len(drifts) * criterion.exchange_percentage)
        # NaN drifts (empty tensors, normalised) rank last either way, as the service ranks them.
        ranked = sorted(
            (name for name, drift in drifts.items() if not math.isnan(drift)),
            key=drifts.__getitem__,
            reverse=more,
        )
        ranked += [name for name, drift in drifts.items() if math.isnan(drift)]
        names = ranked[:count]
    return [to_numpy(state[name]) for name in names], names


def _threshold_criterion(norm_threshold: float, normalize: bool, select_drift_more: bool) -> DriftThreshold:
    return DriftThreshold(float(norm_threshold), bool(normalize), bool(select_drift_more))


def _percentage_criterion(
    exchange_percentage: float, normalize: bool, select_drift_more: bool
) -> DriftPercentage:
    return DriftPercentage(float(exchange_percentage), bool(normalize), bool(select_drift_more))


class LayerSelectionFunctionConstructor:
    """Builds layer selection functions, as FL4Health's class of the same name does.

    ``0 < exchange_percentage <= 1`` and ``norm_threshold > 0`` are required (otherwise
    :class:`InvalidArgumentError`, a ValueError, as the service refuses them).
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
            raise invalid_argument(f"exchange_percentage must be in (0, 1], got {exchange_percentage}")
        if not norm_threshold > 0:  # written so that NaN fails too; +inf is a threshold no drift exceeds
            raise invalid_argument(f"norm_threshold must be > 0, got {norm_threshold}")
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


select_scores_and_sample_masks = LayerSelectionFunction(FedPm())
"""FedPM's selection: every ``weight_scores`` / ``bias_scores`` tensor as a Bernoulli(sigmoid) mask."""

# Stand-ins for the (model, initial_model) an exchanger passes, to see where Python binds them.
_MODEL, _INITIAL = object(), object()
# The values a layer selection function takes before (model, initial_model), by function name.
_BOUND_FIRST: dict[str, tuple[str, Callable[[Any, Any, Any], DriftThreshold | DriftPercentage]]] = {
    "select_layers_by_threshold": ("threshold", _threshold_criterion),
    "select_layers_by_percentage": ("exchange_percentage", _percentage_criterion),
}


def layer_criterion(function: Any) -> tuple[LayerCriterion | None, Connection | None]:
    """The criterion of a layer selection function (ours, or one FL4Health's constructor built), and
    the connection it was built with, if any; no criterion for any other function, which is called.

    Read afresh at each call of an exchanger, so that assigning its ``layer_selection_function`` (or
    the ``criterion`` of one of ours) takes effect at the next call, as in FL4Health."""
    if isinstance(function, LayerSelectionFunction):
        criterion = function.criterion
        if not isinstance(criterion, (DriftThreshold, DriftPercentage, FedPm)):  # assigned in the old form
            criterion = layer_criterion_of(criterion, "LayerSelectionFunction.criterion")
        if function.target is None and function.connection is None:
            return criterion, None
        return criterion, with_target(function.connection, function.target)
    partial = isinstance(function, functools.partial)
    inner = function.func if partial else function
    module = getattr(inner, "__module__", None) or ""
    ours = inner in (select_layers_by_threshold, select_layers_by_percentage)
    if not (ours or module == "fl4health" or module.startswith("fl4health.")):
        return None, None  # a function of the caller's own, even one that borrows a name
    name = getattr(inner, "__name__", "")
    if name == "select_scores_and_sample_masks" and not partial:
        return FedPm(), None
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
