"""The byte layout is a promise: little-endian, row-major, values then positions. Expected bytes are literal."""

import struct

import pytest
import torch

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import (
    DEFAULT_CHUNK_SIZE_BYTES,
    DTYPES,
    MAX_CHUNK_SIZE_BYTES,
    decode_positions,
    dtype_from_proto,
    dtype_to_proto,
    encode_positions,
    itemsize,
    tensor_bytes,
)
from paramsel.wire.streams import SparseOut, write_frames

MODEL = tensor_pb2.SECTION_MODEL
RESULT = tensor_pb2.SECTION_RESULT
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
GRPC_DEFAULT_MAX_MESSAGE = 4 << 20  # what a gRPC channel or server receives unless told otherwise


def test_the_largest_chunk_frame_fits_grpcs_default_message_limit() -> None:
    """Chunk sizes up to the maximum are what lets any gRPC client, with its default limits, read every
    answer: a response frame of the largest chunk, at the largest offset, is under gRPC's 4 MiB."""
    assert 0 < DEFAULT_CHUNK_SIZE_BYTES <= MAX_CHUNK_SIZE_BYTES
    for response in (
        service_pb2.SelectResponse,
        service_pb2.PushResponse,
        service_pb2.PullResponse,
        service_pb2.AggregateResponse,
    ):
        chunk = tensor_pb2.Chunk(section=RESULT, offset_bytes=2**63 - 1, data=bytes(MAX_CHUNK_SIZE_BYTES))
        assert response(chunk=chunk).ByteSize() < GRPC_DEFAULT_MAX_MESSAGE, response.__name__


def test_dtype_table_is_the_contract() -> None:
    contract = {
        1: torch.float32,
        2: torch.float64,
        3: torch.float16,
        4: torch.bfloat16,
        5: torch.int64,
        6: torch.int32,
        7: torch.int16,
        8: torch.int8,
        9: torch.uint8,
        10: torch.bool,
    }
    assert contract == DTYPES
    sizes = {1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}
    for value, dtype in DTYPES.items():
        assert dtype_to_proto(dtype) == value
        assert dtype_from_proto(value, what="test") is dtype
        assert itemsize(dtype) == sizes[value]


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.tensor([1.0, -2.0], dtype=torch.float32), b"\x00\x00\x80\x3f\x00\x00\x00\xc0"),
        (torch.tensor(1.0, dtype=torch.float64), b"\x00\x00\x00\x00\x00\x00\xf0\x3f"),
        (torch.tensor(1.0, dtype=torch.float16), b"\x00\x3c"),
        (torch.tensor([1.0, -2.0], dtype=torch.bfloat16), b"\x80\x3f\x00\xc0"),
        (torch.tensor(1, dtype=torch.int64), b"\x01\x00\x00\x00\x00\x00\x00\x00"),
        (torch.tensor(-2, dtype=torch.int64), b"\xfe\xff\xff\xff\xff\xff\xff\xff"),
        (torch.tensor(0x01020304, dtype=torch.int32), b"\x04\x03\x02\x01"),
        (torch.tensor([-2, 258], dtype=torch.int16), b"\xfe\xff\x02\x01"),
        (torch.tensor([-1, 127], dtype=torch.int8), b"\xff\x7f"),
        (torch.tensor([255, 0], dtype=torch.uint8), b"\xff\x00"),
        (torch.tensor([True, False]), b"\x01\x00"),
        (torch.tensor(-0.0, dtype=torch.float32), b"\x00\x00\x00\x80"),
        (torch.tensor(float("inf"), dtype=torch.float16), b"\x00\x7c"),
    ],
    ids=lambda v: str(v.dtype) if isinstance(v, torch.Tensor) else None,
)
def test_tensor_bytes_are_little_endian(tensor: torch.Tensor, expected: bytes) -> None:
    assert bytes(tensor_bytes(tensor)) == expected


def test_tensor_bytes_are_row_major_of_the_logical_tensor() -> None:
    t = torch.tensor([[1, 2], [3, 4]], dtype=torch.int16)
    assert bytes(tensor_bytes(t)) == b"\x01\x00\x02\x00\x03\x00\x04\x00"
    # The transpose's storage is the same, but its row-major order is not.
    assert bytes(tensor_bytes(t.t())) == b"\x01\x00\x03\x00\x02\x00\x04\x00"
    assert bytes(tensor_bytes(torch.arange(6, dtype=torch.int8)[::2])) == b"\x00\x02\x04"
    assert bytes(tensor_bytes(torch.zeros(0, 3))) == b""


