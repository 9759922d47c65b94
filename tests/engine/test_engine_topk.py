"""Top-k selection on tiny models whose answers are worked out by hand."""

import math

import pytest
import torch

from paramsel.engine import FailedPrecondition, InvalidArgument, ScoreFunction, TopKResult, select_top_k

LARGEST = ScoreFunction.LARGEST_FINAL_MAGNITUDE
CHANGE = ScoreFunction.LARGEST_MAGNITUDE_CHANGE


def sent(result: TopKResult) -> dict[str, tuple[list[float], list[int]]]:
    return {t.name: (t.values.tolist(), t.positions.tolist()) for t in result.tensors}


def test_tiny_model_by_hand() -> None:
    # |w| = a: [0.5, 2.0, 0.0, 1.0], b: [3.0, 0.25, 1.5]; N = 7, k = ceil(7 * 0.4) = 3,
    # descending 3.0, 2.0, 1.5, ... so the threshold is 1.5.
    current = {"a": torch.tensor([[0.5, -2.0], [0.0, 1.0]]), "b": torch.tensor([3.0, -0.25, 1.5])}
    result = select_top_k(current, None, sparsity_level=0.4, score_function=LARGEST)
    assert (result.total_entries, result.k, result.threshold, result.selected_entries) == (7, 3, 1.5, 3)
    assert sent(result) == {"a": ([-2.0], [1]), "b": ([3.0, 1.5], [0, 2])}
    a = result.tensors[0]
    assert a.shape == (2, 2)
    assert a.values.dtype == torch.float32
    assert a.positions.dtype == torch.int64


def test_change_score_by_hand() -> None:
    # |w - w0| = [0.5, 4.0, 1.0, 2.0]; k = ceil(4 * 0.5) = 2; threshold 2.0.
    current = {"w": torch.tensor([1.0, 5.0, -1.0, 2.0])}
    initial = {"w": torch.tensor([0.5, 1.0, 0.0, 0.0])}
    result = select_top_k(current, initial, sparsity_level=0.5, score_function=CHANGE)
    assert result.threshold == 2.0
    assert sent(result) == {"w": ([5.0, 2.0], [1, 3])}


def test_ties_at_the_threshold_are_all_selected() -> None:
    current = {"a": torch.tensor([1.0, 2.0, -2.0, 2.0, 0.5])}
    result = select_top_k(current, None, sparsity_level=0.2, score_function=LARGEST)
    assert result.k == 1
    assert result.threshold == 2.0
    assert result.selected_entries == 3
    assert sent(result) == {"a": ([2.0, -2.0, 2.0], [1, 2, 3])}


def test_int64_buffer_takes_part_and_keeps_its_dtype() -> None:
    # Scores promote to float32: [0.5, 3.0, 2.5] + [4, 0, 1]; k = 3; threshold 2.5 (a float).
    current = {"w": torch.tensor([0.5, -3.0, 2.5]), "count": torch.tensor([4, 0, -1])}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert result.threshold == 2.5
    assert isinstance(result.threshold, float)
    assert sent(result) == {"w": ([-3.0, 2.5], [1, 2]), "count": ([4], [0])}
    assert result.tensors[1].values.dtype == torch.int64


def test_all_integer_scores_give_an_integer_threshold() -> None:
    result = select_top_k({"n": torch.tensor([5, 1, 3])}, None, sparsity_level=0.34, score_function=LARGEST)
    assert result.k == 2
    assert result.threshold == 3
    assert isinstance(result.threshold, int)


def test_int64_scores_compare_in_float32() -> None:
    # 16777219 becomes 16777220.0 in float32, so both entries score 16777220.0 = the threshold and the
    # buffer entry is selected although 16777219 < 16777220 exactly.
    current = {"w": torch.tensor([16777220.0]), "n": torch.tensor([16777219])}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert result.threshold == 16777220.0
    assert result.selected_entries == 2
    assert sent(result) == {"w": ([16777220.0], [0]), "n": ([16777219], [0])}


def test_zero_dim_tensor_counts_but_is_never_sent() -> None:
    # N = 3, k = ceil(1.5) = 2, descending 10, 2, 1: threshold 2; the 0-d entry is selected, not sent.
    current = {"scalar": torch.tensor(10.0), "w": torch.tensor([1.0, 2.0])}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert (result.total_entries, result.k, result.threshold, result.selected_entries) == (3, 2, 2.0, 2)
    assert sent(result) == {"w": ([2.0], [1])}


def test_selected_zeros_are_not_sent() -> None:
    # |w - w0| = a: [3, 4, 0], b: [7]; k = 2, threshold 4: a[1] (-0.0) and b[0] are selected.
    current = {"a": torch.tensor([0.0, -0.0, 5.0]), "b": torch.tensor([7.0])}
    initial = {"a": torch.tensor([3.0, 4.0, 5.0]), "b": torch.tensor([0.0])}
    result = select_top_k(current, initial, sparsity_level=0.5, score_function=CHANGE)
    assert result.threshold == 4.0
    assert result.selected_entries == 2
    assert sent(result) == {"b": ([7.0], [0])}


def test_smallest_magnitude_selects_zeros_but_sends_only_the_rest() -> None:
    # -|w| = [-0, -1, -2]; k = ceil(1.02) = 2; threshold -1.
    current = {"w": torch.tensor([0.0, 1.0, -2.0])}
    result = select_top_k(
        current, None, sparsity_level=0.34, score_function=ScoreFunction.SMALLEST_FINAL_MAGNITUDE
    )
    assert result.threshold == -1.0
    assert result.selected_entries == 2
    assert sent(result) == {"w": ([1.0], [1])}


