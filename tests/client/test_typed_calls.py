"""Client's rpcs with the typed forms against a real server, and the old forms (protobuf messages, plain
ints, SparseOut), which still work for one release with a DeprecationWarning and give the same answers."""

from __future__ import annotations

import pytest
import torch

from paramsel.client import (
    AggregateHeader,
    Client,
    DataType,
    DriftPercentage,
    LayerSelectionFunction,
    ParamselError,
    PayloadKind,
    PositionEncoding,
    PullMode,
    ScoreFunction,
    SelectionHeader,
    SelectionKind,
    ServerInfo,
    SparseTensor,
    StatusCode,
    TopK,
    TopKSummary,
)
from paramsel.server.app import RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2
from paramsel.wire.streams import SparseOut

MODEL = {"w": torch.tensor([[1.0, -5.0, 0.5], [3.0, 0.25, -2.0]]), "b": torch.tensor([4.0, -0.125])}
INITIAL = {"w": torch.zeros(2, 3), "b": torch.zeros(2)}
TOP_HALF = TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE)
OLD = "is deprecated"


def test_select_answers_typed(server: RunningServer) -> None:
    result = Client(target=server.target).select(TOP_HALF, MODEL)
    header = result.header
    assert isinstance(header, SelectionHeader)
    assert header.kind is SelectionKind.SPARSE_COO
    assert header.top_k == TopKSummary(
        total_entries=8, k=4, threshold=2.0, selected_entries=4, sent_entries=4
    )
    assert header.layers is None
    assert isinstance(header.raw, service_pb2.SelectionHeader)
    assert header.raw.top_k.k == 4
    w, b = result.sparse
    assert isinstance(w, SparseTensor)
    assert (w.name, w.shape, w.positions.tolist(), w.values.tolist()) == (
        "w",
        (2, 3),
        [1, 3, 5],
        [-5.0, 3.0, -2.0],
    )
    assert (b.name, b.positions.tolist()) == ("b", [0])
    layers = Client(target=server.target).select(DriftPercentage(0.5), MODEL, INITIAL)
    assert layers.header.kind is SelectionKind.LAYERS
    assert layers.header.layers is not None
    assert len(layers.header.layers.drifts) == 1


def test_a_selection_goes_back_through_pull_and_aggregate(server: RunningServer) -> None:
    """Results carry flat positions; given back, flat positions and COO coordinates mean the same."""
    client = Client(target=server.target)
    selected = client.select(TOP_HALF, MODEL).sparse
    layout = {name: torch.zeros_like(t) for name, t in MODEL.items()}
    pulled = client.pull(PayloadKind.SPARSE_COO, layout, sparse=selected)
    assert pulled["w"].tolist() == [[0.0, -5.0, 0.0], [3.0, 0.0, -2.0]]
    coo = [SparseTensor("w", (2, 3), torch.tensor([-5.0, 3.0, -2.0]), torch.tensor([[0, 1], [1, 0], [1, 2]]))]
    assert torch.equal(client.pull(PayloadKind.SPARSE_COO, layout, sparse=coo)["w"], pulled["w"])
    scattered = client.pull(
        PayloadKind.SPARSE_COO, layout, sparse=selected[:1], mode=PullMode.SCATTER, base=[("w", MODEL["w"])]
    )
    assert torch.equal(scattered["w"], MODEL["w"])
    result = client.aggregate(PayloadKind.SPARSE_COO, [(1, [], selected), (3, [], coo)])
    assert isinstance(result.header, AggregateHeader)
    assert (result.header.contributions, result.header.tensors) == (2, 2)
    assert result.header.raw.contributions == 2
    w = next(t for t in result.sparse if t.name == "w")
    assert w.positions.tolist() == [1, 3, 5]
    assert w.values.tolist() == [-5.0, 3.0, -2.0]


