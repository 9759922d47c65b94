"""coo_to_flat and flat_to_coo: FL4Health's (nnz, ndim) coordinates and flat row-major positions."""

from typing import Any

import numpy as np
import pytest
import torch

from paramsel.wire import WireError, positions
from paramsel.wire.positions import coo_to_flat, flat_to_coo


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (1, 1)])
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint16])
def test_matches_numpy_ravel_multi_index(shape: tuple[int, ...], dtype: type[np.integer[Any]]) -> None:
    rng = np.random.default_rng(len(shape))
    coords = np.stack([rng.integers(0, d, 50) for d in shape], axis=1).astype(dtype)
    flat = coo_to_flat(coords, shape, what="t")
    assert flat.dtype == np.int64
    assert flat.tolist() == np.ravel_multi_index(tuple(coords.T.astype(np.int64)), shape).tolist()
    # The caller's array is read, never written.
    assert coords.dtype == dtype


def test_hand_computed_and_edge_cases() -> None:
    assert coo_to_flat(np.array([[0, 0], [1, 2], [2, 4]]), (3, 5), what="t").tolist() == [0, 7, 14]
    assert coo_to_flat(np.zeros((0, 2), dtype=np.int64), (3, 5), what="t").tolist() == []
    assert coo_to_flat(np.zeros((2, 0), dtype=np.int64), (), what="t").tolist() == [0, 0]


@pytest.mark.parametrize(("row", "axis", "bad"), [([3, 0], 0, 3), ([0, 5], 1, 5), ([-1, 0], 0, -1)])
def test_a_coordinate_out_of_range_is_named(row: list[int], axis: int, bad: int) -> None:
    coords = np.array([[0, 0], row])
    with pytest.raises(
        WireError, match=rf"t: coordinate {bad} on axis {axis} is out of range for shape \[3, 5\]"
    ):
        coo_to_flat(coords, (3, 5), what="t")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2), (1,), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_flat_to_coo_matches_numpy_unravel_index(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    numel = int(np.prod(shape))
    flat = torch.randperm(numel, generator=torch.Generator().manual_seed(numel))[: max(1, numel // 2)]
    coords = flat_to_coo(flat.to(dtype), shape)
    assert coords.dtype == np.int64
    assert coords.shape == (flat.numel(), len(shape))
    assert coords.tolist() == np.stack(np.unravel_index(flat.numpy(), shape), axis=1).tolist()
    assert coo_to_flat(coords, shape, what="t").tolist() == flat.tolist()


def test_flat_to_coo_edge_cases_and_refusals() -> None:
    assert flat_to_coo(torch.tensor([0, 7, 14]), (3, 5)).tolist() == [[0, 0], [1, 2], [2, 4]]
    assert flat_to_coo(torch.zeros(0, dtype=torch.int64), (3, 5)).shape == (0, 2)
    assert flat_to_coo(torch.tensor([0]), ()).shape == (1, 0)
    for bad in (15, -1):
        with pytest.raises(
            WireError, match=r"position out of range for a tensor of shape \[3, 5\] \(15 elements\)"
        ):
            flat_to_coo(torch.tensor([0, bad]), (3, 5))


def test_coordinates_are_checked_and_flattened_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 4 rows, reduced 4 side by side: 19 rows are four whole chunks and one of 3 (no lane).
    monkeypatch.setattr(positions, "_CHUNK_BYTES", 64)
    monkeypatch.setattr(positions, "_LANES", 4)
    coords = np.array([[i // 5, i % 5] for i in range(19)])
    assert coo_to_flat(coords, (4, 5), what="t").tolist() == list(range(19))
    cube = np.array([[i // 12, i // 4 % 3, i % 4] for i in range(24)])
    assert coo_to_flat(cube, (2, 3, 4), what="t").tolist() == list(range(24))
    # Out of range only in the last, partial chunk: negative (on axis 1) and past the end (axis 0).
    low = coords.copy()
    low[17] = [3, -1]
    with pytest.raises(WireError, match=r"t: coordinate -1 on axis 1 is out of range for shape \[4, 5\]"):
        coo_to_flat(low, (4, 5), what="t")
    high = coords.copy()
    high[18] = [4, 0]
    with pytest.raises(WireError, match=r"t: coordinate 4 on axis 0 is out of range for shape \[4, 5\]"):
        coo_to_flat(high, (4, 5), what="t")
    # In a whole chunk's lanes; the first axis with a coordinate out of range is named.
    both = coords.copy()
    both[3] = [-7, 9]
    with pytest.raises(WireError, match=r"t: coordinate -7 on axis 0 is out of range"):
        coo_to_flat(both, (4, 5), what="t")
    # A dimension of 0 takes no coordinate at all.
    with pytest.raises(WireError, match=r"t: coordinate 0 on axis 1 is out of range for shape \[4, 0\]"):
        coo_to_flat(np.zeros((1, 2), dtype=np.int64), (4, 0), what="t")
