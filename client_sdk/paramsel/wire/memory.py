"""How a paramsel process's malloc treats the memory its calls free: kept while calls keep coming, given
back once they stop (glibc only; elsewhere nothing is changed).

**Why keep it.** A call's temporaries are large: hundreds of MB at 50 M parameters, on either side
of the wire (the server's received models and scores; the SDK's answer buffers, positions and
FL4Health's index arrays). glibc unmaps every block above its mmap threshold (at most 32 MiB) as soon
as it is freed, so the next call faults the same memory in again, page by page, each page zeroed by
the kernel. On a virtual machine whose host takes back the guest's free memory (the benchmark's: 2
cores, a Firecracker guest) that costs more than the work, and it grows faster than the model: a
300M-parameter push's blocks are all above the threshold, a 50M one's mostly below it. Measured on
that machine, the SDK's process of a remote 300M push spent 2.8 to 3.8 s in the kernel, over half of
it zeroing fresh pages, returning its memory, and 0.75 to 0.9 s keeping it (push 5.1 to 6.2 s against
2.7 to 3.2 s).

**Why give it back.** Kept for ever, heaps stay as large as their busiest moment. So once no call has
run for a while (:class:`IdleTrim`) the free memory goes back to the system (``malloc_trim(0)``: the top
of each heap and every free page inside them). Like tcmalloc's gradual release or jemalloc's decay,
memory is held a while after use: a minute covers the gaps between an FL round's calls.

``paramsel serve`` sets this up with glibc's tunables when its process starts
(:mod:`paramsel.server.memory`). The SDK's process is the caller's, already running: its calls, to a
server or run in process, go through :data:`KEPT` (:class:`KeptMemory`, ``mallopt`` at the first call,
``$PARAMSEL_IDLE_RELEASE_SECONDS`` of idleness before giving back). An operator's own choice stands:
with any ``glibc.malloc.*`` tunable in ``$GLIBC_TUNABLES`` or any ``MALLOC_*_`` variable set, nothing
is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("paramsel.memory")

TUNABLES_ENV = "GLIBC_TUNABLES"


class MemorySettingError(ValueError):
    """A setting of this module's is malformed: the SDK raises it as FAILED_PRECONDITION."""


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """$GLIBC_TUNABLES as name → value (``a=1:b=2``)."""
    pairs = (item.partition("=") for item in environ.get(TUNABLES_ENV, "").split(":") if item)
    return {name: value for name, _, value in pairs}


