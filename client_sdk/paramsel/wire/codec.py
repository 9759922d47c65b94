"""Tensors <-> raw little-endian bytes, and validated declarations of what a section will carry."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire.compact import bitmap_nbytes, check_distinct, elias_fano_nbytes
from paramsel.wire.dtypes import dtype_from_proto, dtype_to_proto, itemsize
from paramsel.wire.errors import WireError

# Defined in the torch-free sizes module; re-exported for ``from paramsel.wire.codec import ...``.
from paramsel.wire.sizes import DEFAULT_CHUNK_SIZE_BYTES as DEFAULT_CHUNK_SIZE_BYTES
from paramsel.wire.sizes import MAX_CHUNK_SIZE_BYTES as MAX_CHUNK_SIZE_BYTES

MAX_NAME_LENGTH = 4096
_MAX_BYTES = (1 << 63) - 1


def _check_name(name: str, what: str) -> None:
    if not name:
        raise WireError(f"{what}: tensor name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise WireError(f"{what}: tensor name is longer than {MAX_NAME_LENGTH} characters")


def _check_shape(shape: tuple[int, ...], what: str) -> int:
    """numel of a declared shape; negative dimensions and sizes past int64 are refused."""
    for dim in shape:
        if dim < 0:
            raise WireError(f"{what}: negative dimension {dim} in shape {list(shape)}")
    numel = math.prod(shape)
    # The outermost stride counts empty dimensions as 1, so it can overflow even when numel is 0.
    outer_stride = math.prod(max(dim, 1) for dim in shape[1:])
    if max(numel, outer_stride) * 8 > _MAX_BYTES:
        raise WireError(
            f"{what}: shape {list(shape)} has {numel} elements, which overflows int64 byte counts"
        )
    return numel


@dataclass(frozen=True)
class DenseDecl:
    """A declared dense tensor: its data is ``nbytes`` bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def to_proto(self) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(name=self.name, dtype=dtype_to_proto(self.dtype), shape=list(self.shape))


