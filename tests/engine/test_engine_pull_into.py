"""pull_sparse_into: the same result as pull_sparse, written into the model's own tensors."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from paramsel.engine import InvalidArgument, PullMode, SparseTensor, TensorSpec, pull, pull_sparse_into
from paramsel.wire import positions


def _payload(
    positions: list[int], values: list[float], shape: tuple[int, ...] = (2, 3)
) -> list[SparseTensor]:
    return [SparseTensor("w", shape, torch.tensor(values), torch.tensor(positions))]


def test_replace_zeroes_the_rest_in_place() -> None:
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 1
    storage = w.data_ptr()
    assert pull_sparse_into({"w": w}, _payload([1, 5], [10.0, 20.0])) == ["w"]
    assert w.tolist() == [[0.0, 10.0, 0.0], [0.0, 0.0, 20.0]]
    assert w.data_ptr() == storage


def test_scatter_keeps_the_rest() -> None:
    w = torch.ones(2, 3)
    pull_sparse_into({"w": w}, _payload([0, 4], [7.0, 8.0]), mode=PullMode.SCATTER)
    assert w.tolist() == [[7.0, 1.0, 1.0], [1.0, 8.0, 1.0]]


def test_add_adds_in_place() -> None:
    w = torch.ones(2, 3)
    pull_sparse_into({"w": w}, _payload([0, 4], [7.0, 8.0]), mode=PullMode.ADD)
    assert w.tolist() == [[8.0, 1.0, 1.0], [1.0, 9.0, 1.0]]


def test_duplicates_and_disorder_take_the_general_path() -> None:
    # FL4Health's densifying pull sums duplicates: 1 + 2 at position 3, and order does not matter.
    w = torch.full((2, 3), 9.0)
    pull_sparse_into({"w": w}, _payload([3, 0, 3], [1.0, 5.0, 2.0]))
    assert w.tolist() == [[5.0, 0.0, 0.0], [3.0, 0.0, 0.0]]


def test_values_are_cast_to_the_model_dtype() -> None:
    w = torch.zeros(2, 3, dtype=torch.float16)
    payload = [
        SparseTensor("w", (2, 3), torch.tensor([1.0 + 2**-13], dtype=torch.float64), torch.tensor([2]))
    ]
    pull_sparse_into({"w": w}, payload)
    assert w.dtype == torch.float16
    assert w.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]  # 1 + 2**-13 rounds to 1 in float16


def test_refusals_leave_the_model_untouched() -> None:
    w = torch.ones(2, 3)
    with pytest.raises(InvalidArgument, match="outside"):
        pull_sparse_into({"w": w}, _payload([6], [1.0]))
    with pytest.raises(InvalidArgument, match="does not have"):
        pull_sparse_into({"w": w}, [SparseTensor("v", (2, 3), torch.ones(1), torch.tensor([0]))])
    with pytest.raises(InvalidArgument, match="shape"):
        pull_sparse_into({"w": w}, _payload([0], [1.0], shape=(3, 2)))
    assert w.tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize(
    ("positions", "bad"),
    [
        ([0, 2, 6], 6),  # increasing: the last one is past the end
        ([-1, 2, 4], -1),  # increasing: the first one is negative
        ([4, 7, 1], 7),  # not increasing: out of range in the middle
        ([3, -2, 5], -2),
    ],
)
def test_every_position_out_of_range_is_named(positions: list[int], bad: int) -> None:
    for mode in PullMode:
        w = torch.ones(2, 3)
        with pytest.raises(InvalidArgument, match=rf"has position {bad}, outside \[0, 6\)"):
            pull_sparse_into({"w": w}, _payload(positions, [1.0] * len(positions)), mode=mode)
        assert w.tolist() == [[1.0] * 3] * 2


def test_a_bad_second_tensor_stops_the_first_from_being_written() -> None:
    w, v = torch.ones(2, 3), torch.ones(4)
    payload = [
        SparseTensor("w", (2, 3), torch.tensor([5.0]), torch.tensor([0])),
        SparseTensor("v", (4,), torch.tensor([5.0]), torch.tensor([4])),
    ]
    with pytest.raises(InvalidArgument, match="'v'"):
        pull_sparse_into({"w": w, "v": v}, payload)
    assert w.tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.bfloat16])
def test_replace_in_blocks_across_block_edges(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    # Blocks of 8 bytes: 2 entries of float32 and int32, 1 of float64; bfloat16 (which numpy cannot
    # view) is zeroed and scattered whole.
    monkeypatch.setattr(pull, "_BLOCK_BYTES", 8)
    w = torch.full((7,), 9, dtype=dtype)
    storage = w.data_ptr()
    payload = [SparseTensor("w", (7,), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 2, 6]))]
    pull_sparse_into({"w": w}, payload)
    assert w.dtype == dtype
    assert w.tolist() == [0, 1, 2, 0, 0, 0, 3]
    assert w.data_ptr() == storage
    # No position at all: every block is zeroed.
    pull_sparse_into({"w": w}, [SparseTensor("w", (7,), torch.zeros(0), torch.zeros(0, dtype=torch.int64))])
    assert w.tolist() == [0] * 7


@pytest.mark.parametrize("block_bytes", [8, 1 << 19])  # blocks of 2 entries, and the default
def test_replace_densifies_as_adding_into_zeros(monkeypatch: pytest.MonkeyPatch, block_bytes: int) -> None:
    """As FL4Health's to_dense() does, and pull_sparse: a -0.0 sent arrives as +0.0 (0 + -0.0), a NaN
    keeps its bits, every other value is itself; the values' dtype first, then the model's."""
    monkeypatch.setattr(pull, "_BLOCK_BYTES", block_bytes)
    nan = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # a quiet NaN with a payload
    values = torch.cat([torch.tensor([-0.0, -2.5]), nan])
    payload = [SparseTensor("w", (2, 2), values, torch.tensor([0, 1, 3]))]
    w = torch.ones(2, 2)
    pull_sparse_into({"w": w}, payload)
    bits = w.view(torch.int32).view(-1).tolist()
    assert bits == [0, torch.tensor(-2.5).view(torch.int32).item(), 0, 0x7FC00123]
    general = pull.pull_sparse([TensorSpec("w", torch.float32, (2, 2))], payload)["w"]
    assert general.view(torch.int32).view(-1).tolist() == bits
    # float64 values into a float32 model: -1e-320 is not zero in float64, and its cast is -0.0.
    w64 = torch.ones(2)
    tiny = [SparseTensor("w", (2,), torch.tensor([-0.0, -1e-320], dtype=torch.float64), torch.tensor([0, 1]))]
    pull_sparse_into({"w": w64}, tiny)
    assert torch.signbit(w64).tolist() == [False, True]
    # SCATTER writes what was sent, bits and all (paramsel's own mode: nothing is densified).
    w = torch.ones(2, 2)
    pull_sparse_into({"w": w}, payload, mode=PullMode.SCATTER)
    assert torch.signbit(w).view(-1).tolist()[:2] == [True, True]


@pytest.mark.parametrize("helper", [pull.in_parallel, positions._in_parallel])
def test_in_parallel_covers_every_item_once_and_raises_a_share_error(
    monkeypatch: pytest.MonkeyPatch, helper: Callable[[int, Callable[[int, int], None]], None]
) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    shares: list[tuple[int, int]] = []
    helper(50, lambda first, last: shares.append((first, last)))  # 50 // 16 = 3 shares
    assert sorted(shares) == [(0, 16), (16, 33), (33, 50)]
    shares.clear()
    helper(40, lambda first, last: shares.append((first, last)))  # 40 // 16 = 2 shares
    assert sorted(shares) == [(0, 20), (20, 40)]
    shares.clear()
    helper(0, lambda first, last: shares.append((first, last)))
    assert shares == [(0, 0)]

    def fail_the_last(first: int, last: int) -> None:
        if last == 50:
            raise ValueError(f"share {first}-{last}")

    with pytest.raises(ValueError, match="share 33-50"):
        helper(50, fail_the_last)


@pytest.mark.parametrize("helper", [pull.in_parallel, positions._in_parallel])
def test_in_parallel_waits_for_every_share_before_raising(
    monkeypatch: pytest.MonkeyPatch, helper: Callable[[int, Callable[[int, int], None]], None]
) -> None:
    """The calling thread's own share fails: the pool's shares still run to their end first (they
    write into the caller's tensors), then its error is raised."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ended: list[int] = []

    def work(first: int, last: int) -> None:
        if first == 0:
            raise ValueError("the first share")
        time.sleep(0.2)
        ended.append(first)

    with pytest.raises(ValueError, match="the first share"):
        helper(40, work)
    assert ended == [20]


def _in_a_forked_child(helper: Callable[[int, Callable[[int, int], None]], None], queue: Any) -> None:
    shares: list[tuple[int, int]] = []
    helper(40, lambda first, last: shares.append((first, last)))
    queue.put(sorted(shares))


@pytest.mark.parametrize("helper", [pull.in_parallel, positions._in_parallel])
def test_in_parallel_works_in_a_forked_child(
    monkeypatch: pytest.MonkeyPatch, helper: Callable[[int, Callable[[int, int], None]], None]
) -> None:
    """The pool's threads are not in a forked child: it starts its own instead of waiting for ever."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    helper(40, lambda first, last: None)  # the parent's pool is running
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_a_forked_child, args=(helper, queue))
    child.start()
    try:
        assert queue.get(timeout=120) == [(0, 20), (20, 40)]
    finally:
        child.join(timeout=120)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
