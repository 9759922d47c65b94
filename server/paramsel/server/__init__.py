"""The gRPC side of paramsel: a thin servicer over :mod:`paramsel.engine`, and the process around it."""

from paramsel.server.app import create_server
from paramsel.server.config import ServerConfig

__all__ = ["ServerConfig", "create_server"]
