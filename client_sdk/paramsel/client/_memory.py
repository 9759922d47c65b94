"""The SDK's calls keep the memory they free for the next one, until the process is idle
(:data:`paramsel.wire.memory.KEPT`; ``$PARAMSEL_IDLE_RELEASE_SECONDS``, 60 s by default, 0 to leave
malloc alone)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from paramsel.client._errors import ParamselError, StatusCode
from paramsel.wire.memory import KEPT, MemorySettingError


@contextmanager
def kept_memory() -> Iterator[None]:
    """Around one call of the SDK (remote, or run in this process); a malformed setting is
    FAILED_PRECONDITION naming it, before anything is sent or computed."""
    with ExitStack() as stack:
        try:
            stack.enter_context(KEPT.call())
        except MemorySettingError as error:
            raise ParamselError(StatusCode.FAILED_PRECONDITION, str(error)) from None
        yield
