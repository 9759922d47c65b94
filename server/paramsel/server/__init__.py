"""The gRPC side of paramsel: a thin servicer over :mod:`paramsel.engine`, and the process around it.

:class:`ServerConfig` and its :class:`Limits` are imported with the package; ``create_server`` (and with
it the servicer and torch) on first use (PEP 562), so that ``paramsel health`` and ``paramsel --help``
start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from paramsel.server.config import Limits, ServerConfig
from paramsel.wire.lazy import lazy_exports

if TYPE_CHECKING:
    from paramsel.server.app import create_server

__all__ = ["Limits", "ServerConfig", "create_server"]

_getattr, __dir__ = lazy_exports(__name__, globals(), {"create_server": "paramsel.server.app"})
if not TYPE_CHECKING:  # type checkers see the import above; a misspelt name stays an error for them
    __getattr__ = _getattr
