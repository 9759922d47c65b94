"""TLS mismatches fail at once, saying what is wrong; `paramsel health` probes TLS servers.

A refused client certificate, a missing one, a server certificate this side does not trust, and TLS on
one side only are all UNAVAILABLE to gRPC, like a server that is down. The SDK must not retry them (each
attempt would fail the same way) and its error must name the problem; a server that is really down is
still retried. `paramsel health`, the image's HEALTHCHECK, takes the SDK's TLS settings (flags and
environment) so that it can probe the README's TLS production command.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import Certs, make_certs, serve_process, start_server

from paramsel.client import Client, Connection, ParamselError, StatusCode
from paramsel.client._tls_probe import (
    CLIENT_CERTIFICATE_REFUSED,
    CLIENT_CERTIFICATE_REQUIRED,
    SERVER_CERTIFICATE_UNTRUSTED,
    SERVER_SPEAKS_PLAINTEXT,
    SERVER_SPEAKS_TLS,
)
from paramsel.server.app import RunningServer

_SCRIPT = shutil.which("paramsel", path=str(Path(sys.executable).parent))
_COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "paramsel.server.cli"]
_SDK_ENV = (
    "PARAMSEL_TARGET",
    "PARAMSEL_CA_FILE",
    "PARAMSEL_CERT_FILE",
    "PARAMSEL_KEY_FILE",
    "PARAMSEL_TOKEN",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A server CA and certificate (for "localhost" and 127.0.0.1), a client CA, a client certificate
    it signed, and one from a CA the server does not know, as PEM files."""
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(files: Certs) -> Iterator[RunningServer]:
    running = start_server(files.server_config())
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def mtls_server(files: Certs) -> Iterator[RunningServer]:
    running = start_server(files.server_config(mutual=True))
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(0)


@pytest.fixture(autouse=True)
def _no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in _SDK_ENV:
        monkeypatch.delenv(name, raising=False)


def _refusal(connection: Connection, caplog: pytest.LogCaptureFixture) -> ParamselError:
    """The error of one server_info call, asserting that it was not retried."""
    caplog.set_level(logging.INFO, logger="paramsel.client")
    with pytest.raises(ParamselError) as err:
        Client(connection=connection).server_info()
    retries = [r for r in caplog.records if r.name == "paramsel.client" and "retrying" in r.getMessage()]
    assert retries == [], "a TLS mismatch must not be retried"
    assert err.value.status == StatusCode.UNAVAILABLE
    return err.value


# --- the SDK -----------------------------------------------------------------------------------------


def test_a_good_tls_connection_is_served(files: Certs, tls_server: RunningServer) -> None:
    info = Client(connection=Connection(tls_server.target, ca_file=str(files.ca))).server_info()
    assert info.api_package == "paramsel.v1"


