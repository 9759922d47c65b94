"""TLS and mutual TLS with throwaway certificates (trustme, through support.make_certs), over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import Certs, make_certs, start_server

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import RunningServer
from paramsel.server.security import ConfigError
from paramsel.v1 import service_pb2_grpc

HOST = "localhost"  # the name the server certificate is issued for
OVERRIDE = (("grpc.ssl_target_name_override", HOST),)


def secure_channel(certs: Certs, target: str, client: tuple[Path, Path] | None = None) -> grpc.Channel:
    """A channel that trusts ``certs.ca`` and names the server ``localhost``; with a client certificate
    and key when ``client`` gives them."""
    chain, key = (client[0].read_bytes(), client[1].read_bytes()) if client is not None else (None, None)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(), private_key=key, certificate_chain=chain
    )
    return grpc.secure_channel(target, credentials, options=OVERRIDE)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(pki: Certs) -> Iterator[RunningServer]:
    running = start_server(pki.server_config(mutual=False))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def mtls_server(pki: Certs) -> Iterator[RunningServer]:
    running = start_server(pki.server_config(mutual=True))
    yield running
    running.stop(0)


def check(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(), timeout=30).status)


def refused(channel: grpc.Channel) -> grpc.StatusCode:
    with channel, pytest.raises(grpc.RpcError) as err:
        check(channel)
    return err.value.code()


def test_a_tls_client_is_served(pki: Certs, tls_server: RunningServer) -> None:
    with secure_channel(pki, tls_server.target) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING
        # And a paramsel call goes through the same encrypted channel.
        stub = service_pb2_grpc.ParameterSelectionServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Select(iter(()), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # an empty stream: reached the servicer


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_server: RunningServer) -> None:
    assert refused(grpc.insecure_channel(tls_server.target)) == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_server_is_refused(pki: Certs, tls_server: RunningServer) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.other_ca.read_bytes())
    channel = grpc.secure_channel(tls_server.target, credentials, options=OVERRIDE)
    assert refused(channel) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_client_without_a_certificate(pki: Certs, mtls_server: RunningServer) -> None:
    assert refused(secure_channel(pki, mtls_server.target)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(pki: Certs, mtls_server: RunningServer) -> None:
    stranger = (pki.stranger_cert, pki.stranger_key)
    assert refused(secure_channel(pki, mtls_server.target, stranger)) == grpc.StatusCode.UNAVAILABLE


def test_mtls_serves_a_client_certificate_from_the_client_ca(pki: Certs, mtls_server: RunningServer) -> None:
    with secure_channel(pki, mtls_server.target, (pki.client_cert, pki.client_key)) as channel:
        assert check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_a_certificate_without_a_key_is_a_clear_error(pki: Certs) -> None:
    with pytest.raises(ValueError, match="both a certificate file and its key"):
        ServerConfig(tls_cert_file=str(pki.server_cert))
    with pytest.raises(ValueError, match="client CA"):
        ServerConfig(tls_client_ca_file=str(pki.client_ca))


def test_unreadable_or_wrong_files_are_clear_errors(pki: Certs, tmp_path: Path) -> None:
    missing = ServerConfig(port=0, tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=str(pki.server_key))
    with pytest.raises(ConfigError, match=r"TLS certificate file '.*nope.pem' cannot be read"):
        create_server(missing)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    wrong = ServerConfig(port=0, tls_cert_file=str(pki.server_cert), tls_key_file=str(garbage))
    with pytest.raises(ConfigError, match="is not a PEM file"):
        create_server(wrong)
