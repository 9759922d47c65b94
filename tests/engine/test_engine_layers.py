"""Whole-layer selection by drift, with drifts worked out by hand (3-4-5 triangles and friends)."""

import math

import pytest
import torch

from paramsel.engine import (
    FailedPrecondition,
    InvalidArgument,
    drift_norms,
    select_layers_by_percentage,
    select_layers_by_threshold,
)

# Drifts from the zero model: a = ||(3, 4)|| = 5, b = ||(1, 1, 1, 1)|| = 2, c = 6.
# Normalized (divided by numel): a = 2.5, b = 0.5, c = 6.
CURRENT = {
    "a": torch.tensor([3.0, -4.0]),
    "b": torch.ones(2, 2),
    "c": torch.tensor([6.0]),
}
INITIAL = {name: torch.zeros_like(t) for name, t in CURRENT.items()}


def test_drift_norms_with_and_without_normalize() -> None:
    assert drift_norms(CURRENT, INITIAL, normalize=False) == {"a": 5.0, "b": 2.0, "c": 6.0}
    assert drift_norms(CURRENT, INITIAL, normalize=True) == {"a": 2.5, "b": 0.5, "c": 6.0}


def test_drift_of_int64_and_float16_entries() -> None:
    current = {"n": torch.tensor([10, 7]), "h": torch.tensor([3.0, 4.0], dtype=torch.float16)}
    initial = {"n": torch.tensor([7, 3]), "h": torch.zeros(2, dtype=torch.float16)}
    assert drift_norms(current, initial, normalize=False) == {"n": 5.0, "h": 5.0}


def test_drift_of_a_zero_dim_entry() -> None:
    assert drift_norms({"s": torch.tensor(-2.0)}, {"s": torch.tensor(1.0)}, normalize=True) == {"s": 3.0}


def test_threshold_selects_more_in_state_order() -> None:
    result = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=2.0)
    assert result.names == ["a", "c"]  # 2.5 > 2 and 6 > 2; b = 0.5
    assert result.drifts == {"a": 2.5, "b": 0.5, "c": 6.0}


def test_threshold_is_strict_above_and_inclusive_below() -> None:
    more = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=2.5)
    less = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=2.5, select_drift_more=False)
    assert more.names == ["c"]
    assert less.names == ["a", "b"]


def test_threshold_without_normalize() -> None:
    result = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=4.0, normalize=False)
    assert result.names == ["a", "c"]


def test_selected_tensors_are_the_current_ones_as_they_are() -> None:
    current = {"n": torch.tensor([5, 5]), "w": torch.tensor([1.0], dtype=torch.float16)}
    initial = {"n": torch.tensor([1, 2]), "w": torch.tensor([1.0], dtype=torch.float16)}
    result = select_layers_by_threshold(current, initial, norm_threshold=1.0)
    assert result.names == ["n"]
    assert result.tensors[0] is current["n"]


def test_percentage_outputs_in_drift_order() -> None:
    # L = 3, 0.5 -> ceil(1.5) = 2.
    more = select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=0.5)
    less = select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=0.5, select_drift_more=False)
    assert more.names == ["c", "a"]
    assert less.names == ["b", "a"]
    assert [t.tolist() for t in more.tensors] == [[6.0], [3.0, -4.0]]


def test_percentage_ceil_rule() -> None:
    assert len(select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=0.34).names) == 2
    assert len(select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=0.33).names) == 1
    assert len(select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=1.0).names) == 3


def test_percentage_keeps_ties_in_state_order_both_ways() -> None:
    current = {
        "a": torch.tensor([1.0]),
        "b": torch.tensor([2.0]),
        "c": torch.tensor([1.0]),
        "d": torch.tensor([2.0]),
    }
    initial = {name: torch.zeros(1) for name in current}
    more = select_layers_by_percentage(current, initial, exchange_percentage=0.75)
    less = select_layers_by_percentage(current, initial, exchange_percentage=0.75, select_drift_more=False)
    assert more.names == ["b", "d", "a"]
    assert less.names == ["a", "c", "b"]


def test_nan_drift_of_an_empty_entry() -> None:
    # An empty tensor normalizes to 0 / 0 = NaN: never selected by threshold, ranked last by percentage.
    current = {"e": torch.zeros(0), "w": torch.tensor([3.0, 4.0])}
    initial = {"e": torch.zeros(0), "w": torch.zeros(2)}
    assert math.isnan(drift_norms(current, initial, normalize=True)["e"])
    assert select_layers_by_threshold(current, initial, norm_threshold=1.0).names == ["w"]
    assert select_layers_by_threshold(
        current, initial, norm_threshold=9.0, select_drift_more=False
    ).names == ["w"]
    for more in (True, False):
        result = select_layers_by_percentage(
            current, initial, exchange_percentage=1.0, select_drift_more=more
        )
        assert result.names == ["w", "e"]
    assert drift_norms(current, initial, normalize=False)["e"] == 0.0


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_norm_threshold_validation(value: float) -> None:
    with pytest.raises(InvalidArgument, match="norm_threshold"):
        select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=value)


def test_an_infinite_norm_threshold_is_a_threshold_no_drift_exceeds() -> None:
    # FL4Health only asserts 0 < norm_threshold: +inf selects nothing, or everything the other way.
    more = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=float("inf"))
    less = select_layers_by_threshold(CURRENT, INITIAL, norm_threshold=float("inf"), select_drift_more=False)
    assert more.names == []
    assert less.names == list(CURRENT)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.01, float("nan")])
def test_exchange_percentage_validation(value: float) -> None:
    with pytest.raises(InvalidArgument, match="exchange_percentage"):
        select_layers_by_percentage(CURRENT, INITIAL, exchange_percentage=value)


def test_missing_initial_model() -> None:
    with pytest.raises(FailedPrecondition, match="needs the initial model"):
        select_layers_by_threshold(CURRENT, None, norm_threshold=1.0)
    with pytest.raises(FailedPrecondition, match="needs the initial model"):
        select_layers_by_percentage(CURRENT, None, exchange_percentage=0.5)


def test_layout_mismatch_and_bool() -> None:
    with pytest.raises(InvalidArgument, match="'c'"):
        select_layers_by_threshold(CURRENT, {**INITIAL, "c": torch.zeros(2)}, norm_threshold=1.0)
    with pytest.raises(InvalidArgument, match=r"'m'.*bool"):
        drift_norms({"m": torch.tensor([True])}, {"m": torch.tensor([False])}, normalize=True)


def test_empty_state_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="empty"):
        select_layers_by_percentage({}, {}, exchange_percentage=0.5)
