"""Helpers of the client fault tests: a cutting TCP proxy, a bare server with a test interceptor, certs.

Everything is real: sockets on loopback, gRPC servers, ``openssl`` certificates. No tests here.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from paramsel.server import ServerConfig
from paramsel.server.app import service_handlers
from paramsel.server.servicer import ParameterSelectionServicer


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CuttingProxy:
    """A loopback TCP proxy that cuts a connection (both ways, with a reset) after ``cut_after`` bytes
    from the client, on the connections ``should_cut(index)`` picks (0-based, in accept order)."""

    def __init__(self, upstream: str, cut_after: int, should_cut: Callable[[int], bool]) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.should_cut = should_cut
        self.connections = 0
        self.cuts = 0
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
            index = self.connections
            self.connections += 1
            server = socket.create_connection(self.upstream)
            limit = self.cut_after if self.should_cut(index) else None
            threading.Thread(target=self._pump, args=(client, server, limit), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, None), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(limit - sent, 0)])
                    self.cuts += 1
                    for s in (src, dst):  # RST both ways, as a dropped connection looks
                        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    break
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


HOLD_SECONDS = 60.0


@dataclass
class Knobs:
    """What the test interceptor does to each call of the paramsel service."""

    unavailable_first: int = 0
    """Abort the first N calls with UNAVAILABLE (as a restarting server would)."""
    hold: threading.Event | None = None
    """When set, each call waits for this event (at most ``HOLD_SECONDS``) before it is served."""
    held_to_the_end: int = 0
    """How many calls waited the whole ``HOLD_SECONDS`` without the event being set."""
    token: str | None = None
    """When set, calls without ``authorization: Bearer <token>`` fail with UNAUTHENTICATED."""
    calls: list[str] = field(default_factory=list)
    """Method of every call seen, in order."""
    authorizations: list[str | None] = field(default_factory=list)
    """The authorization metadata of every call seen."""


class _Interceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self._lock = threading.Lock()

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not details.method.startswith("/paramsel."):
            return handler
        knobs = self.knobs
        with self._lock:
            knobs.calls.append(details.method)
            number = len(knobs.calls)
        authorization = dict(details.invocation_metadata).get("authorization")
        knobs.authorizations.append(authorization)

        def behaviour(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            if knobs.token is not None and authorization != f"Bearer {knobs.token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
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
def bare_server(
    knobs: Knobs, credentials: grpc.ServerCredentials | None = None, host: str = "127.0.0.1"
) -> Iterator[str]:
    """A real gRPC server of the paramsel service behind the test interceptor; yields ``host:port``."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[_Interceptor(knobs)],
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((service_handlers(ParameterSelectionServicer(ServerConfig(port=0))),))
    address = f"{host}:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    try:
        yield f"{host}:{port}"
    finally:
        server.stop(0).wait()


@dataclass(frozen=True)
class Certs:
    """PEM files: two independent CAs, a server certificate for localhost / 127.0.0.1 signed by
    ``ca``, and a client certificate signed by ``client_ca``."""

    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(directory: Path) -> Certs:
    """Throwaway CAs and certificates, made by ``openssl``."""
    for ca in ("ca", "other_ca", "client_ca"):
        _openssl(
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN=test {ca}"),
            *("-keyout", f"{ca}.key", "-out", f"{ca}.pem"),
            cwd=directory,
        )
    for leaf, ca, ext in (
        ("server", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "client_ca", "extendedKeyUsage=clientAuth"),
    ):
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={leaf}"),
            *("-keyout", f"{leaf}.key", "-out", f"{leaf}.csr"),
            cwd=directory,
        )
        (directory / f"{leaf}.ext").write_text(ext + "\n")
        _openssl(
            *("x509", "-req", "-in", f"{leaf}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key"),
            *("-CAcreateserial", "-days", "1", "-extfile", f"{leaf}.ext", "-out", f"{leaf}.pem"),
            cwd=directory,
        )
    return Certs(
        directory / "ca.pem",
        directory / "other_ca.pem",
        directory / "server.pem",
        directory / "server.key",
        directory / "client_ca.pem",
        directory / "client.pem",
        directory / "client.key",
    )
