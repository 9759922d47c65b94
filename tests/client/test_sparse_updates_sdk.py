"""Sparse updates with error feedback through the SDK (``SparseUpdateExchanger``, ``aggregate_updates``)
against a real server: the residual carried over three rounds, float16 rounding absorbed by it, seeded
random-k positions, per-coordinate averages and the pull that adds them. Every expectation is worked out
by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support import StateModule

from paramsel.client import (
    Client,
    ParamselError,
    PositionEncoding,
    ScoreFunction,
    SelectionKind,
    SparseUpdate,
    SparseUpdateExchanger,
    StatusCode,
    TopK,
    UpdateSelection,
    aggregate_updates,
    unpack_compact,
)
from paramsel.client._updates import decode_update
from paramsel.server.app import RunningServer

MASK64 = (1 << 64) - 1


def splitmix64_key(seed: int, i: int) -> int:
    """SplitMix64's output number i (from 0) when seeded with ``seed``, one Python int at a time: the
    rule criteria.proto states, written out independently of the vectorised code."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_the_key_is_splitmix64() -> None:
    # SplitMix64's first output seeded with 0 is 0xE220A8397B1DCDAF (Vigna's reference splitmix64.c).
    assert splitmix64_key(0, 0) == 0xE220A8397B1DCDAF
    # Pinned for the Node client too (examples/node/client.js checks the same list).
    assert random_k_positions(42, 20, 5) == [1, 4, 15, 16, 18]


def random_k_positions(seed: int, numel: int, k: int) -> list[int]:
    keys = sorted(range(numel), key=lambda i: splitmix64_key(seed, i))
    return sorted(keys[:k])


def module(**tensors: list[float]) -> StateModule:
    return StateModule({name: torch.tensor(v, dtype=torch.float32) for name, v in tensors.items()})


def sent_of(payload: bytes) -> dict[str, dict[int, float]]:
    return {
        t.name: dict(zip(t.positions.tolist(), t.values.tolist(), strict=True))
        for t in decode_update(payload)
    }


def test_the_residual_carries_what_was_not_sent_over_three_rounds(server: RunningServer) -> None:
    # One tensor of 4 entries at sparsity 0.5: k = ceil(4 x 0.5) = 2 entries of largest |u| a round.
    exchanger = SparseUpdateExchanger(0.5, target=server.target)
    start = module(w=[0.0, 0.0, 0.0, 0.0])

    # Round 1: u = w - w0 = [1, -3, 0.5, 2]: -3 and 2 are sent; r = [1, 0, 0.5, 0].
    sent = sent_of(exchanger.push_compact(module(w=[1.0, -3.0, 0.5, 2.0]), start))
    assert sent == {"w": {1: -3.0, 3: 2.0}}
    assert exchanger.residual["w"].tolist() == [1.0, 0.0, 0.5, 0.0]

    # Round 2: w - w0 = [0.5, 0, 0, 0], u = [1.5, 0, 0.5, 0]: 1.5 and 0.5 are sent; r = 0.
    sent = sent_of(exchanger.push_compact(module(w=[0.5, 0.0, 0.0, 0.0]), start))
    assert sent == {"w": {0: 1.5, 2: 0.5}}
    assert exchanger.residual["w"].tolist() == [0.0, 0.0, 0.0, 0.0]

    # Round 3: u = [0.25, -0.125, -1, 0]: -1 and 0.25 are sent; r = [0, -0.125, 0, 0].
    sent = sent_of(exchanger.push_compact(module(w=[0.25, -0.125, -1.0, 0.0]), start))
    assert sent == {"w": {0: 0.25, 2: -1.0}}
    assert exchanger.residual["w"].tolist() == [0.0, -0.125, 0.0, 0.0]


