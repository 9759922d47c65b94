"""Aggregate through a real server: FL4Health's FedAvg rules, against values computed by hand."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from support import assert_serving

from paramsel.client import Client, ParamselError, StatusCode, aggregate_layers, aggregate_sparse_coo
from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire.streams import SparseOut


def _sparse(values: list[float], coords: list[list[int]], shape: list[int], name: str) -> tuple:
    return np.array(values, dtype=np.float32), np.array(coords, dtype=np.int64), np.array(shape), name


def _pack(*tensors: tuple) -> list[np.ndarray]:
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
        ([], service_pb2.PAYLOAD_KIND_LAYERS, "no contributions"),
        ([(0, [("x", torch.ones(2))], [])], service_pb2.PAYLOAD_KIND_LAYERS, "num_examples must be > 0"),
        (
            [(1, [("x", torch.ones(2))], []), (1, [("x", torch.ones(3))], [])],
            service_pb2.PAYLOAD_KIND_LAYERS,
            "'x'",
        ),
        (
            [(1, [("x", torch.ones(2)), ("x", torch.ones(2))], [])],
            service_pb2.PAYLOAD_KIND_LAYERS,
            "declared twice",
        ),
        ([(1, [("x", torch.ones(2))], [])], service_pb2.PAYLOAD_KIND_SPARSE_COO, "sparse_tensors manifests"),
        (
            [(1, [], [SparseOut("w", (2, 2), torch.ones(1), torch.tensor([[0, 2]]))])],
            service_pb2.PAYLOAD_KIND_SPARSE_COO,
            "out of range",
        ),
        (
            [(1, [("x", torch.ones(2))], [])],
            service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES,
            "cannot be aggregated",
        ),
    ],
)
def test_bad_aggregations_are_invalid_argument(
    server: RunningServer, channel: grpc.Channel, contributions: list, kind: int, message: str
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
                tensors=[tensor_pb2.TensorSpec(name="x", dtype=1, shape=[1])],
            )
        ),
    ]
    with pytest.raises(grpc.RpcError) as err:
        list(service_pb2_grpc.ParameterSelectionServiceStub(channel).Aggregate(iter(frames), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "before the first contribution" in err.value.details()


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
