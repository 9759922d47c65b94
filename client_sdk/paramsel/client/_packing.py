"""FL4Health's packed lists, the one place that knows their layout.

Sparse COO: [values..., indices..., shapes..., np.array(names)]; whole layers: [arrays..., np.array(names)].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from paramsel.client._state import NDArrays

SparseInfo = tuple[NDArrays, NDArrays, list[str]]


def _names(array: np.ndarray) -> list[str]:
    return [str(name) for name in np.asarray(array).tolist()]


def pack_sparse(values: Sequence[np.ndarray], info: SparseInfo) -> NDArrays:
    indices, shapes, names = info
    return [*values, *indices, *shapes, np.array(names)]


def unpack_sparse(packed: NDArrays) -> tuple[NDArrays, SparseInfo]:
    if len(packed) % 3 != 1:
        raise ValueError(
            f"a sparse COO packed list has 3n + 1 arrays (values, indices, shapes, names); got {len(packed)}"
        )
    n = (len(packed) - 1) // 3
    return packed[:n], (packed[n : 2 * n], packed[2 * n : 3 * n], _names(packed[-1]))


def pack_layers(arrays: Sequence[np.ndarray], names: Sequence[str]) -> NDArrays:
    return [*arrays, np.array(list(names))]


def unpack_layers(packed: NDArrays) -> tuple[NDArrays, list[str]]:
    if not packed:
        raise ValueError("a layer packed list ends with the names array; got an empty list")
    return packed[:-1], _names(packed[-1])
