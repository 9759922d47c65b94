"""How ``paramsel serve`` flags become a server: reflection, limits, metrics, and clear errors."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import running_server

from paramsel.server import ServerConfig, cli


def config(*flags: str) -> ServerConfig:
    return cli.config_from_args(cli._parser().parse_args(["serve", *flags]))


def reflected_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (answer,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    return {s.name for s in answer.list_services_response.service}


@pytest.fixture
def no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARAMSEL_TOKENS", raising=False)


@pytest.mark.usefixtures("no_tokens")
def test_reflection_flags() -> None:
    assert config().reflection
    assert not config("--production").reflection
    assert config("--production", "--reflection").reflection


@pytest.mark.parametrize("reflection", [True, False])
def test_reflection_served_or_not(reflection: bool) -> None:
    with running_server(reflection=reflection) as running:
        if reflection:
            assert "paramsel.v1.ParameterSelectionService" in reflected_services(running.target)
        else:
            with pytest.raises(grpc.RpcError) as err:
                reflected_services(running.target)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.usefixtures("no_tokens")
def test_limit_flags_and_defaults() -> None:
    # No flags: exactly the library's defaults, so `paramsel serve` and create_server(ServerConfig())
    # serve alike (the flags take their defaults from ServerConfig, not from copies of its values).
    assert config() == ServerConfig()
    custom = config(
        "--max-concurrent-calls",
        "2",
        "--max-inflight-bytes",
        "1000",
        "--max-tensors-per-call",
        "7",
        "--max-elements-per-tensor",
        "99",
    )
    assert (custom.max_concurrent_calls, custom.max_inflight_bytes) == (2, 1000)
    assert (custom.max_tensors_per_call, custom.max_elements_per_tensor) == (7, 99)
    with pytest.raises(ValueError, match="must be positive"):
        config("--max-concurrent-calls", "0")


@pytest.mark.usefixtures("no_tokens")
def test_serve_reports_unusable_settings_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["serve", "--port", "0", "--tls-cert", str(tmp_path / "c.pem")]) == 2
    assert "TLS needs both" in capsys.readouterr().err
    missing = str(tmp_path / "missing.pem")
    assert cli.main(["serve", "--port", "0", "--tls-cert", missing, "--tls-key", missing]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "0", "--token-file", missing]) == 2
    assert "token file" in capsys.readouterr().err


def test_the_embedded_server_serves_no_reflection() -> None:
    """The SDK's in-process server (no target given) lives inside the user's training process: it
    answers paramsel calls and health checks, but does not describe itself to whoever connects."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from paramsel.client._target import embedded_target

    target = embedded_target()
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        reflected_services(target)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_metrics_port_serves_prometheus_metrics() -> None:
    with running_server(metrics_port=0) as running:
        assert running.metrics_port
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200
            assert b"paramsel_" in reply.read()
    # Stopped with the server: the port no longer answers.
    with pytest.raises(urllib.error.URLError, match="refused"):
        urllib.request.urlopen(url, timeout=10)
