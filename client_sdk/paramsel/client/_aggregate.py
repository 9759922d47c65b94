"""Aggregation through the service on FL4Health's packed lists, as its server strategies aggregate them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from paramsel.client._client import Client
from paramsel.client._compact import fl4health_sparse
from paramsel.client._connection import Connection
from paramsel.client._packing import pack_layers, pack_sparse, unpack_layers, unpack_sparse
from paramsel.client._state import NDArrays, to_numpy, to_tensor
from paramsel.v1 import service_pb2
from paramsel.wire.streams import SparseOut

Results = Sequence[tuple[NDArrays, int]]


def _pseudo_sort_key(result: tuple[NDArrays, int]) -> Any:
    """FL4Health's pseudo-sort score of one client's result: the sum of the first element of each
    floating-point array, plus the client's example count (numpy's arithmetic, as FL4Health's).
    Empty arrays have no first element and count for nothing (FL4Health would fail on them)."""
    arrays, num_examples = result
    firsts = [
        a[(0,) * a.ndim] for a in map(np.asarray, arrays) if np.issubdtype(a.dtype, np.floating) and a.size
    ]
    return np.sum(firsts) + num_examples


def fl4health_order(results: Results) -> list[tuple[NDArrays, int]]:
    """The results in the order FL4Health's strategies aggregate them (``decode_and_pseudo_sort_results``:
    a stable sort by :func:`_pseudo_sort_key`), which fixes the summation order, and so the last bits of
    the average, and the order of the aggregate's tensors."""
    return sorted(results, key=_pseudo_sort_key)


def aggregate_sparse_coo(
    results: Results,
    *,
    weighted: bool = True,
    target: str | None = None,
    connection: Connection | None = None,
) -> NDArrays:
    """FedAvgSparseCooTensor's aggregate of clients' packed lists ([values..., indices..., shapes...,
    names], with each client's example count), as the same packed list. The clients are summed in
    FL4Health's order (its pseudo-sort), whatever order they come in. ``connection`` / ``target``:
    as for :class:`Client`."""
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = []
    for packed, num_examples in fl4health_order(results):
        values, (indices, shapes, names) = unpack_sparse(packed)
        tensors = [
            SparseOut(
                name,
                tuple(int(d) for d in np.asarray(shape).reshape(-1)),
                to_tensor(v),
                to_tensor(np.asarray(i, dtype=np.int64)),
            )
            for v, i, shape, name in zip(values, indices, shapes, names, strict=True)
        ]
        contributions.append((int(num_examples), [], tensors))
    result = Client(target=target, connection=connection).aggregate(
        service_pb2.PAYLOAD_KIND_SPARSE_COO, contributions, weighted=weighted
    )
    return pack_sparse(*fl4health_sparse(result.sparse))


def aggregate_layers(
    results: Results,
    *,
    weighted: bool = True,
    target: str | None = None,
    connection: Connection | None = None,
) -> NDArrays:
    """FedAvgDynamicLayer's aggregate of clients' packed lists ([arrays..., names] with each client's
    example count), as the same packed list. The clients are summed in FL4Health's order (its
    pseudo-sort), whatever order they come in. ``connection`` / ``target``: as for :class:`Client`."""
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = []
    for packed, num_examples in fl4health_order(results):
        arrays, names = unpack_layers(packed)
        named = [(name, to_tensor(a)) for a, name in zip(arrays, names, strict=True)]
        contributions.append((int(num_examples), named, []))
    result = Client(target=target, connection=connection).aggregate(
        service_pb2.PAYLOAD_KIND_LAYERS, contributions, weighted=weighted
    )
    return pack_layers([to_numpy(t) for _, t in result.tensors], [name for name, _ in result.tensors])
