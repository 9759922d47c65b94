"""The content digest of a model (ModelDigest in tensor.proto): SHA-256 over names, layouts and bytes."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

import torch

from paramsel.wire.codec import tensor_bytes
from paramsel.wire.dtypes import dtype_to_proto

DIGEST_SIZE_BYTES = 32


def model_digest(tensors: Iterable[tuple[str, torch.Tensor]]) -> bytes:
    """SHA-256 of the tensors in order, each as name, dtype, shape and data (see ModelDigest)."""
    sha = hashlib.sha256()
    for name, tensor in tensors:
        encoded = name.encode("utf-8")
        shape = tuple(tensor.shape)
        sha.update(
            struct.pack(
                f"<I{len(encoded)}sII{len(shape)}q",
                len(encoded),
                encoded,
                int(dtype_to_proto(tensor.dtype)),
                len(shape),
                *shape,
            )
        )
        sha.update(tensor_bytes(tensor))  # hashlib releases the GIL for large buffers
    return sha.digest()
