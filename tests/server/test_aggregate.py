"""Aggregate through a real server: FL4Health's FedAvg rules, against values computed by hand."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import numpy as np
import pytest
import torch
from support import assert_serving

from paramsel.client import (
    Client,
    ParamselError,
    PayloadKind,
    SparseTensor,
    StatusCode,
    aggregate_layers,
    aggregate_sparse_coo,
)
from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, tensor_pb2

Sparse = tuple[np.ndarray, np.ndarray, np.ndarray, str]
"""One tensor of FL4Health's sparse COO packing: values, coordinates, shape, name."""
Contribution = tuple[int, list[tuple[str, torch.Tensor]], list[SparseTensor]]


def _sparse(values: list[float], coords: list[list[int]], shape: list[int], name: str) -> Sparse:
    return np.array(values, dtype=np.float32), np.array(coords, dtype=np.int64), np.array(shape), name


def _pack(*tensors: Sparse) -> list[np.ndarray]:
    return [
        *(t[0] for t in tensors),
        *(t[1] for t in tensors),
        *(t[2] for t in tensors),
        np.array([t[3] for t in tensors]),
    ]


# Client A (10 examples): w = [[2, 0], [0, 4]] as COO, b = [6]. Client B (30 examples): w = [[0, 0], [8, -4]].
A = _pack(_sparse([2.0, 4.0], [[0, 0], [1, 1]], [2, 2], "w"), _sparse([6.0], [[0]], [1], "b"))
B = _pack(_sparse([8.0, -4.0], [[1, 0], [1, 1]], [2, 2], "w"))


def test_weighted_sparse_average(server: RunningServer) -> None:
    # w: (10 * [[2, 0], [0, 4]] + 30 * [[0, 0], [8, -4]]) / 40 = [[0.5, 0], [6, -2]]; b only from A: 6.
    packed = aggregate_sparse_coo([(A, 10), (B, 30)], target=server.target)
    assert packed[-1].tolist() == ["w", "b"]
    assert packed[0].tolist() == [0.5, 6.0, -2.0]
    assert packed[2].tolist() == [[0, 0], [1, 0], [1, 1]]
    assert packed[4].tolist() == [2, 2]
    assert packed[1].tolist() == [6.0]
    assert packed[3].tolist() == [[0]]


def test_unweighted_sparse_average_drops_cancelled_entries(server: RunningServer) -> None:
    # w: ([[2, 0], [0, 4]] + [[0, 0], [8, -4]]) / 2 = [[1, 0], [4, 0]]: the 4 and -4 cancel and vanish.
    packed = aggregate_sparse_coo([(A, 10), (B, 30)], weighted=False, target=server.target)
    assert packed[0].tolist() == [1.0, 4.0]
    assert packed[2].tolist() == [[0, 0], [1, 0]]


def test_weighted_and_unweighted_layers(server: RunningServer) -> None:
    a = [np.array([1.0, 2.0], dtype=np.float32), np.array([10.0], dtype=np.float32), np.array(["x", "y"])]
    b = [np.array([5.0, 6.0], dtype=np.float32), np.array(["x"])]
    weighted = aggregate_layers([(a, 1), (b, 3)], target=server.target)
    assert weighted[-1].tolist() == ["x", "y"]
    assert weighted[0].tolist() == [4.0, 5.0]  # (1 * [1, 2] + 3 * [5, 6]) / 4
    assert weighted[1].tolist() == [10.0]  # y from the first client alone
    plain = aggregate_layers([(a, 1), (b, 3)], weighted=False, target=server.target)
    assert plain[0].tolist() == [3.0, 4.0]


