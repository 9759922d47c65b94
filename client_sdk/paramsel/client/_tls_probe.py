"""Whether a connection that gRPC reported UNAVAILABLE failed on TLS, which no retry can fix.

grpc-core reports a server that is down and a TLS mismatch alike, as UNAVAILABLE, and tells them apart
only in words that change between its releases ("Socket closed" is all it says when a server refuses the
client certificate). So, after such a failure, this module asks the server itself: it opens one
connection per address with Python's ``ssl`` and the connection's own CA, certificate and server name,
and reads what comes back. The verdicts are decided by exception types and by whether bytes arrived,
never by message text:

- a plaintext connection whose server completes a TLS handshake: the server speaks TLS;
- a TLS connection whose server answers plaintext HTTP/2 (a SETTINGS frame): the server speaks plaintext;
- :class:`ssl.SSLCertVerificationError`: this side does not trust the server's certificate;
- a handshake that completes, then the server closes without one HTTP/2 byte: it refused the client
  certificate (TLS 1.3 checks it after the client has finished; a gRPC server then just closes);
- a TLS alert or protocol error during the handshake: the handshake itself is refused.

Anything else (connection refused, reset, timed out, an answer) proves nothing, so the call is retried.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from paramsel.client._connection import ENV_CA_FILE, ENV_CERT_FILE, ENV_KEY_FILE, Resolved

SERVER_SPEAKS_TLS = "SERVER_SPEAKS_TLS"
SERVER_SPEAKS_PLAINTEXT = "SERVER_SPEAKS_PLAINTEXT"
SERVER_CERTIFICATE_UNTRUSTED = "SERVER_CERTIFICATE_UNTRUSTED"
CLIENT_CERTIFICATE_REQUIRED = "CLIENT_CERTIFICATE_REQUIRED"
CLIENT_CERTIFICATE_REFUSED = "CLIENT_CERTIFICATE_REFUSED"
TLS_HANDSHAKE_FAILED = "TLS_HANDSHAKE_FAILED"

# The client's HTTP/2 connection preface and an empty SETTINGS frame: a gRPC server answers with its own
# SETTINGS frame (type 4, the fourth byte of a frame header).
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS = 4
_MAX_ADDRESSES = 8
_OTHER_SCHEMES = ("xds:", "google-c2p:", "vsock:")


@dataclass(frozen=True)
class Mismatch:
    """A TLS failure that the next attempt would meet again."""

    reason: str
    """Machine-readable: one of this module's constants, e.g. ``CLIENT_CERTIFICATE_REQUIRED``."""
    message: str
    """One sentence: what the server did, and which setting to change."""


@dataclass(frozen=True)
class _Address:
    family: int
    address: Any
    label: str
    server_name: str


def tls_mismatch(resolved: Resolved, timeout: float, server_name: str | None = None) -> Mismatch | None:
    """The TLS mismatch between ``resolved`` and the server(s) at its target, or None if there is none
    to be seen (or the target is not one the probe can reach: a proxy, an xDS name, ...).

    With several addresses, a mismatch is reported only when every address shows one: a fleet where
    some replica answers properly is worth retrying. ``server_name`` overrides the name the server's
    certificate must carry (gRPC's ``grpc.ssl_target_name_override``). Never raises.
    """
    deadline = time.monotonic() + timeout
    try:
        addresses = _addresses(resolved.target, server_name)
        context = _context(resolved) if addresses and resolved.tls else None
    except (OSError, ssl.SSLError, ValueError, UnicodeError):
        return None  # unresolvable, or files that Python's ssl cannot load: nothing proven
    found = []
    for address in addresses:
        mismatch = _probe(address, resolved, context, deadline)
        if mismatch is None:
            return None
        found.append(mismatch)
    return found[0] if found else None


def _probe(
    address: _Address, resolved: Resolved, context: ssl.SSLContext | None, deadline: float
) -> Mismatch | None:
    where = f"the server at {address.label}"
    if context is None:  # a plaintext connection
        return _speaks_tls(address, deadline)
    try:
        with (
            _connect(address, deadline) as raw,
            context.wrap_socket(raw, server_hostname=address.server_name) as tls,
        ):
            tls.sendall(_PREFACE)
            answer = tls.recv(16)
    except ssl.SSLCertVerificationError as error:
        roots = f"ca_file {resolved.ca_file}" if resolved.ca_file else "the default roots"
        return Mismatch(
            SERVER_CERTIFICATE_UNTRUSTED,
            f"{where} presented a certificate that {roots} does not accept for {address.server_name!r} "
            f"({error.verify_message}): give the CA that signed it (ca_file or ${ENV_CA_FILE})",
        )
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError, ConnectionResetError):
        if not _handshake_done(address, context, deadline):
            return None
        return _client_certificate_refused(where, resolved)
    except ssl.SSLError as error:  # an alert, or bytes that are not TLS
        if _speaks_plaintext_http2(address, deadline):
            return Mismatch(
                SERVER_SPEAKS_PLAINTEXT,
                f"{where} speaks plaintext, not TLS: drop ca_file / cert_file (and ${ENV_CA_FILE}, "
                f"${ENV_CERT_FILE}), or set tls=False",
            )
        return Mismatch(
            TLS_HANDSHAKE_FAILED, f"the TLS handshake with {where} failed ({error.reason or error})"
        )
    except OSError:  # refused, unreachable, timed out: perhaps restarting
        return None
    if answer:
        return None  # the server took this connection: the failure was something else
    return _client_certificate_refused(where, resolved)


