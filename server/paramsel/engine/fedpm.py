"""FedPM: send a Bernoulli mask sampled from each score tensor, as FL4Health's
``select_scores_and_sample_masks`` does, but from a seeded generator so that a run can be repeated."""

from __future__ import annotations

import math
import operator

import numpy as np
import torch

from .errors import InvalidArgument
from .layers import LayerResult
from .state import State, require_not_bool

_SCORE_SUFFIXES = ("weight_scores", "bias_scores")


def is_fedpm_score(name: str) -> bool:
    """True for ``weight_scores`` / ``bias_scores`` entries, whether top-level or inside a module."""
    return name.rsplit(".", 1)[-1] in _SCORE_SUFFIXES


def sample_fedpm_masks(current: State, *, seed: int, packed: bool = False) -> LayerResult:
    """For each score tensor, in state order, an int64 0/1 mask drawn from Bernoulli(sigmoid(score)).

    The draws come from one PCG64 stream seeded with ``seed`` and consumed in state order, so the same
    state and seed give the same masks. A model without score tensors gives an empty result.

    ``packed`` (beyond FL4Health) gives each mask at 1 bit per entry instead: a uint8 tensor of shape
    [ceil(n / 8)] (n the score tensor's entries), entry i in row-major order being bit i % 8 (counted
    from the least significant) of byte i // 8, the unused high bits of the last byte 0. The draws are
    the same: unpacked, the bits are the int64 masks of the same seed.
    """
    try:
        rng = np.random.Generator(np.random.PCG64(operator.index(seed)))
    except (TypeError, ValueError) as err:  # PCG64 refuses negative seeds
        raise InvalidArgument(f"seed must be a non-negative integer, got {seed!r}") from err
    names: list[str] = []
    masks: list[torch.Tensor] = []
    with torch.no_grad():
        for name, tensor in current.items():
            if not is_fedpm_score(name):
                continue
            require_not_bool(name, tensor)
            mask = _sampled_mask(name, tensor.detach(), rng, packed)
            names.append(name)
            masks.append(mask)
    return LayerResult(names, masks, {})


def _sampled_mask(name: str, tensor: torch.Tensor, rng: np.random.Generator, packed: bool) -> torch.Tensor:
    """One tensor's mask. A function of its own, so that its float64 probabilities and draws are freed
    before the next tensor's are made (a server reserves one tensor's at a time; see
    :func:`paramsel.engine.budget.fedpm_work`)."""
    probability = torch.sigmoid(tensor).double().numpy()
    if probability.size and math.isnan(float(probability.min())):
        raise InvalidArgument(f"score tensor {name!r} has a NaN score; no mask can be sampled")
    # u < p with u uniform on [0, 1) is 1 with probability p, and exactly 0 / 1 at p = 0 / 1.
    draws = np.asarray(rng.random(probability.shape) < probability)
    if packed:
        return torch.from_numpy(np.packbits(draws.reshape(-1), bitorder="little"))
    return torch.from_numpy(draws.astype(np.int64))
