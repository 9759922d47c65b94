"""The gRPC side of paramsel: a thin servicer over :mod:`paramsel.engine`, and the process around it.

:class:`ServerConfig` and its :class:`Limits` are imported with the package; ``create_server`` (and with
it the servicer and torch) on first use (PEP 562), so that ``paramsel health`` and ``paramsel --help``
start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from paramsel.server.config import Limits, ServerConfig

if TYPE_CHECKING:
    from paramsel.server.app import create_server

__all__ = ["Limits", "ServerConfig", "create_server"]

if not TYPE_CHECKING:  # type checkers see the import above; a misspelt name stays an error for them

    def __getattr__(name: str) -> object:
        if name != "create_server":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = importlib.import_module("paramsel.server.app").create_server
        globals()[name] = value  # later lookups find it without coming here
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
