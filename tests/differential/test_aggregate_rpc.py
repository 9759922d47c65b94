"""The Aggregate rpc itself, as a client in another language drives it, against FL4Health's strategies.

The request is built frame by frame (one ``contribution`` frame per client, then its manifests, then
chunks), sent to the servicer through a plain gRPC stub, and the response is read back from its
manifests and chunks: the DataType each result manifest declares must be the dtype of FL4Health's
aggregate, and the bytes must be FL4Health's, for every position encoding a sparse result can be asked
in. Contributions go in reversed and shuffled orders: the server puts them in FL4Health's (pseudo-sorted)
order itself.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch
from fl4health.strategies.fedavg_dynamic_layer import FedAvgDynamicLayer
from fl4health.strategies.fedavg_sparse_coo_tensor import FedAvgSparseCooTensor
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from support import assert_serving

from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, read_frames, write_contributions

Results = list[tuple[list[np.ndarray], int]]
Contribution = tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]
RESULT = tensor_pb2.SECTION_RESULT

DATA_TYPES = {
    np.dtype(np.float16): tensor_pb2.DATA_TYPE_FLOAT16,
    np.dtype(np.float32): tensor_pb2.DATA_TYPE_FLOAT32,
    np.dtype(np.float64): tensor_pb2.DATA_TYPE_FLOAT64,
}
"""What an aggregate can come out as: an average is always floating point."""


def _arrival(results: Results, seed: int) -> Results:
    """The results in an order of arrival that is not FL4Health's: reversed, then shuffled."""
    shuffled = results[::-1]
    random.Random(1000 + seed).shuffle(shuffled)
    return shuffled


class _Proxy:
    cid = "client"


@pytest.fixture(autouse=True)
def _quiet_strategy() -> Iterator[None]:
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture
def channel_to(paramsel_target: str, request: pytest.FixtureRequest) -> Iterator[grpc.Channel]:
    """A channel to the in-process server, or to the separately started ``paramsel serve``."""
    if paramsel_target == "remote":
        address = request.getfixturevalue("remote_target")
    else:
        address = request.getfixturevalue("server").target
    with grpc.insecure_channel(address) as channel:
        yield channel


def fl4health(strategy: type, results: Results, weighted: bool) -> list[np.ndarray]:
    fit = [
        (
            _Proxy(),
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(arrays),
                num_examples=n,
                metrics={},
            ),
        )
        for arrays, n in results
    ]
    parameters, _ = strategy(weighted_aggregation=weighted).aggregate_fit(1, fit, [])
    assert parameters is not None
    return parameters_to_ndarrays(parameters)


def call(
    channel: grpc.Channel,
    kind: service_pb2.PayloadKind.ValueType,
    contributions: list[Contribution],
    *,
    weighted: bool,
    encoding: tensor_pb2.PositionEncoding.ValueType = tensor_pb2.POSITION_ENCODING_UNSPECIFIED,
) -> tuple[list[service_pb2.AggregateResponse], dict[str, object]]:
    start = service_pb2.AggregateStart(payload_kind=kind, weighted=weighted, position_encoding=encoding)
    frames = write_contributions(
        service_pb2.AggregateRequest,
        ("start", start),
        contributions,
        section=tensor_pb2.SECTION_PAYLOAD,
        encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
        chunk_size=1 << 16,
    )
    responses = list(service_pb2_grpc.ParameterSelectionServiceStub(channel).Aggregate(frames, timeout=60))
    got = read_frames(
        iter(responses),
        first="header",
        dense_sections=frozenset({RESULT}),
        sparse_sections=frozenset({RESULT}),
        max_bytes=1 << 30,
    )
    return responses, {"dense": got.dense.get(RESULT, []), "sparse": got.sparse.get(RESULT, [])}


def _declared(responses: list[service_pb2.AggregateResponse], field: str) -> list[tuple[str, int, list[int]]]:
    specs = [spec for r in responses if r.WhichOneof("frame") == field for spec in getattr(r, field).tensors]
    return [(spec.name, spec.dtype, list(spec.shape)) for spec in specs]