def test_server_info_is_typed(server: RunningServer) -> None:
    info = Client(target=server.target).server_info()
    assert isinstance(info, ServerInfo)
    assert set(info.position_encodings) == set(PositionEncoding)
    assert set(info.data_types) == set(DataType)
    assert set(info.score_functions) == set(ScoreFunction)
    assert set(info.payload_kinds) == set(PayloadKind)
    assert all(isinstance(e, PositionEncoding) for e in info.position_encodings)
    assert info.criteria == ("top_k", "drift_threshold", "drift_percentage", "fed_pm", "sparse_update")
    assert PositionEncoding.SEEDED in info.position_encodings
    assert isinstance(info.raw, service_pb2.GetServerInfoResponse)
    assert info.raw.api_package == info.api_package == "paramsel.v1"


def test_old_forms_still_work_and_warn(server: RunningServer) -> None:
    client = Client(target=server.target)
    typed = client.select(
        TOP_HALF, MODEL, position_encoding=PositionEncoding.BITMAP, value_dtype=torch.float16
    )
    message = TOP_HALF.to_proto()
    with pytest.warns(DeprecationWarning, match=OLD) as warned:
        old = client.select(
            message,  # type: ignore[arg-type]
            MODEL,
            position_encoding=tensor_pb2.POSITION_ENCODING_BITMAP,  # type: ignore[arg-type]
            value_dtype=tensor_pb2.DATA_TYPE_FLOAT16,  # type: ignore[arg-type]
        )
    assert len(warned) == 3
    assert old.header == typed.header
    for a, b in zip(old.sparse, typed.sparse, strict=True):
        assert torch.equal(a.values, b.values)
        assert torch.equal(a.positions, b.positions)
    with pytest.warns(DeprecationWarning, match=OLD):
        pushed = client.push(message, MODEL)  # type: ignore[arg-type]
    assert pushed.header == client.push(TOP_HALF, MODEL).header

    layout = {"w": torch.zeros(2, 3)}
    payload = SparseTensor("w", (2, 3), torch.tensor([4.0, 5.0]), torch.tensor([[0, 2], [1, 1]]))
    want = client.pull(PayloadKind.SPARSE_COO, layout, sparse=[payload])
    with pytest.warns(DeprecationWarning, match=OLD) as warned:
        got = client.pull(
            service_pb2.PAYLOAD_KIND_SPARSE_COO,  # type: ignore[arg-type]
            layout,
            sparse=[SparseOut("w", (2, 3), payload.values, payload.positions)],  # type: ignore[list-item]
            mode=service_pb2.PULL_MODE_UNSPECIFIED,  # type: ignore[arg-type]
        )
    assert len(warned) == 3
    assert torch.equal(got["w"], want["w"])
    with pytest.warns(DeprecationWarning, match=OLD):
        aggregated = client.aggregate(service_pb2.PAYLOAD_KIND_LAYERS, [(1, [("w", torch.ones(2))], [])])  # type: ignore[arg-type]
    assert aggregated.tensors[0][1].tolist() == [1.0, 1.0]

    criterion = criteria_pb2.Criterion(
        drift_percentage=criteria_pb2.DriftPercentageCriterion(exchange_percentage=0.5)
    )
    with pytest.warns(DeprecationWarning, match=OLD):
        function = LayerSelectionFunction(criterion, target=server.target)  # type: ignore[arg-type]
    assert function.criterion == DriftPercentage(0.5)


def test_unknown_codes_and_wrong_types_are_refused() -> None:
    client = Client(target="127.0.0.1:1")  # nothing is sent: refused before
    with pytest.warns(DeprecationWarning, match=OLD), pytest.raises(ParamselError) as refused:
        client.pull(PayloadKind.LAYERS, {}, mode=9)  # type: ignore[arg-type]
    assert refused.value.status is StatusCode.INVALID_ARGUMENT
    assert "mode: unknown value 9" in refused.value.message
    with pytest.raises(TypeError, match="PayloadKind"):
        client.pull("sparse", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Criterion"):
        client.select("top_k", MODEL)  # type: ignore[arg-type]
    with pytest.raises(ParamselError, match="DriftThreshold, DriftPercentage or FedPm"):
        LayerSelectionFunction(TOP_HALF)  # type: ignore[arg-type]
