"""Per-coordinate averaging (AVERAGING_PER_COORDINATE), and rounding to a narrower float once.

The running example, one tensor "w" of shape (2, 3), i.e. flat positions 0..5:

    A (1 example):  positions 0, 1, 4  values 1.0, 2.0, 6.0
    B (2 examples): positions 1, 4, 5  values 4.0, 0.0, -3.0
    C (3 examples): positions 1, 2     values 7.0, 5.0

Weighted, per position over the contributions that sent it: 0 -> 1 (A alone); 1 -> (2 x 1 + 4 x 2 +
7 x 3) / 6 = 31 / 6; 2 -> 5 (C alone); 3 -> not sent, not listed; 4 -> (6 x 1 + 0 x 2) / 3 = 2 (B's 0.0
counts: it was sent); 5 -> -3 (B alone). Unweighted: 1 -> 13 / 3, 4 -> 6 / 2 = 3, the rest as above.
(FL4Health's per-tensor average would give 1 / 6 at position 0 and 1 at position 4.)
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from paramsel import engine
from paramsel.engine import Contribution, InvalidArgument, SparseTensor, aggregate_per_coordinate, budget
from paramsel.engine import per_coordinate as module
from paramsel.engine.rounding import round_float


def _w(values: list[float], positions: list[int], dtype: torch.dtype = torch.float32) -> SparseTensor:
    return SparseTensor("w", (2, 3), torch.tensor(values, dtype=dtype), torch.tensor(positions))


A = Contribution(1, [_w([1.0, 2.0, 6.0], [0, 1, 4])])
B = Contribution(2, [_w([4.0, 0.0, -3.0], [1, 4, 5])])
C = Contribution(3, [_w([7.0, 5.0], [1, 2])])


def _one(contributions: list[Contribution], **options: object) -> SparseTensor:
    (result,) = aggregate_per_coordinate(contributions, **options)  # type: ignore[arg-type]
    return result


def test_weighted_average_over_the_contributions_that_sent_each_position() -> None:
    w = _one([A, B, C])
    assert (w.name, w.shape) == ("w", (2, 3))
    assert w.positions.dtype == torch.int64
    assert w.positions.tolist() == [0, 1, 2, 4, 5]
    assert w.values.dtype == torch.float32
    assert w.values.tolist() == [1.0, float(np.float32(31 / 6)), 5.0, 2.0, -3.0]


def test_unweighted_average_counts_contributions() -> None:
    w = _one([A, B, C], weighted=False)
    assert w.positions.tolist() == [0, 1, 2, 4, 5]
    assert w.values.tolist() == [1.0, float(np.float32(13 / 3)), 5.0, 3.0, -3.0]


def test_every_arrival_order_gives_the_same_bits() -> None:
    # At position 0, 2**53, -2**53 and 1 sum to 1 in one order and to 0 in another (2**53 + 1 rounds to
    # 2**53). FL4Health's order sorts by first value + num_examples: f (-2**53 + 1), d (2), e (2**53 + 1).
    def x(values: list[float], positions: list[int]) -> list[SparseTensor]:
        return [SparseTensor("x", (4,), torch.tensor(values, dtype=torch.float64), torch.tensor(positions))]

    d = Contribution(1, x([1.0, 0.3], [0, 3]))
    e = Contribution(1, x([2.0**53], [0]))
    f = Contribution(1, x([-(2.0**53), 0.7], [0, 3]))
    answers = set()
    for order in itertools.permutations([d, e, f]):
        got = _one(list(order))
        answers.add((got.values.numpy().tobytes(), got.positions.numpy().tobytes()))
    assert len(answers) == 1
    got = _one([d, e, f])
    assert got.positions.tolist() == [0, 3]
    assert got.values.tolist() == [((-(2.0**53) + 1.0) + 2.0**53) / 3, (0.7 + 0.3) / 2]
    assert got.values.tolist()[0] == 1 / 3


def test_a_position_sent_twice_in_one_contribution_is_summed_in_its_dtype_and_counts_once() -> None:
    # A sends position 2 three times as float16 2048, 1, 1: summed in float16 in the order listed,
    # 2048 + 1 = 2049 rounds to 2048 (ties to even), + 1 again 2048. With B's 0.0 there, unweighted:
    # (2048 + 0) / 2 = 1024 (counted three times it would be 2048 / 4 = 512).
    a = Contribution(1, [_w([2048.0, 1.0, 1.0], [2, 2, 2], torch.float16)])
    b = Contribution(1, [_w([0.0], [2], torch.float16)])
    w = _one([a, b], weighted=False)
    assert w.values.dtype == torch.float16
    assert (w.positions.tolist(), w.values.tolist()) == ([2], [1024.0])


def test_positions_in_any_order_and_repeats_among_them() -> None:
    a = Contribution(1, [_w([5.0, 1.0, 2.0, 3.0], [4, 0, 4, 3])])  # 4: 5 + 2 = 7
    w = _one([a])
    assert (w.positions.tolist(), w.values.tolist()) == ([0, 3, 4], [1.0, 3.0, 7.0])


def test_float16_is_averaged_in_float64_then_rounded_once() -> None:
    # 65504 (float16's largest) x 2 overflows float16, not float64: (65504 x 2 + 65504 x 2) / 4.
    top = Contribution(2, [_w([65504.0], [0], torch.float16)])
    w = _one([top, top])
    assert w.values.dtype == torch.float16
    assert w.values.tolist() == [65504.0]
    # Unweighted 1, 2**-11, 2**-11: float64 gives (1 + 2**-10) / 3 = 0.33365885..., whose nearest
    # float16 is 0.33374023 (float16 sums would lose both 2**-11 and give 1 / 3 -> 0.33325195).
    one = Contribution(1, [_w([1.0], [0], torch.float16)])
    tiny = Contribution(1, [_w([2**-11], [0], torch.float16)])
    w = _one([one, tiny, tiny], weighted=False)
    assert w.values.tolist() == [float(np.float16((1 + 2**-10) / 3))]
    assert w.values.tolist() == [0.333740234375]  # 2734 / 8192


def test_answer_dtype_is_promoted_and_integers_give_float32() -> None:
    ints = Contribution(1, [_w([3], [0], torch.int64)])
    more = Contribution(1, [_w([4], [0], torch.int32)])
    w = _one([ints, more], weighted=False)
    assert (w.values.dtype, w.values.tolist()) == (torch.float32, [3.5])
    flags = Contribution(1, [_w([True, False], [0, 1], torch.bool)])
    w = _one([flags, ints], weighted=False)
    assert (w.values.dtype, w.values.tolist()) == (torch.float32, [2.0, 0.0])
    wide = Contribution(1, [_w([0.1], [0], torch.float64)])
    half = Contribution(1, [_w([0.5], [0], torch.float16)])
    w = _one([wide, half], weighted=False)
    assert (w.values.dtype, w.values.tolist()) == (torch.float64, [(0.1 + 0.5) / 2])
    brain = Contribution(1, [_w([0.5], [0], torch.bfloat16)])
    assert _one([half, brain]).values.dtype == torch.float32  # float16 with bfloat16: float32


def test_value_dtype_rounds_the_float64_average_once() -> None:
    # 1 + 2**-11 + 2**-40 lies just above the float16 midpoint 1 + 2**-11: rounded once it is
    # 1 + 2**-10. Through float32 (as torch casts float64) it would first become the midpoint, then 1.
    x = 1 + 2**-11 + 2**-40
    alone = Contribution(1, [_w([x], [0], torch.float64)])
    w = _one([alone], value_dtype=torch.float16)
    assert (w.values.dtype, w.values.tolist()) == (torch.float16, [1 + 2**-10])
    assert torch.tensor([x], dtype=torch.float64).to(torch.float16).tolist() == [1.0]  # torch's cast
    # bfloat16: 1 + 2**-8 + 2**-40 is just above the midpoint between 1 and 1 + 2**-7.
    y = 1 + 2**-8 + 2**-40
    w = _one([Contribution(1, [_w([y], [0], torch.float64)])], value_dtype=torch.bfloat16)
    assert (w.values.dtype, w.values.tolist()) == (torch.bfloat16, [1 + 2**-7])
    with pytest.raises(InvalidArgument, match="value_dtype"):
        aggregate_per_coordinate([alone], value_dtype=torch.int8)


def test_zero_averages_are_listed_and_the_sign_of_zero_is_kept() -> None:
    # Position 1: 4 x 1 + (-4) x 1 = 0, listed. Position 2: -0.0 sent alone averages to -0.0.
    a = Contribution(1, [_w([4.0, -0.0], [1, 2])])
    b = Contribution(1, [_w([-4.0], [1])])
    w = _one([a, b])
    assert w.positions.tolist() == [1, 2]
    assert w.values.tolist() == [0.0, -0.0]
    assert torch.signbit(w.values).tolist() == [False, True]


def test_a_name_sent_with_no_entries_is_listed_empty_and_names_keep_first_appearance() -> None:
    a = Contribution(
        1, [SparseTensor("b", (3,), torch.zeros(0), torch.zeros(0, dtype=torch.int64)), _w([1.0], [0])]
    )
    result = aggregate_per_coordinate([a])
    assert [t.name for t in result] == ["b", "w"]
    assert (result[0].values.numel(), result[0].positions.numel(), result[0].shape) == (0, 0, (3,))


def test_a_zero_dimensional_tensor() -> None:
    a = Contribution(1, [SparseTensor("s", (), torch.tensor([2.0]), torch.tensor([0]))])
    b = Contribution(3, [SparseTensor("s", (), torch.tensor([6.0]), torch.tensor([0]))])
    (s,) = aggregate_per_coordinate([a, b])
    assert (s.shape, s.positions.tolist(), s.values.tolist()) == ((), [0], [5.0])  # (2 + 18) / 4


def test_dense_and_sparse_accumulators_give_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(0)
    contributions = []
    for count in (3, 1, 7, 2):
        positions = torch.randperm(1000, generator=generator)[:300]  # unordered, distinct
        positions = torch.cat([positions, positions[:10]])  # and some repeated
        values = torch.randn(310, generator=generator, dtype=torch.float32)
        contributions.append(Contribution(count, [SparseTensor("v", (10, 100), values, positions)]))
    answers = {}
    for dense in (True, False):
        monkeypatch.setattr(module, "dense_accumulators", lambda numel, entries, dense=dense: dense)
        (v,) = aggregate_per_coordinate(contributions)
        answers[dense] = (v.values.numpy().tobytes(), v.positions.numpy().tobytes())
    assert answers[True] == answers[False]
    monkeypatch.undo()
    # 1240 entries of a 1000-element tensor are averaged densely; 1240 of a million, over the positions.
    assert module.dense_accumulators(1000, 1240)
    assert not module.dense_accumulators(1_000_000, 1240)


def test_a_few_positions_of_a_large_tensor() -> None:
    a = Contribution(
        1, [SparseTensor("big", (1 << 24,), torch.tensor([1.0, 3.0]), torch.tensor([5, 1 << 23]))]
    )
    b = Contribution(1, [SparseTensor("big", (1 << 24,), torch.tensor([3.0]), torch.tensor([1 << 23]))])
    (big,) = aggregate_per_coordinate([a, b])
    assert (big.positions.tolist(), big.values.tolist()) == ([5, 1 << 23], [1.0, 3.0])


def test_refusals() -> None:
    other = Contribution(1, [SparseTensor("w", (3, 2), torch.ones(1), torch.tensor([0]))])
    with pytest.raises(InvalidArgument, match=r"'w' has shape \(3, 2\) in contributions\[1\] but \(2, 3\)"):
        aggregate_per_coordinate([A, other])
    with pytest.raises(InvalidArgument, match="whole layers"):
        aggregate_per_coordinate([Contribution(1, layers=[("w", torch.ones(2))])])
    with pytest.raises(InvalidArgument, match="no contributions"):
        aggregate_per_coordinate([])
    with pytest.raises(InvalidArgument, match="num_examples"):
        aggregate_per_coordinate([Contribution(0, [_w([1.0], [0])])])
    with pytest.raises(InvalidArgument, match="position 6, outside"):
        aggregate_per_coordinate([Contribution(1, [_w([1.0], [6])])])


def test_the_plan_counts_float64_accumulators_and_the_answer() -> None:
    f32 = torch.float32
    # 1000 elements, 3 x 400 entries sent: dense accumulators (17 bytes per element); the answer at most
    # 1000 entries of float32 values and int64 positions.
    dense = [(1, [budget.SparseSpec("w", f32, (1000,), 400)]) for _ in range(3)]
    (need,) = budget.aggregate_per_coordinate_work(dense).needs
    assert need.held == 1000 * (4 + 8)
    assert need.scratch >= 1000 * (8 + 8)
    assert "float64 sums and weights over shape [1000]" in need.what
    # A million elements, 2 x 50 entries: accumulators over the 100 positions at most, not the million.
    sparse = [(1, [budget.SparseSpec("w", f32, (1_000_000,), 50)]) for _ in range(2)]
    (need,) = budget.aggregate_per_coordinate_work(sparse).needs
    assert need.held == 100 * (4 + 8)
    assert 100 * 16 <= need.scratch < 100_000
    # value_dtype float16: the answer's values at 2 bytes, with the rounding's scratch.
    (need,) = budget.aggregate_per_coordinate_work(dense, value_dtype=torch.float16).needs
    assert need.held == 1000 * (2 + 8)
    # Shapes that differ: refused before anything is allocated, so nothing is counted.
    clash = [(1, [budget.SparseSpec("w", f32, (4,), 1)]), (1, [budget.SparseSpec("w", f32, (5,), 1)])]
    assert budget.aggregate_per_coordinate_work(clash).needs == ()


def test_round_float_rounds_once_to_nearest_even() -> None:
    # Values whose float16 / bfloat16 neighbours and midpoints are known, each side of the midpoint.
    cases = [
        (1 + 2**-11 + 2**-40, torch.float16, 1 + 2**-10),
        (1 + 2**-11 - 2**-40, torch.float16, 1.0),
        (1 + 2**-11, torch.float16, 1.0),  # the midpoint itself: to even
        (1 + 3 * 2**-11, torch.float16, 1 + 2**-9),  # the midpoint above 1 + 2**-10: to even
        (-(1 + 2**-11 + 2**-40), torch.float16, -(1 + 2**-10)),
        (65520.0, torch.float16, float("inf")),  # float16's overflow threshold: to even, inf
        (65519.99, torch.float16, 65504.0),
        (2**-25 + 2**-60, torch.float16, 2**-24),  # just above half the smallest subnormal
        (2**-25, torch.float16, 0.0),
        (1e-300, torch.float16, 0.0),
        (1 + 2**-8 + 2**-40, torch.bfloat16, 1 + 2**-7),
        (1e39, torch.bfloat16, float("inf")),  # past float32's range too
        (-1e39, torch.bfloat16, float("-inf")),
        (3.0e38, torch.bfloat16, float(torch.tensor(3.0e38, dtype=torch.float32).to(torch.bfloat16))),
    ]
    wide = torch.tensor([x for x, _, _ in cases], dtype=torch.float64)
    for (x, dtype, expected), got in zip(cases, wide, strict=True):
        assert round_float(got.reshape(1), dtype).item() == expected, (x, dtype)
    # NaN stays NaN; integers and same-dtype values come back as they are.
    assert round_float(torch.tensor([float("nan")], dtype=torch.float64), torch.float16).isnan().all()
    ints = torch.tensor([1, 2])
    assert round_float(ints, torch.float16) is ints
    # Against numpy's own float64 -> float16 (one rounding), on values of every magnitude.
    values = np.random.default_rng(0).standard_normal(20_000) * np.logspace(-9, 5, 20_000)
    got16 = round_float(torch.from_numpy(values), torch.float16).numpy()
    with np.errstate(over="ignore"):  # the largest overflow to inf, as they should
        reference = values.astype(np.float16)
    assert got16.tobytes() == reference.tobytes()
    assert engine.round_float is round_float
