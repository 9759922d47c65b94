"""The replace pull's native pass (paramsel/engine/_fastpull.c) and replace_coo_into, against hand-computed
results and against numpy's passes (pull_sparse_into), which serve every pull where it declines."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from paramsel.engine import CooTensor, SparseTensor, pull, pull_sparse_into, replace_coo_into

fast: Any = getattr(pull, "_fastpull")  # noqa: B009 - not exported: the native module, or None


def test_the_native_pull_is_built() -> None:
    # setuptools builds it when the distribution is installed (optional: a machine without a C compiler
    # gets numpy's passes); every machine this project tests on has one.
    assert fast is not None, (
        "paramsel.engine._fastpull was not built: is there a C compiler and Python's headers?"
    )


def _rows(*coords: tuple[int, ...]) -> np.ndarray:
    return np.array(coords, dtype=np.int64).reshape(len(coords), -1)


SHARE = 1 << 16
"""Fewest rows (check) or elements (write) a thread of the native module takes on (MIN_SHARE in the C)."""


def test_check_accepts_increasing_coordinates_in_range() -> None:
    assert fast.check(_rows((0, 1), (0, 2), (1, 0), (2, 2)), (3, 3), 2) is True
    assert fast.check(np.zeros((0, 2), np.int64), (3, 3), 2) is True  # no rows: nothing wrong


@pytest.mark.parametrize(
    "rows",
    [
        _rows((0, 1), (0, 3)),  # axis 1 out of range, yet its flat position (3) is inside the tensor
        _rows((0, 1), (3, 0)),  # axis 0 out of range
        _rows((0, -1)),  # negative
        _rows((-1, 1), (0, 0)),  # negative first axis: huge as unsigned, its flat position wraps
        _rows((0, 1), (0, 1)),  # repeated
        _rows((1, 0), (0, 2)),  # decreasing
        _rows((1, 0), (0, 5)),  # decreasing in the first axis, out of range in the second
    ],
)
def test_check_refuses(rows: np.ndarray) -> None:
    assert fast.check(rows, (3, 3), 2) is False


def test_check_in_one_and_three_dimensions() -> None:
    assert fast.check(_rows((0,), (4,)), (5,), 1) is True
    assert fast.check(_rows((0,), (5,)), (5,), 1) is False
    assert fast.check(_rows((4,), (4,)), (5,), 1) is False
    assert fast.check(_rows((0, 1, 1), (1, 0, 0)), (2, 2, 2), 1) is True
    assert fast.check(_rows((0, 1, 1), (0, 1, 1)), (2, 2, 2), 1) is False
    assert fast.check(_rows((0, 1, 1), (1, 0, 2)), (2, 2, 2), 1) is False


def _sorted_rows(count: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    flat = np.sort(np.random.default_rng(seed).choice(math.prod(shape), count, replace=False))
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)


@pytest.mark.parametrize("threads", [2, 3])
def test_check_across_the_threads_shares(threads: int) -> None:
    # Enough rows for `threads` shares; a fault on either side of each boundary between them is found.
    shape = (700, 1000)
    rows = _sorted_rows(threads * SHARE + 5, shape, threads)
    assert fast.check(rows, shape, threads) is True
    count = rows.shape[0]
    for boundary in [count * t // threads for t in range(1, threads)]:
        for at in (boundary - 1, boundary, boundary + 1):
            repeated = rows.copy()
            repeated[at] = repeated[at - 1]
            assert fast.check(repeated, shape, threads) is False, at
            out = rows.copy()
            out[at, 1] = shape[1]
            assert fast.check(out, shape, threads) is False, at
    assert fast.check(rows[::-1].copy(), shape, threads) is False
    last = rows.copy()
    last[-1, 0] = shape[0]
    assert fast.check(last, shape, threads) is False


def test_write_zeroes_the_tensor_and_writes_the_values() -> None:
    dense = np.full(9, 7.0, dtype=np.float32)
    values = np.array([1.0, -0.0, float("nan")], dtype=np.float32)
    rows = _rows((0, 1), (1, 0), (2, 2))
    fast.write(dense, 4, True, rows, (3, 3), values, 2)
    assert dense[[0, 2, 4, 5, 6, 7]].tolist() == [0.0] * 6
    assert dense[1] == 1.0
    assert dense[3] == 0.0
    assert not np.signbit(dense[3])  # -0.0 + 0 is +0.0
    assert np.isnan(dense[8])
    dense[:] = 7.0
    fast.write(dense, 4, False, rows, (3, 3), values, 1)
    assert np.signbit(dense[3])  # written as sent without add_zero
    fast.write(dense, 4, True, np.zeros((0, 2), np.int64), (3, 3), np.zeros(0, np.float32), 1)
    assert dense.tolist() == [0.0] * 9  # no rows: all zeros


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32, np.int16, np.uint8, np.bool_])
def test_write_other_item_sizes(dtype: Any) -> None:
    dense = np.ones(6, dtype=dtype)
    values = np.array([1, 0, 1], dtype=dtype)
    fast.write(dense, dense.itemsize, dtype is np.float64, _rows((1,), (2,), (5,)), (6,), values, 1)
    assert dense.tolist() == np.array([0, 1, 0, 0, 0, 1], dtype=dtype).tolist()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(3 * SHARE + 7,), (5, 3, SHARE // 2 + 3)])
def test_write_across_the_threads_shares(threads: int, shape: tuple[int, ...]) -> None:
    # The threads share the elements; values right at and beside each share's first element, at the
    # ends, and a run of spans with no value at all land where numpy puts them.
    numel = math.prod(shape)
    edges = [numel * t // threads for t in range(threads + 1)]
    picked = {0, numel - 1} | {e + d for e in edges[1:-1] for d in (-1, 0, 1)}
    generator = np.random.default_rng(numel + threads)
    picked |= {int(p) for p in generator.choice(numel // 2, numel // 20, replace=False)}  # none above half
    flat = np.array(sorted(picked), dtype=np.int64)
    rows = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    values = generator.standard_normal(flat.size).astype(np.float32)
    values[::7] = -0.0
    dense = np.full(numel, 3.0, dtype=np.float32)
    fast.write(dense, 4, True, rows, shape, values, threads)
    expected = np.zeros(numel, dtype=np.float32)
    expected[flat] = values + np.float32(0)
    assert dense.tobytes() == expected.tobytes()


def test_write_refuses_coordinates_that_changed_since_the_check() -> None:
    values = np.ones(2, dtype=np.float32)
    for rows in [
        _rows((0, 1), (0, 5)),  # out of its axis
        _rows((1, 1), (0, 2)),  # out of order
        _rows((1, 1), (1, 1)),  # repeated
        _rows((-1, 1), (1, 1)),  # negative
    ]:
        dense = np.full(9, 7.0, dtype=np.float32)
        with pytest.raises(ValueError, match="changed since they were checked"):
            fast.write(dense, 4, True, rows, (3, 3), values, 1)
    # Across shares: the second thread's rows are found by binary search, and checked again.
    shape = (4 * SHARE,)
    flat = np.arange(0, 4 * SHARE, 2, dtype=np.int64)
    flat[SHARE] = 5  # out of order, in the second half
    with pytest.raises(ValueError, match="changed since they were checked"):
        fast.write(
            np.zeros(4 * SHARE, np.float32),
            4,
            True,
            flat.reshape(-1, 1),
            shape,
            np.ones(flat.size, np.float32),
            2,
        )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(9, np.float32), 3, False, _rows((0, 1)), (3, 3), np.ones(1, np.float32), 1), "itemsize"),
        ((np.zeros(9, np.int16), 2, True, _rows((0, 1)), (3, 3), np.ones(1, np.int16), 1), "add_zero"),
        (
            (np.zeros(9, np.float32), 4, True, _rows((0, 1)), (3, 3), np.ones(0, np.float32), 1),
            "one item per row",
        ),
        (
            (np.zeros(9, np.float32), 4, True, _rows((0, 1)), (3, 3), np.ones(2, np.float32), 1),
            "one item per row",
        ),
        ((np.zeros(10, np.float32), 4, True, _rows((0, 1)), (3, 3), np.ones(1, np.float32), 1), "prod"),
        (
            (np.zeros(9, np.float32), 4, True, np.zeros(3, np.int64), (3, 3), np.ones(1, np.float32), 1),
            "whole rows",
        ),
    ],
)
def test_write_refuses_arguments_that_do_not_fit(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fast.write(*args)


def test_check_and_write_refuse_a_bad_shape() -> None:
    with pytest.raises(ValueError, match="1 to 64 dimensions"):
        fast.check(np.zeros(0, np.int64), (), 1)
    with pytest.raises(ValueError, match="negative"):
        fast.check(_rows((0, 0)), (2, -1), 1)
    with pytest.raises(ValueError, match="more elements"):
        fast.check(_rows((0, 0)), (1 << 40, 1 << 40), 1)
    with pytest.raises(TypeError):
        fast.write(b"read-only", 1, False, _rows((0,)), (9,), b"x", 1)


def _random_payload(generator: np.random.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, CooTensor]:
    shape = tuple(int(d) for d in generator.integers(1, 9, size=int(generator.integers(1, 4))))
    numel = math.prod(shape)
    nnz = int(generator.integers(0, numel + 1))
    flat = np.sort(generator.choice(numel, nnz, replace=False))
    coords = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64).reshape(nnz, len(shape))
    values = torch.from_numpy(generator.standard_normal(nnz)).to(dtype)
    if dtype.is_floating_point and nnz:
        values[0] = -0.0
    target = torch.from_numpy(generator.standard_normal(numel)).to(dtype).reshape(shape)
    return target, CooTensor("w", shape, values, torch.from_numpy(coords))


def _numpy_passes(target: torch.Tensor, item: CooTensor) -> torch.Tensor:
    flat = torch.from_numpy(np.ravel_multi_index(tuple(item.coords.numpy().T), item.shape).astype(np.int64))
    result = target.clone()
    pull_sparse_into({"w": result}, [SparseTensor("w", item.shape, item.values, flat.reshape(-1))])
    return result


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.int32, torch.bool])
def test_replace_coo_into_matches_numpys_passes(dtype: torch.dtype) -> None:
    generator = np.random.default_rng(7)
    for _ in range(120):
        target, item = _random_payload(generator, dtype)
        expected = _numpy_passes(target, item)
        storage = target.data_ptr()
        assert replace_coo_into({"w": target}, [item]) is True
        assert target.data_ptr() == storage
        assert target.dtype == dtype
        # Bits, -0.0 included (written as +0.0 by both).
        assert target.view(-1).numpy().tobytes() == expected.view(-1).numpy().tobytes()


def _declined(targets: dict[str, torch.Tensor], payload: list[CooTensor]) -> None:
    before = {name: t.clone() for name, t in targets.items()}
    assert replace_coo_into(targets, payload) is False
    for name, tensor in targets.items():
        assert torch.equal(tensor, before[name]), f"{name} was written"


def test_replace_coo_into_declines_what_numpys_passes_handle_or_refuse() -> None:
    good = CooTensor("a", (2, 3), torch.tensor([1.0, 2.0]), torch.tensor([[0, 1], [1, 2]]))

    def second(values: torch.Tensor, coords: list[list[int]], shape: tuple[int, ...] = (2, 3)) -> CooTensor:
        return CooTensor("b", shape, values, torch.tensor(coords, dtype=torch.int64).reshape(-1, len(shape)))

    targets = {"a": torch.ones(2, 3), "b": torch.ones(2, 3)}
    # A good first tensor is not written when the second is declined: every check comes first.
    for bad in [
        second(torch.tensor([1.0, 2.0]), [[0, 1], [0, 1]]),  # repeated (numpy's passes sum them)
        second(torch.tensor([1.0, 2.0, 3.0]), [[0, 0], [1, 0], [0, 2]]),  # out of order
        second(torch.tensor([1.0, 2.0]), [[0, 1], [1, 3]]),  # out of range
        second(torch.tensor([1.0, 2.0]), [[-1, 1], [1, 1]]),  # negative
        second(
            torch.tensor([1.0, 2.0], dtype=torch.float64), [[0, 1], [1, 1]]
        ),  # another dtype than the model's
        second(torch.tensor([1.0, 2.0]), [[0, 1], [1, 1]], shape=(3, 2)),  # another shape
        second(torch.tensor([1.0]), [[0, 1], [1, 1]]),  # fewer values than coordinates
        CooTensor("c", (2, 3), torch.tensor([1.0]), torch.tensor([[0, 1]])),  # not in the model
    ]:
        _declined(targets, [good, bad])
    # Dtypes it does not write, and tensors it cannot write in place.
    _declined(
        {"b": torch.ones(2, 3, dtype=torch.float16)},
        [second(torch.tensor([1.0], dtype=torch.float16), [[0, 1]])],
    )
    _declined({"b": torch.ones(3, 2).t()}, [second(torch.tensor([1.0]), [[0, 1]])])


def test_replace_coo_into_declines_without_the_native_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pull, "_fastpull", None)
    item = CooTensor("w", (3,), torch.tensor([1.0]), torch.tensor([[1]]))
    _declined({"w": torch.ones(3)}, [item])


def test_the_drop_in_pull_gives_the_same_bits_either_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch import nn

    from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

    torch.manual_seed(0)
    model, initial = (
        nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 5)),
        nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 5)),
    )
    exchanger = SparseCooParameterExchanger(0.3, largest_magnitude_change_scores)
    packed = exchanger.push_parameters(model, initial)
    native, numpy_passes = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 5)), None
    numpy_passes = nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 5))
    numpy_passes.load_state_dict(native.state_dict())
    calls: list[bool] = []
    real = pull.replace_coo_into

    def counted(*args: Any) -> bool:
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr("paramsel.engine.replace_coo_into", counted)
    exchanger.pull_parameters(packed, native)
    assert calls == [True]
    monkeypatch.setattr(pull, "_fastpull", None)
    exchanger.pull_parameters(packed, numpy_passes)
    assert calls == [True, False]
    for (name, a), b in zip(native.state_dict().items(), numpy_passes.state_dict().values(), strict=True):
        assert a.numpy().tobytes() == b.numpy().tobytes(), name


def test_replace_coo_into_a_tensor_the_threads_share() -> None:
    generator = np.random.default_rng(11)
    shape = (300, 1000)  # 300 000 elements: the write has a share per thread
    flat = np.sort(generator.choice(300_000, 30_000, replace=False))
    coords = torch.from_numpy(np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64))
    item = CooTensor(
        "w", shape, torch.from_numpy(generator.standard_normal(flat.size).astype(np.float32)), coords
    )
    target = torch.full(shape, 5.0)
    expected = _numpy_passes(target, item)
    assert replace_coo_into({"w": target}, [item]) is True
    assert target.numpy().tobytes() == expected.numpy().tobytes()
