"""Connection options of the SDK: validation, environment fallbacks, TLS, bearer tokens, and the
refusal to send a token in plaintext off this machine. Real gRPC servers on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import grpc
import pytest
import torch
from support import Knobs, injecting_server, make_certs, start_server

import paramsel.client._connection as connection_module
from paramsel.client import (
    Client,
    Connection,
    ParamselError,
    ScoreFunction,
    SparseCooParameterExchanger,
    StatusCode,
    TopK,
)
from paramsel.client import largest_final_magnitude_scores as largest
from paramsel.client._connection import is_loopback


class Backoff(TypedDict):
    """Connection's backoff settings, passed as ``**FAST``."""

    initial_backoff_seconds: float
    max_backoff_seconds: float


FAST: Backoff = {"initial_backoff_seconds": 0.01, "max_backoff_seconds": 0.05}
CRITERION = TopK(0.5, ScoreFunction.LARGEST_FINAL_MAGNITUDE)
MODEL = {"w": torch.tensor([1.0, -5.0, 3.0, 0.5])}


class ClientTls(TypedDict):
    """Connection's mutual TLS files, passed as ``**tls``."""

    ca_file: str
    cert_file: str
    key_file: str


def push_values(client: Client) -> list[float]:
    return [v for _, t in client.push(CRITERION, MODEL).arrays[:1] for v in t.tolist()]


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:1", True),
        ("localhost:50051", True),
        ("LOCALHOST", True),
        ("[::1]:50051", True),
        ("::1", True),
        ("ipv4:127.0.0.1:5", True),
        ("dns:///localhost:50051", True),
        ("unix:/tmp/paramsel.sock", True),
        ("example.invalid:50051", False),
        ("10.0.0.1:50051", False),
        ("[2001:db8::1]:50051", False),
        ("dns:///paramsel.example.com:443", False),
        ("localhost.example.com:1", False),
    ],
)
def test_loopback_classification(target: str, loopback: bool) -> None:
    assert is_loopback(target) is loopback


def test_invalid_options_are_refused_at_construction() -> None:
    for bad in (
        {"timeout_seconds": 0},
        {"max_attempts": 0},
        {"initial_backoff_seconds": 2.0, "max_backoff_seconds": 1.0},
        {"token": "a", "token_file": "f"},
        {"token": "  "},
        {"cert_file": "c.pem"},
        {"tls": False, "ca_file": "ca.pem"},
    ):
        with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
            Connection("localhost:1", **bad)


def test_token_in_plaintext_to_a_remote_host_is_refused_before_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_channel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a channel was opened")

    monkeypatch.setattr(grpc, "insecure_channel", no_channel)
    monkeypatch.setattr(grpc, "secure_channel", no_channel)
    for connection in (
        Connection("example.invalid:50051", token="secret"),
        Connection("10.1.2.3:50051", token="secret"),
    ):
        with pytest.raises(ParamselError) as refused:
            Client(connection=connection).push(CRITERION, MODEL)
        assert refused.value.status == StatusCode.FAILED_PRECONDITION
        assert "plaintext" in refused.value.message
    # Through the drop-in classes, and with the token from the environment, the same.
    monkeypatch.setenv("PARAMSEL_TOKEN", "from-env")
    exchanger = SparseCooParameterExchanger(0.5, largest, target="example.invalid:50051")
    with pytest.raises(ParamselError) as refused:
        exchanger.push_parameters(torch.nn.Linear(2, 2))
    assert refused.value.status == StatusCode.FAILED_PRECONDITION


def test_allow_insecure_token_lets_the_call_go_out(monkeypatch: pytest.MonkeyPatch) -> None:
    connection = Connection(
        "example.invalid:50051", token="secret", allow_insecure_token=True, max_attempts=2, **FAST
    )
    with pytest.raises(ParamselError) as failed:
        Client(connection=connection).push(CRITERION, MODEL)
    assert failed.value.status == StatusCode.UNAVAILABLE  # it tried: the name does not resolve
    assert "2 attempt" in failed.value.message


def test_token_is_sent_and_checked(tmp_path: Path) -> None:
    knobs = Knobs()
    with injecting_server(knobs, tokens=("s3cret",)) as target:
        assert push_values(Client(connection=Connection(target, token="s3cret"))) == [-5.0, 3.0]
        token_file = tmp_path / "token"
        token_file.write_text("s3cret\n")
        assert push_values(Client(connection=Connection(target, token_file=str(token_file)))) == [-5.0, 3.0]
        with pytest.raises(ParamselError) as refused:
            push_values(Client(connection=Connection(target, token="wrong", **FAST)))
        assert refused.value.status == StatusCode.UNAUTHENTICATED
        with pytest.raises(ParamselError) as refused:
            push_values(Client(target=target))
        assert refused.value.status == StatusCode.UNAUTHENTICATED
    # Each refused call was tried once: UNAUTHENTICATED is not retried.
    assert knobs.authorizations == ["Bearer s3cret", "Bearer s3cret", "Bearer wrong", None]


