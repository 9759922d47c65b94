"""Aggregation through the service on FL4Health's packed lists, as its server strategies aggregate them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from paramsel.client._client import Client
from paramsel.client._compact import fl4health_sparse
from paramsel.client._connection import Connection
from paramsel.client._state import NDArrays, to_numpy, to_tensor
from paramsel.v1 import service_pb2
from paramsel.wire.streams import SparseOut

Results = Sequence[tuple[NDArrays, int]]


def _names(array: np.ndarray) -> list[str]:
    return [str(name) for name in np.asarray(array).tolist()]


def aggregate_sparse_coo(
    results: Results,
    *,
    weighted: bool = True,
    target: str | None = None,
    connection: Connection | None = None,
) -> NDArrays:
    """FedAvgSparseCooTensor's aggregate of clients' packed lists ([values..., indices..., shapes...,
    names], with each client's example count), as the same packed list. ``connection`` / ``target``:
    as for :class:`Client`."""
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = []
    for packed, num_examples in results:
        if len(packed) % 3 != 1:
            raise ValueError(f"a sparse COO packed list has 3n + 1 arrays; got {len(packed)}")
        n = (len(packed) - 1) // 3
        tensors = [
            SparseOut(
                name,
                tuple(int(d) for d in np.asarray(shape).reshape(-1)),
                to_tensor(values),
                to_tensor(np.asarray(indices, dtype=np.int64)),
            )
            for values, indices, shape, name in zip(
                packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n], _names(packed[-1]), strict=True
            )
        ]
        contributions.append((int(num_examples), [], tensors))
    result = Client(target=target, connection=connection).aggregate(
        service_pb2.PAYLOAD_KIND_SPARSE_COO, contributions, weighted=weighted
    )
    values, (indices, shapes, names) = fl4health_sparse(result.sparse)
    return [*values, *indices, *shapes, np.array(names)]


def aggregate_layers(
    results: Results,
    *,
    weighted: bool = True,
    target: str | None = None,
    connection: Connection | None = None,
) -> NDArrays:
    """FedAvgDynamicLayer's aggregate of clients' packed lists ([arrays..., names] with each client's
    example count), as the same packed list. ``connection`` / ``target``: as for :class:`Client`."""
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = []
    for packed, num_examples in results:
        if not packed:
            raise ValueError("a layer packed list ends with the names array; got an empty list")
        named = [(name, to_tensor(a)) for a, name in zip(packed[:-1], _names(packed[-1]), strict=True)]
        contributions.append((int(num_examples), named, []))
    result = Client(target=target, connection=connection).aggregate(
        service_pb2.PAYLOAD_KIND_LAYERS, contributions, weighted=weighted
    )
    return [*(to_numpy(t) for _, t in result.tensors), np.array([name for name, _ in result.tensors])]
