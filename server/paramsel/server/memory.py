"""How ``paramsel serve``'s process allocates: large blocks go back to the system as calls end, and are
faulted in as transparent huge pages.

**Freed memory goes back.** glibc's malloc serves blocks above a threshold with their own ``mmap``,
which ``free`` unmaps at once; smaller blocks come from heaps that are seldom returned. The threshold
starts at 128 KiB but rises (up to 32 MiB on 64-bit) each time such a block is freed, so a server that
has received a few large tensors keeps later ones of up to 32 MiB, and every scratch buffer below, in
heaps that stay as large as their busiest moment. Measured on 2 cores: idle RSS went from 236 MB to
1,062 MB after 12 sequential pushes of 50 M parameters, and to 3,643 MB after 4 rounds of 4 concurrent
ones. Fixing the threshold (which also stops its rise) returns the large blocks when they are freed.

It is fixed at 4 MiB, not lower: a call streams its tensors in chunks of 1 MiB (gRPC's message buffer,
the frame's bytes), and below the threshold those come back from the heaps, already faulted in, chunk
after chunk; with 128 KiB every chunk was a fresh ``mmap`` whose pages the kernel faulted in and zeroed,
three times per uploaded byte.

**Huge pages.** A 50 M-parameter push faults in some 1.5 GB a call (the received model, the scores,
the selection's scratch), 4 KiB at a time. glibc 2.35+ can ask for transparent huge pages on the blocks
it maps (the ``glibc.malloc.hugetlb=1`` tunable: ``madvise(MADV_HUGEPAGE)``, effective where the
kernel's THP mode is ``madvise`` or ``always``), 2 MiB a fault. Measured here (issue 14): a cached push of
50.1 M parameters 0.75 s → 0.54 s, a first push 1.55 s → 1.15 s, the server's peak RSS unchanged.
Tunables are read when a process starts, so ``paramsel serve`` re-executes itself once with them in
``$GLIBC_TUNABLES`` (:func:`allocator_environment`); the image sets them in its environment instead.

An operator's own choice stands: ``$MALLOC_MMAP_THRESHOLD_`` or a ``glibc.malloc.mmap_threshold`` in
``$GLIBC_TUNABLES`` keeps its threshold, a ``glibc.malloc.hugetlb`` keeps its huge-page setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Mapping

log = logging.getLogger("paramsel.server")

ENV = "MALLOC_MMAP_THRESHOLD_"
TUNABLES_ENV = "GLIBC_TUNABLES"
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
THRESHOLD_TUNABLE = "glibc.malloc.mmap_threshold"
_HUGE_PAGES_SINCE = (2, 35)  # the first glibc with glibc.malloc.hugetlb
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    """$GLIBC_TUNABLES as name → value (``a=1:b=2``)."""
    pairs = (item.partition("=") for item in environ.get(TUNABLES_ENV, "").split(":") if item)
    return {name: value for name, _, value in pairs}


def _threshold_is_the_operators(environ: Mapping[str, str]) -> bool:
    return bool(environ.get(ENV)) or THRESHOLD_TUNABLE in _tunables(environ)


def allocator_environment(
    environ: Mapping[str, str], libc: tuple[str, str] | None = None
) -> dict[str, str] | None:
    """The environment for ``paramsel serve`` to re-execute itself in, so that glibc's malloc starts
    with huge pages and the 4 MiB threshold; None when there is nothing to add (not glibc, a glibc
    before 2.35, or the operator already chose: see the module's notes)."""
    name, version = libc if libc is not None else platform.libc_ver()
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or release < _HUGE_PAGES_SINCE:
        return None
    tunables = _tunables(environ)
    if HUGE_PAGES_TUNABLE in tunables:
        return None
    added = [f"{HUGE_PAGES_TUNABLE}=1"]
    if not _threshold_is_the_operators(environ):
        added.append(f"{THRESHOLD_TUNABLE}={MMAP_THRESHOLD_BYTES}")
    existing = environ.get(TUNABLES_ENV, "")
    return {**environ, TUNABLES_ENV: ":".join([existing, *added] if existing else added)}


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold at ``threshold`` bytes; True when it is in effect (here, or from
    ``$MALLOC_MMAP_THRESHOLD_`` or ``$GLIBC_TUNABLES``), False where the C library is not glibc."""
    if _threshold_is_the_operators(os.environ):
        log.debug("malloc's mmap threshold is the environment's (%s or %s)", ENV, TUNABLES_ENV)
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to set
        log.debug("no mallopt in the C library (%s): freed memory is returned as it decides", name)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not done:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) was refused: idle memory may stay high", threshold)
    return done
