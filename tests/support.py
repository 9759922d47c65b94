"""The tests' one helper module: servers (in-process through ``create_server``, or ``paramsel serve`` as a
process), waiting for a condition, throwaway certificates (trustme), and the faults tests inject.

Every in-process server is the real one, built by ``create_server`` with its whole interceptor chain
(metrics and the call log, the token check when tokens are set, admission); its metrics go to a Prometheus
registry of its own (``running.registry``), so that no test sees another's calls. A process's output goes
to a file, never to a pipe someone has to drain.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import SERVICE_NAME, RunningServer

TIMEOUT = 60.0
"""Seconds: the bound of every wait here. Generous, so that a loaded machine never fails a test; a
condition that holds returns at once, so it is never a measure of speed."""

T = TypeVar("T")


# --- waiting ----------------------------------------------------------------------------------------


def wait_for(condition: Callable[[], T | None], timeout: float = TIMEOUT, what: str = "the condition") -> T:
    """Polls ``condition`` until it returns something true, and returns that (so never None); fails after
    ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.02)
    return result


# --- in-process servers -----------------------------------------------------------------------------


def loopback(**settings: Any) -> ServerConfig:
    """A server configuration on 127.0.0.1 and a port the server picks, with ``settings``."""
    return ServerConfig(**{"host": "127.0.0.1", "port": 0, **settings})


def start_server(
    config: ServerConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),  # type: ignore[type-arg]
    **settings: Any,
) -> RunningServer:
    """``create_server`` with ``config`` (default: :func:`loopback`) changed by ``settings``, its metrics
    on ``registry`` (default: a new one, ``running.registry``). Stop it with ``running.stop(0)``."""
    config = replace(config if config is not None else loopback(), **settings)
    registry = CollectorRegistry() if registry is None else registry
    return create_server(config, registry=registry, extra_interceptors=extra_interceptors)


@contextmanager
def running_server(
    config: ServerConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),  # type: ignore[type-arg]
    **settings: Any,
) -> Iterator[RunningServer]:
    """:func:`start_server`, stopped at once when the block ends."""
    running = start_server(config, registry=registry, extra_interceptors=extra_interceptors, **settings)
    try:
        yield running
    finally:
        running.stop(0)


def metric(running: RunningServer, name: str, **labels: str) -> float:
    """A sample of the server's own registry (0 when it was never recorded)."""
    return running.registry.get_sample_value(name, labels) or 0.0


def scrape(metrics_port: int, name: str, **labels: str) -> float:
    """A sample read from the /metrics endpoint on 127.0.0.1:``metrics_port`` (0 when absent): the
    figures of a server in another process."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def assert_serving(channel: grpc.Channel) -> None:
    """The server still answers its health check for the paramsel service."""
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=30)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def server_logs(path: Path) -> Iterator[Path]:
    """While open, the in-process servers' logs (``paramsel.*``, at INFO as ``paramsel serve`` logs: one
    line per call, refusals) go to the file ``path`` only, not to pytest's captured output."""
    logger = logging.getLogger("paramsel")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()


# --- faults injected in front of the real chain -----------------------------------------------------

HOLD_SECONDS = 60.0


@dataclass
class Knobs:
    """What :class:`FaultInjector` does to each streaming call of the paramsel service, and what it saw."""

    unavailable_first: int = 0
    """Abort the first N calls with UNAVAILABLE (as a restarting server would), after their upload."""
    hold: threading.Event | None = None
    """When set, each call waits for this event (at most ``HOLD_SECONDS``) before it is served."""
    held_to_the_end: int = 0
    """How many calls waited the whole ``HOLD_SECONDS`` without the event being set."""
    calls: list[str] = field(default_factory=list)
    """Method of every paramsel call seen, in order (those the server goes on to refuse included)."""
    authorizations: list[str | None] = field(default_factory=list)
    """The authorization metadata of every paramsel call seen."""


