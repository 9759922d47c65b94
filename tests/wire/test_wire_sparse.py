"""Sparse tensors through write_frames -> read_frames in both position encodings."""

import math

import pytest
import torch

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DTYPES
from paramsel.wire.streams import Received, SparseOut, read_frames, write_frames

RESULT = tensor_pb2.SECTION_RESULT
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
ENCODINGS = pytest.mark.parametrize("encoding", [COO, FLAT], ids=["coo", "flat"])


def round_trip(out: list[SparseOut], encoding: int, chunk_size: int = 5) -> Received:
    header = service_pb2.SelectionHeader(kind=service_pb2.SELECTION_KIND_SPARSE_COO)
    frames = list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", header),
            chunk_size=chunk_size,
            sparse=[(RESULT, out, encoding)],
        )
    )
    for f in frames:
        if f.WhichOneof("frame") == "chunk":
            assert 0 < len(f.chunk.data) <= chunk_size
    got = read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 26)
    assert got.first == header
    return got


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def check(out: list[SparseOut], encoding: int, chunk_size: int = 5) -> None:
    got = round_trip(out, encoding, chunk_size).sparse[RESULT]
    assert [s.decl.name for s in got] == [o.name for o in out]
    for s, o in zip(got, out, strict=True):
        assert s.decl.shape == o.shape
        assert s.decl.nnz == o.values.numel()
        assert s.decl.position_encoding == encoding
        assert s.decl.dtype == o.values.dtype
        assert s.values.dtype == o.values.dtype
        assert s.values.shape == (o.values.numel(),)
        assert raw(s.values) == raw(o.values)
        assert s.positions.dtype == torch.int64
        assert s.positions.tolist() == o.positions.tolist()


def values(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.arange(n) % 2 == 0
    return (torch.arange(n) % 100 - 50).to(dtype)


@ENCODINGS
def test_density_zero(encoding: int) -> None:
    check([SparseOut("w", (3, 4), values(0), torch.zeros(0, dtype=torch.int64))], encoding)


@ENCODINGS
def test_density_one(encoding: int) -> None:
    check([SparseOut("w", (3, 4), values(12), torch.arange(12))], encoding)


@ENCODINGS
def test_single_entry(encoding: int) -> None:
    check([SparseOut("w", (3, 4), values(1), torch.tensor([7]))], encoding)


@ENCODINGS
@pytest.mark.parametrize("shape", [(9,), (3, 4), (2, 3, 4)], ids=str)
def test_positions_at_both_ends(encoding: int, shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    check([SparseOut("w", shape, values(2), torch.tensor([0, n - 1]))], encoding)


@ENCODINGS
def test_zero_d_tensor_with_one_value(encoding: int) -> None:
    check([SparseOut("s", (), torch.tensor([2.5]), torch.tensor([0]))], encoding)


@ENCODINGS
def test_four_d_tensor(encoding: int) -> None:
    shape = (2, 3, 4, 5)
    g = torch.Generator().manual_seed(0)
    positions = torch.randperm(120, generator=g)[:37].sort().values
    check([SparseOut("conv", shape, torch.randn(37, generator=g), positions)], encoding, chunk_size=11)


@ENCODINGS
def test_empty_dense_shape(encoding: int) -> None:
    check([SparseOut("e", (0, 3), values(0), torch.zeros(0, dtype=torch.int64))], encoding)


@ENCODINGS
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_values_dtype_is_preserved(encoding: int, dtype: torch.dtype) -> None:
    check([SparseOut("w", (4, 5), values(6, dtype), torch.tensor([0, 3, 4, 11, 12, 19]))], encoding)


@ENCODINGS
def test_bfloat16_values_keep_their_bits(encoding: int) -> None:
    v = torch.tensor([1.0, -2.0, float("nan"), float("-inf"), -0.0, 3.140625], dtype=torch.bfloat16)
    check([SparseOut("w", (6,), v, torch.arange(6))], encoding)


@ENCODINGS
def test_several_tensors_share_the_section(encoding: int) -> None:
    out = [
        SparseOut("a", (3, 4), values(3, torch.float16), torch.tensor([1, 5, 11])),
        SparseOut("empty", (5,), values(0, torch.float16), torch.zeros(0, dtype=torch.int64)),
        SparseOut("scalar", (), values(1, torch.int8), torch.tensor([0])),
        SparseOut("c", (2, 2, 2), values(2, torch.bfloat16), torch.tensor([0, 7])),
    ]
    for chunk_size in (1, 3, 7, 1 << 20):
        check(out, encoding, chunk_size)


def test_coo_coordinates_can_be_given_directly() -> None:
    coords = torch.tensor([[0, 0], [1, 1], [2, 3]])
    got = round_trip([SparseOut("w", (3, 4), values(3), coords)], COO).sparse[RESULT]
    assert got[0].positions.tolist() == [0, 5, 11]


def test_non_contiguous_values_and_positions() -> None:
    v = torch.arange(10, dtype=torch.float32)[::2]
    p = torch.arange(20)[::4]
    for encoding in (COO, FLAT):
        got = round_trip([SparseOut("w", (4, 5), v, p)], encoding).sparse[RESULT]
        assert torch.equal(got[0].values, v)
        assert got[0].positions.tolist() == [0, 4, 8, 12, 16]


def test_unspecified_encoding_is_read_as_coo() -> None:
    spec = tensor_pb2.SparseTensorSpec(
        name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3, 4], nnz=1, positions_size_bytes=16
    )
    frames = [
        service_pb2.SelectResponse(header=service_pb2.SelectionHeader()),
        service_pb2.SelectResponse(sparse_tensors=tensor_pb2.SparseManifest(section=RESULT, tensors=[spec])),
        service_pb2.SelectResponse(
            chunk=tensor_pb2.Chunk(
                section=RESULT, offset_bytes=0, data=b"\x00\x00\x80\x3f" + bytes([2] + [0] * 7) * 2
            )
        ),
    ]
    got = read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=100).sparse[
        RESULT
    ]
    assert got[0].decl.position_encoding == COO
    assert got[0].positions.tolist() == [10]
    assert got[0].values.tolist() == [1.0]
