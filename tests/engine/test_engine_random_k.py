"""Seeded random-k: the draw (paramsel.wire.seeded, which the engine is handed) against SplitMix64 in
scalar Python integers (tests/seeded_reference.py), and the engine's per-tensor random-k of an update.

Rule (proto/paramsel/v1/criteria.proto, UPDATE_SELECTION_RANDOM_K): tensor j of the state (every tensor
counted) draws with s_j = (seed + j) mod 2^64; of a tensor with n >= 1 entries and at least one
dimension, the k_t = ceil(n x sparsity_level) positions whose SplitMix64 keys are smallest, increasing.
"""

from __future__ import annotations

import pytest
import torch
from seeded_reference import (
    LITERAL_COUNT,
    LITERAL_NUMEL,
    LITERAL_POSITIONS,
    LITERAL_SEED,
    reference_positions,
    splitmix64,
)

from paramsel import engine
from paramsel.engine import InvalidArgument, UpdateSelection, select_sparse_update
from paramsel.engine.random_k import random_k_count, tensor_seed
from paramsel.wire import WireError
from paramsel.wire import seeded as seeded_module
from paramsel.wire.seeded import seeded_positions, splitmix64_keys

TOP = (1 << 64) - 1


def test_the_scalar_reference_is_splitmix64() -> None:
    # SplitMix64's published first outputs for seed 0 (Vigna's splitmix64.c).
    assert [splitmix64(0, i) for i in range(3)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
    ]


@pytest.mark.parametrize("seed", [0, 1, 42, 1 << 63, TOP - 5, TOP])
def test_vectorised_keys_are_the_scalar_ones_wraparound_included(seed: int) -> None:
    keys = splitmix64_keys(seed, 3, 40)
    assert keys.dtype.name == "uint64"
    assert [int(k) for k in keys] == [splitmix64(seed, i) for i in range(3, 40)]


def test_the_pinned_literal_draw() -> None:
    # The same literal list pins every other client's implementation (the Node client's too).
    assert reference_positions(LITERAL_SEED, LITERAL_NUMEL, LITERAL_COUNT) == LITERAL_POSITIONS
    assert LITERAL_POSITIONS == [1, 4, 15, 16, 18]
    drawn = seeded_positions(42, 20, 5)
    assert drawn.dtype.name == "int64"
    assert drawn.tolist() == [1, 4, 15, 16, 18]


@pytest.mark.parametrize(
    ("seed", "numel", "count"),
    [
        (0, 1, 1),
        (0, 2, 1),
        (7, 4, 2),
        (8, 4, 2),
        (TOP, 4, 2),
        (1, 6, 3),
        (123456789, 50, 17),
        (TOP - 1, 33, 32),
        (1 << 63, 100, 1),
        (99, 64, 64),
    ],
)
def test_positions_match_the_scalar_reference(seed: int, numel: int, count: int) -> None:
    assert seeded_positions(seed, numel, count).tolist() == reference_positions(seed, numel, count)


def test_positions_across_work_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Keys are computed a chunk at a time (twice: to find the threshold, then to pick the positions);
    # chunks of 7 entries cut these tensors in many places.
    monkeypatch.setattr(seeded_module, "SEEDED_WORK_CHUNK", 7)
    for seed, numel, count in [(5, 50, 9), (TOP, 49, 48), (3, 8, 1), (11, 7, 3), (2, 15, 14)]:
        assert seeded_positions(seed, numel, count).tolist() == reference_positions(seed, numel, count)


def test_positions_of_a_tensor_larger_than_one_chunk() -> None:
    numel = seeded_module.SEEDED_WORK_CHUNK + 4_000
    assert seeded_positions(2024, numel, 5).tolist() == reference_positions(2024, numel, 5)


def test_none_and_all() -> None:
    assert seeded_positions(3, 10, 0).tolist() == []
    assert seeded_positions(3, 0, 0).tolist() == []
    assert seeded_positions(3, 5, 5).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("seed", "numel", "count", "needle"),
    [
        (0, 4, 5, "not 5"),
        (0, 4, -1, "not -1"),
        (-1, 4, 1, "uint64"),
        (1 << 64, 4, 1, "uint64"),
    ],
)
def test_impossible_draws_are_refused(seed: int, numel: int, count: int, needle: str) -> None:
    with pytest.raises(WireError, match=needle):
        seeded_positions(seed, numel, count)


