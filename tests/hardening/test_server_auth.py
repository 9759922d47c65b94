"""Bearer-token authentication on every call but health checks (reflection included); tokens stay secret."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import start_server

from paramsel.server import cli
from paramsel.server.app import RunningServer
from paramsel.server.security import ConfigError, load_tokens
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, write_contributions, write_frames

TOKEN = "s3cret-token-value-3f9a"
OTHER = "second-token-77c1"
TIMEOUT = 60  # seconds: a generous bound for calls, never a measure of speed
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def select_frames() -> list[Any]:
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    first = ("start", service_pb2.SelectStart(criterion=criterion))
    dense = [(tensor_pb2.SECTION_MODEL, [("w", torch.randn(64))])]
    return list(write_frames(service_pb2.SelectRequest, first, chunk_size=1 << 20, dense=dense))


def aggregate_frames() -> list[Any]:
    first = ("start", service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS))
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = [
        (1, [("w", torch.randn(8))], []),
        (3, [("w", torch.randn(8))], []),
    ]
    return list(
        write_contributions(
            service_pb2.AggregateRequest,
            first,
            contributions,
            section=tensor_pb2.SECTION_PAYLOAD,
            encoding=0,
            chunk_size=1 << 20,
        )
    )


def call(channel: grpc.Channel, method: str, metadata: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
    if method == "Select":
        return list(stub.Select(iter(select_frames()), timeout=TIMEOUT, metadata=metadata))
    return list(stub.Aggregate(iter(aggregate_frames()), timeout=TIMEOUT, metadata=metadata))


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[RunningServer, grpc.Channel]]:
    running = start_server(tokens=(TOKEN, OTHER))
    with grpc.insecure_channel(running.target) as channel:
        yield running, channel
    running.stop(0)


@pytest.mark.parametrize("method", ["Select", "Aggregate"])
@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "missing 'authorization' metadata"),
        ((("authorization", "Bearer wrong"),), "not accepted"),
        ((("authorization", f"Bearer {TOKEN}x"),), "not accepted"),
        ((("authorization", TOKEN),), "'Bearer <token>'"),
        ((("authorization", f"Basic {TOKEN}"),), "'Bearer <token>'"),
    ],
)
def test_missing_or_wrong_tokens_are_unauthenticated(
    secured: tuple[RunningServer, grpc.Channel],
    method: str,
    metadata: tuple[tuple[str, str], ...],
    message: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.RpcError) as err:
        call(secured[1], method, metadata)
    assert err.value.code() == UNAUTHENTICATED
    assert message in (err.value.details() or "")
    assert TOKEN not in (err.value.details() or "")
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("method", ["Select", "Aggregate"])
@pytest.mark.parametrize("token", [TOKEN, OTHER])
def test_a_right_token_is_served(
    secured: tuple[RunningServer, grpc.Channel], method: str, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    frames = call(secured[1], method, (("authorization", f"Bearer {token}"),))
    assert frames[0].WhichOneof("frame") == "header"
    assert token not in caplog.text


def test_health_needs_no_token_and_reflection_does(secured: tuple[RunningServer, grpc.Channel]) -> None:
    _, channel = secured
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT))
    assert err.value.code() == UNAUTHENTICATED
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT, metadata=metadata)
    assert "paramsel.v1.ParameterSelectionService" in {s.name for s in answer.list_services_response.service}


def test_tokens_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"# paramsel tokens\n{TOKEN}\n\n  {OTHER}  # the second client\n")
    assert load_tokens(str(path), {}) == (TOKEN, OTHER)
    assert load_tokens(None, {"PARAMSEL_TOKENS": f" {TOKEN}, ,{OTHER}"}) == (TOKEN, OTHER)
    assert load_tokens(str(path), {"PARAMSEL_TOKENS": "third"}) == (TOKEN, OTHER, "third")
    assert load_tokens(None, {}) == ()
    (tmp_path / "empty").write_text("# nothing here\n")
    with pytest.raises(ConfigError, match="holds no token"):
        load_tokens(str(tmp_path / "empty"), {})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_tokens(str(tmp_path / "missing"), {})


def test_tokens_never_come_from_the_command_line_nor_show_in_a_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PARAMSEL_TOKENS", TOKEN)
    config = cli.config_from_args(cli._parser().parse_args(["serve"]))
    assert config.tokens == (TOKEN,)
    assert TOKEN not in repr(config)
    for flag in ("--token", "--tokens"):
        with pytest.raises(SystemExit):
            cli._parser().parse_args(["serve", flag, TOKEN])
    capsys.readouterr()
