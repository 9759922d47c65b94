"""How ``paramsel serve``'s process allocates: memory stays with the process while calls keep coming,
goes back to the system once it is idle, and is faulted in as transparent huge pages.

**Why keep it.** A 50 M-parameter push makes the server hold about 1.5 GB for a moment (the received
models, the scores, the selection's scratch). Returned to the system at the end of each call (glibc
unmaps every large block as it is freed), it must be faulted in again by the next call; on a virtual
machine whose host takes back the guest's free memory (as on the machines the benchmark ran on: 2 cores,
a Firecracker guest) that costs more than the work: a cached push of 50.1M parameters took 0.66 s
returning it, 0.44 s keeping it; a first push (both models uploaded) 1.64 s and 0.88 s.

**Why give it back.** Kept for ever, heaps stay as large as their busiest moment: idle RSS went from
236 MB to 1,062 MB after 12 sequential pushes of 50 M parameters, and to 3,643 MB after 4 rounds of 4
concurrent ones. So the server gives back what its heaps hold free (``malloc_trim(0)``: the top of
each heap and every free page inside them) once no call has run for ``--idle-release-seconds``
(``ServerConfig.idle_release_seconds``, 60 s by default: :class:`IdleTrim`, run by
:func:`paramsel.server.app.serve`). Like tcmalloc's gradual release or jemalloc's decay, memory is
held a while after use: a minute covers the gaps between an FL round's pushes, the memory is what the
busiest moment needed (and the limits are sized for), and an idle server still shrinks back.

**The settings** (glibc's tunables, :data:`SERVER_TUNABLES`): ``glibc.malloc.mmap_max=0`` serves every
block from the heaps, so freeing one keeps its pages; ``glibc.malloc.trim_threshold`` (1 TiB) stops
``free`` from trimming on its own; ``glibc.malloc.hugetlb=1`` (glibc 2.35+) asks for transparent huge
pages where the heaps grow, 2 MiB a fault instead of 4 KiB (effective where the kernel's THP mode is
``madvise`` or ``always``); ``glibc.malloc.arena_max=1`` makes every thread allocate from the one
main heap: in the arena of another thread (the server's calls run on gRPC's worker threads) a block
larger than such an arena's 64 MiB heaps is mmapped whatever ``mmap_max`` says, and unmapped when
freed, so a 300M-parameter push faulted in its 300 MB tensors afresh each time (about 10,000 faults
and 1.5 to 2 s a push, against none at 50M, whose tensors fit those heaps).

Tunables are read when a process starts, so ``paramsel serve`` re-executes itself once with them added to ``$GLIBC_TUNABLES`` (:func:`allocator_environment`); the image sets them
in its environment instead.

An operator's own choice stands: with any ``glibc.malloc.*`` tunable in ``$GLIBC_TUNABLES`` or any
``MALLOC_*_`` variable (``MALLOC_MMAP_THRESHOLD_``, ...) set, nothing is added, and where no tunable
can be set (a glibc before 2.35) the mmap threshold is fixed by ``mallopt`` instead
(:func:`return_freed_memory`: large blocks unmapped when freed, small ones in heaps the idle trim gives
back).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("paramsel.server")

ENV = "MALLOC_MMAP_THRESHOLD_"
TUNABLES_ENV = "GLIBC_TUNABLES"
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
"""The ``mallopt`` fallback's threshold: the 1 MiB chunks of a stream stay in the heaps."""
SERVER_TUNABLES = (
    ("glibc.malloc.hugetlb", "1"),
    ("glibc.malloc.mmap_max", "0"),
    ("glibc.malloc.trim_threshold", str(1 << 40)),
    ("glibc.malloc.arena_max", "1"),
)
_TUNABLES_SINCE = (2, 35)  # the first glibc with glibc.malloc.hugetlb
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """$GLIBC_TUNABLES as name → value (``a=1:b=2``)."""
    pairs = (item.partition("=") for item in environ.get(TUNABLES_ENV, "").split(":") if item)
    return {name: value for name, _, value in pairs}


def operator_chose(environ: Mapping[str, str]) -> bool:
    """Whether the environment already sets malloc's behaviour (a glibc.malloc tunable, a MALLOC_*_)."""
    return any(name.startswith("glibc.malloc.") for name in _tunables(environ)) or any(
        name.startswith("MALLOC_") and name.endswith("_") and value for name, value in environ.items()
    )