def test_tensor_seeds_wrap_and_counts_round_as_top_k() -> None:
    assert tensor_seed(TOP, 0) == TOP
    assert tensor_seed(TOP, 1) == 0
    assert tensor_seed(TOP, 3) == 2
    assert random_k_count((4,), 0.5) == 2
    assert random_k_count((2, 3), 0.5) == 3
    # 100 x 0.07 is 7.000000000000001 in binary64, so k_t = 8, as top-k's k = ceil(N x level) would be.
    assert random_k_count((100,), 0.07) == 8
    assert random_k_count((10, 10), 0.07) == 8
    assert random_k_count((3,), 1e-9) == 1
    assert random_k_count((), 1.0) == 0  # 0-d: skipped
    assert random_k_count((0, 5), 1.0) == 0  # empty: skipped


# --- the engine's random-k of an update ------------------------------------------------------------

# u = w - w0 (no residual): a = [9, 18, 0, 36], s (0-d) = 1, b = [[1, 2, 3], [4, 5, 6]], e empty.
W = {
    "a": torch.tensor([10.0, 20.0, 3.0, 40.0]),
    "s": torch.tensor(2.0),
    "b": torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]),
    "e": torch.zeros(0),
}
W0 = {
    "a": torch.tensor([1.0, 2.0, 3.0, 4.0]),
    "s": torch.tensor(1.0),
    "b": torch.zeros(2, 3),
    "e": torch.zeros(0),
}
U_A = [9.0, 18.0, 0.0, 36.0]
U_B = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def random_k(seed: int, level: float = 0.5, **kwargs: object) -> engine.SparseUpdateResult:
    return select_sparse_update(
        W,
        {n: t.clone() for n, t in W0.items()},
        sparsity_level=level,
        selection=UpdateSelection.RANDOM_K,
        seed=seed,
        draw=seeded_positions,
        **kwargs,  # type: ignore[arg-type]
    )


def test_random_k_draws_each_tensor_from_its_own_seed() -> None:
    result = random_k(TOP)
    # a is tensor 0 (seed 2^64 - 1), s tensor 1 (0-d: skipped, but counted), b tensor 2 (seed
    # 2^64 - 1 + 2 = 1 mod 2^64), e tensor 3 (empty: skipped). k_a = ceil(4 x 0.5) = 2, k_b = 3.
    pos_a = reference_positions(TOP, 4, 2)
    pos_b = reference_positions(1, 6, 3)
    assert (pos_a, pos_b) == ([2, 3], [0, 3, 4])
    assert [t.name for t in result.tensors] == ["a", "b"]
    a, b = result.tensors
    assert a.positions.tolist() == pos_a
    assert b.positions.tolist() == pos_b
    # Every drawn entry is sent, a[2]'s exact zero included; values are u there, in float32.
    assert a.values.tolist() == [U_A[p] for p in pos_a] == [0.0, 36.0]
    assert b.values.tolist() == [U_B[p] for p in pos_b] == [1.0, 4.0, 5.0]
    assert a.values.dtype == torch.float32
    assert (a.shape, b.shape) == ((4,), (2, 3))
    assert dict(result.seeds) == {"a": TOP, "b": 1}
    # N = 4 + 1 + 6 + 0 = 11; k = selected = sent = 2 + 3; threshold 0.
    assert (result.total_entries, result.k, result.selected_entries, result.threshold) == (11, 5, 5, 0)


def test_random_k_at_sparsity_one_sends_the_whole_update() -> None:
    result = random_k(42, 1.0)
    assert [t.positions.tolist() for t in result.tensors] == [[0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert [t.values.tolist() for t in result.tensors] == [U_A, U_B]


def test_random_k_needs_the_draw_and_a_uint64_seed() -> None:
    with pytest.raises(InvalidArgument, match="position draw"):
        select_sparse_update(W, W0, sparsity_level=0.5, selection=UpdateSelection.RANDOM_K, seed=1)
    with pytest.raises(InvalidArgument, match="uint64"):
        random_k(1 << 64)
    with pytest.raises(InvalidArgument, match="uint64"):
        random_k(-1)