def test_a_client_certificate_the_server_refuses_fails_at_once(
    files: Certs, mtls_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    connection = Connection(
        mtls_server.target,
        ca_file=str(files.ca),
        cert_file=str(files.stranger_cert),
        key_file=str(files.stranger_key),
        max_attempts=5,
    )
    error = _refusal(connection, caplog)
    assert error.reason == CLIENT_CERTIFICATE_REFUSED
    assert "refused the client certificate" in error.message
    assert str(files.stranger_cert) in error.message


def test_no_client_certificate_for_a_mutual_tls_server_fails_at_once(
    files: Certs, mtls_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = _refusal(Connection(mtls_server.target, ca_file=str(files.ca), max_attempts=5), caplog)
    assert error.reason == CLIENT_CERTIFICATE_REQUIRED
    assert "requires a client certificate" in error.message


def test_the_right_client_certificate_is_served(files: Certs, mtls_server: RunningServer) -> None:
    connection = Connection(
        mtls_server.target,
        ca_file=str(files.ca),
        cert_file=str(files.client_cert),
        key_file=str(files.client_key),
    )
    assert Client(connection=connection).server_info().api_package == "paramsel.v1"


def test_plaintext_to_a_tls_server_fails_at_once(
    tls_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = _refusal(Connection(tls_server.target, max_attempts=5), caplog)
    assert error.reason == SERVER_SPEAKS_TLS
    assert "speaks TLS" in error.message


def test_tls_to_a_plaintext_server_fails_at_once(
    files: Certs, plain_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = _refusal(Connection(plain_server.target, ca_file=str(files.ca), max_attempts=5), caplog)
    assert error.reason == SERVER_SPEAKS_PLAINTEXT
    assert "speaks plaintext" in error.message


def test_an_untrusted_server_certificate_fails_at_once(
    files: Certs, tls_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    error = _refusal(Connection(tls_server.target, ca_file=str(files.other_ca), max_attempts=5), caplog)
    assert error.reason == SERVER_CERTIFICATE_UNTRUSTED
    assert str(files.other_ca) in error.message


def test_a_server_that_is_down_is_still_retried(caplog: pytest.LogCaptureFixture) -> None:
    stopped = start_server()
    target = stopped.target
    stopped.stop(0)
    caplog.set_level(logging.INFO, logger="paramsel.client")
    connection = Connection(target, max_attempts=3, initial_backoff_seconds=0.01, max_backoff_seconds=0.02)
    with pytest.raises(ParamselError) as err:
        Client(connection=connection).server_info()
    assert err.value.status == StatusCode.UNAVAILABLE
    assert err.value.reason not in {CLIENT_CERTIFICATE_REFUSED, SERVER_SPEAKS_TLS, SERVER_SPEAKS_PLAINTEXT}
    retries = [r for r in caplog.records if r.name == "paramsel.client" and "retrying" in r.getMessage()]
    assert len(retries) == 2  # three attempts, two waits between them


# --- `paramsel health` -------------------------------------------------------------------------------


def _health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in _SDK_ENV and k != "PARAMSEL_TLS_SERVER_NAME"}
    return subprocess.run(
        [*_COMMAND, "health", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture(scope="module")
def tls_process(files: Certs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`paramsel serve` as the README's TLS production command runs it, with a token required."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text("s3cret-token\n")
    tokens.chmod(0o600)
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    args = (
        "--production",
        "--tls-cert",
        str(files.server_cert),
        "--tls-key",
        str(files.server_key),
        "--token-file",
        str(tokens),
    )
    with serve_process(*args, log=log) as (_proc, target):
        yield target


@pytest.mark.slow  # a `paramsel serve` process (tls_process)
def test_health_reports_serving_for_a_tls_server_given_its_ca(files: Certs, tls_process: str) -> None:
    result = _health("--target", tls_process, "--ca-file", str(files.ca))
    assert (result.returncode, result.stdout.strip(), result.stderr) == (0, "SERVING", "")


@pytest.mark.slow  # a `paramsel serve` process (tls_process)
def test_health_takes_the_sdk_environment_as_the_image_healthcheck_does(
    files: Certs, tls_process: str
) -> None:
    """The Dockerfile's HEALTHCHECK has no TLS flags: the container's environment gives them. The probe
    dials 127.0.0.1; PARAMSEL_TLS_SERVER_NAME names the host the certificate was issued for."""
    port = tls_process.rsplit(":", 1)[1]
    env = {"PARAMSEL_CA_FILE": str(files.ca), "PARAMSEL_TLS_SERVER_NAME": "localhost"}
    result = _health("--target", f"127.0.0.1:{port}", env=env)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING"), result


@pytest.mark.slow  # a `paramsel serve` process (tls_process)
def test_health_says_when_the_server_speaks_tls_and_the_probe_does_not(tls_process: str) -> None:
    result = _health("--target", tls_process)
    assert result.returncode == 1
    assert result.stdout.strip() == "TLS_ERROR"
    assert "speaks TLS" in result.stderr


@pytest.mark.slow  # a `paramsel serve` process (tls_process)
def test_health_says_when_the_server_certificate_is_untrusted(files: Certs, tls_process: str) -> None:
    result = _health("--target", tls_process, "--ca-file", str(files.other_ca))
    assert result.returncode == 1
    assert result.stdout.strip() == "TLS_ERROR"
    assert str(files.other_ca) in result.stderr


def test_health_probes_a_mutual_tls_server_with_a_client_certificate(
    files: Certs, mtls_server: RunningServer
) -> None:
    flags = ("--target", mtls_server.target, "--ca-file", str(files.ca))
    refused = _health(*flags)
    assert (refused.returncode, refused.stdout.strip()) == (1, "TLS_ERROR"), refused
    assert "client certificate" in refused.stderr
    served = _health(*flags, "--cert-file", str(files.client_cert), "--key-file", str(files.client_key))
    assert (served.returncode, served.stdout.strip()) == (0, "SERVING"), served
