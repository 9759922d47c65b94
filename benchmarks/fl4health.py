"""The baseline: FL4Health 0.4.2's top-k sparse COO push, by its cost profile, in this process.

Written here from its documented behaviour (not copied): scores |w - w0| per state tensor, one
``torch.cat`` of all flattened scores, a full descending ``torch.sort``, threshold = the k-th largest,
then per tensor ``torch.where`` masking and ``torch.nonzero`` for the values and (nnz, ndim) indices.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def push(model: nn.Module, initial_model: nn.Module, sparsity_level: float) -> list[np.ndarray]:
    """[values..., indices..., shapes..., names] for largest_magnitude_change_scores."""
    state = model.state_dict()
    start = initial_model.state_dict()
    scores = {name: torch.abs(w - start[name]) for name, w in state.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    ordered, _ = torch.sort(flat, descending=True)
    k = math.ceil(flat.numel() * sparsity_level)
    threshold = ordered[k - 1].item()
    del flat, ordered
    values: list[np.ndarray] = []
    indices: list[np.ndarray] = []
    shapes: list[np.ndarray] = []
    names: list[str] = []
    for name, w in state.items():
        if w.dim() == 0:
            continue
        masked = torch.where(scores[name] >= threshold, w, torch.zeros((), dtype=w.dtype))
        coords = torch.nonzero(masked)
        if coords.shape[0] == 0:
            continue
        values.append(masked[coords.unbind(1)].numpy())
        indices.append(coords.numpy())
        shapes.append(np.array(list(w.shape), dtype=np.int64))
        names.append(name)
    return [*values, *indices, *shapes, np.array(names)]
