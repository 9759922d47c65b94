"""Giving the memory of finished calls back to the system.

glibc's malloc serves blocks above a threshold with their own ``mmap``, which ``free`` unmaps at once;
smaller blocks come from heaps that are seldom returned. The threshold starts at 128 KiB but rises
(up to 32 MiB on 64-bit) each time such a block is freed, so a server that has received a few large
tensors keeps later ones of up to 32 MiB, and every chunk, frame and scratch buffer below, in heaps that
stay as large as their busiest moment. Measured on 2 cores: idle RSS went from 236 MB to 1,062 MB after
12 sequential pushes of 50 M parameters, and to 3,643 MB after 4 rounds of 4 concurrent ones.

Fixing the threshold at 128 KiB (which also stops its rise) returns large blocks when they are freed;
the idle server then stays near where it started. It costs an ``mmap`` and ``munmap`` per large block,
which is small beside the copying those blocks go through. ``MALLOC_MMAP_THRESHOLD_`` in the
environment does the same from the process's start (the image sets it); when it is set, the operator's
value is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("paramsel.server")

ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD_BYTES = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fixes glibc's mmap threshold at ``threshold`` bytes; True when it is in effect (here or from
    ``$MALLOC_MMAP_THRESHOLD_``), False where the C library is not glibc."""
    if os.environ.get(ENV):
        log.debug("%s is set: malloc's mmap threshold is the environment's", ENV)
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
