"""The content digest of a model (ModelDigest in tensor.proto): SHA-256 or BLAKE3 of one digest input.

The digest input is, for each tensor in order: the UTF-8 name's byte length (uint32 LE), the name, the
DataType (uint32 LE), the number of dimensions (uint32 LE), each dimension (int64 LE), then the data
bytes as they travel. Both kinds hash exactly that byte string; they differ only in the hash.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable
from typing import Literal, Protocol

import torch
from blake3 import blake3

from paramsel.wire.codec import tensor_bytes
from paramsel.wire.dtypes import dtype_to_proto

DIGEST_SIZE_BYTES = 32
DigestKind = Literal["sha256", "blake3"]
SHA256: DigestKind = "sha256"
BLAKE3: DigestKind = "blake3"
# By ModelDigest field name, oldest first: what a server accepts (GetServerInfoResponse.model_digests).
DIGEST_KINDS: tuple[DigestKind, ...] = (SHA256, BLAKE3)


class _Hash(Protocol):
    def update(self, data: memoryview | bytes, /) -> object: ...

    def digest(self) -> bytes: ...


def _hasher(kind: DigestKind) -> _Hash:
    if kind == SHA256:
        return hashlib.sha256()
    if kind == BLAKE3:
        # Every core: BLAKE3 splits one large update across threads (the GIL is released meanwhile).
        return blake3(max_threads=blake3.AUTO)
    raise ValueError(f"unknown digest kind {kind!r}; known: {', '.join(DIGEST_KINDS)}")


def digest_header(name: str, tensor: torch.Tensor) -> bytes:
    """The bytes of the digest input that precede a tensor's data: name, DataType and shape."""
    encoded = name.encode("utf-8")
    shape = tuple(tensor.shape)
    return struct.pack(
        f"<I{len(encoded)}sII{len(shape)}q",
        len(encoded),
        encoded,
        int(dtype_to_proto(tensor.dtype)),
        len(shape),
        *shape,
    )


def model_digest(tensors: Iterable[tuple[str, torch.Tensor]], kind: DigestKind = SHA256) -> bytes:
    """The ``kind`` hash (32 bytes) of the tensors' digest input, in order (see ModelDigest)."""
    hasher = _hasher(kind)
    for name, tensor in tensors:
        hasher.update(digest_header(name, tensor))
        hasher.update(tensor_bytes(tensor))  # both release the GIL for large buffers
    return hasher.digest()
