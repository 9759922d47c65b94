"""A caller's own score function, its scores sent to the service (``ScoreFunction.SUPPLIED``): paramsel's
``SparseCooParameterExchanger`` against FL4Health's, bit for bit, for scores of every kind a score
function returns - integer scores for the int64 ``num_batches_tracked`` buffers beside float32 ones,
float64, float16, bool, ties, scores for some tensors only and in an order of their own - through the embedded server and a separate ``paramsel serve``."""

from __future__ import annotations

import pytest
import torch
from helpers import FlSparseCooParameterExchanger, assert_packed_identical, model_pair, ours
from torch import nn

SPARSITY_LEVELS = [0.01, 0.1, 0.37, 0.5, 1.0]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def magnitude(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """|w| in each tensor's dtype: int64 scores for num_batches_tracked, compared with float32 ones."""
    return {name: t.abs() for name, t in _state(model).items()}


def change_in_float64(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    assert initial_model is not None
    before = _state(initial_model)
    return {name: (t.double() - before[name].double()).abs() for name, t in _state(model).items()}


def rounded_in_float16(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Coarse float16 scores: many ties at every level."""
    return {name: (t.float() * 4).round().half() for name, t in _state(model).items()}


def negative_entries(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """bool scores: True for the negative entries."""
    return {name: t < 0 for name, t in _state(model).items()}


def weights_only_reversed(model: nn.Module, initial_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """Scores for the weights alone, last tensor first: FL4Health selects among the scored tensors only,
    in the scores' order."""
    return {name: t.abs() for name, t in reversed(_state(model).items()) if name.endswith("weight")}


FUNCTIONS = {
    "magnitude": magnitude,
    "weights_only_reversed": weights_only_reversed,
    "change_in_float64": change_in_float64,
    "rounded_in_float16": rounded_in_float16,
    "negative_entries": negative_entries,
}


@pytest.mark.parametrize("sparsity_level", SPARSITY_LEVELS)
@pytest.mark.parametrize("function", list(FUNCTIONS))
def test_a_callers_own_scores_select_as_fl4health_selects(
    paramsel_target: str, function: str, sparsity_level: float
) -> None:
    trained, initial = model_pair(seed=sorted(FUNCTIONS).index(function))
    score = FUNCTIONS[function]
    exchanger = ours.SparseCooParameterExchanger(sparsity_level, score)
    oracle = FlSparseCooParameterExchanger(sparsity_level, score)
    assert exchanger.criterion is None  # scored here, selected by the service
    expected = oracle.push_parameters(trained, initial)
    assert_packed_identical(exchanger.push_parameters(trained, initial), expected)
    assert_packed_identical(ours.unpack_compact(exchanger.push_compact(trained, initial)), expected)