@pytest.mark.parametrize(
    ("contributions", "kind", "message"),
    [
        ([], PayloadKind.LAYERS, "no contributions"),
        ([(0, [("x", torch.ones(2))], [])], PayloadKind.LAYERS, "num_examples must be > 0"),
        (
            [(1, [("x", torch.ones(2))], []), (1, [("x", torch.ones(3))], [])],
            PayloadKind.LAYERS,
            "'x'",
        ),
        ([(1, [("x", torch.ones(2))], [])], PayloadKind.SPARSE_COO, "sparse_tensors manifests"),
        (
            [(1, [], [SparseTensor("w", (2, 2), torch.ones(1), torch.tensor([[0, 2]]))])],
            PayloadKind.SPARSE_COO,
            "out of range",
        ),
        (
            [(1, [("x", torch.ones(2))], [])],
            PayloadKind.FEDPM_PROBABILITIES,
            "cannot be aggregated",
        ),
    ],
)
def test_bad_aggregations_are_invalid_argument(
    server: RunningServer,
    channel: grpc.Channel,
    contributions: list[Contribution],
    kind: PayloadKind,
    message: str,
) -> None:
    with pytest.raises(ParamselError, match=message) as err:
        Client(target=server.target).aggregate(kind, contributions)
    assert err.value.status is StatusCode.INVALID_ARGUMENT
    assert_serving(channel)


