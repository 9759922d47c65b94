"""Which server to call: ``target=``, else ``PARAMSEL_TARGET``, else an embedded in-process server."""

from __future__ import annotations

import atexit
import os
import threading
from typing import Any

import grpc

ENV_TARGET = "PARAMSEL_TARGET"

_lock = threading.Lock()
_embedded: Any = None
_channels: dict[str, grpc.Channel] = {}


def embedded_target() -> str:
    """Address of this process's embedded server, started on first use and stopped at exit."""
    global _embedded
    with _lock:
        if _embedded is None:
            from paramsel.server import ServerConfig, create_server  # the server only when needed

            _embedded = create_server(ServerConfig(host="127.0.0.1", port=0))
            atexit.register(_embedded.stop, 0)
        return str(_embedded.target)


def resolve_target(target: str | None) -> str:
    """The address to call."""
    if target:
        return target
    return os.environ.get(ENV_TARGET) or embedded_target()


def channel_for(target: str) -> grpc.Channel:
    """One shared channel per target: channels are expensive and safe to share across threads."""
    with _lock:
        channel = _channels.get(target)
        if channel is None:
            channel = _channels[target] = grpc.insecure_channel(target)
        return channel