def _client_certificate_refused(where: str, resolved: Resolved) -> Mismatch:
    if resolved.cert_file is None:
        return Mismatch(
            CLIENT_CERTIFICATE_REQUIRED,
            f"{where} closed the connection right after the TLS handshake: it requires a client "
            f"certificate (mutual TLS) and this connection has none: give cert_file and key_file "
            f"(or ${ENV_CERT_FILE} and ${ENV_KEY_FILE})",
        )
    return Mismatch(
        CLIENT_CERTIFICATE_REFUSED,
        f"{where} closed the connection right after the TLS handshake: it refused the client "
        f"certificate {resolved.cert_file} (not signed by a CA it trusts, expired, or not for client "
        "authentication)",
    )


def _handshake_done(address: _Address, context: ssl.SSLContext, deadline: float) -> bool:
    """Whether a bare handshake (no request) completes: the server closed after it, not during it."""
    try:
        with (
            _connect(address, deadline) as raw,
            context.wrap_socket(raw, server_hostname=address.server_name),
        ):
            return True
    except OSError:  # ssl.SSLError included
        return False


def _speaks_tls(address: _Address, deadline: float) -> Mismatch | None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only whether the server speaks TLS at all
    context.set_alpn_protocols(["h2"])
    try:
        with (
            _connect(address, deadline) as raw,
            context.wrap_socket(raw, server_hostname=address.server_name),
        ):
            pass
    except OSError:  # ssl.SSLError included: not a TLS server, or not reachable
        return None
    return Mismatch(
        SERVER_SPEAKS_TLS,
        f"the server at {address.label} speaks TLS and this connection is plaintext: give ca_file "
        f"(or ${ENV_CA_FILE}), or tls=True to trust the default roots",
    )


def _speaks_plaintext_http2(address: _Address, deadline: float) -> bool:
    try:
        with _connect(address, deadline) as raw:
            raw.sendall(_PREFACE)
            header = _read(raw, 9)
    except OSError:
        return False
    return len(header) == 9 and header[3] == _SETTINGS


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            break
        data += more
    return data


def _connect(address: _Address, deadline: float) -> socket.socket:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no time left to probe")
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.settimeout(left)
        sock.connect(address.address)
    except BaseException:
        sock.close()
        raise
    return sock


def _context(resolved: Resolved) -> ssl.SSLContext:
    """What gRPC's channel credentials check and present, as an ``ssl`` context."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if resolved.ca_file:
        context.load_verify_locations(cafile=resolved.ca_file)
    else:
        roots = _grpc_default_roots()
        if roots is not None:
            context.load_verify_locations(cafile=roots)
        else:
            context.load_default_certs()
    if resolved.cert_file:
        context.load_cert_chain(resolved.cert_file, resolved.key_file)
    context.set_alpn_protocols(["h2"])
    return context


def _grpc_default_roots() -> str | None:
    """The roots gRPC trusts when given none: $GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, else its bundled file."""
    path = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    if path:
        return path
    bundled = Path(grpc.__file__).parent / "_cython" / "_credentials" / "roots.pem"
    return str(bundled) if bundled.is_file() else None


def _addresses(target: str, server_name: str | None) -> list[_Address]:
    """The addresses gRPC would dial for ``target`` (its dns, ipv4, ipv6 and unix schemes)."""
    if target.startswith("unix-abstract:"):
        path = "\0" + target[len("unix-abstract:") :]
        return [_Address(socket.AF_UNIX, path, target, server_name or "localhost")]
    if target.startswith("unix:"):
        path = target[len("unix:") :]
        path = path[2:] if path.startswith("//") else path
        return [_Address(socket.AF_UNIX, path, target, server_name or "localhost")]
    if target.startswith(("ipv4:", "ipv6:")):
        hosts = [_host_port(part) for part in target.split(":", 1)[1].split(",") if part]
        return [a for host, port in hosts[:_MAX_ADDRESSES] for a in _resolve(host, port, server_name)[:1]]
    if target.startswith("dns:"):
        target = target[len("dns:") :]
        if target.startswith("//"):
            target = target[2:].split("/", 1)[1] if "/" in target[2:] else ""
    elif "://" in target or target.startswith(_OTHER_SCHEMES):
        return []
    host, port = _host_port(target)
    return _resolve(host, port, server_name)[:_MAX_ADDRESSES]


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 443
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 443  # a bare name, or a bare IPv6 address; gRPC's default port


def _resolve(host: str, port: int, server_name: str | None) -> list[_Address]:
    found: list[_Address] = []
    for family, _, _, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        label = f"[{address[0]}]:{port}" if family == socket.AF_INET6 else f"{address[0]}:{port}"
        if all(a.address != address for a in found):
            found.append(_Address(family, address, label, server_name or host))
    return found
