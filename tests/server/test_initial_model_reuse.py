"""Initial models kept by digest: named first, uploaded only when the server lacks them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from support import assert_serving, start_server

from paramsel.client import (
    Client,
    ParamselError,
    ScoreFunction,
    SparseCooParameterExchanger,
    TopK,
    largest_magnitude_change_scores,
)
from paramsel.client import _client as client_module
from paramsel.server.app import RunningServer
from paramsel.server.models import ModelStore
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.digest import model_digest
from paramsel.wire.streams import read_frames, write_frames

MODEL = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
INITIAL = {"w": torch.tensor([1.0, 0.0, 3.5, 0.0])}  # |w - w0| = [0, 2, 0.5, 4]
TOP_HALF = TopK(0.5, ScoreFunction.LARGEST_MAGNITUDE_CHANGE)


@pytest.fixture
def fresh() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(0)


def _select(target: str, digest: bytes | None, initial: dict[str, torch.Tensor] | None) -> Any:
    start = service_pb2.SelectStart(
        criterion=TOP_HALF.to_proto(), position_encoding=tensor_pb2.POSITION_ENCODING_FLAT_INT64
    )
    if digest is not None:
        start.initial_model_digest.sha256 = digest
    sections = [(tensor_pb2.SECTION_MODEL, list(MODEL.items()))]
    if initial is not None:
        sections.append((tensor_pb2.SECTION_INITIAL_MODEL, list(initial.items())))
    frames = write_frames(service_pb2.SelectRequest, ("start", start), chunk_size=1 << 20, dense=sections)
    with grpc.insecure_channel(target) as channel:
        replies = service_pb2_grpc.ParameterSelectionServiceStub(channel).Select(frames, timeout=60)
        result = read_frames(
            replies,
            first="header",
            sparse_sections=frozenset({tensor_pb2.SECTION_RESULT}),
            max_bytes=1 << 20,
        )
    return result.sparse[tensor_pb2.SECTION_RESULT][0].positions.tolist()


def test_digest_only_is_refused_until_the_model_is_held(fresh: RunningServer) -> None:
    digest = model_digest(INITIAL.items())
    with pytest.raises(grpc.RpcError) as err:
        _select(fresh.target, digest, None)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not held" in (err.value.details() or "")
    assert isinstance(err.value, grpc.Call)  # a failed call's error is also its grpc.Call
    status = rpc_status.from_call(err.value)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.reason == "INITIAL_MODEL_NOT_HELD"
    # Sent once with its digest, it is kept: the digest alone then suffices, with the same result.
    assert _select(fresh.target, digest, INITIAL) == [1, 3]
    assert _select(fresh.target, digest, None) == [1, 3]


def test_a_digest_that_does_not_match_the_data_is_refused(fresh: RunningServer) -> None:
    wrong = model_digest(MODEL.items())
    with pytest.raises(grpc.RpcError) as err:
        _select(fresh.target, wrong, INITIAL)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "initial_model_digest does not match" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        _select(fresh.target, b"short", None)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "32 bytes" in (err.value.details() or "")
    with grpc.insecure_channel(fresh.target) as channel:
        assert_serving(channel)


def _initial_uploads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for every request the SDK builds, whether it carries the initial model's tensors."""
    sent: list[bool] = []
    real = write_frames  # the function client_module imported

    def spy(*args: Any, **kwargs: Any) -> Any:
        sent.append(
            any(section == tensor_pb2.SECTION_INITIAL_MODEL for section, _ in kwargs.get("dense", ()))
        )
        return real(*args, **kwargs)

    monkeypatch.setattr(client_module, "write_frames", spy)
    return sent


def test_sdk_uploads_the_initial_model_once_per_server(
    fresh: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import nn

    current, initial = nn.Linear(4, 3), nn.Linear(4, 3)
    exchanger = SparseCooParameterExchanger(0.3, largest_magnitude_change_scores, target=fresh.target)
    sent = _initial_uploads(monkeypatch)
    first = exchanger.push_parameters(current, initial)
    assert sent == [False, True]  # named, refused, then uploaded
    second = exchanger.push_parameters(current, initial)
    assert sent == [False, True, False]  # named and found: only the current model travels
    assert all((a == b).all() for a, b in zip(first, second, strict=True))
    # After a server restart (a new, empty server) the SDK re-uploads transparently.
    restarted = start_server()
    try:
        moved = SparseCooParameterExchanger(0.3, largest_magnitude_change_scores, target=restarted.target)
        third = moved.push_parameters(current, initial)
        assert sent[3:] == [False, True]
        assert all((a == b).all() for a, b in zip(first, third, strict=True))
    finally:
        restarted.stop(0)


def test_eviction_means_a_re_upload_not_a_wrong_result(monkeypatch: pytest.MonkeyPatch) -> None:
    # Room for one 4 KiB model: the second initial model evicts the first.
    small = start_server(model_cache_bytes=6 << 10)
    try:
        client = Client(target=small.target)
        model = {"w": torch.arange(1024, dtype=torch.float32)}
        one, two = {"w": torch.zeros(1024)}, {"w": torch.full((1024,), 1000.0)}
        sent = _initial_uploads(monkeypatch)
        a = client.select(TOP_HALF, model, one)
        client.select(TOP_HALF, model, two)
        again = client.select(TOP_HALF, model, one)
        assert sent == [False, True, False, True, False, True]
        assert again.sparse[0].positions.tolist() == a.sparse[0].positions.tolist() == list(range(512, 1024))
    finally:
        small.stop(0)


def test_opting_out_always_uploads(fresh: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _initial_uploads(monkeypatch)
    client = Client(target=fresh.target)
    for _ in range(2):
        result = client.select(TOP_HALF, MODEL, INITIAL, reuse_initial=False)
        assert result.sparse[0].positions.tolist() == [1, 3]
    assert sent == [True, True]


def test_model_store_is_bounded_and_least_recently_used() -> None:
    store = ModelStore(capacity_bytes=8 * 4)
    a, b, c = ({"w": torch.zeros(4)} for _ in range(3))  # 16 bytes each
    store.put(b"a", a)
    store.put(b"b", b)
    assert store.get(b"a") is a  # a is now the most recent
    store.put(b"c", c)  # evicts b, the least recent
    assert store.get(b"b") is None
    assert store.get(b"a") is a
    assert store.get(b"c") is c
    assert store.held_bytes == 32
    store.put(b"huge", {"w": torch.zeros(100)})  # larger than the store: not kept, nothing evicted
    assert store.get(b"huge") is None
    assert store.held_bytes == 32


def test_a_missing_initial_model_is_not_a_cache_miss(fresh: RunningServer) -> None:
    client = Client(target=fresh.target)
    with pytest.raises(ParamselError) as err:
        client.select(TOP_HALF, MODEL, None)
    assert err.value.reason is None  # no ErrorInfo: the SDK must not retry with an upload
    assert err.value.status.name == "FAILED_PRECONDITION"