def operator_chose(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets malloc's behaviour (a glibc.malloc tunable, a MALLOC_*_)."""
    return any(name.startswith("glibc.malloc.") for name in _tunables(environ)) or any(
        name.startswith("MALLOC_") and name.endswith("_") and value for name, value in environ.items()
    )


@functools.cache
def glibc() -> Any | None:
    """glibc, with the argument types of the two functions used here; None for another C library.
    Loaded once: ``find_library`` runs ``ldconfig`` in a subprocess."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt, libc.malloc_trim  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return None
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    libc.malloc_trim.restype = ctypes.c_int
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def trim() -> bool:
    """Gives the heaps' free memory back to the system (``malloc_trim(0)``); False where there is no
    glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


class IdleTrim:
    """Calls ``release`` once no call has run for ``idle_seconds`` since the last one ended, once per
    idle spell. :meth:`tick` is called periodically with the server's counts."""

    def __init__(
        self,
        idle_seconds: float,
        release: Callable[[], object] = trim,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._idle_seconds = idle_seconds
        self._release = release
        self._clock = clock
        self._seen_finished = 0
        self._quiet_since: float | None = None

    def tick(self, active: int, finished: int) -> bool:
        """``active``: calls running now; ``finished``: calls ended since the server started. True
        when this tick gave the memory back."""
        now = self._clock()
        if active or finished != self._seen_finished:
            # Busy, or a call ended since the last tick: the idle spell starts (again) now.
            self._seen_finished = finished
            self._quiet_since = None if active else now
            return False
        if self._quiet_since is None or now - self._quiet_since < self._idle_seconds:
            return False
        self._quiet_since = None  # once per idle spell
        self._release()
        log.debug("idle for %.0f s: free memory given back", self._idle_seconds)
        return True


IDLE_RELEASE_ENV = "PARAMSEL_IDLE_RELEASE_SECONDS"
"""The SDK's process's ``--idle-release-seconds`` (see :class:`KeptMemory`); 0 leaves malloc alone."""
DEFAULT_IDLE_RELEASE_SECONDS = 60.0
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults, restored once idle
_DEFAULT_MMAP_MAX = 65536
_KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def idle_release_seconds(environ: Mapping[str, str]) -> float:
    """``$PARAMSEL_IDLE_RELEASE_SECONDS`` (a number >= 0; unset or empty: 60); otherwise
    :class:`MemorySettingError` (the SDK's FAILED_PRECONDITION) naming the variable."""
    raw = environ.get(IDLE_RELEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_RELEASE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise MemorySettingError(
            f"${IDLE_RELEASE_ENV} must be a number of seconds >= 0 (0: never keep memory), got {raw!r}"
        )
    return seconds


class KeptMemory:
    """The SDK's calls (to a server, or the service run in the caller's process) keep freed memory as
    ``paramsel serve`` does, for the same reason (see the module's notes): while its calls keep coming,
    every block comes from the heaps and stays there when freed (``mallopt``: no mmap, no trimming on
    ``free``), so the next call finds its memory faulted in; once no call has run for
    ``$PARAMSEL_IDLE_RELEASE_SECONDS`` (60 s) a thread gives the free memory back (``malloc_trim``),
    restores glibc's defaults and ends. On the benchmark machine (a VM whose host takes back the guest's
    free memory) a 50.1M-parameter push in process took 0.18-0.59 s returning it and 0.15-0.18 s keeping
    it, with 3 s between pushes; a remote 300M-parameter push 5.1-6.2 s and 2.7-3.2 s.

    The settings are the process's, so they apply to the caller's own allocations meanwhile (reused
    instead of unmapped; peak memory is unchanged). Nothing is changed with the variable at 0, where the
    environment already sets malloc's behaviour (:func:`operator_chose`), or without glibc. A forked
    child starts with glibc's defaults.
    """

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        libc: Callable[[], Any | None] = glibc,
        clock: Callable[[], float] = time.monotonic,
        poll_seconds: float = 1.0,
    ) -> None:
        self._environ = environ
        self._load_libc = libc
        self._clock = clock
        self._poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._active = 0
        self._finished = 0
        self._keeping = False
        self._libc: Any = None
        self._idle: IdleTrim | None = None
        self._watcher: threading.Thread | None = None

    @contextmanager
    def call(self) -> Iterator[None]:
        """Around one of the SDK's calls (to a server or run in process)."""
        with self._lock:
            self._active += 1
            try:
                self._keep()
            except BaseException:
                self._active -= 1
                raise
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._finished += 1

    @property
    def keeping(self) -> bool:
        """Whether freed memory is being kept now."""
        return self._keeping

    def _keep(self) -> None:  # under the lock
        if not self._keeping:
            seconds = idle_release_seconds(self._environ)
            libc = None if seconds == 0 or operator_chose(self._environ) else self._load_libc()
            if libc is None:
                return
            mallopt(libc, _M_MMAP_MAX, 0)
            mallopt(libc, _M_TRIM_THRESHOLD, _KEPT_TRIM_THRESHOLD)
            self._libc = libc
            self._keeping = True
            self._idle = IdleTrim(seconds, release=self._release, clock=self._clock)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="paramsel-idle-release", daemon=True)
            self._watcher.start()

    def tick(self) -> bool:
        """One look at the calls (the watcher's, every ``poll_seconds``); True when it gave the memory
        back."""
        with self._lock:
            return self._idle is not None and self._idle.tick(self._active, self._finished)

    def release(self) -> bool:
        """Gives the free memory back now and restores glibc's defaults (the next call keeps again);
        False when nothing was kept."""
        with self._lock:
            if not self._keeping:
                return False
            self._release()
            return True

    def _release(self) -> None:  # under the lock
        self._libc.malloc_trim(0)
        _restore_defaults(self._libc)
        self._keeping = False
        self._idle = None
        log.debug("the SDK's calls idle: free memory given back, malloc's defaults restored")

    def _watch(self) -> None:
        while True:
            time.sleep(self._poll_seconds)
            self.tick()
            with self._lock:
                if not self._keeping:
                    self._watcher = None
                    return

    def after_fork_in_child(self) -> None:
        """The child has no watcher: it goes back to glibc's defaults (a later call keeps again)."""
        libc = self._libc if self._keeping else None
        self._lock = threading.Lock()
        self._reset()
        if libc is not None:
            _restore_defaults(libc)


def _restore_defaults(libc: Any) -> None:
    mallopt(libc, _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    mallopt(libc, _M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def mallopt(libc: Any, param: int, value: int) -> bool:
    """``mallopt(param, value)``; False, with a warning, when glibc refuses it."""
    done = bool(libc.mallopt(param, value))
    if not done:
        log.warning("mallopt(%d, %d) was refused: freed memory may not be kept or given back", param, value)
    return done


KEPT = KeptMemory()
"""The process's: the SDK's calls run inside ``KEPT.call()`` (:func:`paramsel.client._memory.kept_memory`)."""
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=KEPT.after_fork_in_child)
