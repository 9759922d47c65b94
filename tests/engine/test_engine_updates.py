"""Sparse updates (SparseUpdateCriterion): u = (w - w0) + r per tensor in the model's dtype, top-k by
|u| over the whole state, and the checks of the initial model and the residual.

The model of most cases, float32, N = 8 entries:

    w  = a [1.0, -2.0, 3.0, 0.5]      b [[0.25, 4.0], [1.0, 1.0]]
    w0 = a [0.5,  0.0, 3.0, 1.0]      b [[0.0,  1.0], [1.0, 0.0]]
    r  = a [0.0,  1.0, -0.25, 0.0]    (b has none: r = 0)

    u  = a [0.5, -1.0, -0.25, -0.5]   b [[0.25, 3.0], [0.0, 1.0]]
   |u| = a [0.5,  1.0,  0.25,  0.5]   b [[0.25, 3.0], [0.0, 1.0]]

At sparsity 0.5, k = 4; |u| in decreasing order is 3, 1, 1, 0.5, 0.5, 0.25, 0.25, 0, so the threshold is
0.5 and five entries reach it (a[0] and a[3] tie at it): a at 0, 1, 3 and b at 1, 3.
"""

from __future__ import annotations

import pytest
import torch

from paramsel.engine import (
    FailedPrecondition,
    InvalidArgument,
    UpdateSelection,
    budget,
    select_sparse_update,
)
from paramsel.engine.state import TensorSpec
from paramsel.wire.seeded import seeded_positions, seeded_positions_nbytes

W = {"a": torch.tensor([1.0, -2.0, 3.0, 0.5]), "b": torch.tensor([[0.25, 4.0], [1.0, 1.0]])}
W0 = {"a": torch.tensor([0.5, 0.0, 3.0, 1.0]), "b": torch.tensor([[0.0, 1.0], [1.0, 0.0]])}
R = {"a": torch.tensor([0.0, 1.0, -0.25, 0.0])}


def initial() -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in W0.items()}


def sent(result: object) -> dict[str, tuple[list[int], list[float]]]:
    return {t.name: (t.positions.tolist(), t.values.tolist()) for t in result.tensors}  # type: ignore[attr-defined]