def test_float16_compares_against_the_threshold_rounded_to_float16() -> None:
    # The threshold is float32(1.0004) = 1.0003999471664429; in float16 it rounds to 1.0, so h[0] = 1.0
    # is selected too.
    current = {"f": torch.tensor([1.0004]), "h": torch.tensor([1.0, 0.5], dtype=torch.float16)}
    result = select_top_k(current, None, sparsity_level=0.3, score_function=LARGEST)
    assert result.k == 1
    assert result.threshold == 1.0003999471664429
    assert result.selected_entries == 2
    assert sent(result) == {"f": ([1.0003999471664429], [0]), "h": ([1.0], [0])}
    assert result.tensors[1].values.dtype == torch.float16


def test_bfloat16_compares_against_the_threshold_rounded_to_bfloat16() -> None:
    current = {"f": torch.tensor([1.001]), "b": torch.tensor([1.0, 0.5], dtype=torch.bfloat16)}
    result = select_top_k(current, None, sparsity_level=0.3, score_function=LARGEST)
    assert result.threshold == 1.0010000467300415
    assert sent(result) == {"f": ([1.0010000467300415], [0]), "b": ([1.0], [0])}
    assert result.tensors[1].values.dtype == torch.bfloat16


def test_float16_and_bfloat16_promote_to_float32() -> None:
    # Descending 3, 2.5, 2, 1, 0.5; k = ceil(5 * 0.4) = 2: threshold 2.5.
    current = {
        "b": torch.tensor([1.0, 2.0, -3.0], dtype=torch.bfloat16),
        "h": torch.tensor([0.5, 2.5], dtype=torch.float16),
    }
    result = select_top_k(current, None, sparsity_level=0.4, score_function=LARGEST)
    assert result.threshold == 2.5
    assert sent(result) == {"b": ([-3.0], [2]), "h": ([2.5], [1])}


def test_bfloat16_only_state() -> None:
    current = {"b": torch.tensor([0.5, 1.5, 1.0], dtype=torch.bfloat16)}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert result.threshold == 1.0
    assert sent(result) == {"b": ([1.5, 1.0], [1, 2])}


def test_float64_promotion() -> None:
    # float32(0.1) = 0.10000000149011612 > 0.1, so it is the largest score and the threshold; the float64
    # 0.1 falls below it.
    current = {"d": torch.tensor([0.1], dtype=torch.float64), "f": torch.tensor([0.1])}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert result.threshold == 0.10000000149011612
    assert result.selected_entries == 1
    assert list(sent(result)) == ["f"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_rejected_naming_the_tensor(bad: float) -> None:
    current = {"ok": torch.tensor([1.0]), "broken": torch.tensor([1.0, bad])}
    with pytest.raises(InvalidArgument, match="'broken'"):
        select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)


def test_inf_minus_inf_is_a_nan_score() -> None:
    current = {"w": torch.tensor([math.inf])}
    with pytest.raises(InvalidArgument, match="'w'"):
        select_top_k(
            current,
            {"w": torch.tensor([math.inf])},
            sparsity_level=1.0,
            score_function=ScoreFunction.LARGEST_INCREASE_IN_MAGNITUDE,
        )


def test_bool_tensor_is_rejected() -> None:
    current = {"w": torch.tensor([1.0]), "mask": torch.tensor([True])}
    with pytest.raises(InvalidArgument, match=r"'mask'.*bool"):
        select_top_k(current, None, sparsity_level=1.0, score_function=LARGEST)


def test_missing_initial_model() -> None:
    with pytest.raises(FailedPrecondition):
        select_top_k({"w": torch.ones(2)}, None, sparsity_level=0.5, score_function=CHANGE)


def test_layout_mismatch() -> None:
    with pytest.raises(InvalidArgument, match="'w'"):
        select_top_k({"w": torch.ones(2)}, {"w": torch.ones(3)}, sparsity_level=0.5, score_function=CHANGE)


@pytest.mark.parametrize("level", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_sparsity_level_out_of_range(level: float) -> None:
    with pytest.raises(InvalidArgument, match="sparsity_level"):
        select_top_k({"w": torch.ones(2)}, None, sparsity_level=level, score_function=LARGEST)


def test_sparsity_level_one_sends_every_non_zero() -> None:
    current = {"w": torch.tensor([[1.0, 0.0], [-2.0, 3.0]])}
    result = select_top_k(current, None, sparsity_level=1.0, score_function=LARGEST)
    assert (result.k, result.threshold, result.selected_entries) == (4, 0.0, 4)
    assert sent(result) == {"w": ([1.0, -2.0, 3.0], [0, 2, 3])}


def test_empty_state_and_state_without_entries_are_rejected() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        select_top_k({}, None, sparsity_level=0.5, score_function=LARGEST)
    with pytest.raises(InvalidArgument, match="empty"):
        select_top_k({"w": torch.zeros(0, 3)}, None, sparsity_level=0.5, score_function=LARGEST)


def test_empty_tensor_beside_others_is_skipped() -> None:
    current = {"e": torch.zeros(0), "w": torch.tensor([1.0, 2.0])}
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert sent(result) == {"w": ([2.0], [1])}


def test_non_contiguous_tensor_is_read_in_row_major_order() -> None:
    current = {"t": torch.tensor([[1.0, 4.0], [3.0, 2.0]]).t()}  # logically [[1, 3], [4, 2]]
    result = select_top_k(current, None, sparsity_level=0.5, score_function=LARGEST)
    assert sent(result) == {"t": ([3.0, 4.0], [1, 2])}
