"""Aggregation through the service on FL4Health's packed lists, as its server strategies aggregate them."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from paramsel.client._client import AggregateResult, Client, SparseTensor
from paramsel.client._compact import fl4health_sparse
from paramsel.client._connection import Connection
from paramsel.client._errors import ParamselError, invalid_argument
from paramsel.client._packing import pack_layers, pack_sparse, unpack_layers, unpack_sparse
from paramsel.client._state import NDArrays, to_numpy, to_tensor
from paramsel.client._types import PayloadKind

Results = Sequence[tuple[NDArrays, int]]
_Contribution = tuple[int, list[tuple[str, torch.Tensor]], list[SparseTensor]]


def _refuse(message: str) -> ParamselError:
    return invalid_argument(message)


def _checked(results: Results) -> list[tuple[int, NDArrays, int]]:
    """The results, each with its index in ``results``, in the order given: the server puts them in
    FL4Health's order (its pseudo-sort) itself, whatever order they come in.

    FL4Health's pseudo-sort reads the first element of every floating-point array, so it fails on an
    empty one (an empty names array ``np.array([])`` is float64, too): that is refused here. Example
    counts are taken as Python ints, as Flower delivers them."""
    checked: list[tuple[int, NDArrays, int]] = []
    for client, (arrays, num_examples) in enumerate(results):
        for position, array in enumerate(map(np.asarray, arrays)):
            if np.issubdtype(array.dtype, np.floating) and array.size == 0:
                raise _refuse(
                    f"results[{client}]: array {position} is an empty {array.dtype} array; FL4Health's "
                    "pseudo-sort reads the first element of every floating-point array and fails on it"
                )
        try:
            count = operator.index(num_examples)
        except TypeError:
            raise _refuse(
                f"results[{client}]: num_examples must be an integer, got {num_examples!r}"
            ) from None
        checked.append((client, arrays, count))
    return checked


def _tensor(array: Any, what: str) -> torch.Tensor:
    """A tensor of an array the client sent; numpy's native byte order (values unchanged)."""
    array = np.asarray(array)
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return to_tensor(array)
    except TypeError as error:
        raise _refuse(f"{what}: {error}") from None


def _sparse_tensor(client: int, value: Any, index: Any, shape: Any, name: str) -> SparseTensor:
    """One tensor of a sparse packed list, refused where FL4Health's strategy would fail on it."""
    where = f"results[{client}]: sparse tensor {name!r}"
    shape = np.asarray(shape)
    if shape.ndim != 1 or not (np.issubdtype(shape.dtype, np.integer) or shape.size == 0):
        raise _refuse(
            f"{where}: its shape must be a 1-D array of integers, got {shape.dtype} {shape.tolist()}"
        )
    values = np.asarray(value)
    if not values.dtype.isnative:  # torch.tensor, in FL4Health, refuses it
        raise _refuse(f"{where}: values in non-native byte order ({values.dtype.str})")
    if values.ndim > 1:  # a hybrid COO tensor in torch; FL4Health's own packing never makes one
        raise _refuse(f"{where}: values must be 1-D, got shape {values.shape}")
    indices = np.asarray(index)
    if indices.ndim != 2 or indices.shape != (values.size, shape.size):
        raise _refuse(
            f"{where}: indices must be an (nnz, ndim) = ({values.size}, {shape.size}) array, "
            f"got shape {indices.shape}"
        )
    return SparseTensor(  # COO coordinates, as FL4Health's indices
        name,
        tuple(int(d) for d in shape),
        _tensor(values.reshape(-1), where),
        to_tensor(indices.astype(np.int64, copy=False)),
    )


def _aggregate(
    kind: PayloadKind,
    contributions: list[_Contribution],
    weighted: bool,
    target: str | None,
    connection: Connection | None,
) -> AggregateResult:
    # A tensor the wire cannot carry (complex, uint16, ...) is refused while encoding, as INVALID_ARGUMENT.
    return Client(target=target, connection=connection).aggregate(kind, contributions, weighted=weighted)


def aggregate_sparse_coo(
    results: Results,
    *,
    weighted: bool = True,
    target: str | None = None,
    connection: Connection | None = None,
) -> NDArrays:
    """FedAvgSparseCooTensor's aggregate of clients' packed lists ([values..., indices..., shapes...,
    names], with each client's example count), as the same packed list. The server sums the clients
    in FL4Health's order (its pseudo-sort), whatever order they come in. ``connection`` / ``target``:
    as for :class:`Client`."""
    contributions: list[_Contribution] = []
    for client, packed, num_examples in _checked(results):
        values, (indices, shapes, names) = unpack_sparse(packed)
        if not names or len(names) != len(values):  # FL4Health asserts there are n > 0 names for n tensors
            raise _refuse(
                f"results[{client}] sent {len(values)} tensors and {len(names)} names; FL4Health's "
                "FedAvgSparseCooTensor fails unless it is as many of each, and at least one"
            )
        tensors = [
            _sparse_tensor(client, v, i, shape, name)
            for v, i, shape, name in zip(values, indices, shapes, names, strict=True)
        ]
        # A name sent twice counts twice, in the client's place, as in FL4Health: the rpc takes that.
        contributions.append((num_examples, [], tensors))
    result = _aggregate(PayloadKind.SPARSE_COO, contributions, weighted, target, connection)
    for s in result.sparse:
        if not s.shape:
            raise _refuse(
                f"tensor {s.name!r} averages to a 0-d tensor, which FL4Health's FedAvgSparseCooTensor "
                "cannot re-sparsify (it fails on it)"
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
    example count), as the same packed list. The server sums the clients in FL4Health's order (its
    pseudo-sort), whatever order they come in. ``connection`` / ``target``: as for :class:`Client`."""
    contributions: list[_Contribution] = []
    for client, packed, num_examples in _checked(results):
        arrays, names = unpack_layers(packed)
        # FL4Health pairs arrays and names with a plain zip: the longer list's extra items are ignored.
        named = [
            (name, _tensor(a, f"results[{client}]: layer {name!r}"))
            for a, name in zip(arrays, names, strict=False)
        ]
        contributions.append((num_examples, named, []))
    result = _aggregate(PayloadKind.LAYERS, contributions, weighted, target, connection)
    return pack_layers([to_numpy(t) for _, t in result.tensors], [name for name, _ in result.tensors])
