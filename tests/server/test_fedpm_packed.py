"""FedPmCriterion.packed_masks: FedPM masks at 1 bit per entry, through a real server and in the engine.

Each mask travels as a uint8 tensor of shape [ceil(n / 8)]: entry i (row-major) is bit i % 8, counted
from the least significant, of byte i // 8; the unused high bits of the last byte are 0. The draws are
the ones of the int64 masks with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from paramsel import engine
from paramsel.engine import budget
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
RESULT = tensor_pb2.SECTION_RESULT
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)

# Saturated scores give certain masks: sigmoid(200) is 1 and sigmoid(-200) is 0 exactly in float32.
SURE = {
    "fc.weight": torch.ones(2, 2),  # not a score tensor: no mask
    # 12 entries, row-major 1 0 1 1 1 0 1 1 | 0 1 1 0: byte 0 = 1 + 4 + 8 + 16 + 64 + 128 = 221, byte 1
    # = 2 + 4 = 6 (its four high bits unused).
    "fc.weight_scores": torch.tensor(
        [[200.0, -200, 200, 200], [200, -200, 200, 200], [-200, 200, 200, -200]]
    ),
    "bias_scores": torch.tensor(200.0),  # 0-d: one entry, byte 1
}
# A model whose masks are random: 15 + 1 + 64 + 0 entries (not all multiples of 8).
RANDOM = {
    "a.weight_scores": torch.linspace(-3, 3, 15).reshape(3, 5),
    "weight_scores": torch.tensor(0.25),
    "b.bias_scores": torch.randn(8, 8, generator=torch.Generator().manual_seed(1)),
    "c.bias_scores": torch.zeros(0),
}


def fed_pm(seed: int, packed: bool) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(fed_pm=criteria_pb2.FedPmCriterion(seed=seed, packed_masks=packed))


def call(
    target: str, rpc: str, model: dict[str, torch.Tensor], criterion: criteria_pb2.Criterion
) -> list[Any]:
    message, start = (
        (service_pb2.SelectRequest, service_pb2.SelectStart)
        if rpc == "Select"
        else (service_pb2.PushRequest, service_pb2.PushStart)
    )
    frames = write_frames(
        message,
        ("start", start(criterion=criterion)),
        chunk_size=1 << 20,
        dense=[(MODEL, list(model.items()))],
    )
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        return list(getattr(stub, rpc)(iter(frames), timeout=CALL_TIMEOUT))


def masks(
    target: str, rpc: str, model: dict[str, torch.Tensor], seed: int, packed: bool
) -> list[tuple[str, torch.Tensor]]:
    got = read_frames(
        call(target, rpc, model, fed_pm(seed, packed)),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
        unique_names=False,
    )
    assert got.first.kind == service_pb2.SELECTION_KIND_FEDPM_MASKS
    assert got.first.layers.seed == seed
    return [(decl.name, tensor) for decl, tensor in got.dense[RESULT]]


def unpack(packed: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    n = int(np.prod(shape))
    return np.unpackbits(packed.numpy(), bitorder="little", count=n).astype(np.int64).reshape(tuple(shape))


@pytest.mark.parametrize("rpc", ["Select", "Push"])
def test_certain_masks_packed_by_hand(server: RunningServer, rpc: str) -> None:
    got = masks(server.target, rpc, SURE, seed=9, packed=True)
    assert [name for name, _ in got] == ["fc.weight_scores", "bias_scores"]
    weight, bias = (tensor for _, tensor in got)
    assert (weight.dtype, weight.shape, weight.tolist()) == (torch.uint8, (2,), [221, 6])
    assert (bias.dtype, bias.shape, bias.tolist()) == (torch.uint8, (1,), [1])


def test_the_hand_example_is_what_it_says() -> None:
    signs = [1 if s > 0 else 0 for s in SURE["fc.weight_scores"].reshape(-1).tolist()]
    assert signs == [1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 0]


@pytest.mark.parametrize("rpc", ["Select", "Push"])
def test_packed_masks_are_the_unpacked_draws(server: RunningServer, rpc: str) -> None:
    plain = masks(server.target, rpc, RANDOM, seed=1234, packed=False)
    packed = masks(server.target, rpc, RANDOM, seed=1234, packed=True)
    assert [name for name, _ in packed] == [name for name, _ in plain]
    for (name, mask), (_, bits) in zip(plain, packed, strict=True):
        n = mask.numel()
        assert mask.dtype == torch.int64
        assert (bits.dtype, tuple(bits.shape)) == (torch.uint8, ((n + 7) // 8,)), name
        assert np.array_equal(unpack(bits, mask.shape), mask.numpy()), name
        if n % 8:  # the unused high bits of the last byte are 0
            assert int(bits[-1]) >> (n % 8) == 0, name
    # Not all ones or zeros: the comparison above means something.
    a = next(mask for name, mask in plain if name == "b.bias_scores")
    assert 0 < int(a.sum()) < 64


def test_the_engine_packs_the_same_draws_and_budgets_the_packed_copy() -> None:
    plain = engine.sample_fedpm_masks(RANDOM, seed=77)
    packed = engine.sample_fedpm_masks(RANDOM, seed=77, packed=True)
    assert packed.names == plain.names
    for mask, bits in zip(plain.tensors, packed.tensors, strict=True):
        assert np.array_equal(unpack(bits, mask.shape), mask.numpy())
    specs = [engine.TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in RANDOM.items()]
    held = {need.name: need.held for need in budget.fedpm_work(specs, packed=True).needs}
    assert held == {"a.weight_scores": 2, "weight_scores": 1, "b.bias_scores": 8, "c.bias_scores": 0}
    unpacked = {need.name: need.held for need in budget.fedpm_work(specs).needs}
    assert unpacked == {"a.weight_scores": 120, "weight_scores": 8, "b.bias_scores": 512, "c.bias_scores": 0}