def _layers(seed: int) -> Results:
    rng = np.random.default_rng(seed)
    dtypes = ["float16", "float32", "float64", "int32", "int64", "int8", "bool"]
    results: Results = []
    for _ in range(5):
        names = [n for n in ("a", "b", "s", "m") if rng.random() < 0.75] or ["a"]
        arrays = []
        for name in names:
            dtype = str(rng.choice(dtypes))
            shape = {"a": (3, 2), "b": (2,), "s": (), "m": (1, 2)}[name]
            arrays.append(
                (rng.standard_normal(shape) * 30).astype(dtype)
                if dtype != "bool"
                else rng.random(shape) < 0.5
            )
        results.append(([*arrays, np.array(names)], int(rng.integers(1, 100))))
    return results


@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("seed", range(4))
def test_layers_rpc_declares_and_sends_fl4health_dtype_and_bits(
    channel_to: grpc.Channel, seed: int, weighted: bool
) -> None:
    results = _layers(seed)
    expected = fl4health(FedAvgDynamicLayer, results, weighted)
    contributions: list[Contribution] = [
        (
            n,
            [
                (str(name), torch.from_numpy(np.array(a)))
                for a, name in zip(arrays[:-1], arrays[-1], strict=True)
            ],
            [],
        )
        for arrays, n in _arrival(results, seed)
    ]
    responses, got = call(channel_to, service_pb2.PAYLOAD_KIND_LAYERS, contributions, weighted=weighted)
    names = expected[-1].tolist()
    assert _declared(responses, "tensors") == [
        (name, DATA_TYPES[array.dtype], list(array.shape))
        for name, array in zip(names, expected, strict=False)
    ]
    dense = got["dense"]
    assert isinstance(dense, list)
    for (decl, tensor), want in zip(dense, expected[:-1], strict=True):
        assert tensor.numpy().dtype == want.dtype
        assert tensor.numpy().tobytes() == want.tobytes(), decl.name


def _sparse(seed: int) -> Results:
    rng = np.random.default_rng(seed)
    dtypes = ["float16", "float32", "float64", "int32", "int64", "uint8", "bool"]
    shapes = {"w": (4, 5), "b": (7,), "c": (2, 3, 2)}
    results: Results = []
    for _ in range(5):
        names = [n for n in shapes if rng.random() < 0.75] or ["w"]
        values, indices, dims = [], [], []
        for name in names:
            numel = int(np.prod(shapes[name]))
            flat = np.sort(rng.choice(numel, int(rng.integers(1, numel)), replace=False))
            dtype = str(rng.choice(dtypes))
            v = (
                (rng.standard_normal(flat.size) * 30).astype(dtype)
                if dtype != "bool"
                else np.ones(flat.size, bool)
            )
            if v.dtype.kind == "f":
                v[v == 0] = 1
            values.append(v)
            indices.append(np.stack(np.unravel_index(flat, shapes[name]), axis=1).astype(np.int64))
            dims.append(np.array(shapes[name], np.int64))
        results.append(([*values, *indices, *dims, np.array(names)], int(rng.integers(1, 3000))))
    return results


ENCODINGS = [
    tensor_pb2.POSITION_ENCODING_UNSPECIFIED,
    tensor_pb2.POSITION_ENCODING_COO_INT64,
    tensor_pb2.POSITION_ENCODING_FLAT_INT64,
    tensor_pb2.POSITION_ENCODING_BITMAP,
    tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
    tensor_pb2.POSITION_ENCODING_COMPACT,
]


