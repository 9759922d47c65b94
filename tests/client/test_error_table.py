"""One error table: a mistake raises the same type with the same status whether the server finds it or
the SDK does, and a function and its inverse refuse malformed input alike."""

from __future__ import annotations

import pickle

import grpc
import numpy as np
import pytest
import torch

from paramsel.client import (
    Client,
    LayerSelectionFunctionConstructor,
    ParamselError,
    SparseCooParameterExchanger,
    StatusCode,
    largest_final_magnitude_scores,
    pack_compact,
    unpack_compact,
)
from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import write_frames

MODEL = {"w": torch.tensor([1.0, -2.0, 3.0, -4.0])}


def _refusal(call: object, *args: object, **kwargs: object) -> ParamselError:
    with pytest.raises(ParamselError) as refused:
        call(*args, **kwargs)  # type: ignore[operator]
    return refused.value


def _server_refusal(server: RunningServer, start: service_pb2.SelectStart) -> grpc.StatusCode:
    """What the server answers a Select that starts with ``start`` (sent without the SDK's checks)."""
    frames = write_frames(
        service_pb2.SelectRequest,
        ("start", start),
        chunk_size=1 << 20,
        dense=[(tensor_pb2.SECTION_MODEL, list(MODEL.items()))],
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Select(frames, timeout=60))
    return failed.value.code()


def test_the_sdk_maps_shared_errors_as_the_server_does() -> None:
    """The errors both sides raise get the status the server's own table gives them."""
    from paramsel import engine
    from paramsel.client._errors import local_status
    from paramsel.server.status import STATUS_OF
    from paramsel.wire import WireError

    shared = [(kind, code) for kind, code in STATUS_OF if issubclass(kind, (WireError, engine.EngineError))]
    assert len(shared) >= 4  # WireLimitError, WireError, InvalidArgument, FailedPrecondition
    for kind, code in shared:
        assert local_status(kind("x")) == StatusCode(code.value[0]), kind


def test_invalid_argument_is_one_type_and_still_a_value_error() -> None:
    from paramsel.client import InvalidArgumentError

    error = ParamselError(StatusCode.INVALID_ARGUMENT, "bad")
    assert isinstance(error, InvalidArgumentError)
    assert isinstance(error, ValueError)
    assert not isinstance(ParamselError(StatusCode.UNAVAILABLE, "down"), ValueError)
    for original in (error, ParamselError(StatusCode.FAILED_PRECONDITION, "no", "INITIAL_MODEL_NOT_HELD")):
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is type(original)
        assert (copy.status, copy.message, copy.reason) == (
            original.status,
            original.message,
            original.reason,
        )


@pytest.mark.parametrize(
    "packed",
    [
        [],
        [np.zeros(2), np.zeros((2, 1), np.int64), np.array(["w"])],
        [np.zeros(2, np.float32), np.array([[0], [2]]), np.array([2]), np.array(["w"])],
        [np.zeros(1), np.zeros(1), np.array(["w", "w"])],
        [np.zeros(1, np.complex64), np.array(["w"])],
    ],
    ids=["empty", "wrong-count", "out-of-range", "named-twice", "complex"],
)
def test_pack_compact_refuses_as_unpack_compact_does(packed: list[np.ndarray]) -> None:
    """Inverse functions, one error: ParamselError with INVALID_ARGUMENT (still a ValueError)."""
    packing = _refusal(pack_compact, packed)
    unpacking = _refusal(unpack_compact, b"\xff not a payload")
    assert type(packing) is type(unpacking)
    assert packing.status is unpacking.status is StatusCode.INVALID_ARGUMENT
    assert isinstance(packing, ValueError)
    assert isinstance(unpacking, ValueError)
    assert _refusal(pack_compact, [np.zeros(1), np.array(["w"])], value_dtype=torch.int8).status is (
        StatusCode.INVALID_ARGUMENT
    )


def test_a_payload_declaring_too_much_is_resource_exhausted() -> None:
    """The server answers RESOURCE_EXHAUSTED to a call that declares more than it accepts; so does the
    SDK to a compact payload that declares more than any call may (2**62 bytes)."""
    frames = [
        service_pb2.SelectResponse(
            header=service_pb2.SelectionHeader(kind=service_pb2.SELECTION_KIND_LAYERS)
        ),
        service_pb2.SelectResponse(
            tensors=tensor_pb2.TensorManifest(
                section=tensor_pb2.SECTION_RESULT,
                tensors=[
                    tensor_pb2.TensorSpec(name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT64, shape=[(1 << 60) - 1])
                ],
            )
        ),
    ]
    refused = _refusal(unpack_compact, service_pb2.SelectionPayload(frames=frames).SerializeToString())
    assert refused.status is StatusCode.RESOURCE_EXHAUSTED, refused
    assert not isinstance(refused, ValueError)


def test_a_tensor_the_wire_cannot_carry_is_refused_as_a_paramsel_error(server: RunningServer) -> None:
    """Found while the request is built, before anything is sent: INVALID_ARGUMENT, not a raw WireError."""
    from paramsel.client import ScoreFunction, TopK

    client = Client(target=server.target)
    criterion = TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE)
    refused = _refusal(client.select, criterion, {"w": torch.zeros(3, dtype=torch.complex64)})
    assert refused.status is StatusCode.INVALID_ARGUMENT
    assert "complex64" in refused.message


def test_local_checks_refuse_as_the_server_does(server: RunningServer) -> None:
    """The same mistake, made where the SDK checks it and where only the server does: same type, same status."""
    from paramsel.client import DriftPercentage, DriftThreshold, ScoreFunction, TopK

    client = Client(target=server.target)
    pairs = [
        (
            lambda: SparseCooParameterExchanger(2.0, largest_final_magnitude_scores),
            lambda: client.select(TopK(2.0, ScoreFunction.LARGEST_FINAL_MAGNITUDE), MODEL),
        ),
        (
            lambda: LayerSelectionFunctionConstructor(0.5, 1.5),
            lambda: client.select(DriftPercentage(1.5), MODEL, MODEL),
        ),
        (
            lambda: LayerSelectionFunctionConstructor(-1.0, 0.5),
            lambda: client.select(DriftThreshold(-1.0), MODEL, MODEL),
        ),
    ]
    for local, remote in pairs:
        here, there = _refusal(local), _refusal(remote)
        assert type(here) is type(there)
        assert here.status is there.status is StatusCode.INVALID_ARGUMENT
        assert isinstance(here, ValueError)  # what these checks raised before they had a status


def test_local_refusals_of_request_fields_match_the_server(server: RunningServer) -> None:
    """A chunk size past the limit, and an unknown payload kind: refused here as the server refuses them."""
    from paramsel.client import ScoreFunction, TopK

    too_big = 4 << 20
    start = service_pb2.SelectStart(
        criterion=TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE).to_proto(),
        response_chunk_size_bytes=too_big,
    )
    code = _server_refusal(server, start)
    here = _refusal(Client, target=server.target, chunk_size_bytes=too_big)
    assert here.status == code.value[0] == StatusCode.INVALID_ARGUMENT
    assert isinstance(here, ValueError)
    with pytest.warns(DeprecationWarning, match="payload_kind as a plain int is deprecated"):
        unknown = _refusal(Client(target=server.target).pull, 7, MODEL)
    assert unknown.status is StatusCode.INVALID_ARGUMENT
    assert "unknown value 7" in unknown.message
