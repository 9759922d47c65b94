"""The server of last resort: one embedded in this process when no target is given or set."""

from __future__ import annotations

import atexit
import threading
from typing import Any

from paramsel.client._embedded import start_server

ENV_TARGET = "PARAMSEL_TARGET"

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