@pytest.mark.parametrize("encoding", ENCODINGS, ids=[tensor_pb2.PositionEncoding.Name(e) for e in ENCODINGS])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
@pytest.mark.parametrize("seed", range(3))
def test_sparse_rpc_declares_and_sends_fl4health_dtype_and_bits(
    channel_to: grpc.Channel, seed: int, weighted: bool, encoding: tensor_pb2.PositionEncoding.ValueType
) -> None:
    results = _sparse(seed)
    expected = fl4health(FedAvgSparseCooTensor, results, weighted)
    contributions: list[Contribution] = []
    for arrays, n in _arrival(results, seed):
        k = (len(arrays) - 1) // 3
        tensors = [
            SparseOut(
                str(name),
                tuple(int(d) for d in arrays[2 * k + i]),
                torch.from_numpy(arrays[i]),
                torch.from_numpy(arrays[k + i]),
            )
            for i, name in enumerate(arrays[-1])
        ]
        contributions.append((n, [], tensors))
    responses, got = call(
        channel_to, service_pb2.PAYLOAD_KIND_SPARSE_COO, contributions, weighted=weighted, encoding=encoding
    )
    k = (len(expected) - 1) // 3
    names = expected[-1].tolist()
    assert _declared(responses, "sparse_tensors") == [
        (name, DATA_TYPES[expected[i].dtype], expected[2 * k + i].tolist()) for i, name in enumerate(names)
    ]
    sparse = got["sparse"]
    assert isinstance(sparse, list)
    for i, data in enumerate(sparse):
        shape = tuple(expected[2 * k + i].tolist())
        flat = np.ravel_multi_index(tuple(expected[k + i].T), shape) if shape else np.zeros(0, np.int64)
        assert data.values.numpy().dtype == expected[i].dtype
        assert data.values.numpy().tobytes() == expected[i].tobytes(), names[i]
        assert data.positions.tolist() == flat.tolist(), names[i]


@pytest.mark.parametrize(
    ("kind", "contributions", "names"),
    [
        (
            service_pb2.PAYLOAD_KIND_LAYERS,
            [(1, [("w", torch.ones(3))], []), (2, [("w", torch.ones(4, dtype=torch.float64))], [])],
            "'w' has shape (4,) in contributions[1] but (3,) in contributions[0]",
        ),
        (
            service_pb2.PAYLOAD_KIND_SPARSE_COO,
            [
                (1, [], [SparseOut("v", (2, 3), torch.ones(1), torch.tensor([[0, 1]]))]),
                (1, [], [SparseOut("v", (3, 2), torch.ones(1, dtype=torch.float16), torch.tensor([[1, 0]]))]),
            ],
            "'v' has shape (3, 2) in contributions[1] but (2, 3) in contributions[0]",
        ),
    ],
    ids=["layers", "sparse"],
)
def test_shapes_that_do_not_broadcast_are_invalid_argument(
    channel_to: grpc.Channel,
    kind: service_pb2.PayloadKind.ValueType,
    contributions: list[Contribution],
    names: str,
) -> None:
    # FL4Health fails on these (np.add / torch.add cannot broadcast them): the rpc refuses them, clearly.
    with pytest.raises(grpc.RpcError) as err:
        call(channel_to, kind, contributions, weighted=True)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert names in (err.value.details() or "")
    assert_serving(channel_to)


def test_a_count_the_layer_dtype_cannot_hold(channel_to: grpc.Channel) -> None:
    # uint8 * 300: numpy 2 refuses it (FL4Health fails), numpy 1 widens it. The rpc does what FL4Health does.
    results: Results = [([np.array([2, 7], np.uint8), np.array(["u"])], 300)]
    contributions: list[Contribution] = [(300, [("u", torch.tensor([2, 7], dtype=torch.uint8))], [])]
    try:
        expected = fl4health(FedAvgDynamicLayer, results, True)
    except OverflowError:
        with pytest.raises(grpc.RpcError) as err:
            call(channel_to, service_pb2.PAYLOAD_KIND_LAYERS, contributions, weighted=True)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'u' in contributions[0] is uint8" in (err.value.details() or "")
        assert_serving(channel_to)
        return
    _, got = call(channel_to, service_pb2.PAYLOAD_KIND_LAYERS, contributions, weighted=True)
    dense = got["dense"]
    assert isinstance(dense, list)
    ((_, tensor),) = dense
    assert tensor.numpy().dtype == expected[0].dtype
    assert tensor.numpy().tobytes() == expected[0].tobytes()
