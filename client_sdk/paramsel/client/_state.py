"""Models <-> the name -> tensor maps and NDArrays the SDK moves around."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

NDArray = np.ndarray
NDArrays = list[np.ndarray]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state (parameters and buffers) in state order, on the CPU."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


def to_numpy(tensor: torch.Tensor) -> NDArray:
    """A numpy array of the tensor. bfloat16, which numpy lacks, becomes float32 (exactly)."""
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()


def to_tensor(array: NDArray) -> torch.Tensor:
    """A tensor of a (possibly read-only or non-contiguous) numpy array."""
    return torch.from_numpy(np.array(array, copy=True, order="C"))


def read_only_tensor(array: NDArray) -> torch.Tensor:
    """A tensor of a numpy array that the caller only reads: the array's own memory when torch can
    share it (C-contiguous, writeable, native byte order), else a copy (:func:`to_tensor`)."""
    a = np.asarray(array)
    if a.flags.c_contiguous and a.flags.writeable and a.dtype.isnative:
        return torch.from_numpy(a)
    return to_tensor(a)


def load_changed(model: nn.Module, changed: Mapping[str, torch.Tensor]) -> None:
    """Writes the changed tensors into the model's own tensors.

    FL4Health rebuilds the whole state and loads it strictly; writing only the named entries has the
    same effect (names and shapes were checked by the engine) without copying the untouched ones.
    """
    state = model.state_dict()
    with torch.no_grad():
        for name, tensor in changed.items():
            state[name].copy_(tensor)
