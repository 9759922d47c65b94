"""Server-side aggregation: FedAvgSparseCooTensor and FedAvgDynamicLayer, with hand-computed figures."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import numpy as np
import pytest
import torch

from paramsel.engine import Contribution, InvalidArgument, SparseTensor, aggregate_layers, aggregate_sparse

NUMPY_2 = int(np.__version__.split(".")[0]) >= 2
"""numpy 2 promotes Python ints by NEP 50, numpy 1 by their values: FL4Health's layer average differs."""


def sp(
    name: str,
    shape: tuple[int, ...],
    values: list[float],
    positions: list[int],
    dtype: torch.dtype = torch.float32,
) -> SparseTensor:
    return SparseTensor(
        name, shape, torch.tensor(values, dtype=dtype), torch.tensor(positions, dtype=torch.int64)
    )


def sparse_of(n: int, *tensors: SparseTensor) -> Contribution:
    return Contribution(n, sparse=tensors)


def layers_of(n: int, *layers: tuple[str, torch.Tensor]) -> Contribution:
    return Contribution(n, layers=layers)


def as_lists(result: Sequence[SparseTensor]) -> list[tuple[str, tuple[int, ...], list[Any], list[int]]]:
    return [(t.name, t.shape, t.values.tolist(), t.positions.tolist()) for t in result]


# Client A (1 example) and client B (3 examples) on one (2, 3) tensor: position 0 overlaps,
# 4 only A sent, 5 only B sent.
A = sparse_of(1, sp("w", (2, 3), [1.0, 2.0], [0, 4]))
B = sparse_of(3, sp("w", (2, 3), [5.0, 4.0], [0, 5]))


def test_sparse_weighted_overlapping_and_disjoint_positions() -> None:
    # (1*1 + 5*3) / 4 = 4;  2*1 / 4 = 0.5;  4*3 / 4 = 3.
    assert as_lists(aggregate_sparse([A, B])) == [("w", (2, 3), [4.0, 0.5, 3.0], [0, 4, 5])]


def test_sparse_unweighted() -> None:
    # (1 + 5) / 2 = 3;  2 / 2 = 1;  4 / 2 = 2.
    assert as_lists(aggregate_sparse([A, B], weighted=False)) == [("w", (2, 3), [3.0, 1.0, 2.0], [0, 4, 5])]


def test_sparse_result_is_typed_and_flat() -> None:
    (result,) = aggregate_sparse([A, B])
    assert isinstance(result, SparseTensor)
    assert result.values.dtype == torch.float32
    assert result.positions.dtype == torch.int64
    assert result.values.dim() == 1
    assert result.positions.dim() == 1


def test_sparse_a_name_is_averaged_over_its_senders_only_in_first_appearance_order() -> None:
    a = sparse_of(1, sp("b", (3,), [3.0], [2]), sp("a", (2,), [2.0], [0]))
    b = sparse_of(3, sp("c", (2,), [2.0], [1]), sp("a", (2,), [6.0], [0]))
    # a: (2*1 + 6*3) / 4 = 5;  b: only client A, 3*1 / 1 = 3;  c: only client B, 2*3 / 3 = 2.
    assert as_lists(aggregate_sparse([a, b])) == [
        ("b", (3,), [3.0], [2]),
        ("a", (2,), [5.0], [0]),
        ("c", (2,), [2.0], [1]),
    ]
    # Unweighted: a: (2 + 6) / 2 = 4; b and c divide by their one sender.
    assert as_lists(aggregate_sparse([a, b], weighted=False)) == [
        ("b", (3,), [3.0], [2]),
        ("a", (2,), [4.0], [0]),
        ("c", (2,), [2.0], [1]),
    ]


def test_sparse_duplicate_positions_are_summed_before_weighting() -> None:
    # Client A's position 1 carries 1 + 2 = 3, then weighs 2: (3*2 + 1*6) / 8 = 1.5.
    a = sparse_of(2, sp("w", (4,), [1.0, 2.0], [1, 1]))
    b = sparse_of(6, sp("w", (4,), [1.0], [1]))
    assert as_lists(aggregate_sparse([a, b])) == [("w", (4,), [1.5], [1])]