def test_coo_positions_are_int64_coordinates() -> None:
    data = bytes(encode_positions(torch.tensor([5]), (3, 4), COO))
    assert data == struct.pack("<qq", 1, 1)
    assert data == b"\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00"
    data = bytes(encode_positions(torch.tensor([0, 23]), (2, 3, 4), COO))
    assert data == struct.pack("<6q", 0, 0, 0, 1, 2, 3)
    # A 0-d tensor has no coordinates: its positions take no bytes.
    assert bytes(encode_positions(torch.tensor([0]), (), COO)) == b""
    # Coordinates already in COO form are sent as they are.
    assert bytes(encode_positions(torch.tensor([[2, 3]]), (3, 4), COO)) == struct.pack("<qq", 2, 3)


def test_flat_positions_are_int64() -> None:
    data = bytes(encode_positions(torch.tensor([5, 11]), (3, 4), FLAT))
    assert data == b"\x05\x00\x00\x00\x00\x00\x00\x00\x0b\x00\x00\x00\x00\x00\x00\x00"
    assert bytes(encode_positions(torch.tensor([5], dtype=torch.int32), (3, 4), FLAT)) == struct.pack("<q", 5)


def test_positions_decode_from_literal_bytes() -> None:
    coo = torch.frombuffer(bytearray(struct.pack("<4q", 1, 1, 2, 3)), dtype=torch.uint8)
    assert decode_positions(coo, 2, (3, 4), COO, what="t").tolist() == [5, 11]
    flat = torch.frombuffer(bytearray(struct.pack("<2q", 0, 11)), dtype=torch.uint8)
    got = decode_positions(flat, 2, (3, 4), FLAT, what="t")
    assert got.dtype == torch.int64
    assert got.tolist() == [0, 11]


def test_dense_stream_frames_are_pinned() -> None:
    model = [
        ("a", torch.tensor([1.0, -2.0])),
        ("b", torch.tensor([3], dtype=torch.int16)),
    ]
    frames = list(
        write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=4,
            dense=[(MODEL, model)],
        )
    )
    kinds = [f.WhichOneof("frame") for f in frames]
    # Manifests are cut to about chunk_size bytes too, so a 4-byte chunk size gives one spec per manifest.
    assert kinds == ["start", "tensors", "tensors", "chunk", "chunk", "chunk"]
    assert [f.tensors.section for f in frames[1:3]] == [MODEL, MODEL]
    assert [s for f in frames[1:3] for s in f.tensors.tensors] == [
        tensor_pb2.TensorSpec(name="a", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2]),
        tensor_pb2.TensorSpec(name="b", dtype=tensor_pb2.DATA_TYPE_INT16, shape=[1]),
    ]
    chunks = [(f.chunk.section, f.chunk.offset_bytes, f.chunk.data) for f in frames[3:]]
    assert chunks == [
        (MODEL, 0, b"\x00\x00\x80\x3f"),
        (MODEL, 4, b"\x00\x00\x00\xc0"),
        (MODEL, 8, b"\x03\x00"),
    ]


@pytest.mark.parametrize(
    ("encoding", "positions"),
    [(COO, struct.pack("<qq", 1, 1)), (FLAT, struct.pack("<q", 5))],
    ids=["coo", "flat"],
)
def test_sparse_stream_frames_are_pinned(
    encoding: tensor_pb2.PositionEncoding.ValueType, positions: bytes
) -> None:
    out = [
        SparseOut("w", (3, 4), torch.tensor([1.0]), torch.tensor([5])),
        SparseOut("b", (2,), torch.tensor([-2.0], dtype=torch.bfloat16), torch.tensor([1])),
    ]
    header = service_pb2.SelectionHeader(kind=service_pb2.SELECTION_KIND_SPARSE_COO)
    frames = list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", header),
            chunk_size=1 << 20,
            sparse=[(RESULT, out, encoding)],
        )
    )
    assert [f.WhichOneof("frame") for f in frames] == ["header", "sparse_tensors", "chunk"]
    assert frames[0].header == header
    assert frames[1].sparse_tensors == tensor_pb2.SparseManifest(
        section=RESULT,
        tensors=[
            tensor_pb2.SparseTensorSpec(
                name="w",
                dtype=tensor_pb2.DATA_TYPE_FLOAT32,
                shape=[3, 4],
                nnz=1,
                position_encoding=encoding,
                positions_size_bytes=len(positions),
            ),
            tensor_pb2.SparseTensorSpec(
                name="b",
                dtype=tensor_pb2.DATA_TYPE_BFLOAT16,
                shape=[2],
                nnz=1,
                position_encoding=encoding,
                positions_size_bytes=8,
            ),
        ],
    )
    # Each tensor's values, then its positions, tensor after tensor.
    expected = b"\x00\x00\x80\x3f" + positions + b"\x00\xc0" + struct.pack("<q", 1)
    assert frames[2].chunk == tensor_pb2.Chunk(section=RESULT, offset_bytes=0, data=expected)
