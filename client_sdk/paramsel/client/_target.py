"""Where calls go when no server is given: by default the service runs in this process, on the caller's
tensors (``paramsel.server.local``, through ``_embedded.run_local``); ``target="embedded-grpc"`` (or
``PARAMSEL_TARGET=embedded-grpc``) starts a loopback gRPC server in this process instead, and calls go
through it."""

from __future__ import annotations

import atexit
import threading
from typing import Any

from paramsel.client._embedded import start_server

ENV_TARGET = "PARAMSEL_TARGET"
EMBEDDED_GRPC = "embedded-grpc"
"""The target that names a loopback gRPC server embedded in this process, started on first use."""

_lock = threading.Lock()
_embedded: Any = None


def embedded_target() -> str:
    """Address of this process's embedded server, started on first use and stopped at exit."""
    global _embedded
    with _lock:
        if _embedded is None:
            _embedded = start_server()  # the server (and torch) only when needed
            atexit.register(_embedded.stop, 0)
        return str(_embedded.target)