@dataclass(frozen=True)
class SparseDecl:
    """A declared sparse COO tensor: ``nnz`` values, then ``positions_nbytes`` bytes of positions."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nnz: int
    position_encoding: int
    positions_nbytes: int
    position_seed: int = 0
    """POSITION_ENCODING_SEEDED only: the seed the positions are drawn from (0 otherwise)."""

    @property
    def values_nbytes(self) -> int:
        return self.nnz * itemsize(self.dtype)

    def to_proto(self) -> tensor_pb2.SparseTensorSpec:
        return tensor_pb2.SparseTensorSpec(
            name=self.name,
            dtype=dtype_to_proto(self.dtype),
            shape=list(self.shape),
            nnz=self.nnz,
            position_encoding=tensor_pb2.PositionEncoding.ValueType(self.position_encoding),
            positions_size_bytes=self.positions_nbytes,
            position_seed=self.position_seed,
        )


def dense_decl(spec: tensor_pb2.TensorSpec, *, what: str) -> DenseDecl:
    """Validates a TensorSpec; ``what`` says where it came from, for the error message."""
    where = f"{what} '{spec.name}'" if spec.name else what
    _check_name(spec.name, what)
    dtype = dtype_from_proto(spec.dtype, what=where)
    shape = tuple(int(d) for d in spec.shape)
    _check_shape(shape, where)
    return DenseDecl(spec.name, dtype, shape)


_COO = tensor_pb2.POSITION_ENCODING_COO_INT64
_FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
_BITMAP = tensor_pb2.POSITION_ENCODING_BITMAP
_ELIAS_FANO = tensor_pb2.POSITION_ENCODING_ELIAS_FANO
_COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
_SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED


def encoding_name(encoding: int) -> str:
    try:
        return tensor_pb2.PositionEncoding.Name(encoding)  # type: ignore[arg-type]
    except ValueError:
        return f"position encoding {encoding}"


def expected_positions_nbytes(encoding: int, nnz: int, shape: tuple[int, ...]) -> int:
    """Bytes the positions of ``nnz`` values of a tensor of dense ``shape`` take in ``encoding``.

    BITMAP, ELIAS_FANO and SEEDED code distinct positions, so nnz beyond numel(shape) is refused for
    them; SEEDED takes no bytes (the positions are drawn from the spec's seed). COMPACT is no encoding
    of its own (a request asks for it; a tensor declares what it got) and is refused like an unknown
    value.
    """
    if encoding == _COO:
        return nnz * len(shape) * 8
    if encoding == _FLAT:
        return nnz * 8
    if encoding == _SEEDED:
        check_distinct(nnz, math.prod(shape), encoding_name(encoding))
        return 0
    if encoding in (_BITMAP, _ELIAS_FANO):
        numel = math.prod(shape)
        check_distinct(nnz, numel, encoding_name(encoding))
        return bitmap_nbytes(numel) if encoding == _BITMAP else elias_fano_nbytes(nnz, numel)
    if encoding == _COMPACT:
        raise WireError(
            "POSITION_ENCODING_COMPACT is only a request; a tensor declares BITMAP or ELIAS_FANO instead"
        )
    raise WireError(f"unknown position encoding {encoding}")


def choose_encoding(requested: int, nnz: int, shape: tuple[int, ...]) -> int:
    """The encoding a tensor of ``nnz`` values and dense ``shape`` is sent in when ``requested`` is asked.

    COMPACT becomes whichever of BITMAP and ELIAS_FANO takes fewer bytes (ELIAS_FANO on a tie);
    UNSPECIFIED becomes COO_INT64; any other known encoding is kept as it is (SEEDED too: only a tensor
    whose positions are seeded random-k's draw, and that carries its seed, can be written in it).
    """
    if requested == tensor_pb2.POSITION_ENCODING_UNSPECIFIED:
        return _COO
    if requested == _COMPACT:
        bitmap = expected_positions_nbytes(_BITMAP, nnz, shape)
        elias_fano = expected_positions_nbytes(_ELIAS_FANO, nnz, shape)
        return _BITMAP if bitmap < elias_fano else _ELIAS_FANO
    if requested not in (_COO, _FLAT, _BITMAP, _ELIAS_FANO, _SEEDED):
        raise WireError(f"unknown position encoding {requested}")
    return requested


def sparse_decl(spec: tensor_pb2.SparseTensorSpec, *, what: str) -> SparseDecl:
    """Validates a SparseTensorSpec, including that its byte counts match nnz, dtype and shape."""
    where = f"{what} '{spec.name}'" if spec.name else what
    _check_name(spec.name, what)
    dtype = dtype_from_proto(spec.dtype, what=where)
    shape = tuple(int(d) for d in spec.shape)
    _check_shape(shape, where)
    if spec.nnz < 0:
        raise WireError(f"{where}: nnz is negative ({spec.nnz})")
    encoding = spec.position_encoding or _COO
    try:
        expected = expected_positions_nbytes(encoding, spec.nnz, shape)
    except WireError as err:
        raise WireError(f"{where}: {err}") from None
    if spec.positions_size_bytes != expected:
        raise WireError(
            f"{where}: positions_size_bytes is {spec.positions_size_bytes} but {spec.nnz} positions of a "
            f"tensor of shape {list(shape)} take {expected} bytes in {encoding_name(encoding)}"
        )
    if spec.position_seed and encoding != _SEEDED:
        raise WireError(
            f"{where}: position_seed is set ({spec.position_seed}), but it is for POSITION_ENCODING_SEEDED "
            f"only and the positions are in {encoding_name(encoding)}"
        )
    return SparseDecl(spec.name, dtype, shape, int(spec.nnz), encoding, expected, int(spec.position_seed))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian row-major bytes, without a copy when already contiguous."""
    if tensor.layout != torch.strided:
        raise WireError(f"{tensor.layout} tensors cannot be sent; call .to_dense() first")
    if tensor.numel() == 0:
        return memoryview(b"")  # an empty tensor may carry strides (e.g. 0) that no byte view accepts
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def tensor_from_bytes(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor viewing ``data`` (a 1-D uint8 tensor of exactly the right size)."""
    if data.numel() == 0:
        return torch.empty(shape, dtype=dtype)
    return data.view(dtype).reshape(shape)
