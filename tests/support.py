"""Test helpers: ``paramsel serve`` as a real process on a port it picks, and the health probe."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramsel.server.app import SERVICE_NAME

_ANNOUNCE = re.compile(r"paramsel serving on (\S+):(\d+)")


class Output(list[str]):
    """The lines a process printed after announcing itself, collected by a thread as they come."""


@contextmanager
def serve_process(*args: str, output: Output | None = None) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Runs ``paramsel serve --port 0`` and yields the process and its ``host:port``; SIGTERMs it after.

    The rest of its output (one JSON line per call, among others) is drained by a thread, so the pipe
    never fills, and kept in ``output`` when one is given.
    """
    cmd = [sys.executable, "-m", "paramsel.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    sink = output if output is not None else Output()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            match = _ANNOUNCE.search(line)
            if match:
                threading.Thread(target=sink.extend, args=(proc.stdout,), daemon=True).start()
                yield proc, f"{match.group(1)}:{match.group(2)}"
                break
        else:
            raise AssertionError(f"paramsel serve exited with {proc.wait()} before announcing its port")
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)


def assert_serving(channel: grpc.Channel) -> None:
    """The server still answers its health check for the paramsel service."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def instrumented_server(registry: Any, *, workers: int = 8) -> tuple[grpc.Server, str]:
    """A server like ``create_server``'s, its observability interceptor on ``registry``, on a free
    loopback port; returns the server and its ``host:port`` (stop it with ``server.stop(0)``)."""
    from concurrent import futures

    from grpc_health.v1 import health

    from paramsel.server.app import service_handlers
    from paramsel.server.config import ServerConfig
    from paramsel.server.observability import interceptor
    from paramsel.server.servicer import ParameterSelectionServicer

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[interceptor(registry)],
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((service_handlers(ParameterSelectionServicer(ServerConfig(port=0))),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@contextmanager
def serve_process_logging_to(
    log: Path, *args: str, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``serve_process`` whose stdout and stderr go to the file ``log`` (no pipe to drain, nothing lost
    if the test stops reading); yields the process and its ``host:port``, SIGTERMs it after."""
    cmd = [sys.executable, "-m", "paramsel.server.cli", "serve", "--host", "127.0.0.1", "--port", "0", *args]
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ))
    try:
        deadline = time.monotonic() + timeout
        while (match := _ANNOUNCE.search(log.read_text(errors="replace"))) is None:
            if proc.poll() is not None:
                raise AssertionError(f"paramsel serve exited with {proc.returncode}:\n{log.read_text()}")
            assert time.monotonic() < deadline, f"paramsel serve did not announce its port in {timeout} s"
            time.sleep(0.05)
        yield proc, f"{match.group(1)}:{match.group(2)}"
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
