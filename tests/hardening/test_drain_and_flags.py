"""Issue 10, findings 3 and 7: GetServerInfo (and every other call but health) is refused with UNAVAILABLE
while the server drains; flags that cannot be used are usage errors (exit 2, the usage line and the
reason), never a traceback; the threads rule (calls below workers) is checked where settings are made."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import serve_process, start_server, wait_for

from paramsel.server import ServerConfig, cli
from paramsel.server.config import Limits
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc

TIMEOUT = 60  # seconds: a generous bound for every wait, never a measure of speed
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(240)
def test_get_server_info_is_refused_while_draining() -> None:
    """The finding: GetServerInfo answered OK during the SIGTERM drain. A call in flight keeps the drain
    going while new calls are tried: all but health are refused with UNAVAILABLE."""
    running = start_server(grace_seconds=TIMEOUT)
    release = threading.Event()
    stopper = threading.Thread(target=running.stop, daemon=True)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
            assert stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=TIMEOUT).api_package

            def held_select() -> Iterator[Any]:
                criterion = criteria_pb2.Criterion(
                    top_k=criteria_pb2.TopKCriterion(
                        sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
                    )
                )
                yield service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=criterion))
                release.wait(TIMEOUT)

            in_flight = stub.Select(held_select(), timeout=TIMEOUT * 2)
            wait_for(lambda: running.limits.active_calls == 1)
            stopper.start()
            health = health_pb2_grpc.HealthStub(channel)
            wait_for(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                )
            )
            with pytest.raises(grpc.RpcError) as info:
                stub.GetServerInfo(service_pb2.GetServerInfoRequest(), timeout=TIMEOUT)
            assert info.value.code() == UNAVAILABLE
            assert "shutting down" in (info.value.details() or "")
            with pytest.raises(grpc.RpcError) as reflected:
                list(
                    reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
                    )
                )
            assert reflected.value.code() == UNAVAILABLE
            assert stopper.is_alive(), "the drain ended with a call in flight"
            release.set()  # the held call's stream ends early: it fails, and the drain completes
            with pytest.raises(grpc.RpcError) as ended:
                list(in_flight)
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stopper.join(TIMEOUT)
            assert not stopper.is_alive()
    finally:
        release.set()
        if stopper.ident is None:
            running.stop(0)
        else:
            stopper.join(TIMEOUT)


def test_calls_must_stay_below_workers() -> None:
    with pytest.raises(ValueError, match=r"max_concurrent_calls \(16\) must be below max_workers \(8\)"):
        ServerConfig(max_workers=8)
    with pytest.raises(ValueError, match="must be below max_workers"):
        ServerConfig(max_workers=4, limits=Limits(max_concurrent_calls=4))
    assert ServerConfig(max_workers=5, limits=Limits(max_concurrent_calls=4)).max_workers == 5


def test_limits_are_nested_and_flat_keywords_are_deprecated() -> None:
    config = ServerConfig(limits=Limits(max_call_bytes=1 << 20))
    assert config.limits == Limits(max_call_bytes=1 << 20)
    assert config.max_call_bytes == 1 << 20  # a read-only view of limits
    with pytest.raises(ValueError, match="max_tensors_per_call must be positive, got 0"):
        Limits(max_tensors_per_call=0)
    with pytest.warns(DeprecationWarning, match=r"pass limits=Limits\(\.\.\.\)"):
        flat = ServerConfig(max_call_bytes=1 << 20, max_concurrent_calls=2)  # type: ignore[call-arg]
    assert flat.limits == Limits(max_call_bytes=1 << 20, max_concurrent_calls=2)
    with pytest.warns(DeprecationWarning, match=r"ServerConfig\(max_inflight_bytes=\.\.\.\)"):
        assert replace(config, max_inflight_bytes=5).limits.max_inflight_bytes == 5  # type: ignore[call-arg]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``paramsel ARGS`` as a process (it exits before serving), its output collected."""
    cmd = [sys.executable, "-m", "paramsel.server.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=False)


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("serve", "--log-level", "verbose"), "invalid choice: 'VERBOSE'"),
        (("serve", "--max-workers", "8"), "must be below max_workers (8)"),
    ],
)
def test_a_process_given_unusable_flags_exits_2_without_a_traceback(
    args: tuple[str, ...], reason: str
) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: paramsel serve")
    assert reason in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


