"""PEP 562 lazy exports, shared by the packages that defer their heavy imports (torch) to first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, namespace: dict[str, Any], modules: Mapping[str, str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """A module ``__getattr__`` that imports each name of ``modules`` (name -> defining module) on first
    use and keeps it in ``namespace`` (the package's globals), so that later lookups skip it; and the
    matching ``__dir__``, listing ``namespace`` and its ``__all__``."""

    def getattr_(name: str) -> object:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return getattr_, dir_
