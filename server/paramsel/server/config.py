"""Server settings, with the defaults ``paramsel serve`` uses."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from paramsel.wire.sizes import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES


@dataclass(frozen=True)
class Limits:
    """What one server accepts at a time: ``ServerConfig.limits``, and what admission enforces
    (:class:`paramsel.server.limits.CallLimits`). Each is a ``paramsel serve`` flag of the same name."""

    max_concurrent_calls: int = 16
    """paramsel.v1 calls running at once; one more is refused at once with RESOURCE_EXHAUSTED (not queued).
    Must be below ``ServerConfig.max_workers``, so that refusals always find a thread."""

    max_inflight_bytes: int = 12 << 30
    """The bytes ``max_call_bytes`` counts, of all running calls together; a call that would pass it is
    refused with RESOURCE_EXHAUSTED."""

    max_call_bytes: int = 8 << 30
    """Bytes one call may make the server hold - the tensor bytes it declares and what is computed from
    them (README "Sizing a machine"); more is refused with RESOURCE_EXHAUSTED before it is allocated."""

    max_tensors_per_call: int = 100_000
    """Tensors (layout entries and manifest entries) one call may declare."""

    max_elements_per_tensor: int = 2**31
    """Elements of one declared tensor (for a sparse one: of its shape, and its nnz)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"{f.name} must be positive, got {value!r}")


_LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(Limits))


@dataclass(frozen=True)
class ServerConfig:
    """How a paramsel server listens and what it accepts."""

    host: str = "127.0.0.1"
    """Address to bind; ``0.0.0.0`` or ``[::]`` to accept other machines."""

    port: int = 50051
    """TCP port; 0 picks a free one (``create_server`` returns it)."""

    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    """Default tensor bytes per response message; a request may ask for less or more (up to 3 MiB)."""

    max_workers: int = 20
    """Threads serving calls; calls beyond this wait in gRPC's queue. Must be above
    ``limits.max_concurrent_calls``: the spare threads answer refusals, GetServerInfo and reflection
    while every call slot is taken (health checks have threads of their own)."""

    grace_seconds: float = 10.0
    """How long ``stop`` lets in-flight calls finish."""

    idle_release_seconds: float = 60.0
    """``serve`` gives its free memory back to the system once no call has run for this long; until
    then the next call reuses it, already faulted in (:mod:`paramsel.server.memory`). 0: as soon as
    the server is idle (checked every second)."""

    progress_timeout_seconds: float = 30.0
    """Longest a call may wait on its client - for the next request frame, or for the client to take the
    next response frame - before the server ends it with DEADLINE_EXCEEDED, freeing its slot and the
    bytes it reserved. The server's own computing never counts."""

    max_calls_per_peer: int | None = None
    """Calls one client address may have running at once (health checks aside); more are refused with
    RESOURCE_EXHAUSTED. None: no cap per address (behind a proxy or NAT, all clients share one)."""

    model_cache_bytes: int = 2 << 30
    """Initial models kept by digest for reuse (least recently used out first); 0 keeps none."""

    limits: Limits = field(default_factory=Limits)
    """Admission limits: calls at once, bytes in flight, bytes, tensors and elements per call."""

    tls_cert_file: str | None = None
    """PEM certificate chain; with ``tls_key_file`` the server speaks TLS only."""

    tls_key_file: str | None = None
    """PEM private key of ``tls_cert_file``."""

    tls_client_ca_file: str | None = None
    """PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."""

    tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens accepted on paramsel.v1 calls; empty: no token needed. Never shown in a repr."""

    reflection: bool = True
    """Serve gRPC reflection (``paramsel serve --production`` turns it off unless ``--reflection``)."""

    metrics_port: int | None = None
    """Port of a Prometheus /metrics HTTP endpoint (0 picks one); None: no endpoint."""

    def __post_init__(self) -> None:
        if not 0 < self.chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise ValueError(f"chunk_size_bytes must be in (0, {MAX_CHUNK_SIZE_BYTES}]")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not isinstance(self.limits, Limits):
            raise TypeError(f"limits must be a Limits, got {type(self.limits).__name__}")
        if self.max_workers <= 0 or self.model_cache_bytes < 0:
            raise ValueError("max_workers must be positive, model_cache_bytes >= 0")
        if self.limits.max_concurrent_calls >= self.max_workers:
            raise ValueError(
                f"max_concurrent_calls ({self.limits.max_concurrent_calls}) must be below max_workers "
                f"({self.max_workers}): the spare threads answer refusals, GetServerInfo and reflection "
                "while every call slot is taken; raise --max-workers or lower --max-concurrent-calls"
            )
        if self.max_calls_per_peer is not None and self.max_calls_per_peer <= 0:
            raise ValueError(f"max_calls_per_peer must be positive (or None), got {self.max_calls_per_peer}")
        if not (math.isfinite(self.progress_timeout_seconds) and self.progress_timeout_seconds > 0):
            raise ValueError(
                f"progress_timeout_seconds must be positive, got {self.progress_timeout_seconds}"
            )
        if not (math.isfinite(self.grace_seconds) and self.grace_seconds >= 0):
            raise ValueError(f"grace_seconds must be a number >= 0, got {self.grace_seconds}")
        if not (math.isfinite(self.idle_release_seconds) and self.idle_release_seconds >= 0):
            raise ValueError(f"idle_release_seconds must be a number >= 0, got {self.idle_release_seconds}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both a certificate file and its key file (--tls-cert and --tls-key)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("a client CA (--tls-client-ca) needs a server certificate and key too")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")

    # Read-only views of ``limits``, for code written before it was nested; they are not settings.
    @property
    def max_concurrent_calls(self) -> int:
        return self.limits.max_concurrent_calls

    @property
    def max_inflight_bytes(self) -> int:
        return self.limits.max_inflight_bytes

    @property
    def max_call_bytes(self) -> int:
        return self.limits.max_call_bytes

    @property
    def max_tensors_per_call(self) -> int:
        return self.limits.max_tensors_per_call

    @property
    def max_elements_per_tensor(self) -> int:
        return self.limits.max_elements_per_tensor


_dataclass_init = ServerConfig.__init__


def _init(self: ServerConfig, *args: Any, **kwargs: Any) -> None:
    """The dataclass's ``__init__``, also taking the limits as flat keywords (``max_call_bytes=...``), as
    ServerConfig did before ``limits`` (deprecated: pass ``limits=Limits(...)``)."""
    flat = {name: kwargs.pop(name) for name in _LIMIT_NAMES if name in kwargs}
    if flat:
        warnings.warn(
            f"ServerConfig({', '.join(f'{n}=' for n in flat)}...) is deprecated: "
            "pass limits=Limits(...) (paramsel.server.Limits)",
            DeprecationWarning,
            stacklevel=2,
        )
        base = kwargs.get("limits", Limits())
        if not isinstance(base, Limits):
            raise TypeError(f"limits must be a Limits, got {type(base).__name__}")
        kwargs["limits"] = dataclasses.replace(base, **flat)
    _dataclass_init(self, *args, **kwargs)


_init.__wrapped__ = _dataclass_init  # type: ignore[attr-defined]  # inspect.signature shows the fields
ServerConfig.__init__ = _init  # type: ignore[method-assign]
