"""Wire codecs shared by the SDK and the server: dtypes, tensor bytes, chunked sections, positions.

Nothing here knows about selection; it turns tensors into the frames of ``proto/paramsel/v1`` and
back, and refuses malformed frames with :class:`WireError` / :class:`WireLimitError`.

The errors and the chunk sizes are imported with the package; everything else (all of it needs
torch) is imported from its module on first use (PEP 562), so that ``paramsel health`` and the
server's settings do not pay for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from paramsel.wire.errors import WireError, WireLimitError
from paramsel.wire.lazy import lazy_exports
from paramsel.wire.sizes import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES

if TYPE_CHECKING:
    from paramsel.wire.codec import (
        DenseDecl,
        SparseDecl,
        dense_decl,
        sparse_decl,
        tensor_bytes,
        tensor_from_bytes,
    )
    from paramsel.wire.dtypes import DTYPES, dtype_from_proto, dtype_to_proto, itemsize
    from paramsel.wire.positions import decode_positions, encode_positions
    from paramsel.wire.sections import Inbound, chunk_frames, spec_batches
    from paramsel.wire.seeded import seeded_positions

__all__ = [
    "DEFAULT_CHUNK_SIZE_BYTES",
    "DTYPES",
    "MAX_CHUNK_SIZE_BYTES",
    "DenseDecl",
    "Inbound",
    "SparseDecl",
    "WireError",
    "WireLimitError",
    "chunk_frames",
    "decode_positions",
    "dense_decl",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode_positions",
    "itemsize",
    "seeded_positions",
    "sparse_decl",
    "spec_batches",
    "tensor_bytes",
    "tensor_from_bytes",
]

# Each lazily imported name, and the module that defines it.
_LAZY = {
    **dict.fromkeys(
        ("DenseDecl", "SparseDecl", "dense_decl", "sparse_decl", "tensor_bytes", "tensor_from_bytes"),
        "paramsel.wire.codec",
    ),
    **dict.fromkeys(("DTYPES", "dtype_from_proto", "dtype_to_proto", "itemsize"), "paramsel.wire.dtypes"),
    **dict.fromkeys(("decode_positions", "encode_positions"), "paramsel.wire.positions"),
    "seeded_positions": "paramsel.wire.seeded",
    **dict.fromkeys(("Inbound", "chunk_frames", "spec_batches"), "paramsel.wire.sections"),
}

_getattr, __dir__ = lazy_exports(__name__, globals(), _LAZY)
if not TYPE_CHECKING:  # type checkers see the imports above; a misspelt name stays an error for them
    __getattr__ = _getattr
