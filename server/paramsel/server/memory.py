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
(``ServerConfig.idle_release_seconds``, 60 s by default: :class:`~paramsel.wire.memory.IdleTrim`, run by
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

The SDK's process keeps the memory of its calls the same way, with ``mallopt`` at its first call
(:mod:`paramsel.wire.memory`, shared by both distributions).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Mapping

from paramsel.wire.memory import TUNABLES_ENV, glibc, mallopt, operator_chose

log = logging.getLogger("paramsel.server")


ENV = "MALLOC_MMAP_THRESHOLD_"
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


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold at ``threshold`` bytes, unless the environment set malloc's
    behaviour (``paramsel serve``'s own tunables included); True when either is in effect, False where
    the C library is not glibc."""
    if operator_chose(os.environ):
        log.debug("malloc's settings are the environment's (%s)", TUNABLES_ENV)
        return True
    libc = glibc()
    if libc is None:
        log.debug("no mallopt in the C library: freed memory is returned as it decides")
        return False
    return mallopt(libc, _M_MMAP_THRESHOLD, threshold)