def test_float16_rounding_stays_in_the_residual(server: RunningServer) -> None:
    # 1/3 in float32 is 0.3333333432674408; in float16, 1365/4096 = 0.333251953125 (half an ulp of
    # float16 at 1/3 is 2**-13 ~ 1.2e-4). The value travels as float16 and the residual keeps the
    # difference, computed in float32.
    exchanger = SparseUpdateExchanger(0.25, value_dtype=torch.float16, target=server.target)
    third = float(np.float32(1 / 3))
    payload = exchanger.push_compact(module(w=[third, 0.0, 0.0, 0.0]), module(w=[0.0, 0.0, 0.0, 0.0]))
    (tensor,) = decode_update(payload)
    assert tensor.values.dtype == torch.float16
    assert tensor.values.tolist() == [0.333251953125]
    expected = np.float32(third) - np.float32(0.333251953125)
    assert abs(float(expected)) <= 2.0**-13
    assert exchanger.residual["w"].tolist() == [float(expected), 0.0, 0.0, 0.0]


def test_random_k_positions_come_from_the_seed(server: RunningServer) -> None:
    # Tensors a (20 entries) and b (7): ceil(20 x 0.25) = 5 and ceil(7 x 0.25) = 2 positions, drawn
    # with seeds 42 + 0 and 42 + 1 (their index in the state). The compact answer carries seeds only.
    a = [float(i + 1) for i in range(20)]
    b = [float(-i - 1) for i in range(7)]
    exchanger = SparseUpdateExchanger(0.25, selection="random_k", target=server.target)
    payload = exchanger.push_compact(module(a=a, b=b), module(a=[0.0] * 20, b=[0.0] * 7), seed=42)
    tensors = {t.name: t for t in decode_update(payload)}
    want_a = random_k_positions(42, 20, 5)
    want_b = random_k_positions(43, 7, 2)
    assert tensors["a"].positions.tolist() == want_a
    assert tensors["a"].values.tolist() == [a[p] for p in want_a]
    assert tensors["b"].positions.tolist() == want_b
    assert (tensors["a"].position_seed, tensors["b"].position_seed) == (42, 43)
    # A different seed draws other positions (for 20 choose 5, the same set would be a 1 in 15504 fluke).
    other = SparseUpdateExchanger(0.25, selection=UpdateSelection.RANDOM_K, target=server.target)
    again = other.push_compact(module(a=a, b=b), module(a=[0.0] * 20, b=[0.0] * 7), seed=7)
    assert {t.name: t for t in decode_update(again)}["a"].positions.tolist() == random_k_positions(7, 20, 5)


def test_random_k_sends_zeros_too_and_takes_no_position_bytes(server: RunningServer) -> None:
    # Every drawn position is sent, zero or not; with POSITION_ENCODING_COMPACT the positions take no bytes.
    model = {"a": torch.zeros(64)}
    result = Client(target=server.target).select(
        SparseUpdate(0.5, UpdateSelection.RANDOM_K, seed=3), model, {"a": torch.zeros(64)}
    )
    assert result.header.kind is SelectionKind.SPARSE_UPDATE
    (tensor,) = result.sparse
    assert tensor.positions.tolist() == random_k_positions(3, 64, 32)
    assert tensor.values.tolist() == [0.0] * 32
    coo = Client(target=server.target).select(
        SparseUpdate(0.5, UpdateSelection.RANDOM_K, seed=3),
        model,
        {"a": torch.zeros(64)},
        position_encoding=PositionEncoding.COO_INT64,
    )
    assert coo.sparse[0].positions.tolist() == tensor.positions.tolist()
    assert coo.sparse[0].position_seed is None


