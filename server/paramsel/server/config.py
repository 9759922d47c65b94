"""Server settings, with the defaults ``paramsel serve`` uses."""

from __future__ import annotations

from dataclasses import dataclass

from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES


@dataclass(frozen=True)
class ServerConfig:
    """How a paramsel server listens and what it accepts."""

    host: str = "127.0.0.1"
    """Address to bind; ``0.0.0.0`` or ``[::]`` to accept other machines."""

    port: int = 50051
    """TCP port; 0 picks a free one (``create_server`` returns it)."""

    chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES
    """Default tensor bytes per response message; a request may ask for less or more (up to 3 MiB)."""

    max_call_bytes: int = 8 << 30
    """Largest total of tensor bytes one call may declare; more is refused with RESOURCE_EXHAUSTED."""

    max_workers: int = 8
    """Threads serving calls; calls beyond this wait in gRPC's queue."""

    grace_seconds: float = 10.0
    """How long ``stop`` lets in-flight calls finish."""

    model_cache_bytes: int = 2 << 30
    """Initial models kept by digest for reuse (least recently used out first); 0 keeps none."""

    def __post_init__(self) -> None:
        if not 0 < self.chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise ValueError(f"chunk_size_bytes must be in (0, {MAX_CHUNK_SIZE_BYTES}]")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_call_bytes <= 0 or self.max_workers <= 0 or self.model_cache_bytes < 0:
            raise ValueError("max_call_bytes and max_workers must be positive, model_cache_bytes >= 0")
