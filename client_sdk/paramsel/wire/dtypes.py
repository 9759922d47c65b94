"""The dtype table, both ways: proto DataType <-> torch.dtype. Bytes are always little-endian."""

from __future__ import annotations

import sys

import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire.errors import WireError

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("paramsel's wire format is little-endian; this host is big-endian")

DTYPES: dict[int, torch.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT32: torch.float32,
    tensor_pb2.DATA_TYPE_FLOAT64: torch.float64,
    tensor_pb2.DATA_TYPE_FLOAT16: torch.float16,
    tensor_pb2.DATA_TYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DATA_TYPE_INT64: torch.int64,
    tensor_pb2.DATA_TYPE_INT32: torch.int32,
    tensor_pb2.DATA_TYPE_INT16: torch.int16,
    tensor_pb2.DATA_TYPE_INT8: torch.int8,
    tensor_pb2.DATA_TYPE_UINT8: torch.uint8,
    tensor_pb2.DATA_TYPE_BOOL: torch.bool,
}
_TO_PROTO: dict[torch.dtype, int] = {v: k for k, v in DTYPES.items()}


def dtype_from_proto(value: int, *, what: str) -> torch.dtype:
    """The torch dtype of a proto DataType; ``what`` names the field in the error."""
    try:
        return DTYPES[value]
    except KeyError:
        raise WireError(
            f"{what}: unknown dtype {value} (expected one of DATA_TYPE_FLOAT32 ... BOOL)"
        ) from None


def dtype_to_proto(dtype: torch.dtype) -> tensor_pb2.DataType.ValueType:
    """The proto DataType of a torch dtype; complex and quantized dtypes are refused."""
    try:
        return tensor_pb2.DataType.ValueType(_TO_PROTO[dtype])
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in _TO_PROTO)
        raise WireError(f"dtype {dtype} is not supported on the wire (supported: {supported})") from None


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element."""
    return torch.empty((), dtype=dtype).element_size()
