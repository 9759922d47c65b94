"""Chunk sizes of the wire format: plain numbers, importable without torch.

:mod:`paramsel.server.config` (and with it the ``paramsel`` command) needs them, and the
``paramsel health`` probe must start without paying for torch.
"""

DEFAULT_CHUNK_SIZE_BYTES = 1 << 20
# Framing adds a few bytes per chunk; 3 MiB of data keeps every message under gRPC's 4 MiB default.
MAX_CHUNK_SIZE_BYTES = 3 << 20
