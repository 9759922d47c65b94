"""``paramsel health``: the container probe, run as a command against real servers."""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import free_port, running_server, serve_process

from paramsel.server.app import SERVICE_NAME, RunningServer
from paramsel.server.health_check import check_health, run_health

_SCRIPT = shutil.which("paramsel", path=str(Path(sys.executable).parent))
# The console script is what the image's HEALTHCHECK runs; ``-m`` when the venv has none.
_COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "paramsel.server.cli"]


def _health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "PARAMSEL_TARGET"}
    return subprocess.run(
        [*_COMMAND, "health", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **(env or {})},
        check=False,
    )


def _assert_failure(result: subprocess.CompletedProcess[str], status: str, *words: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout.strip() == status
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("paramsel health: ")
    for word in words:
        assert word in lines[0]


@contextmanager
def _reporting(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> Iterator[str]:
    """The real server, its health servicer made to report ``status`` for the server as a whole."""
    with running_server() as running:
        running.health.set("", status)
        yield running.target


# --- the command against `paramsel serve` -------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """One ``paramsel serve`` process for the tests that leave it running."""
    with serve_process() as (_proc, target):
        yield target


@pytest.mark.slow  # a `paramsel serve` process
def test_serving_server_exits_0(served: str) -> None:
    result = _health("--target", served)
    assert result.returncode == 0, result
    assert result.stdout.strip() == "SERVING"
    assert result.stderr == ""
    named = _health("--target", served, "--service", SERVICE_NAME, "--timeout", "2.5")
    assert named.returncode == 0, named


@pytest.mark.slow  # a `paramsel serve` process
def test_target_defaults_to_paramsel_target_env(served: str) -> None:
    result = _health(env={"PARAMSEL_TARGET": served})
    assert result.returncode == 0, result
    assert result.stdout.strip() == "SERVING"


def test_nothing_listening_exits_1_saying_so() -> None:
    target = f"127.0.0.1:{free_port()}"
    _assert_failure(_health("--target", target), "UNREACHABLE", "cannot reach", target)


@pytest.mark.slow  # a `paramsel serve` process
def test_draining_server_exits_1() -> None:
    """After SIGTERM the server drains in-flight calls (here a health Watch) and takes no new ones."""
    with serve_process("--grace-seconds", "30") as (proc, target), grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        result = _health("--target", target)
        assert proc.poll() is None, "the server should still be draining"
        _assert_failure(result, "UNREACHABLE", "cannot reach", target, "shutting down")
        watch.cancel()
        assert proc.wait(timeout=20) == 0


@pytest.mark.slow  # a `paramsel serve` process
def test_unknown_service_exits_1(served: str) -> None:
    _assert_failure(
        _health("--target", served, "--service", "no.such.Service"), "SERVICE_NOT_FOUND", "'no.such.Service'"
    )


def test_bad_timeout_is_a_usage_error() -> None:
    result = _health("--timeout", "0")
    assert result.returncode == 2
    assert "must be positive" in result.stderr


# --- statuses a running paramsel only shows for an instant -------------------------------------------


def test_not_serving_exits_1() -> None:
    with _reporting(health_pb2.HealthCheckResponse.NOT_SERVING) as target:
        _assert_failure(_health("--target", target), "NOT_SERVING", target, "NOT_SERVING")


@pytest.mark.slow  # waits out the probe's timeout
def test_silent_server_times_out() -> None:
    """A socket that accepts connections but never speaks HTTP/2."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        result = _health("--target", target, "--timeout", "1")
    _assert_failure(result, "TIMEOUT", "no answer from", target, "within 1 s")


# --- the function, in process -------------------------------------------------------------------------


def test_check_health_in_process(server: RunningServer) -> None:
    overall = check_health(server.target)
    assert overall.serving
    assert overall.status == "SERVING"
    assert check_health(server.target, SERVICE_NAME, timeout=30).serving
    unknown = check_health(server.target, "nope")
    assert not unknown.serving
    assert unknown.status == "SERVICE_NOT_FOUND"
    with pytest.raises(ValueError, match="positive"):
        check_health(server.target, timeout=0)


def test_run_health_writes_status_and_one_line(server: RunningServer) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run_health(server.target, out=out, err=err) == 0
    assert (out.getvalue(), err.getvalue()) == ("SERVING\n", "")
    out, err = io.StringIO(), io.StringIO()
    assert run_health(f"127.0.0.1:{free_port()}", out=out, err=err) == 1
    assert out.getvalue() == "UNREACHABLE\n"
    assert err.getvalue().count("\n") == 1
