"""The replace pull's native passes (paramsel/engine/_fastpull.c) and replace_coo_into, against hand-computed
results and against numpy's passes (pull_sparse_into), which serve every pull where it declines."""

from __future__ import annotations

import math
import os
import signal
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
"""Fewest rows (flatten) or elements (write) a thread of the native module takes on (MIN_SHARE in the C)."""


def _flatten(rows: np.ndarray, shape: tuple[int, ...], threads: int = 2, dtype: Any = np.uint32) -> Any:
    """flatten()'s verdict, and the flat positions when it accepts."""
    flats = np.full(rows.shape[0], 7, dtype=dtype)
    return fast.flatten(rows, shape, flats, threads) and flats.tolist()


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_flatten_gives_the_flat_positions_of_increasing_coordinates_in_range(dtype: Any) -> None:
    assert _flatten(_rows((0, 1), (0, 2), (1, 0), (2, 2)), (3, 3), dtype=dtype) == [1, 2, 3, 8]
    assert _flatten(np.zeros((0, 2), np.int64), (3, 3), dtype=dtype) == []  # no rows: nothing wrong


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
def test_flatten_refuses(rows: np.ndarray) -> None:
    assert _flatten(rows, (3, 3)) is False


def test_flatten_in_one_and_three_dimensions() -> None:
    assert _flatten(_rows((0,), (4,)), (5,)) == [0, 4]
    assert _flatten(_rows((0,), (5,)), (5,)) is False
    assert _flatten(_rows((4,), (4,)), (5,)) is False
    assert _flatten(_rows((0, 1, 1), (1, 0, 0)), (2, 2, 2), dtype=np.uint64) == [3, 4]
    assert _flatten(_rows((0, 1, 1), (0, 1, 1)), (2, 2, 2)) is False
    assert _flatten(_rows((0, 1, 1), (1, 0, 2)), (2, 2, 2)) is False


def _sorted_rows(count: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    flat = np.sort(np.random.default_rng(seed).choice(math.prod(shape), count, replace=False))
    return np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64), flat


@pytest.mark.parametrize("threads", [2, 3])
def test_flatten_across_the_threads_shares(threads: int) -> None:
    # Enough rows for `threads` shares; a fault on either side of each boundary between them is found.
    shape = (700, 1000)
    rows, flat = _sorted_rows(threads * SHARE + 5, shape, threads)
    assert _flatten(rows, shape, threads) == flat.tolist()
    count = rows.shape[0]
    for boundary in [count * t // threads for t in range(1, threads)]:
        for at in (boundary - 1, boundary, boundary + 1):
            repeated = rows.copy()
            repeated[at] = repeated[at - 1]
            assert _flatten(repeated, shape, threads) is False, at
            out = rows.copy()
            out[at, 1] = shape[1]
            assert _flatten(out, shape, threads) is False, at
    assert _flatten(rows[::-1].copy(), shape, threads) is False
    last = rows.copy()
    last[-1, 0] = shape[0]
    assert _flatten(last, shape, threads) is False


def test_flatten_refuses_arguments_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="one uint32 or one uint64 per row"):
        fast.flatten(_rows((0, 1)), (3, 3), np.zeros(3, np.uint32), 1)
    with pytest.raises(ValueError, match="more than 2\\*\\*32 elements"):
        fast.flatten(_rows((0, 1)), (1 << 20, 1 << 13), np.zeros(1, np.uint32), 1)
    assert fast.flatten(_rows((0, 1)), (1 << 20, 1 << 13), np.zeros(1, np.uint64), 1) is True
    with pytest.raises(ValueError, match="whole rows"):
        fast.flatten(np.zeros(3, np.int64), (3, 3), np.zeros(1, np.uint32), 1)
    with pytest.raises(ValueError, match="1 to 64 dimensions"):
        fast.flatten(np.zeros(0, np.int64), (), np.zeros(0, np.uint32), 1)
    with pytest.raises(ValueError, match="negative"):
        fast.flatten(_rows((0, 0)), (2, -1), np.zeros(1, np.uint32), 1)
    with pytest.raises(ValueError, match="more elements"):
        fast.flatten(_rows((0, 0)), (1 << 40, 1 << 40), np.zeros(1, np.uint64), 1)
    with pytest.raises(TypeError):
        fast.flatten(_rows((0, 0)), (2, 2), b"\0" * 4, 1)  # read-only flats