def test_sparse_unordered_positions_come_out_increasing() -> None:
    a = sparse_of(1, sp("w", (2, 3), [1.0, 2.0, 3.0], [5, 0, 3]))
    assert as_lists(aggregate_sparse([a])) == [("w", (2, 3), [2.0, 3.0, 1.0], [0, 3, 5])]


def test_sparse_exact_zeros_are_dropped() -> None:
    # Position 2: +1 and -1 cancel; position 0 survives: (4 + 2) / 2 = 3.
    a = sparse_of(1, sp("w", (3,), [4.0, 1.0], [0, 2]))
    b = sparse_of(1, sp("w", (3,), [2.0, -1.0], [0, 2]))
    assert as_lists(aggregate_sparse([a, b])) == [("w", (3,), [3.0], [0])]


def test_sparse_duplicates_that_cancel_leave_nothing() -> None:
    a = sparse_of(5, sp("w", (3,), [1.5, -1.5, 7.0], [1, 1, 2]))
    assert as_lists(aggregate_sparse([a])) == [("w", (3,), [7.0], [2])]


def test_sparse_all_zero_result_is_kept_with_no_entries() -> None:
    a = sparse_of(2, sp("w", (2, 2), [1.0], [3]), sp("v", (3,), [1.0], [0]))
    b = sparse_of(2, sp("w", (2, 2), [-1.0], [3]))
    result = aggregate_sparse([a, b])
    assert as_lists(result) == [("w", (2, 2), [], []), ("v", (3,), [1.0], [0])]
    assert result[0].values.dtype == torch.float32
    assert result[0].positions.dtype == torch.int64


def test_sparse_tensor_sent_with_no_entries_counts_as_zeros() -> None:
    # Client B sent "w" with nothing in it: its zeros still count, 6*1 / (1 + 2) = 2.
    a = sparse_of(1, sp("w", (2,), [6.0], [1]))
    b = sparse_of(2, sp("w", (2,), [], []))
    assert as_lists(aggregate_sparse([a, b])) == [("w", (2,), [2.0], [1])]
    assert as_lists(aggregate_sparse([b])) == [("w", (2,), [], [])]


def test_sparse_float16_stays_float16() -> None:
    a = sparse_of(1, sp("w", (2,), [1.0], [0], torch.float16))
    b = sparse_of(3, sp("w", (2,), [3.0], [0], torch.float16))
    (result,) = aggregate_sparse([a, b])
    assert result.values.dtype == torch.float16
    assert result.values.tolist() == [2.5]  # (1*1 + 3*3) / 4


def test_sparse_weighting_is_computed_in_the_values_dtype() -> None:
    # float16: 100 * 1000 = 100000 > 65504 overflows to inf, exactly as FL4Health's dense * n does.
    a = sparse_of(1000, sp("w", (1,), [100.0], [0], torch.float16))
    assert aggregate_sparse([a])[0].values.tolist() == [math.inf]
    assert aggregate_sparse([a], weighted=False)[0].values.tolist() == [100.0]


def test_sparse_integer_values_divide_to_float32() -> None:
    a = sparse_of(1, sp("n", (2,), [3], [0], torch.int64))
    b = sparse_of(2, sp("n", (2,), [2], [0], torch.int64))
    (weighted,) = aggregate_sparse([a, b])
    assert weighted.values.dtype == torch.float32
    assert weighted.values.tolist() == [2.3333332538604736]  # (3 + 4) / 3 in float32
    assert aggregate_sparse([a, b], weighted=False)[0].values.tolist() == [2.5]


def test_sparse_zero_dimensional_tensor() -> None:
    a = sparse_of(1, sp("s", (), [2.0], [0]))
    b = sparse_of(1, sp("s", (), [4.0], [0]))
    assert as_lists(aggregate_sparse([a, b])) == [("s", (), [3.0], [0])]


