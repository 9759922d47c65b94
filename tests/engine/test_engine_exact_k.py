"""Exact-k (beyond FL4Health): exactly k entries, ties at the threshold broken by state position."""

from __future__ import annotations

import torch

from paramsel.engine import ScoreFunction, select_top_k

MAGNITUDE = ScoreFunction.LARGEST_FINAL_MAGNITUDE


def test_exact_k_breaks_ties_by_state_then_row_major_order() -> None:
    # |scores|: a [3, 1, 3], b [3, 5]; N = 5, k = ceil(5 * 0.6) = 3, threshold 3 (tied four ways).
    state = {"a": torch.tensor([3.0, 1.0, -3.0]), "b": torch.tensor([[3.0, 5.0]])}
    fl4health = select_top_k(state, None, sparsity_level=0.6, score_function=MAGNITUDE)
    assert fl4health.selected_entries == 4  # every tie goes
    exact = select_top_k(state, None, sparsity_level=0.6, score_function=MAGNITUDE, exact_k=True)
    assert exact.selected_entries == 3
    # 5 is above the threshold; two of the four 3s fit: a[0] and a[2], the earliest.
    assert [(t.name, t.positions.tolist(), t.values.tolist()) for t in exact.tensors] == [
        ("a", [0, 2], [3.0, -3.0]),
        ("b", [1], [5.0]),
    ]


def test_exact_k_without_ties_equals_the_default() -> None:
    state = {"w": torch.tensor([4.0, -1.0, 2.0, 8.0])}
    default = select_top_k(state, None, sparsity_level=0.5, score_function=MAGNITUDE)
    exact = select_top_k(state, None, sparsity_level=0.5, score_function=MAGNITUDE, exact_k=True)
    assert exact.tensors[0].positions.tolist() == default.tensors[0].positions.tolist() == [0, 3]


def test_exact_k_counts_unsent_0d_entries_toward_k() -> None:
    # |n| = 9 is the largest score and 0-d: it uses one of k = ceil(4 * 0.5) = 2 slots, unsent.
    state = {"n": torch.tensor(9.0), "w": torch.tensor([2.0, 2.0, 2.0])}
    exact = select_top_k(state, None, sparsity_level=0.5, score_function=MAGNITUDE, exact_k=True)
    assert exact.selected_entries == 2
    assert exact.tensors[0].positions.tolist() == [0]


def test_exact_k_selects_exactly_k_on_a_model_of_ties() -> None:
    state = {"w": torch.ones(1000), "v": torch.ones(10, 10)}
    exact = select_top_k(state, None, sparsity_level=0.123, score_function=MAGNITUDE, exact_k=True)
    assert exact.k == 136
    assert exact.selected_entries == 136
    assert exact.tensors[0].positions.tolist() == list(range(136))
