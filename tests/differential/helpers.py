"""Shared pieces of the drop-in differential tests: FL4Health's classes next to ours, small real models,
and comparisons that demand bit-for-bit equality (values, dtypes, shapes, names, order).

Imported only by ``test_dropin_*.py``, which the conftest skips when FL4Health is not importable.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from fl4health.parameter_exchange import parameter_selection_criteria as fl_criteria
from fl4health.parameter_exchange.fedpm_exchanger import FedPmExchanger as FlFedPmExchanger
from fl4health.parameter_exchange.layer_exchanger import DynamicLayerExchanger as FlDynamicLayerExchanger
from fl4health.parameter_exchange.sparse_coo_parameter_exchanger import (
    SparseCooParameterExchanger as FlSparseCooParameterExchanger,
)
from torch import nn

import paramsel.client as ours

__all__ = [
    "SCORE_NAMES",
    "FlDynamicLayerExchanger",
    "FlFedPmExchanger",
    "FlSparseCooParameterExchanger",
    "Net",
    "OneTensor",
    "assert_packed_identical",
    "assert_same_array",
    "assert_states_identical",
    "fl_criteria",
    "fl_score",
    "model_pair",
    "our_score",
    "ours",
    "twin",
]

SCORE_NAMES = [
    "largest_final_magnitude_scores",
    "smallest_final_magnitude_scores",
    "largest_magnitude_change_scores",
    "smallest_magnitude_change_scores",
    "largest_increase_in_magnitude_scores",
    "smallest_increase_in_magnitude_scores",
]


def fl_score(name: str) -> Callable[..., Any]:
    """FL4Health's score function of that name."""
    function: Callable[..., Any] = getattr(fl_criteria, name)
    return function


def our_score(name: str) -> Callable[..., Any]:
    """paramsel's score function of that name."""
    function: Callable[..., Any] = getattr(ours, name)
    return function


class Net(nn.Module):
    """Conv + BatchNorm2d + Linear + BatchNorm1d: float parameters, float buffers and the int64 0-d
    ``num_batches_tracked`` buffers, in a realistic state order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=3)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(12, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn2(self.conv(x)))
        x = torch.nn.functional.max_pool2d(x, 2).flatten(1)
        out: torch.Tensor = self.head(torch.relu(self.bn1(self.fc(x))))
        return out


class OneTensor(nn.Module):
    """A module whose state is the given tensors, in order (floats as parameters, others as buffers)."""

    def __init__(self, **state: Any) -> None:
        super().__init__()
        for name, value in state.items():
            tensor = torch.as_tensor(value)
            if tensor.is_floating_point():
                self.register_parameter(name, nn.Parameter(tensor.clone(), requires_grad=False))
            else:
                self.register_buffer(name, tensor.clone())


def twin(model: nn.Module) -> nn.Module:
    """An independent copy, so that FL4Health and paramsel never write into the same tensors."""
    return copy.deepcopy(model)


def model_pair(seed: int = 0) -> tuple[Net, Net]:
    """(trained, initial): the initial model, and a copy with trained BatchNorm buffers and a
    perturbation that leaves some entries unchanged, zeroes some, and creates ties, so that every score
    function and drift has ties, exact zeros and unchanged entries to get right."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    initial = Net()
    trained = twin(initial)
    assert isinstance(trained, Net)
    with torch.no_grad():
        # What two training-mode batches leave in the BatchNorm buffers (a forward pass on the CPU
        # costs far more than the whole comparison, so the buffers are written directly).
        for norm in (trained.bn2, trained.bn1):
            assert norm.running_mean is not None
            assert norm.running_var is not None
            assert norm.num_batches_tracked is not None
            norm.running_mean.copy_(torch.randn(norm.running_mean.shape, generator=generator) * 0.2)
            norm.running_var.copy_(1 + torch.rand(norm.running_var.shape, generator=generator))
            norm.num_batches_tracked.fill_(2)  # int64, 0-d; drifts by 2 in both: a tie
        for name, parameter in trained.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * 0.1
            keep = torch.rand(parameter.shape, generator=generator) < 0.25  # unchanged entries
            parameter.add_(torch.where(keep, torch.zeros_like(noise), noise))
            flat = parameter.view(-1)
            if flat.numel() >= 4:
                flat[0] = 0.0  # an exact zero: selected by some scores but never sent
                flat[1] = flat[2]  # a tie
            if name == "fc.weight":
                flat[3] = -flat[2]  # a tie in magnitude
    return trained, initial


def assert_same_array(ours_array: Any, theirs: Any, what: str) -> None:
    """Same type, dtype, shape and bytes (NaN payloads included)."""
    assert isinstance(ours_array, np.ndarray), f"{what}: paramsel gave a {type(ours_array).__name__}"
    assert isinstance(theirs, np.ndarray), f"{what}: FL4Health gave a {type(theirs).__name__}"
    assert ours_array.dtype == theirs.dtype, f"{what}: dtype {ours_array.dtype} != FL4Health's {theirs.dtype}"
    assert ours_array.shape == theirs.shape, f"{what}: shape {ours_array.shape} != FL4Health's {theirs.shape}"
    if ours_array.dtype.kind in "USO":
        assert ours_array.tolist() == theirs.tolist(), f"{what}: {ours_array} != FL4Health's {theirs}"
    else:
        same = np.ascontiguousarray(ours_array).tobytes() == np.ascontiguousarray(theirs).tobytes()
        assert same, f"{what}: {ours_array} != FL4Health's {theirs}"


def assert_packed_identical(ours_list: Sequence[Any], theirs: Sequence[Any], what: str = "packed") -> None:
    """Two packed lists, element by element."""
    assert isinstance(ours_list, list), f"{what}: paramsel gave a {type(ours_list).__name__}"
    assert len(ours_list) == len(theirs), f"{what}: {len(ours_list)} arrays != FL4Health's {len(theirs)}"
    for position, (a, b) in enumerate(zip(ours_list, theirs, strict=True)):
        assert_same_array(a, b, f"{what}[{position}]")


def assert_states_identical(ours_model: nn.Module, theirs: nn.Module) -> None:
    """Every state entry: same names in the same order, dtype, shape and bits."""
    a, b = ours_model.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert_same_array(a[name].detach().cpu().numpy(), b[name].detach().cpu().numpy(), f"state {name!r}")