def test_sparse_nan_is_kept_negative_zero_is_dropped() -> None:
    a = sparse_of(1, sp("w", (3,), [math.nan, -0.0, 1.0], [0, 1, 2]))
    (result,) = aggregate_sparse([a])
    assert result.positions.tolist() == [0, 2]
    assert math.isnan(result.values[0].item())
    assert result.values[1].item() == 1.0


def test_sparse_leaves_its_inputs_untouched() -> None:
    values, positions = torch.tensor([1.0, 2.0]), torch.tensor([1, 0])
    a = sparse_of(4, SparseTensor("w", (2,), values, positions))
    aggregate_sparse([a, sparse_of(1, sp("w", (2,), [9.0], [1]))])
    assert values.tolist() == [1.0, 2.0]
    assert positions.tolist() == [1, 0]


def _pseudo_sorted(contributions: Sequence[Contribution]) -> list[Contribution]:
    """FL4Health's decode_and_pseudo_sort_results on the arrays it would receive: the first element of
    each floating-point array, summed with np.sum, plus the example count (bfloat16 read as float32)."""

    def key(c: Contribution) -> Any:
        arrays = [t.values for t in c.sparse] + [layer for _, layer in c.layers]
        floats = [a.float() if a.dtype == torch.bfloat16 else a for a in arrays if a.dtype.is_floating_point]
        return np.sum([a.reshape(-1)[0].numpy() for a in floats]) + c.num_examples

    return sorted(contributions, key=key)