SERVE_ERRORS = [
    (("--log-level", "verbose"), "--log-level: invalid choice"),
    (("--log-level", ""), "--log-level: invalid choice"),
    (("--port", "http"), "--port: invalid int value"),
    (("--port", "70000"), "port must be in [0, 65535]"),
    (("--port", "-1"), "port must be in [0, 65535]"),
    (("--metrics-port", "70000"), "metrics_port must be in [0, 65535]"),
    (("--grace-seconds", "-1"), "--grace-seconds: must be 0 or more"),
    (("--grace-seconds", "nan"), "--grace-seconds: must be a finite number"),
    (("--idle-release-seconds", "-1"), "--idle-release-seconds: must be 0 or more"),
    (("--idle-release-seconds", "inf"), "--idle-release-seconds: must be a finite number"),
    (("--progress-timeout-seconds", "0"), "--progress-timeout-seconds: must be positive"),
    (("--progress-timeout-seconds", "inf"), "--progress-timeout-seconds: must be a finite number"),
    (("--progress-timeout-seconds", "soon"), "--progress-timeout-seconds: not a number"),
    (("--max-calls-per-peer", "0"), "max_calls_per_peer must be positive"),
    (("--max-workers", "0"), "must be positive"),
    (("--max-workers", "16"), "must be below max_workers (16)"),
    (("--max-concurrent-calls", "0"), "must be positive"),
    (("--max-inflight-bytes", "-5"), "must be positive"),
    (("--max-tensors-per-call", "0"), "must be positive"),
    (("--max-elements-per-tensor", "0"), "must be positive"),
    (("--max-call-bytes", "0"), "must be positive"),
    (("--chunk-size-bytes", "0"), "chunk_size_bytes must be in"),
    (("--chunk-size-bytes", str(4 << 20)), "chunk_size_bytes must be in"),
    (("--model-cache-bytes", "-1"), "model_cache_bytes >= 0"),
    (("--tls-key", "key.pem"), "TLS needs both"),
    (("--tls-client-ca", "ca.pem"), "needs a server certificate"),
    (("--unknown-flag",), "unrecognized arguments"),
]


@pytest.mark.parametrize(("args", "reason"), SERVE_ERRORS)
def test_every_serve_flag_is_checked_before_serving(
    args: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = cli.main(["serve", "--port", "0", *args])
    except SystemExit as exit_:  # argparse's own usage errors
        code = int(exit_.code or 0)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: paramsel ")  # the serve subcommand's usage, or the whole command's
    assert reason in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--timeout", "0"), "--timeout: must be positive"),
        (("--timeout", "nan"), "--timeout: must be a finite number"),
        (("--timeout", "later"), "--timeout: not a number"),
    ],
)
def test_every_health_flag_is_checked(
    args: tuple[str, ...], reason: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["health", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: paramsel health")
    assert reason in err


@pytest.mark.slow  # a `paramsel serve` process
@pytest.mark.timeout(120)
@pytest.mark.parametrize(("level", "logged"), [("warning", False), ("debug", True)])
def test_log_levels_are_taken_in_any_case(tmp_path: Path, level: str, logged: bool) -> None:
    log = tmp_path / "serve.log"
    with (
        serve_process("--log-level", level, log=log) as (_, target),
        grpc.insecure_channel(target) as channel,
    ):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert (" INFO paramsel.server serving on port " in log.read_text()) is logged


@pytest.mark.slow  # a `paramsel serve` process
def test_an_address_that_cannot_be_bound_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert result.returncode == 1
    assert f"paramsel serve: error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
