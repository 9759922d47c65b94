"""Whole-layer selection by l2 drift, as FL4Health's LayerSelectionFunctionConstructor selects.

Drifts are computed with FL4Health's own torch ops, so they are bit-identical floats and a threshold
or a ranking splits them exactly where FL4Health would.

An empty tensor with ``normalize`` has drift NaN (0 / 0). Python's comparisons and sort give NaN no
consistent place, so it is pinned down here: a NaN drift is never selected by a threshold (in either
direction) and ranks after every number in a percentage selection (in either direction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidArgument
from .scores import require_initial
from .state import State, check_same_layout, require_fraction, require_nonempty, require_not_bool


@dataclass(frozen=True)
class LayerResult:
    """Whole state entries to send, in the order they are sent."""

    names: list[str]
    """State-dict keys of the sent entries."""
    tensors: list[torch.Tensor]
    """The tensors sent, aligned with ``names``."""
    drifts: dict[str, float]
    """The drift of every state entry considered, in state order; empty for FedPM."""


def drift_norms(current: State, initial: State, *, normalize: bool) -> dict[str, float]:
    """``||w - w0||_2`` per state entry (in float32), divided by ``numel`` when ``normalize``."""
    check_same_layout(current, initial)
    drifts: dict[str, float] = {}
    with torch.no_grad():
        for name, tensor in current.items():
            require_not_bool(name, tensor)
            try:
                norm = torch.linalg.norm((tensor.detach() - initial[name].detach()).float())
            except RuntimeError as err:
                raise InvalidArgument(f"tensor {name!r} of dtype {tensor.dtype} has no drift: {err}") from err
            if normalize:
                norm = norm / tensor.numel()
            drifts[name] = norm.item()
    return drifts


def select_layers_by_threshold(
    current: State,
    initial: State | None,
    *,
    norm_threshold: float,
    normalize: bool = True,
    select_drift_more: bool = True,
) -> LayerResult:
    """In state order, the entries with drift > threshold (or <= threshold when not ``select_drift_more``)."""
    if not norm_threshold > 0.0:  # NaN fails too; +inf is a threshold no drift exceeds, as in FL4Health
        raise InvalidArgument(f"norm_threshold must be > 0, got {norm_threshold!r}")
    drifts = _drifts(current, initial, normalize, "select_layers_by_threshold")
    if select_drift_more:
        names = [name for name, drift in drifts.items() if drift > norm_threshold]
    else:
        names = [name for name, drift in drifts.items() if drift <= norm_threshold]
    return LayerResult(names, [current[name] for name in names], drifts)


def select_layers_by_percentage(
    current: State,
    initial: State | None,
    *,
    exchange_percentage: float,
    normalize: bool = True,
    select_drift_more: bool = True,
) -> LayerResult:
    """The ``ceil(L * exchange_percentage)`` entries of largest (or smallest) drift, in drift order.

    Ties keep state order in both directions, as Python's stable ``sorted(reverse=...)`` keeps them.
    """
    require_fraction("exchange_percentage", exchange_percentage)
    drifts = _drifts(current, initial, normalize, "select_layers_by_percentage")
    count = math.ceil(len(drifts) * exchange_percentage)
    numbers = [name for name, drift in drifts.items() if not math.isnan(drift)]
    ranked = sorted(numbers, key=drifts.__getitem__, reverse=select_drift_more)
    ranked += [name for name, drift in drifts.items() if math.isnan(drift)]
    names = ranked[:count]
    return LayerResult(names, [current[name] for name in names], drifts)


def _drifts(current: State, initial: State | None, normalize: bool, criterion: str) -> dict[str, float]:
    require_nonempty(current)
    return drift_norms(current, require_initial(criterion, initial), normalize=normalize)
