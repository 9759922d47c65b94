"""Model states as the engine sees them, and the checks shared by every criterion."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import InvalidArgument

State = Mapping[str, torch.Tensor]
"""A model's state: name -> CPU tensor. Iteration order is the state order FL4Health walks."""


@dataclass(frozen=True)
class TensorSpec:
    """What a model declares about one of its state entries, so payloads can be checked against it."""

    name: str
    """The state-dict key, e.g. ``"fc1.weight"``."""
    dtype: torch.dtype
    """The dtype the model stores the entry in; pulls cast to it."""
    shape: tuple[int, ...]
    """The entry's shape; ``()`` for a 0-d tensor."""


def require_nonempty(state: State) -> None:
    if len(state) == 0:
        raise InvalidArgument("the model state is empty: it has no tensors to select from")


def require_fraction(field: str, value: float) -> None:
    """Accept ``0 < value <= 1``; written so that NaN fails too."""
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise InvalidArgument(f"{field} must be in (0, 1], got {value!r}")


def require_not_bool(name: str, tensor: torch.Tensor) -> None:
    # torch has no abs or subtraction for bool, so no score or drift is defined for it.
    if tensor.dtype == torch.bool:
        raise InvalidArgument(f"tensor {name!r} has dtype torch.bool, which cannot be scored or compared")


def check_same_layout(current: State, initial: State) -> None:
    """Raise InvalidArgument unless ``initial`` has the same names (in any order), shapes and dtypes."""
    missing = [name for name in current if name not in initial]
    if missing:
        raise InvalidArgument(f"the initial model has no tensor {missing[0]!r}, which the current model has")
    extra = [name for name in initial if name not in current]
    if extra:
        raise InvalidArgument(f"the initial model has tensor {extra[0]!r}, which the current model does not")
    for name, tensor in current.items():
        other = initial[name]
        if tuple(tensor.shape) != tuple(other.shape):
            raise InvalidArgument(
                f"tensor {name!r} has shape {tuple(tensor.shape)} in the current model "
                f"but {tuple(other.shape)} in the initial model"
            )
        if tensor.dtype != other.dtype:
            raise InvalidArgument(
                f"tensor {name!r} has dtype {tensor.dtype} in the current model "
                f"but {other.dtype} in the initial model"
            )