def _fl4health_sparse(contributions: Sequence[Contribution], weighted: bool) -> dict[str, torch.Tensor]:
    """FedAvgSparseCooTensor.weighted_aggregate / unweighted_aggregate, literally."""
    dense: dict[str, list[torch.Tensor]] = {}
    totals: dict[str, int] = {}
    for c in _pseudo_sorted(contributions):
        for t in c.sparse:
            indices = torch.stack(torch.unravel_index(t.positions, t.shape))
            d = torch.sparse_coo_tensor(indices, t.values, t.shape, check_invariants=True).to_dense()
            dense.setdefault(t.name, []).append(d * c.num_examples if weighted else d)
            totals[t.name] = totals.get(t.name, 0) + (c.num_examples if weighted else 1)
    return {name: reduce(torch.add, ds) / totals[name] for name, ds in dense.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("weighted", [True, False])
def test_sparse_matches_fl4health_bit_for_bit(dtype: torch.dtype, weighted: bool) -> None:
    g = torch.Generator().manual_seed(7)
    shapes = {"a": (5, 6), "b": (11,), "c": (2, 3, 4)}
    contributions = []
    for _ in range(4):
        tensors = []
        for name, shape in shapes.items():
            numel = math.prod(shape)
            positions = torch.randint(0, numel, (numel // 2,), generator=g)  # duplicates, unordered
            if name == "b":
                positions = torch.unique(positions)
            values = (torch.randn(positions.numel(), generator=g) * 300).to(dtype)
            tensors.append(SparseTensor(name, shape, values, positions))
        contributions.append(Contribution(int(torch.randint(1, 3000, (1,), generator=g)), sparse=tensors))
    expected = _fl4health_sparse(contributions, weighted)
    got = aggregate_sparse(contributions, weighted=weighted)
    assert [t.name for t in got] == list(expected)
    for t in got:
        flat = expected[t.name].reshape(-1)
        nonzero = torch.nonzero(flat, as_tuple=True)[0]
        assert t.values.dtype == flat.dtype
        assert torch.equal(t.positions, nonzero)
        # Exact, NaN included: float16 weighting overflows to inf here, and inf - inf is NaN.
        torch.testing.assert_close(t.values, flat[nonzero], rtol=0, atol=0, equal_nan=True)


def test_layers_weighted() -> None:
    a = layers_of(1, ("w", torch.tensor([[1.0, 2.0]])))
    b = layers_of(3, ("w", torch.tensor([[5.0, 6.0]])))
    # (1 + 15) / 4 = 4;  (2 + 18) / 4 = 5.
    ((name, tensor),) = aggregate_layers([a, b])
    assert name == "w"
    assert tensor.tolist() == [[4.0, 5.0]]
    assert tensor.dtype == torch.float32


def test_layers_unweighted() -> None:
    a = layers_of(1, ("w", torch.tensor([[1.0, 2.0]])))
    b = layers_of(3, ("w", torch.tensor([[5.0, 6.0]])))
    assert [(n, t.tolist()) for n, t in aggregate_layers([a, b], weighted=False)] == [("w", [[3.0, 4.0]])]


def test_layers_a_name_is_averaged_over_its_senders_only_in_first_appearance_order() -> None:
    a = layers_of(1, ("b", torch.tensor([3.0])), ("a", torch.tensor([2.0, 4.0])))
    b = layers_of(3, ("c", torch.tensor([7.0])), ("a", torch.tensor([6.0, 8.0])))
    # a: (2 + 18) / 4 = 5, (4 + 24) / 4 = 7;  b: 3 / 1;  c: 21 / 3.
    assert [(n, t.tolist()) for n, t in aggregate_layers([a, b])] == [
        ("b", [3.0]),
        ("a", [5.0, 7.0]),
        ("c", [7.0]),
    ]
    assert [(n, t.tolist()) for n, t in aggregate_layers([a, b], weighted=False)] == [
        ("b", [3.0]),
        ("a", [4.0, 6.0]),
        ("c", [7.0]),
    ]


def test_layers_float16_stays_float16_and_weighs_in_float16() -> None:
    a = layers_of(1, ("w", torch.tensor([1.0], dtype=torch.float16)))
    b = layers_of(3, ("w", torch.tensor([3.0], dtype=torch.float16)))
    ((_, tensor),) = aggregate_layers([a, b])
    assert tensor.dtype == torch.float16
    assert tensor.tolist() == [2.5]
    big = layers_of(1000, ("w", torch.tensor([100.0], dtype=torch.float16)))
    ((_, result),) = aggregate_layers([big])
    if NUMPY_2:  # NEP 50: 1000 becomes a float16 and 100 * 1000 overflows float16
        assert (result.dtype, result.tolist()) == (torch.float16, [math.inf])
    else:  # value-based casting: 1000 needs uint16, and float16 with uint16 promotes to float32
        assert (result.dtype, result.tolist()) == (torch.float32, [100.0])


def test_layers_integer_layers_divide_to_float64_as_numpy_does() -> None:
    a = layers_of(1, ("n", torch.tensor([3])))
    b = layers_of(2, ("n", torch.tensor([4])))
    ((_, weighted),) = aggregate_layers([a, b])
    assert weighted.dtype == torch.float64
    assert weighted.tolist() == [11 / 3]  # (3 + 8) / 3 in float64
    assert aggregate_layers([a, b], weighted=False)[0][1].tolist() == [3.5]


def test_layers_count_beyond_a_small_integer_dtype_is_numpys_business() -> None:
    # uint8 * 300: numpy 2 refuses it (so FL4Health fails), numpy 1 widens to uint16 (600 / 300).
    a = layers_of(300, ("u", torch.tensor([2], dtype=torch.uint8)))
    if NUMPY_2:
        with pytest.raises(InvalidArgument, match=r"'u' in contributions\[0\] is uint8.*num_examples 300"):
            aggregate_layers([a])
    else:
        ((_, tensor),) = aggregate_layers([a])
        assert (tensor.dtype, tensor.tolist()) == (torch.float64, [2.0])
    # Unweighted, the count is not multiplied in: 2 / 1.
    assert aggregate_layers([a], weighted=False)[0][1].tolist() == [2.0]


def test_layers_mixed_dtypes_promote_as_numpy_does() -> None:
    a = layers_of(3, ("w", torch.tensor([1.5, 2.0], dtype=torch.float16)), ("n", torch.tensor([3])))
    b = layers_of(1, ("w", torch.tensor([0.5, 4.0])), ("n", torch.tensor([2.5], dtype=torch.float16)))
    (w_name, w), (n_name, n) = aggregate_layers([a, b])
    assert (w_name, w.dtype, w.tolist()) == ("w", torch.float32, [1.25, 2.5])  # (4.5 + 0.5) / 4, (6 + 4) / 4
    # int64 with float16 is float64 in numpy; (9 + 2.5) / 4.
    assert (n_name, n.dtype, n.tolist()) == ("n", torch.float64, [2.875])
    unweighted = aggregate_layers([a, b], weighted=False)
    assert [(t.dtype, t.tolist()) for _, t in unweighted] == [
        (torch.float32, [1.0, 3.0]),
        (torch.float64, [2.75]),
    ]


def test_layers_int32_with_int64_and_bool_layers() -> None:
    a = layers_of(2, ("i", torch.tensor([7], dtype=torch.int32)), ("b", torch.tensor([True, False])))
    b = layers_of(3, ("i", torch.tensor([1])), ("b", torch.tensor([True, True])))
    assert [(t.dtype, t.tolist()) for _, t in aggregate_layers([a, b])] == [
        (torch.float64, [17 / 5]),  # (14 + 3) / 5
        (torch.float64, [1.0, 0.6]),  # bool * n is int64: (2 + 3) / 5, 3 / 5
    ]
    # Unweighted, bools add as numpy adds them (True + True is True), then divide.
    assert [(t.dtype, t.tolist()) for _, t in aggregate_layers([a, b], weighted=False)] == [
        (torch.float64, [4.0]),
        (torch.float64, [0.5, 0.5]),
    ]


def test_layers_shapes_that_broadcast_are_averaged_broadcast() -> None:
    a = layers_of(1, ("w", torch.tensor([[1.0], [2.0]])))  # (2, 1)
    b = layers_of(3, ("w", torch.tensor([4.0, 8.0, 0.0])))  # (3,)
    ((_, w),) = aggregate_layers([a, b])
    assert w.shape == (2, 3)
    assert w.tolist() == [[3.25, 6.25, 0.25], [3.5, 6.5, 0.5]]  # (a + 3b) / 4


def _fl4health_layers(contributions: list[Contribution], weighted: bool) -> dict[str, np.ndarray]:
    """FedAvgDynamicLayer's aggregate written out as FL4Health writes it, in numpy."""
    layers: dict[str, list[np.ndarray]] = {}
    totals: dict[str, int] = {}
    for c in _pseudo_sorted(contributions):
        for name, layer in c.layers:
            array = layer.numpy()
            with np.errstate(over="ignore"):
                layers.setdefault(name, []).append(array * c.num_examples if weighted else array)
            totals[name] = totals.get(name, 0) + (c.num_examples if weighted else 1)
    with np.errstate(over="ignore", invalid="ignore"):  # float16 weighting overflows, as it does there
        return {name: reduce(np.add, arrays) / totals[name] for name, arrays in layers.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int64, torch.int32])
@pytest.mark.parametrize("weighted", [True, False])
def test_layers_match_fl4health_bit_for_bit(dtype: torch.dtype, weighted: bool) -> None:
    g = torch.Generator().manual_seed(11)
    contributions = []
    for i in range(5):
        named = [
            (name, (torch.randn(shape, generator=g) * 50).to(dtype))
            for name, shape in (("w", (3, 4)), ("b", (4,)), ("s", ()))
            if i % 2 == 0 or name != "b"
        ]
        # Counts up to 5000: above 2048 float16 cannot hold them exactly, and numpy rounds them first.
        contributions.append(Contribution(int(torch.randint(1, 5000, (1,), generator=g)), layers=named))
    expected = _fl4health_layers(contributions, weighted)
    got = aggregate_layers(contributions, weighted=weighted)
    assert [name for name, _ in got] == list(expected)
    for name, tensor in got:
        want = np.asarray(expected[name])
        assert tensor.numpy().dtype == want.dtype
        assert tensor.shape == want.shape
        np.testing.assert_array_equal(tensor.numpy(), want)


def test_layers_leave_inputs_untouched_and_return_new_tensors() -> None:
    layer = torch.tensor([1.0, 2.0])
    ((_, result),) = aggregate_layers([layers_of(7, ("w", layer))], weighted=False)
    assert result.tolist() == [1.0, 2.0]
    assert result.data_ptr() != layer.data_ptr()
    result.add_(1)
    assert layer.tolist() == [1.0, 2.0]


def test_empty_contributions_add_nothing() -> None:
    # A client that sent nothing neither adds a name nor weighs in the average.
    assert as_lists(aggregate_sparse([Contribution(5), A])) == [("w", (2, 3), [1.0, 2.0], [0, 4])]
    assert aggregate_sparse([Contribution(5)]) == []
    assert aggregate_layers([Contribution(5)]) == []


Aggregate = Callable[..., object]
BOTH = pytest.mark.parametrize("aggregate", [aggregate_sparse, aggregate_layers], ids=["sparse", "layers"])


@BOTH
@pytest.mark.parametrize("weighted", [True, False])
def test_refuses_no_contributions(aggregate: Aggregate, weighted: bool) -> None:
    with pytest.raises(InvalidArgument, match="no contributions"):
        aggregate([], weighted=weighted)


@BOTH
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("count", [0, -1, True, 2.0])
def test_refuses_num_examples_that_is_not_a_positive_integer(
    aggregate: Aggregate, weighted: bool, count: Any
) -> None:
    with pytest.raises(InvalidArgument, match=r"contributions\[1\]\.num_examples"):
        aggregate([Contribution(1), Contribution(count)], weighted=weighted)


@BOTH
def test_refuses_num_examples_beyond_int64(aggregate: Aggregate) -> None:
    with pytest.raises(InvalidArgument, match="beyond int64"):
        aggregate([Contribution(2**62), Contribution(2**62)])


@BOTH
def test_refuses_a_contribution_with_both_kinds(aggregate: Aggregate) -> None:
    both = Contribution(1, sparse=[sp("w", (1,), [1.0], [0])], layers=[("w", torch.ones(1))])
    with pytest.raises(InvalidArgument, match=r"contributions\[0\] carries both"):
        aggregate([both])


def test_refuses_layers_in_a_sparse_aggregation_and_the_reverse() -> None:
    with pytest.raises(InvalidArgument, match=r"contributions\[1\] carries whole layers"):
        aggregate_sparse([A, layers_of(1, ("w", torch.ones(2, 3)))])
    with pytest.raises(InvalidArgument, match=r"contributions\[0\] carries sparse tensors"):
        aggregate_layers([A])


def test_a_sparse_name_twice_in_one_contribution_counts_twice() -> None:
    # As FL4Health counts a name a client's packed list repeats: one more term and one more count.
    twice = sparse_of(1, sp("w", (2,), [1.0], [0]), sp("w", (2,), [2.0], [1]))
    (w,) = aggregate_sparse([twice])
    assert w.values.tolist() == [0.5, 1.0]
    assert w.positions.tolist() == [0, 1]


def test_a_layer_name_twice_in_one_contribution_counts_twice() -> None:
    twice = layers_of(1, ("w", torch.ones(2)), ("w", torch.full((2,), 4.0)))
    ((name, w),) = aggregate_layers([layers_of(1, ("w", torch.ones(2))), twice])
    assert name == "w"
    assert w.tolist() == [2.0, 2.0]


def test_refuses_sparse_shapes_that_differ_across_contributions() -> None:
    with pytest.raises(InvalidArgument, match=r"'w' has shape \(3, 2\) in contributions\[1\] but \(2, 3\)"):
        aggregate_sparse([A, sparse_of(1, sp("w", (3, 2), [1.0], [0]))])


def test_sparse_dtypes_that_differ_across_contributions_promote_as_torch_does() -> None:
    # Formerly refused; FL4Health's torch.add promotes: float32 with float64 is float64.
    (w,) = aggregate_sparse([A, sparse_of(4, sp("w", (2, 3), [1.0], [1], torch.float64))])
    assert w.values.dtype == torch.float64
    assert as_lists([w]) == [("w", (2, 3), [0.2, 0.8, 0.4], [0, 1, 4])]  # 1/5, 4/5, 2/5
    # int64 with float16 is float16 in torch (numpy would say float64).
    a = sparse_of(1, sp("n", (2,), [3], [0], torch.int64))
    b = sparse_of(1, sp("n", (2,), [0.5], [0], torch.float16))
    (n,) = aggregate_sparse([a, b])
    assert (n.values.dtype, n.values.tolist()) == (torch.float16, [1.75])


def test_sparse_shapes_that_broadcast_are_averaged_broadcast() -> None:
    a = sparse_of(1, sp("w", (3,), [3.0, 6.0], [0, 2]))
    b = sparse_of(2, sp("w", (1,), [3.0], [0]))
    assert as_lists(aggregate_sparse([a, b])) == [("w", (3,), [3.0, 2.0, 4.0], [0, 1, 2])]  # (a + 2b) / 3
    # A 0-d tensor broadcasts too, and defers to the dimensioned one's dtype (torch's rule).
    s = sparse_of(1, sp("w", (), [2.0], [0], torch.float64))
    (w,) = aggregate_sparse([s, a], weighted=False)
    assert (w.shape, w.values.dtype, w.values.tolist(), w.positions.tolist()) == (
        (3,),
        torch.float32,
        [2.5, 1.0, 4.0],
        [0, 1, 2],
    )


def test_refuses_layer_shapes_that_differ_across_contributions() -> None:
    with pytest.raises(InvalidArgument, match=r"'w' has shape \(3,\) in contributions\[1\] but \(2,\)"):
        aggregate_layers([layers_of(1, ("w", torch.ones(2))), layers_of(1, ("w", torch.ones(3)))])


def test_layer_dtypes_that_differ_across_contributions_are_averaged() -> None:
    # Formerly refused; FL4Health's np.add promotes: float32 with float16 is float32.
    ((_, w),) = aggregate_layers(
        [layers_of(1, ("w", torch.ones(2))), layers_of(1, ("w", torch.full((2,), 3.0, dtype=torch.float16)))]
    )
    assert (w.dtype, w.tolist()) == (torch.float32, [2.0, 2.0])


def test_refuses_layer_shapes_that_do_not_broadcast_naming_the_clash() -> None:
    # (1,) then (3,) broadcast; (2,) clashes with the (3,) of contributions[1], not with the (1,).
    ones = [layers_of(1, ("w", torch.ones(size))) for size in (1, 3, 2)]
    with pytest.raises(
        InvalidArgument, match=r"'w' has shape \(2,\) in contributions\[2\] but \(3,\) in contributions\[1\]"
    ):
        aggregate_layers(ones)


@pytest.mark.parametrize(("position", "shown"), [(6, "6"), (-1, "-1")])
def test_refuses_positions_out_of_range(position: int, shown: str) -> None:
    bad = sparse_of(1, sp("w", (2, 3), [1.0, 2.0], [0, position]))
    with pytest.raises(
        InvalidArgument, match=rf"'w' in contributions\[1\] has position {shown}, outside \[0, 6\)"
    ):
        aggregate_sparse([A, bad])


def test_refuses_values_and_positions_of_different_lengths() -> None:
    bad = sparse_of(1, sp("w", (2, 3), [1.0, 2.0], [0]))
    with pytest.raises(InvalidArgument, match=r"'w' in contributions\[0\] has 2 values but 1 positions"):
        aggregate_sparse([bad])


def test_refuses_entries_that_are_not_one_dimensional() -> None:
    bad = sparse_of(1, SparseTensor("w", (2, 3), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)))
    with pytest.raises(InvalidArgument, match="must be 1-D"):
        aggregate_sparse([bad])


def test_refuses_positions_that_are_not_integers() -> None:
    bad = sparse_of(1, SparseTensor("w", (2, 3), torch.ones(1), torch.zeros(1)))
    with pytest.raises(InvalidArgument, match="positions must be integers"):
        aggregate_sparse([bad])


def test_refuses_a_negative_size_in_a_shape() -> None:
    bad = sparse_of(1, sp("w", (2, -3), [], []))
    with pytest.raises(InvalidArgument, match=r"'w' in contributions\[0\] has shape \(2, -3\)"):
        aggregate_sparse([bad])
