"""The configurations the hardening fuzz and soak tests run in: ``plain`` (no TLS, no token) and
``token+tls`` (TLS with a server certificate from a throwaway CA, and a bearer token required), with the
client set up as an SDK user would: it trusts the CA and sends ``authorization: Bearer <token>``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from support import make_certs

from paramsel.client import Connection
from paramsel.server import ServerConfig

PLAIN = "plain"
SECURED = "token+tls"
CONFIGS = (PLAIN, SECURED)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Security:
    """How a server of one configuration is secured, and how a client of it connects."""

    name: str
    token: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @property
    def secured(self) -> bool:
        return self.name == SECURED

    @property
    def metadata(self) -> Metadata:
        """What a client of this configuration sends with every call."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def bad_auth(self) -> list[Metadata]:
        """Call metadata a secured server must refuse with UNAUTHENTICATED: no token, a wrong one, the
        right one badly presented (no scheme, another scheme, a suffix, twice)."""
        token = self.token or "no-token"
        return [
            (),
            (("authorization", "Bearer not-the-token"),),
            (("authorization", f"Bearer {token}x"),),
            (("authorization", token),),
            (("authorization", f"Basic {token}"),),
            (("authorization", f"Bearer {token}"), ("authorization", f"Bearer {token}")),
            (("x-api-key", token),),
        ]

    def server_config(self, **settings: object) -> ServerConfig:
        """A loopback server on a free port with ``settings``, secured as this configuration says."""
        config = ServerConfig(host="127.0.0.1", port=0, **settings)  # type: ignore[arg-type]
        if not self.secured:
            return config
        assert self.token is not None
        assert self.cert_file is not None
        assert self.key_file is not None
        return replace(
            config, tls_cert_file=str(self.cert_file), tls_key_file=str(self.key_file), tokens=(self.token,)
        )

    def channel(self, target: str) -> grpc.Channel:
        """A channel to ``target`` as the SDK opens one: TLS trusting only the test CA when secured (no
        name override: the certificate names 127.0.0.1, the address the server is reached at)."""
        if self.ca_file is None:
            return grpc.insecure_channel(target)
        credentials = grpc.ssl_channel_credentials(root_certificates=self.ca_file.read_bytes())
        return grpc.secure_channel(target, credentials)

    def connection(self, target: str, *, token: bool = True) -> Connection:
        """The SDK's settings for this configuration (with or without its token)."""
        return Connection(
            target,
            ca_file=str(self.ca_file) if self.ca_file else None,
            token=self.token if token else None,
            max_attempts=1,
        )


def security(name: str, root: Path) -> Security:
    """The configuration ``name``; a secured one gets a fresh CA, certificate and token under ``root``."""
    if name == PLAIN:
        return Security(PLAIN)
    assert name == SECURED, name
    certs = make_certs(root)
    return Security(SECURED, secrets.token_urlsafe(24), certs.ca, certs.server_cert, certs.server_key)