def test_top_k_of_the_update_with_a_residual() -> None:
    result = select_sparse_update(W, initial(), R, sparsity_level=0.5)
    assert (result.total_entries, result.k, result.threshold, result.selected_entries) == (8, 4, 0.5, 5)
    assert sent(result) == {"a": ([0, 1, 3], [0.5, -1.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}
    assert dict(result.seeds) == {}


def test_exact_k_takes_the_earliest_ties() -> None:
    # Strictly above 0.5: a[1] (1), b[1] (3), b[3] (1); one more fits, the first tie in state order: a[0].
    result = select_sparse_update(W, initial(), R, sparsity_level=0.5, exact_k=True)
    assert (result.k, result.selected_entries) == (4, 4)
    assert sent(result) == {"a": ([0, 1], [0.5, -1.0]), "b": ([1, 3], [3.0, 1.0])}


def test_without_a_residual_the_update_is_w_minus_w0() -> None:
    # u = a [0.5, -2, 0, -0.5], b as above; |u| descending 3, 2, 1, 0.5, 0.5, ...: threshold 0.5.
    result = select_sparse_update(W, initial(), None, sparsity_level=0.5)
    assert result.threshold == 0.5
    assert sent(result) == {"a": ([0, 1, 3], [0.5, -2.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}


def test_selected_zeros_and_0d_tensors_are_not_sent() -> None:
    # u = a [0, 0], s (0-d) = 5: k = ceil(3 x 1.0) = 3, all selected (threshold 0); the zeros of a and
    # the 0-d s are not sent.
    model = {"a": torch.tensor([1.0, 2.0]), "s": torch.tensor(6.0)}
    start = {"a": torch.tensor([1.0, 2.0]), "s": torch.tensor(1.0)}
    result = select_sparse_update(model, start, sparsity_level=1.0)
    assert (result.total_entries, result.k, result.selected_entries) == (3, 3, 3)
    assert result.tensors == []


def test_arithmetic_is_two_roundings_in_the_models_dtype() -> None:
    # float16: w - w0 = 1 - 2^-12 lies halfway between 1 - 2^-11 and 1: rounds to 1 (even). Then
    # 1 - 2^-12 is halfway again: 1. Computed in float32 and rounded once, it would be 1 - 2^-11.
    w = {"h": torch.tensor([1.0], dtype=torch.float16)}
    w0 = {"h": torch.tensor([2.0**-12], dtype=torch.float16)}
    r = {"h": torch.tensor([-(2.0**-12)], dtype=torch.float16)}
    for selection in UpdateSelection:
        result = select_sparse_update(
            w, {"h": w0["h"].clone()}, r, sparsity_level=1.0, selection=selection, draw=seeded_positions
        )
        (t,) = result.tensors
        assert t.values.dtype == torch.float16
        assert t.values.tolist() == [1.0]
    assert float((w["h"].float() - w0["h"].float() + r["h"].float()).half()) == 1.0 - 2.0**-11


def test_integer_tensors_wrap_as_torch_computes() -> None:
    # uint8: 1 - 3 wraps to 254, + 4 wraps to 2.
    w = {"q": torch.tensor([1, 9], dtype=torch.uint8)}
    w0 = {"q": torch.tensor([3, 9], dtype=torch.uint8)}
    r = {"q": torch.tensor([4, 0], dtype=torch.uint8)}
    result = select_sparse_update(w, w0, r, sparsity_level=0.5)
    assert sent(result) == {"q": ([0], [2])}
    assert result.tensors[0].values.dtype == torch.uint8


def test_the_update_may_be_written_over_the_initial_model() -> None:
    start = initial()
    result = select_sparse_update(W, start, R, sparsity_level=0.5, overwrite_initial=True)
    assert sent(result) == {"a": ([0, 1, 3], [0.5, -1.0, -0.5]), "b": ([1, 3], [3.0, 1.0])}
    assert start["a"].tolist() == [0.5, -1.0, -0.25, -0.5]  # u, where w0 was
    untouched = initial()
    select_sparse_update(W, untouched, R, sparsity_level=0.5)
    assert untouched["a"].tolist() == W0["a"].tolist()
    assert R["a"].tolist() == [0.0, 1.0, -0.25, 0.0]


# --- refusals --------------------------------------------------------------------------------------


def test_the_initial_model_is_required() -> None:
    with pytest.raises(FailedPrecondition, match="sparse_update needs the initial model"):
        select_sparse_update(W, None, sparsity_level=0.5)


@pytest.mark.parametrize(
    ("residual", "needle"),
    [
        ({"zz": torch.zeros(4)}, "'zz', which the model state does not have"),
        ({"a": torch.zeros(4, dtype=torch.float64)}, "residual of 'a' has dtype torch.float64"),
        ({"b": torch.zeros(4)}, "residual of 'b' has shape (4,)"),
    ],
)
def test_a_residual_that_does_not_fit_is_refused(residual: dict[str, torch.Tensor], needle: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        select_sparse_update(W, initial(), residual, sparsity_level=0.5)
    assert needle in str(err.value)


def test_bool_tensors_and_tensors_without_subtraction_are_refused() -> None:
    model = {"a": W["a"], "m": torch.tensor([True, False])}
    with pytest.raises(InvalidArgument, match=r"'m' has dtype torch\.bool"):
        select_sparse_update(model, {"a": W0["a"], "m": torch.tensor([False, False])}, sparsity_level=0.5)
    wide = {"u": torch.tensor([1, 2], dtype=torch.uint16)}
    with pytest.raises(InvalidArgument, match=r"'u' of dtype torch\.uint16 has no update"):
        select_sparse_update(wide, {"u": wide["u"].clone()}, sparsity_level=0.5)


@pytest.mark.parametrize("level", [0.0, 1.5, float("nan")])
def test_sparsity_out_of_range_is_refused(level: float) -> None:
    with pytest.raises(InvalidArgument, match="sparsity_level"):
        select_sparse_update(W, initial(), sparsity_level=level)


def test_an_infinite_update_is_refused_naming_the_tensor() -> None:
    # float16's largest is 65504: 65504 - (-65504) overflows to +inf, which no threshold can order.
    w = {"h": torch.tensor([65504.0], dtype=torch.float16)}
    w0 = {"h": torch.tensor([-65504.0], dtype=torch.float16)}
    with pytest.raises(InvalidArgument, match="'h' has a NaN or infinite score"):
        select_sparse_update(w, w0, sparsity_level=1.0)


# --- the plan --------------------------------------------------------------------------------------


def test_the_plan_of_top_k_counts_the_update_and_its_scores() -> None:
    model = [TensorSpec("a", torch.float32, (4,)), TensorSpec("b", torch.float16, (10,))]
    work = budget.sparse_update_work(
        model,
        selection=UpdateSelection.TOP_K,
        sparsity_level=0.5,
        draw_nbytes=seeded_positions_nbytes,
    )
    held: dict[str, int] = {}
    for need in work.needs:
        held[need.name] = held.get(need.name, 0) + need.held
    # u: a 4 x 4 bytes, b 10 x 2; |u| the same again; b's float16 scores copied as float32: 40.
    assert held == {"a": 16 + 16, "b": 20 + 20 + 40}
    # Written over the initial model: no u of its own.
    over = budget.sparse_update_work(
        model,
        selection=UpdateSelection.TOP_K,
        sparsity_level=0.5,
        draw_nbytes=seeded_positions_nbytes,
        overwrite_initial=True,
    )
    assert over.held == work.held - 36


def test_the_plan_of_random_k_counts_the_keys_of_each_tensor() -> None:
    model = [
        TensorSpec("a", torch.float32, (1000,)),
        TensorSpec("s", torch.float32, ()),
        TensorSpec("b", torch.float64, (10, 10)),
    ]
    work = budget.sparse_update_work(
        model,
        selection=UpdateSelection.RANDOM_K,
        sparsity_level=0.1,
        draw_nbytes=seeded_positions_nbytes,
    )
    needs = {need.name: need for need in work.needs}
    assert set(needs) == {"a", "b"}  # the 0-d s draws nothing
    # a: k_t = 100 entries of 8 + 4 bytes; b: 10 of 8 + 8.
    assert (needs["a"].held, needs["b"].held) == (1200, 160)
    # Scratch: the draw (8 bytes of key per entry, its answer, a chunk's temporaries) and w, w0, r
    # gathered at the k_t positions.
    assert needs["a"].scratch == 8 * 1000 + 8 * 100 + 25 * 1000 + 3 * 100 * 4
    assert work.scratch == needs["a"].scratch
    # A model the engine refuses before computing anything needs nothing.
    bools = [TensorSpec("m", torch.bool, (5,))]
    for selection in UpdateSelection:
        assert (
            budget.sparse_update_work(
                bools, selection=selection, sparsity_level=0.5, draw_nbytes=seeded_positions_nbytes
            ).nbytes
            == 0
        )