def test_per_coordinate_average_and_the_pull_that_adds_it(server: RunningServer) -> None:
    # Client A (10 examples) sends w[0] = 1 and w[2] = 4; client B (30 examples) sends w[2] = 8 and
    # w[3] = -2. Per coordinate, weighted: w[0] = 1 (A alone), w[2] = (4 x 10 + 8 x 30) / 40 = 7,
    # w[3] = -2 (B alone); w[1] nobody sent, so it is not in the answer.
    start = module(w=[0.0, 0.0, 0.0, 0.0])
    a = SparseUpdateExchanger(0.5, target=server.target).push_compact(module(w=[1.0, 0.0, 4.0, 0.0]), start)
    b = SparseUpdateExchanger(0.5, target=server.target).push_compact(module(w=[0.0, 0.0, 8.0, -2.0]), start)
    averaged = aggregate_updates([(a, 10), (b, 30)], target=server.target)
    assert sent_of(averaged) == {"w": {0: 1.0, 2: 7.0, 3: -2.0}}
    # The same in the other order: the same bytes.
    assert aggregate_updates([(b, 30), (a, 10)], target=server.target) == averaged
    # Unweighted: w[2] = (4 + 8) / 2 = 6.
    assert sent_of(aggregate_updates([(a, 10), (b, 30)], weighted=False, target=server.target)) == {
        "w": {0: 1.0, 2: 6.0, 3: -2.0}
    }
    # The pull adds the average to the model the round started from: [10, 20, 30, 40] + [1, 0, 7, -2].
    model = module(w=[10.0, 20.0, 30.0, 40.0])
    SparseUpdateExchanger(0.5, target=server.target).pull_compact(averaged, model)
    assert model.w.tolist() == [11.0, 20.0, 37.0, 38.0]


def test_seeded_contributions_give_a_seeded_average(server: RunningServer) -> None:
    # Two clients draw the same positions (seed 9) of a 16-entry tensor at 0.25: 4 positions. Per
    # coordinate the average of 2 and 6 (equal weights) is 4 at each; the answer keeps the seed.
    start = module(a=[0.0] * 16)
    one = SparseUpdateExchanger(0.25, selection="random_k", target=server.target)
    two = SparseUpdateExchanger(0.25, selection="random_k", target=server.target)
    p1 = one.push_compact(module(a=[2.0] * 16), start, seed=9)
    p2 = two.push_compact(module(a=[6.0] * 16), start, seed=9)
    (tensor,) = decode_update(aggregate_updates([(p1, 5), (p2, 5)], target=server.target))
    assert tensor.position_seed == 9
    assert tensor.positions.tolist() == random_k_positions(9, 16, 4)
    assert tensor.values.tolist() == [4.0] * 4


def test_refusals_name_what_is_wrong(server: RunningServer) -> None:
    client = Client(target=server.target)
    model = {"w": torch.ones(3)}
    with pytest.raises(ParamselError, match="residual= goes only with SparseUpdate"):
        client.select(TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE), model, residual={"w": torch.ones(3)})
    with pytest.raises(ParamselError) as wrong_shape:
        client.select(SparseUpdate(0.5), model, {"w": torch.zeros(3)}, residual={"w": torch.ones(4)})
    assert wrong_shape.value.status is StatusCode.INVALID_ARGUMENT
    assert "'w'" in str(wrong_shape.value)
    with pytest.raises(ParamselError) as no_initial:
        client.select(SparseUpdate(0.5), model)
    assert no_initial.value.status is StatusCode.FAILED_PRECONDITION
    with pytest.raises(ParamselError, match="selection must be 'top_k' or 'random_k'"):
        SparseUpdateExchanger(0.5, selection="smallest")
    with pytest.raises(ParamselError, match="not a sparse update"):
        decode_update(_layers_payload())


def _layers_payload() -> bytes:
    from paramsel.client import pack_compact

    return pack_compact([np.ones(2, np.float32), np.array(["w"])])


def test_fl4health_lists_of_an_update_payload(server: RunningServer) -> None:
    # A compact update payload is a compact payload: unpack_compact gives FL4Health's packed list of it.
    payload = SparseUpdateExchanger(0.5, target=server.target).push_compact(
        module(w=[0.0, 5.0, 0.0, -6.0]), module(w=[0.0, 0.0, 0.0, 0.0])
    )
    values, indices, shape, names = unpack_compact(payload)
    assert values.tolist() == [5.0, -6.0]
    assert indices.tolist() == [[1], [3]]
    assert shape.tolist() == [4]
    assert names.tolist() == ["w"]