def _flats(*positions: int, dtype: Any = np.uint32) -> np.ndarray:
    return np.array(positions, dtype=dtype)


def test_write_zeroes_the_tensor_and_writes_the_values() -> None:
    dense = np.full(9, 7.0, dtype=np.float32)
    values = np.array([1.0, -0.0, float("nan")], dtype=np.float32)
    fast.write(dense, 4, True, _flats(1, 3, 8), values, 2)
    assert dense[[0, 2, 4, 5, 6, 7]].tolist() == [0.0] * 6
    assert dense[1] == 1.0
    assert dense[3] == 0.0
    assert not np.signbit(dense[3])  # -0.0 + 0 is +0.0
    assert np.isnan(dense[8])
    dense[:] = 7.0
    fast.write(dense, 4, False, _flats(1, 3, 8, dtype=np.uint64), values, 1)
    assert np.signbit(dense[3])  # written as sent without add_zero
    fast.write(dense, 4, True, _flats(), np.zeros(0, np.float32), 1)
    assert dense.tolist() == [0.0] * 9  # no positions: all zeros


@pytest.mark.parametrize("dtype", [np.float64, np.int64, np.int32, np.int16, np.uint8, np.bool_])
def test_write_other_item_sizes(dtype: Any) -> None:
    dense = np.ones(6, dtype=dtype)
    values = np.array([1, 0, 1], dtype=dtype)
    fast.write(dense, dense.itemsize, dtype is np.float64, _flats(1, 2, 5), values, 1)
    assert dense.tolist() == np.array([0, 1, 0, 0, 0, 1], dtype=dtype).tolist()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("numel", [3 * SHARE + 7, 15 * (SHARE // 2 + 3)])
def test_write_across_the_threads_shares(threads: int, numel: int) -> None:
    # The threads share the elements; values right at and beside each share's first element, at the
    # ends, and a run of spans with no value at all land where numpy puts them.
    edges = [numel * t // threads for t in range(threads + 1)]
    picked = {0, numel - 1} | {e + d for e in edges[1:-1] for d in (-1, 0, 1)}
    generator = np.random.default_rng(numel + threads)
    picked |= {int(p) for p in generator.choice(numel // 2, numel // 20, replace=False)}  # none above half
    flat = np.array(sorted(picked), dtype=np.uint32)
    values = generator.standard_normal(flat.size).astype(np.float32)
    values[::7] = -0.0
    dense = np.full(numel, 3.0, dtype=np.float32)
    fast.write(dense, 4, True, flat, values, threads)
    expected = np.zeros(numel, dtype=np.float32)
    expected[flat] = values + np.float32(0)
    assert dense.tobytes() == expected.tobytes()


@pytest.mark.parametrize(
    "flats",
    [
        _flats(1, 9),  # past the end
        _flats(2, 1),  # out of order
        _flats(1, 1),  # repeated
    ],
)
def test_write_refuses_positions_that_do_not_increase_inside_the_tensor(flats: np.ndarray) -> None:
    with pytest.raises(ValueError, match="strictly increase inside the tensor"):
        fast.write(np.full(9, 7.0, dtype=np.float32), 4, True, flats, np.ones(2, np.float32), 1)


def test_write_refuses_positions_out_of_order_in_another_threads_share() -> None:
    # The second thread finds its positions by binary search, and checks them as it writes.
    flat = np.arange(0, 4 * SHARE, 2, dtype=np.uint32)
    flat[SHARE] = 5
    with pytest.raises(ValueError, match="strictly increase"):
        fast.write(np.zeros(4 * SHARE, np.float32), 4, True, flat, np.ones(flat.size, np.float32), 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.zeros(9, np.float32), 3, False, _flats(1), np.ones(1, np.float32), 1), "itemsize"),
        ((np.zeros(9, np.int16), 2, True, _flats(1), np.ones(1, np.int16), 1), "add_zero"),
        (
            (np.zeros(9, np.float32), 4, True, _flats(1), np.ones(2, np.float32), 1),
            "one uint32 or one uint64",
        ),
        (
            (np.zeros(9, np.float32), 4, True, _flats(1, 2, 3), np.ones(1, np.float32), 1),
            "one uint32 or one uint64",
        ),
        ((np.zeros(9, np.uint8), 4, True, _flats(1), np.ones(1, np.float32), 1), "whole items"),
    ],
)
def test_write_refuses_arguments_that_do_not_fit(args: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fast.write(*args)
    with pytest.raises(TypeError):
        fast.write(b"read-only", 1, False, _flats(1), b"x", 1)


def _random_payload(generator: np.random.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, CooTensor]:
    shape = tuple(int(d) for d in generator.integers(1, 9, size=int(generator.integers(0, 4))))
    numel = math.prod(shape)
    nnz = int(generator.integers(0, numel + 1))
    flat = np.sort(generator.choice(numel, nnz, replace=False))
    coords = np.zeros((nnz, 0), dtype=np.int64)  # a 0-d tensor's
    if shape:
        coords = np.stack(np.unravel_index(flat, shape), axis=1).astype(np.int64)
    values = torch.from_numpy(generator.standard_normal(nnz)).to(dtype)
    if dtype.is_floating_point and nnz:
        values[0] = -0.0
    target = torch.from_numpy(generator.standard_normal(numel)).to(dtype).reshape(shape)
    return target, CooTensor("w", shape, values, torch.from_numpy(coords))


def _numpy_passes(target: torch.Tensor, item: CooTensor) -> torch.Tensor:
    flat = torch.zeros(item.coords.shape[0], dtype=torch.int64)  # a 0-d tensor's
    if item.shape:
        flat = torch.from_numpy(
            np.ravel_multi_index(tuple(item.coords.numpy().T), item.shape).astype(np.int64)
        )
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_replace_coo_into_a_0d_tensor_beside_others(dtype: torch.dtype) -> None:
    # A BatchNorm's num_batches_tracked among the selected tensors: written here too (before, it sent
    # the whole payload to numpy's passes).
    targets = {"w": torch.full((2, 3), 5.0), "n": torch.tensor(9, dtype=dtype)}
    w = CooTensor("w", (2, 3), torch.tensor([1.0, 2.0]), torch.tensor([[0, 1], [1, 2]]))
    sent = torch.tensor([-0.0 if dtype.is_floating_point else 4], dtype=dtype)
    assert replace_coo_into(targets, [w, CooTensor("n", (), sent, torch.zeros((1, 0), dtype=torch.int64))])
    assert targets["w"].tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]
    assert targets["n"].item() == (0 if dtype.is_floating_point else 4)
    assert not torch.signbit(targets["n"]).item()  # -0.0 + 0 is +0.0
    empty = CooTensor("n", (), torch.zeros(0, dtype=dtype), torch.zeros((0, 0), dtype=torch.int64))
    assert replace_coo_into(targets, [empty])
    assert targets["n"].item() == 0
    # Repeated: numpy's passes sum them.
    twice = CooTensor("n", (), torch.ones(2, dtype=dtype), torch.zeros((2, 0), dtype=torch.int64))
    _declined(targets, [twice])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_pulls_after_its_parent_ran_parallel_regions() -> None:
    # GNU OpenMP is not fork-safe: a child using the parent's thread team waits forever. The child
    # pulls on one thread instead; an alarm ends it (non-zero status) if it hangs all the same.
    shape = (400, 1000)  # 400 000 elements: two threads' shares in the parent
    rows, flat = _sorted_rows(40_000, shape, 5)
    values = torch.ones(flat.size)
    item = CooTensor("w", shape, values, torch.from_numpy(rows))
    parent = {"w": torch.full(shape, 2.0)}
    torch.ones(1_000_000).add_(1)  # a torch parallel region, as training leaves behind
    assert replace_coo_into(parent, [item])
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's verdict is its exit status
        # Nothing here runs a torch parallel region: the child's torch would wait forever as well.
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # not pytest-timeout's handler: end the child
        signal.alarm(60)
        child = {"w": torch.from_numpy(np.full(shape, 3.0, dtype=np.float32))}
        done = (
            replace_coo_into(child, [item]) and child["w"].numpy().tobytes() == parent["w"].numpy().tobytes()
        )
        os._exit(0 if done else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status), f"the child was ended by a signal (status {status}): it hung"
    assert os.WEXITSTATUS(status) == 0, "the child's pull wrote other values than its parent's"