class FaultInjector(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """An extra interceptor (``create_server(extra_interceptors=...)``) that records the paramsel calls
    and fails or holds them as ``knobs`` say, before the server's own chain sees them."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith("/paramsel."):
            return handler
        knobs = self.knobs
        authorization = dict(details.invocation_metadata or ()).get("authorization")
        with self._lock:
            knobs.calls.append(details.method)
            knobs.authorizations.append(authorization)
            number = len(knobs.calls)
        if not (handler.request_streaming and handler.response_streaming):
            return handler  # GetServerInfo: recorded, never failed

        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            if number <= knobs.unavailable_first:
                for _ in requests:  # take the whole upload, then fail, as a server dying late would
                    pass
                context.abort(grpc.StatusCode.UNAVAILABLE, f"injected: call {number} unavailable")
            if knobs.hold is not None and not knobs.hold.wait(HOLD_SECONDS):
                knobs.held_to_the_end += 1
            yield from handler.stream_stream(requests, context)

        return grpc.stream_stream_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextmanager
def injecting_server(knobs: Knobs, config: ServerConfig | None = None, **settings: Any) -> Iterator[str]:
    """The real server behind a :class:`FaultInjector` of ``knobs``; yields its ``host:port``."""
    with running_server(config, extra_interceptors=[FaultInjector(knobs)], **settings) as running:
        yield running.target


def free_port() -> int:
    """A TCP port free on loopback right now (for a server that must come back on the same port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CuttingProxy:
    """A loopback TCP proxy that cuts a connection (both ways, with a reset) once ``cut_after`` bytes from
    the client have gone through it, on at most ``max_cuts`` connections (``None``: on every one).

    Whichever connection first carries that much is cut, not the first one accepted: gRPC may open a
    connection and drop it unused (a connect attempt that timed out on a loaded machine), and a test
    that wants "the upload is cut once" must not depend on which socket the upload took."""

    def __init__(self, upstream: str, cut_after: int, max_cuts: int | None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.max_cuts = max_cuts
        self.connections = 0
        self.cuts = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, server, self.cut_after), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _claim_cut(self) -> bool:
        with self._lock:
            if self.max_cuts is not None and self.cuts >= self.max_cuts:
                return False
            self.cuts += 1
            return True

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    if self._claim_cut():
                        dst.sendall(data[: max(limit - sent, 0)])
                        reset = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends RST
                        for s in (src, dst):  # both ways, as a dropped connection looks
                            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
                        break
                    limit = None
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()


# --- `paramsel serve` as a process ------------------------------------------------------------------

_ANNOUNCE = re.compile(r"paramsel serving on (\S+):(\d+)")


class Output:
    """The lines a ``serve_process`` printed after announcing itself (its call log among them), read from
    its log file each time they are asked for."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self._skip = 0

    def __iter__(self) -> Iterator[str]:
        if self.path is None:
            return iter(())
        text = self.path.read_text(errors="replace")
        return iter(text[self._skip :].splitlines())


@contextmanager
def serve_process(
    *args: str, log: Path | None = None, output: Output | None = None, timeout: float = 120
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Runs ``paramsel serve --host 127.0.0.1 --port 0 ARGS`` and yields the process and its ``host:port``
    once it has announced them; SIGTERMs it after. Its stdout and stderr go to the file ``log`` (a
    scratch one, removed after, when none is given): no pipe to drain, nothing lost if the test stops
    reading. ``output``, when given, reads the lines printed after the announcement."""
    with tempfile.TemporaryDirectory(prefix="paramsel-serve-") as scratch:
        path = log if log is not None else Path(scratch) / "serve.log"
        cmd = [sys.executable, "-m", "paramsel.server.cli", "serve", "--host", "127.0.0.1", "--port", "0"]
        with path.open("wb") as sink:
            proc = subprocess.Popen(
                [*cmd, *args], stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ)
            )
        try:

            def announced() -> re.Match[str] | None:
                found = _ANNOUNCE.search(path.read_text(errors="replace"))
                if found is None and proc.poll() is not None:
                    raise AssertionError(f"paramsel serve exited with {proc.returncode}:\n{path.read_text()}")
                return found

            match = wait_for(announced, timeout, "paramsel serve to announce its port")
            if output is not None:
                output.path, output._skip = path, match.end()
            yield proc, f"{match.group(1)}:{match.group(2)}"
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:  # a drain takes --grace-seconds at most (10 s by default); generous for a loaded machine
                    proc.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    tail = path.read_text(errors="replace")[-4000:]
                    raise AssertionError(
                        f"paramsel serve did not exit within 90 s of SIGTERM; its log:\n{tail}"
                    ) from None


# --- certificates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    """Throwaway PEM files made by trustme: a server certificate for ``localhost`` and 127.0.0.1 signed by
    ``ca``; a client certificate signed by ``client_ca``; and ``other_ca``, which signed nothing of
    these but the ``stranger`` client certificate (a CA neither side trusts)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    stranger_cert: Path
    stranger_key: Path

    def server_config(self, *, mutual: bool = False, **settings: Any) -> ServerConfig:
        """A loopback server on a free port serving TLS with these files (mTLS when ``mutual``)."""
        return loopback(
            tls_cert_file=str(self.server_cert),
            tls_key_file=str(self.server_key),
            tls_client_ca_file=str(self.client_ca) if mutual else None,
            **settings,
        )


def _issue(ca: trustme.CA, stem: Path, *names: str) -> tuple[Path, Path]:
    issued = ca.issue_cert(*names)  # trustme's leaves are good for both server and client auth
    cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def make_certs(directory: Path) -> Certs:
    """Fresh CAs and certificates under ``directory`` (see :class:`Certs`)."""
    ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    for authority, name in ((ca, "ca"), (client_ca, "client-ca"), (other_ca, "other-ca")):
        authority.cert_pem.write_to_path(str(directory / f"{name}.pem"))
    server_cert, server_key = _issue(ca, directory / "server", "localhost", "127.0.0.1")
    client_cert, client_key = _issue(client_ca, directory / "client", "client.example")
    stranger_cert, stranger_key = _issue(other_ca, directory / "stranger", "client.example")
    return Certs(
        directory / "ca.pem",
        server_cert,
        server_key,
        directory / "client-ca.pem",
        client_cert,
        client_key,
        directory / "other-ca.pem",
        stranger_cert,
        stranger_key,
    )


# --- a server process's memory, from /proc -------------------------------------------------------


def proc_status(pid: int, field: str) -> int:
    """A size field (``VmRSS``, ``VmHWM``, ...) of ``/proc/PID/status``, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


class PeakGrowth:
    """How far the process's resident memory rises above where it was while the block runs: its peak
    (VmHWM, reset through /proc/PID/clear_refs) or, where that cannot be reset, the largest VmRSS seen
    by a thread sampling it every few milliseconds."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.growth = 0
        self._stop = threading.Event()
        self._seen = 0
        self._sampler: threading.Thread | None = None

    def __enter__(self) -> PeakGrowth:
        self.before = proc_status(self.pid, "VmRSS")
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current VmRSS
        except OSError:
            self._seen = self.before
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._seen = max(self._seen, proc_status(self.pid, "VmRSS"))

    def __exit__(self, *_: object) -> None:
        if self._sampler is None:
            peak = proc_status(self.pid, "VmHWM")
        else:
            self._stop.set()
            self._sampler.join()
            peak = self._seen
        self.growth = peak - self.before


class StateModule(nn.Module):
    """A module whose state is exactly the given tensors, in order (floats as parameters, others as buffers)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            if tensor.is_floating_point():
                self.register_parameter(name, nn.Parameter(tensor.clone(), requires_grad=False))
            else:
                self.register_buffer(name, tensor.clone())

    def __getattr__(self, name: str) -> torch.Tensor:
        """nn.Module's, typed: every attribute it adds is one of its tensors."""
        tensor = super().__getattr__(name)
        assert isinstance(tensor, torch.Tensor)
        return tensor
