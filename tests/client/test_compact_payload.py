"""The compact payload: what travels between SDK and server, and what a client can forward."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from paramsel.client import (
    ParamselError,
    SparseCooParameterExchanger,
    largest_magnitude_change_scores,
    unpack_compact,
)
from paramsel.server.app import RunningServer


class Wide(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(1000, 1000, generator=generator), requires_grad=False)


@pytest.mark.parametrize(("sparsity", "limit"), [(0.1, 4.8), (0.01, 5.3)])
def test_compact_payload_is_near_the_information_floor(
    server: RunningServer, sparsity: float, limit: float
) -> None:
    exchanger = SparseCooParameterExchanger(sparsity, largest_magnitude_change_scores, target=server.target)
    current, initial = Wide(1), Wide(2)
    payload = exchanger.push_compact(current, initial)
    packed = exchanger.push_parameters(current, initial)
    sent = packed[0].size
    assert sent == math.ceil(1_000_000 * sparsity)  # continuous random scores: no ties
    # 4 B per float32 value plus Elias-Fano positions, framing included; FL4Health's list is 20 B.
    assert len(payload) / sent <= limit
    fl4health_bytes = sum(a.nbytes for a in packed[:3])
    assert fl4health_bytes / sent == pytest.approx(20.0, abs=0.01)
    unpacked = unpack_compact(payload)
    assert len(unpacked) == len(packed)
    for mine, theirs in zip(unpacked, packed, strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_lossy_compact_payload(server: RunningServer) -> None:
    exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=server.target)
    current, initial = Wide(1), Wide(2)
    exact = exchanger.push_compact(current, initial)
    half = exchanger.push_compact(current, initial, value_dtype=torch.float16)
    assert len(half) < 0.6 * len(exact)  # 2 B instead of 4 B per value
    values = unpack_compact(half)[0]
    assert values.dtype == np.float16
    np.testing.assert_allclose(values, unpack_compact(exact)[0], rtol=1e-3)


def test_garbage_is_not_a_payload() -> None:
    with pytest.raises(ParamselError, match="not a paramsel compact payload"):
        unpack_compact(b"\xff\xff\xff")