def test_aggregate_stream_without_a_contribution_frame(channel: grpc.Channel) -> None:
    from paramsel.v1 import service_pb2_grpc

    frames = [
        service_pb2.AggregateRequest(
            start=service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS)
        ),
        service_pb2.AggregateRequest(
            tensors=tensor_pb2.TensorManifest(
                section=tensor_pb2.SECTION_PAYLOAD,
                tensors=[tensor_pb2.TensorSpec(name="x", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[1])],
            )
        ),
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(service_pb2_grpc.ParameterSelectionServiceStub(channel).Aggregate(iter(frames), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before the first contribution" in (err.value.details() or "")


def test_clients_are_summed_in_fl4health_pseudo_sorted_order(server: RunningServer) -> None:
    # FL4Health sorts results by (sum of each float array's first element) + num_examples before summing.
    # C: 1e8 + 1; D: 1.0 + 3.0 + 1 = 5; E: -1e8 + 1. Sorted: E, D, C.
    c = _pack(_sparse([1e8], [[0]], [1], "x"))
    d = _pack(_sparse([1.0], [[0]], [1], "x"), _sparse([3.0], [[0]], [1], "y"))
    e = _pack(_sparse([-1e8], [[0]], [1], "x"))
    # In float32, E, D, C sums x as (-1e8 + 1) + 1e8 = 0 (the 1 is lost next to 1e8); the order C, E, D
    # would give (1e8 - 1e8) + 1 = 1, an average of 1/3. Whatever the order given, x comes out 0.
    for order in ([c, e, d], [d, c, e], [e, d, c], [c, d, e]):
        packed = aggregate_sparse_coo([(r, 1) for r in order], weighted=False, target=server.target)
        assert packed[-1].tolist() == ["x", "y"]  # first appearance in E, D, C: x, then y (from D)
        assert packed[0].size == 0  # x's average is exactly 0, so no entry of it is sent
        assert packed[1].tolist() == [3.0]  # y: only D sent it


def test_layers_are_summed_in_fl4health_pseudo_sorted_order(server: RunningServer) -> None:
    a = [np.array([2.0], dtype=np.float32), np.array(["x"])]  # key 2 + 5 = 7
    b = [
        np.array([0.5], dtype=np.float32),
        np.array([9.0], dtype=np.float32),
        np.array(["y", "x"]),
    ]  # 9.5 + 1
    for order in ([(a, 5), (b, 1)], [(b, 1), (a, 5)]):
        packed = aggregate_layers(order, weighted=False, target=server.target)
        assert packed[-1].tolist() == ["x", "y"]  # a (7) sorts before b (10.5): x appears first
        assert packed[0].tolist() == [5.5]  # (2 + 9) / 2
        assert packed[1].tolist() == [0.5]


def test_dtypes_that_differ_across_clients_are_averaged(server: RunningServer) -> None:
    # Layers, numpy's promotion: float16 with float32 is float32; (1 * [1.5, 2] + 3 * [0.5, 4]) / 4.
    a = [np.array([1.5, 2.0], dtype=np.float16), np.array(["x"])]
    b = [np.array([0.5, 4.0], dtype=np.float32), np.array(["x"])]
    x, names = aggregate_layers([(a, 1), (b, 3)], target=server.target)
    assert (x.dtype, x.tolist(), names.tolist()) == (np.dtype(np.float32), [0.75, 3.5], ["x"])
    # Sparse, torch's promotion: int64 with float16 is float16; (2 * 3 + 2 * 0.5) / 4 at [0].
    c = _pack((np.array([3]), np.array([[0]]), np.array([2]), "n"))
    d = _pack((np.array([0.5], dtype=np.float16), np.array([[0]]), np.array([2]), "n"))
    packed = aggregate_sparse_coo([(c, 2), (d, 2)], target=server.target)
    assert (packed[0].dtype, packed[0].tolist(), packed[1].tolist()) == (np.dtype(np.float16), [1.75], [[0]])


def test_shapes_that_broadcast_are_averaged_broadcast(server: RunningServer) -> None:
    a = [np.array([1.0, 2.0, 3.0], dtype=np.float32), np.array(["x"])]
    b = [np.array([5.0], dtype=np.float32), np.array(["x"])]
    x, _ = aggregate_layers([(a, 1), (b, 1)], weighted=False, target=server.target)
    assert x.tolist() == [3.0, 3.5, 4.0]


def test_a_name_twice_in_one_client_counts_twice(server: RunningServer) -> None:
    # FL4Health adds each occurrence as one more term and one more count: (1 * 2 + 3 * 2 + 8 * 1) / 5.
    a = [np.array([1.0], dtype=np.float32), np.array([3.0], dtype=np.float32), np.array(["x", "x"])]
    b = [np.array([8.0], dtype=np.float32), np.array(["x"])]
    x, names = aggregate_layers([(a, 2), (b, 1)], target=server.target)
    assert (x.tolist(), names.tolist()) == ([np.float32(3.2)], ["x"])
    c = _pack(
        _sparse([1.0], [[0]], [2], "w"), _sparse([2.0], [[1]], [2], "v"), _sparse([3.0], [[1]], [2], "w")
    )
    packed = aggregate_sparse_coo([(c, 1)], weighted=False, target=server.target)
    assert packed[-1].tolist() == ["w", "v"]
    assert packed[0].tolist() == [0.5, 1.5]  # w: ([1, 0] + [0, 3]) / 2


@pytest.mark.parametrize(
    ("aggregate", "results", "message"),
    [
        (aggregate_layers, [([np.array([])], 1)], r"results\[0\]: array 0 is an empty float64 array"),
        (
            aggregate_layers,
            [
                ([np.array([1.0], np.float32), np.array(["x"])], 1),
                ([np.zeros(0, np.float32), np.array(["x"])], 1),
            ],
            r"results\[1\]: array 0 is an empty float32",
        ),
        (
            aggregate_sparse_coo,
            [([np.array([], dtype=np.str_)], 1)],
            r"results\[0\] sent 0 tensors and 0 names",
        ),
        (
            aggregate_sparse_coo,
            [
                (
                    _pack(
                        (np.array([1.0], np.float32), np.zeros((1, 0), np.int64), np.array([], np.int64), "s")
                    ),
                    1,
                )
            ],
            "'s' averages to a 0-d tensor",
        ),
        (
            aggregate_sparse_coo,
            [(_pack((np.array([1.0], np.float32), np.array([[0]]), np.array([2.0]), "w")), 1)],
            "'w': its shape must be a 1-D array of integers",
        ),
    ],
    ids=["empty-names", "empty-layer", "no-tensors", "0d-aggregate", "float-shape"],
)
def test_what_fl4health_fails_on_is_refused(
    server: RunningServer,
    aggregate: Callable[..., list[np.ndarray]],
    results: list[tuple[list[np.ndarray], int]],
    message: str,
) -> None:
    with pytest.raises(ParamselError, match=message) as err:
        aggregate(results, target=server.target)
    assert err.value.status is StatusCode.INVALID_ARGUMENT


def test_a_count_a_small_integer_layer_cannot_hold(server: RunningServer) -> None:
    results = [([np.array([3], np.uint8), np.array(["u"])], 300)]
    if int(np.__version__.split(".")[0]) < 2:  # numpy 1 widens uint8 * 300 to uint16: 900 / 300
        assert aggregate_layers(results, target=server.target)[0].tolist() == [3.0]
        return
    with pytest.raises(
        ParamselError, match=r"'u' in contributions\[0\] is uint8"
    ) as err:  # NEP 50 refuses it
        aggregate_layers(results, target=server.target)
    assert err.value.status is StatusCode.INVALID_ARGUMENT