def test_environment_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    knobs = Knobs()
    with injecting_server(knobs, tokens=("env-token",)) as target:
        monkeypatch.setenv("PARAMSEL_TARGET", target)
        monkeypatch.setenv("PARAMSEL_TOKEN", "env-token")
        assert push_values(Client()) == [-5.0, 3.0]
        monkeypatch.delenv("PARAMSEL_TOKEN")
        (tmp_path / "t").write_text("env-token")
        monkeypatch.setenv("PARAMSEL_TOKEN_FILE", str(tmp_path / "t"))
        assert push_values(Client()) == [-5.0, 3.0]
        monkeypatch.setenv("PARAMSEL_TOKEN_FILE", str(tmp_path / "missing"))
        with pytest.raises(ParamselError) as unreadable:
            push_values(Client())
        assert unreadable.value.status == StatusCode.FAILED_PRECONDITION
    assert knobs.authorizations == ["Bearer env-token", "Bearer env-token"]


def test_tls_with_the_right_ca_and_not_with_another(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    knobs = Knobs()
    with injecting_server(knobs, certs.server_config(tokens=("tls-token",))) as target:
        port = target.rsplit(":", 1)[1]
        for host in ("localhost", "127.0.0.1"):
            good = Connection(f"{host}:{port}", ca_file=str(certs.ca), token="tls-token")
            assert push_values(Client(connection=good)) == [-5.0, 3.0]
        wrong = Connection(f"localhost:{port}", ca_file=str(certs.other_ca), token="tls-token", **FAST)
        with pytest.raises(ParamselError) as failed:
            push_values(Client(connection=wrong))
        assert failed.value.status == StatusCode.UNAVAILABLE
        # An untrusted certificate fails every attempt alike: the first failure is final, and says why.
        # grpc-core words it "Ssl handshake failed" in grpcio 1.62, "Tls handshake failed" later.
        assert "handshake failed" in failed.value.message.lower()
        assert "CERTIFICATE_VERIFY_FAILED" in failed.value.message
        assert "gave up after" not in failed.value.message
        plaintext = Connection(f"localhost:{port}", token="tls-token", max_attempts=1)
        with pytest.raises(ParamselError):
            push_values(Client(connection=plaintext))
    assert knobs.authorizations == ["Bearer tls-token"] * 2  # the failed handshakes sent nothing


def test_mutual_tls_and_the_ca_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    with injecting_server(Knobs(), certs.server_config(mutual=True)) as target:
        monkeypatch.setenv("PARAMSEL_CA_FILE", str(certs.ca))
        mutual = Connection(target, cert_file=str(certs.client_cert), key_file=str(certs.client_key))
        assert push_values(Client(connection=mutual)) == [-5.0, 3.0]
        with pytest.raises(ParamselError) as failed:
            push_values(Client(connection=Connection(target, max_attempts=1)))
        assert failed.value.status == StatusCode.UNAVAILABLE


def test_target_shortcut_overrides_the_connection_address() -> None:
    connection = Connection("example.invalid:1", timeout_seconds=7.0)
    client = Client(target="127.0.0.1:2", connection=connection)
    assert client.connection == Connection("127.0.0.1:2", timeout_seconds=7.0)
    assert connection_module.with_target(None, None) == Connection()
    assert "s3cret" not in repr(Connection("localhost:1", token="s3cret"))


def test_against_the_servers_own_tls_and_tokens(tmp_path: Path) -> None:
    """End to end with ``create_server``'s mutual TLS and bearer tokens."""
    certs = make_certs(tmp_path)
    running = start_server(certs.server_config(mutual=True, tokens=("server-token",)))
    try:
        tls: ClientTls = {
            "ca_file": str(certs.ca),
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
        }
        good = Connection(running.target, token="server-token", **tls)
        exchanger = SparseCooParameterExchanger(0.5, largest, connection=good)
        values, _ = exchanger.select_parameters(torch.nn.Linear(4, 4))
        assert sum(len(v) for v in values) == 10  # half of the 20 entries
        with pytest.raises(ParamselError) as refused:
            push_values(Client(connection=Connection(running.target, token="wrong", **tls)))
        assert refused.value.status in (StatusCode.UNAUTHENTICATED, StatusCode.PERMISSION_DENIED)
    finally:
        running.stop(0)
