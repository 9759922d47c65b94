"""Benchmark models: a few large square Linear layers and a BatchNorm (so the state has buffers), and
issue 14's model (two convolutions and four square Linear layers)."""

from __future__ import annotations

import copy
import hashlib
import math

import numpy as np
import torch
from torch import nn


def _linear_stack(n_params: int, layers: int) -> nn.Sequential:
    width = round(math.sqrt(n_params / layers))
    # Built on the meta device and given uninitialised memory: the caller fills the weights.
    linears = nn.Sequential(*(nn.Linear(width, width, device="meta") for _ in range(layers)))
    return nn.Sequential(*linears.to_empty(device="cpu"), nn.BatchNorm1d(width))


def _conv_linear_stack(width: int) -> nn.Sequential:
    """Issue 14's model: Conv2d(3, 64, 3), Conv2d(64, 128, 3), then four ``width`` x ``width`` Linear layers.

    At ``width`` 3536: 75,648 + 4 x 12,506,832 = 50,102,976 float32 parameters (50.1M, 200 MB), no
    buffers. Only its state matters here (a push reads ``state_dict()``), so the layers are not chained
    into a forward pass that would run.
    """
    convs = [nn.Conv2d(3, 64, 3, device="meta"), nn.Conv2d(64, 128, 3, device="meta")]
    linears = [nn.Linear(width, width, device="meta") for _ in range(4)]
    return nn.Sequential(*convs, *linears).to_empty(device="cpu")


def state_entries(model: nn.Module) -> int:
    """N: every entry of the state, parameters and buffers."""
    return sum(t.numel() for t in model.state_dict().values())


def state_bytes(model: nn.Module) -> int:
    return sum(t.nbytes for t in model.state_dict().values())


@torch.no_grad()
def trained_pair(n_params: int, layers: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """(model, initial_model): random weights, and the same plus a small 'training' step everywhere.

    Deterministic in ``seed`` (separate processes build identical pairs). The BatchNorm's running
    statistics move too and ``num_batches_tracked`` counts one batch, as after a real round.
    """
    return _trained(_linear_stack(n_params, layers), seed)


def conv_linear_pair(width: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """(model, initial_model) of issue 14's model (:func:`_conv_linear_stack`), as :func:`trained_pair`."""
    return _trained(_conv_linear_stack(width), seed)


@torch.no_grad()
def _trained(initial: nn.Module, seed: int) -> tuple[nn.Module, nn.Module]:
    generator = torch.Generator().manual_seed(seed)
    for p in initial.parameters():
        p.normal_(0.0, 0.02, generator=generator)
    model = copy.deepcopy(initial)
    perturb(model, generator)
    return model, initial


@torch.no_grad()
def perturb(model: nn.Module, generator: torch.Generator, scale: float = 0.01) -> None:
    """One more small 'training step' in place: noise on every float state entry, one more batch counted."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.add_(torch.empty_like(tensor).normal_(0.0, scale, generator=generator))
        else:
            tensor.add_(1)


@torch.no_grad()
def tied_pair(n_params: int, layers: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """A pair whose |w - w0| takes only five values (0, .25, .5, .75, 1), exactly, and w is never 0.

    w0 is an integer in [10, 20] and w = w0 + j/4 with j in [-4, 4]: many ties at any threshold.
    """
    generator = torch.Generator().manual_seed(seed)
    initial = _linear_stack(n_params, layers)
    for p in initial.parameters():
        p.copy_(torch.randint(10, 21, p.shape, generator=generator))
    model = copy.deepcopy(initial)
    for p in model.parameters():
        p.add_(torch.randint(-4, 5, p.shape, generator=generator).float() * 0.25)
    return model, initial


@torch.no_grad()
def new_round(initial: nn.Module, round_: int) -> None:
    """A new value at one entry of the initial model (a different entry each round): a new round's
    initial model, the same in every process that applies the same rounds."""
    first = next(iter(initial.state_dict().values())).view(-1)
    first[round_ % first.numel()] += 0.001


def digest(packed: list[np.ndarray]) -> str:
    """A fingerprint of a packed list (dtypes, shapes and bytes of every array)."""
    h = hashlib.sha256()
    for array in packed:
        a = np.ascontiguousarray(array)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def sent_values(packed: list[np.ndarray]) -> int:
    """How many values a sparse COO packed list [values..., indices..., shapes..., names] carries."""
    n = (len(packed) - 1) // 3
    return sum(int(np.asarray(v).size) for v in packed[:n])


def packed_bytes(packed: list[np.ndarray]) -> int:
    """Bytes of values + indices + shapes in a packed list (FL4Health's payload, names excluded)."""
    return sum(int(np.asarray(a).nbytes) for a in packed[:-1])


def info_floor_bytes_per_value(n: int, k: int) -> float:
    """log2(C(N, k)) / 8 / k: the fewest bytes per value that can say which k of N positions are sent."""
    if k <= 0 or k >= n:
        return 0.0
    log2_binom = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
    return log2_binom / 8 / k
