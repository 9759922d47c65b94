"""Wire codecs shared by the SDK and the server: dtypes, tensor bytes, chunked sections, positions.

Nothing here knows about selection; it turns tensors into the frames of ``proto/paramsel/v1`` and
back, and refuses malformed frames with :class:`WireError` / :class:`WireLimitError`.
"""

from paramsel.wire.codec import (
    DEFAULT_CHUNK_SIZE_BYTES,
    MAX_CHUNK_SIZE_BYTES,
    DenseDecl,
    SparseDecl,
    dense_decl,
    sparse_decl,
    tensor_bytes,
    tensor_from_bytes,
)
from paramsel.wire.dtypes import DTYPES, dtype_from_proto, dtype_to_proto, itemsize
from paramsel.wire.errors import WireError, WireLimitError
from paramsel.wire.positions import decode_positions, encode_positions
from paramsel.wire.sections import Inbound, chunk_frames, spec_batches

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
    "sparse_decl",
    "spec_batches",
    "tensor_bytes",
    "tensor_from_bytes",
]
