"""TLS and mutual TLS with throwaway certificates (trustme), over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import RunningServer
from paramsel.server.security import ConfigError
from paramsel.v1 import service_pb2_grpc

HOST = "localhost"  # the name the server certificate is issued for
OVERRIDE = (("grpc.ssl_target_name_override", HOST),)


class Pki:
    """A server certificate and key, its CA, and a client CA with one client certificate, as PEM files."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        self.client_ca = trustme.CA()
        server = self.ca.issue_cert(HOST, "127.0.0.1")
        self.cert = root / "server.pem"
        self.key = root / "server.key"
        for blob in server.cert_chain_pems:
            blob.write_to_path(str(self.cert), append=True)
        server.private_key_pem.write_to_path(str(self.key))
        self.client_ca_file = root / "client-ca.pem"
        self.client_ca.cert_pem.write_to_path(str(self.client_ca_file))

    def server_config(self, *, mutual: bool) -> ServerConfig:
        return ServerConfig(
            host="127.0.0.1",
            port=0,
            tls_cert_file=str(self.cert),
            tls_key_file=str(self.key),
            tls_client_ca_file=str(self.client_ca_file) if mutual else None,
        )

    def channel(self, target: str, client_ca: trustme.CA | None = None) -> grpc.Channel:
        chain = key = None
        if client_ca is not None:
            client = client_ca.issue_cert("client.example")
            chain = b"".join(blob.bytes() for blob in client.cert_chain_pems)
            key = client.private_key_pem.bytes()
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.cert_pem.bytes(), private_key=key, certificate_chain=chain
        )
        return grpc.secure_channel(target, credentials, options=OVERRIDE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[RunningServer]:
    running = create_server(pki.server_config(mutual=False))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[RunningServer]:
    running = create_server(pki.server_config(mutual=True))
    yield running
    running.stop(0)


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as err:
        check(channel)
    return err.value.code()  # type: ignore[no-any-return]


def test_a_tls_client_is_served(pki: Pki, tls_server: RunningServer) -> None:
    with pki.channel(tls_server.target) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        # And a paramsel call goes through the same encrypted channel.
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Select(iter(()), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # an empty stream: reached the servicer


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server: RunningServer) -> None:
    assert refused(grpc.insecure_channel(tls_server.target)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_is_refused(tls_server: RunningServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=trustme.CA().cert_pem.bytes())
    channel = grpc.secure_channel(tls_server.target, credentials, options=OVERRIDE)
    assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(pki: Pki, mtls_server: RunningServer) -> None:
    assert refused(pki.channel(mtls_server.target)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(pki: Pki, mtls_server: RunningServer) -> None:
    assert refused(pki.channel(mtls_server.target, client_ca=trustme.CA())) == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_certificate_from_the_client_ca(pki: Pki, mtls_server: RunningServer) -> None:
    with pki.channel(mtls_server.target, client_ca=pki.client_ca) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_certificate_without_a_key_is_a_clear_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="both a certificate file and its key"):
        ServerConfig(tls_cert_file=str(pki.cert))
    with pytest.raises(ValueError, match="client CA"):
        ServerConfig(tls_client_ca_file=str(pki.client_ca_file))


def test_unreadable_or_wrong_files_are_clear_errors(pki: Pki, tmp_path: Path) -> None:
    missing = ServerConfig(port=0, tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=str(pki.key))
    with pytest.raises(ConfigError, match=r"TLS certificate file '.*nope.pem' cannot be read"):
        create_server(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    wrong = ServerConfig(port=0, tls_cert_file=str(pki.cert), tls_key_file=str(garbage))
    with pytest.raises(ConfigError, match="is not a PEM file"):
        create_server(wrong)