def allocator_environment(
    environ: Mapping[str, str], libc: tuple[str, str] | None = None
) -> dict[str, str] | None:
    """The environment for ``paramsel serve`` to re-execute itself in (``environ`` with
    :data:`SERVER_TUNABLES` added to ``$GLIBC_TUNABLES``); None when there is nothing to add: not
    glibc, a glibc before 2.35, or the operator already chose (see the module's notes)."""
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or release < _TUNABLES_SINCE or operator_chose(environ):
        return None
    added = [f"{tunable}={value}" for tunable, value in SERVER_TUNABLES]
    existing = environ.get(TUNABLES_ENV, "")
    return {**environ, TUNABLES_ENV: ":".join([existing, *added] if existing else added)}


@functools.cache
def _libc() -> Any | None:
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


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold at ``threshold`` bytes, unless the environment set malloc's
    behaviour (``paramsel serve``'s own tunables included); True when either is in effect, False where
    the C library is not glibc."""
    if operator_chose(os.environ):
        log.debug("malloc's settings are the environment's (%s)", TUNABLES_ENV)
        return True
    libc = _libc()
    if libc is None:
        log.debug("no mallopt in the C library: freed memory is returned as it decides")
        return False
    return _mallopt(libc, _M_MMAP_THRESHOLD, threshold)


def trim() -> bool:
    """Gives the heaps' free memory back to the system (``malloc_trim(0)``); False where there is no
    glibc."""
    libc = _libc()
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
"""The in-process service's ``--idle-release-seconds`` (see :class:`KeptMemory`); 0 leaves malloc alone."""
DEFAULT_IDLE_RELEASE_SECONDS = 60.0
_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024  # glibc's defaults, restored once idle
_DEFAULT_MMAP_MAX = 65536
_KEPT_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def idle_release_seconds(environ: Mapping[str, str]) -> float:
    """``$PARAMSEL_IDLE_RELEASE_SECONDS`` (a number >= 0; unset or empty: 60); otherwise
    FailedPrecondition (the SDK's FAILED_PRECONDITION) naming the variable."""
    raw = environ.get(IDLE_RELEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_IDLE_RELEASE_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        from paramsel.engine import FailedPrecondition  # the engine loads torch: not for `paramsel health`

        raise FailedPrecondition(
            f"${IDLE_RELEASE_ENV} must be a number of seconds >= 0 (0: never keep memory), got {raw!r}"
        )
    return seconds


class KeptMemory:
    """The service run in the caller's process (:mod:`paramsel.server.local`) keeps freed memory as
    ``paramsel serve`` does, for the same reason (see the module's notes): while its calls keep coming,
    every block comes from the heaps and stays there when freed (``mallopt``: no mmap, no trimming on
    ``free``), so the next call finds its memory faulted in; once no call has run for
    ``$PARAMSEL_IDLE_RELEASE_SECONDS`` (60 s) a thread gives the free memory back (``malloc_trim``),
    restores glibc's defaults and ends. On the benchmark machine (a VM whose host takes back the guest's
    free memory) a 50.1M-parameter push in process took 0.18-0.59 s returning it and 0.15-0.18 s keeping
    it, with 3 s between pushes.

    The settings are the process's, so they apply to the caller's own allocations meanwhile (reused
    instead of unmapped; peak memory is unchanged). Nothing is changed with the variable at 0, where the
    environment already sets malloc's behaviour (:func:`operator_chose`), or without glibc. A forked
    child starts with glibc's defaults.
    """

    def __init__(
        self,
        environ: Mapping[str, str] = os.environ,
        libc: Callable[[], Any | None] = _libc,
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
        """Around one in-process call."""
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
            _mallopt(libc, _M_MMAP_MAX, 0)
            _mallopt(libc, _M_TRIM_THRESHOLD, _KEPT_TRIM_THRESHOLD)
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
        log.debug("in-process calls idle: free memory given back, malloc's defaults restored")

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
    _mallopt(libc, _M_MMAP_MAX, _DEFAULT_MMAP_MAX)
    _mallopt(libc, _M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)


def _mallopt(libc: Any, param: int, value: int) -> bool:
    """``mallopt(param, value)``; False, with a warning, when glibc refuses it."""
    done = bool(libc.mallopt(param, value))
    if not done:
        log.warning("mallopt(%d, %d) was refused: freed memory may not be kept or given back", param, value)
    return done
