"""Malformed frames are refused with WireError (WireLimitError past the limit), naming what is wrong."""

import itertools

import pytest
import torch

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import (
    Inbound,
    WireError,
    WireLimitError,
    dense_decl,
    dtype_from_proto,
    dtype_to_proto,
    sparse_decl,
    tensor_bytes,
)
from paramsel.wire.streams import Received, SparseOut, read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
RESULT = tensor_pb2.SECTION_RESULT
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
F32 = tensor_pb2.DATA_TYPE_FLOAT32


def start() -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(start=service_pb2.SelectStart())


def manifest(*specs: tensor_pb2.TensorSpec, section: int = MODEL) -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(
        tensors=tensor_pb2.TensorManifest(section=tensor_pb2.Section.ValueType(section), tensors=specs)
    )


def chunk(offset: int, data: bytes, section: int = MODEL) -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(
        chunk=tensor_pb2.Chunk(section=tensor_pb2.Section.ValueType(section), offset_bytes=offset, data=data)
    )


def read(
    frames: list[service_pb2.SelectRequest], max_bytes: int = 1 << 20, *, unique_names: bool = True
) -> Received:
    return read_frames(
        frames,
        first="start",
        dense_sections=frozenset({MODEL}),
        max_bytes=max_bytes,
        unique_names=unique_names,
    )


def read_sparse(out: list[SparseOut], encoding: int) -> Received:
    frames = write_frames(
        service_pb2.SelectResponse,
        ("header", service_pb2.SelectionHeader()),
        chunk_size=64,
        sparse=[(RESULT, out, encoding)],
    )
    return read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 20)


def spec(name: str = "w", dtype: int = F32, shape: tuple[int, ...] = (2,)) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, dtype=tensor_pb2.DataType.ValueType(dtype), shape=list(shape))


# --- declarations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [0, 11, 99], ids=["unspecified", "eleven", "ninety-nine"])
def test_unknown_dtype_is_refused(dtype: int) -> None:
    with pytest.raises(WireError, match=rf"SECTION_MODEL 'w': unknown dtype {dtype}\b"):
        read([start(), manifest(spec(dtype=dtype))])
    with pytest.raises(WireError, match=rf"unknown dtype {dtype}\b"):
        dtype_from_proto(dtype, what="x")


def test_negative_dimension_is_refused() -> None:
    with pytest.raises(WireError, match=r"'w': negative dimension -1 in shape \[2, -1\]"):
        read([start(), manifest(spec(shape=(2, -1)))])


@pytest.mark.parametrize(
    "shape", [(1 << 32, 1 << 32), (1 << 60,), (1 << 31, 1 << 31, 1 << 31), ((1 << 63) - 1,)], ids=str
)
def test_overflowing_shape_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(WireError, match="overflows int64") as info:
        read([start(), manifest(spec(shape=shape))], max_bytes=(1 << 63) - 1)
    assert not isinstance(info.value, WireLimitError)
    sparse = tensor_pb2.SparseTensorSpec(name="s", dtype=F32, shape=list(shape), position_encoding=FLAT)
    with pytest.raises(WireError, match="overflows int64"):
        sparse_decl(sparse, what="result")


def test_zero_numel_shape_with_overflowing_strides_is_refused_as_wire_error() -> None:
    with pytest.raises(WireError):
        read([start(), manifest(spec(shape=(0, 1 << 62, 1 << 62)))])


def test_zero_numel_shape_with_a_huge_dimension_is_accepted() -> None:
    state = read([start(), manifest(spec(shape=(1 << 62, 0)))]).state(MODEL)
    assert state is not None
    assert state["w"].shape == (1 << 62, 0)


def test_empty_name_is_refused() -> None:
    with pytest.raises(WireError, match="SECTION_MODEL: tensor name is empty"):
        read([start(), manifest(spec(name=""))])
    with pytest.raises(WireError, match="tensor name is empty"):
        sparse_decl(tensor_pb2.SparseTensorSpec(dtype=F32, shape=[2]), what="result")


def test_overlong_name_is_refused() -> None:
    dense_decl(spec(name="n" * 4096), what="layout")
    with pytest.raises(WireError, match="longer than 4096"):
        dense_decl(spec(name="n" * 4097), what="layout")


def test_duplicate_name_in_a_section_is_refused() -> None:
    with pytest.raises(WireError, match="tensor 'w' is declared twice"):
        read([start(), manifest(spec()), manifest(spec())])
    got = read(
        [start(), manifest(spec(shape=(1,)), spec(shape=(1,))), chunk(0, bytes(8))], unique_names=False
    )
    assert got.dense[MODEL][0][0].name == got.dense[MODEL][1][0].name == "w"


@pytest.mark.parametrize(
    ("encoding", "nnz", "size", "expected"),
    [
        (COO, 2, 16, 32),
        (FLAT, 2, 24, 16),
        (COO, 0, 8, 0),
        (tensor_pb2.POSITION_ENCODING_UNSPECIFIED, 1, 8, 16),
    ],
    ids=["coo", "flat", "coo-empty", "unspecified-is-coo"],
)
def test_positions_size_mismatch_is_refused(
    encoding: tensor_pb2.PositionEncoding.ValueType, nnz: int, size: int, expected: int
) -> None:
    s = tensor_pb2.SparseTensorSpec(
        name="w", dtype=F32, shape=[3, 4], nnz=nnz, position_encoding=encoding, positions_size_bytes=size
    )
    with pytest.raises(
        WireError, match=rf"result 'w': positions_size_bytes is {size} but .* take {expected} bytes"
    ):
        sparse_decl(s, what="result")


def test_unknown_position_encoding_and_negative_nnz_are_refused() -> None:
    s = tensor_pb2.SparseTensorSpec(
        name="w",
        dtype=F32,
        shape=[3],
        nnz=1,
        position_encoding=tensor_pb2.PositionEncoding.ValueType(7),
        positions_size_bytes=8,
    )
    with pytest.raises(WireError, match="'w': unknown position encoding 7"):
        sparse_decl(s, what="result")
    s = tensor_pb2.SparseTensorSpec(name="w", dtype=F32, shape=[3], nnz=-1, position_encoding=FLAT)
    with pytest.raises(WireError, match=r"nnz is negative \(-1\)"):
        sparse_decl(s, what="result")


@pytest.mark.parametrize(
    ("coords", "bad", "axis"),
    [
        ([[3, 0]], 3, 0),
        ([[0, 4]], 4, 1),
        ([[0, 5]], 5, 1),  # flattens to 5, inside the 12 elements
        ([[1, -1]], -1, 1),  # flattens to 3
        ([[-1, 7]], -1, 0),  # flattens to 3
        ([[0, 0], [2, 3], [1, 9]], 9, 1),
    ],
    ids=["axis0", "axis1", "flattens-in-range", "negative", "negative-axis0", "last-of-three"],
)
def test_coo_coordinate_out_of_range_is_refused(coords: list[list[int]], bad: int, axis: int) -> None:
    out = [SparseOut("w", (3, 4), torch.ones(len(coords)), torch.tensor(coords))]
    with pytest.raises(
        WireError, match=rf"SECTION_RESULT 'w': coordinate {bad} on axis {axis} is out of range"
    ):
        read_sparse(out, COO)


@pytest.mark.parametrize(
    ("shape", "positions", "bad", "numel"),
    [
        ((3, 4), [12], 12, 12),
        ((3, 4), [0, 100], 100, 12),
        ((3, 4), [-1], -1, 12),
        ((), [1], 1, 1),
        ((0,), [0], 0, 0),
    ],
    ids=["numel", "far", "negative", "0-d", "empty"],
)
def test_flat_position_out_of_range_is_refused(
    shape: tuple[int, ...], positions: list[int], bad: int, numel: int
) -> None:
    out = [SparseOut("w", shape, torch.ones(len(positions)), torch.tensor(positions))]
    with pytest.raises(
        WireError, match=rf"'w': position {bad} is out of range for a tensor of {numel} elements"
    ):
        read_sparse(out, FLAT)


# --- Inbound --------------------------------------------------------------------------------------------


def inbound(*sizes: int, max_bytes: int = 1000) -> Inbound:
    rx = Inbound(allowed={MODEL, INITIAL}, max_bytes=max_bytes)
    for size in sizes:
        rx.declare(MODEL, size)
    return rx


def c(offset: int, data: bytes, section: int = MODEL) -> tensor_pb2.Chunk:
    return tensor_pb2.Chunk(section=tensor_pb2.Section.ValueType(section), offset_bytes=offset, data=data)


def test_inbound_splits_chunks_into_segments() -> None:
    rx = inbound(3, 0, 5)
    rx.declare(INITIAL, 2)
    for offset in range(0, 8, 2):
        rx.feed(c(offset, bytes(range(offset, offset + 2))))
    rx.feed(c(0, b"\xaa\xbb", INITIAL))
    got = rx.finish()
    assert [bytes(t.numpy()) for t in got[MODEL]] == [b"\x00\x01\x02", b"", b"\x03\x04\x05\x06\x07"]
    assert [bytes(t.numpy()) for t in got[INITIAL]] == [b"\xaa\xbb"]


def test_chunk_out_of_order_is_refused() -> None:
    rx = inbound(10)
    with pytest.raises(WireError, match=r"SECTION_MODEL: chunk at offset_bytes 4, but 0 bytes have arrived"):
        rx.feed(c(4, b"abcd"))


def test_gap_between_chunks_is_refused() -> None:
    rx = inbound(10)
    rx.feed(c(0, b"abc"))
    with pytest.raises(WireError, match="offset_bytes 4, but 3 bytes have arrived"):
        rx.feed(c(4, b"e"))


def test_repeated_chunk_is_refused() -> None:
    rx = inbound(10)
    rx.feed(c(0, b"abcde"))
    with pytest.raises(WireError, match=r"offset_bytes 0, but 5 bytes have arrived \(.*repeated\)"):
        rx.feed(c(0, b"abcde"))


def test_empty_chunk_is_refused() -> None:
    rx = inbound(10)
    with pytest.raises(WireError, match="SECTION_MODEL: empty chunk at offset_bytes 0"):
        rx.feed(c(0, b""))


def test_chunk_past_the_declared_size_is_refused() -> None:
    rx = inbound(4, 6)
    rx.feed(c(0, b"abcdefgh"))
    with pytest.raises(WireError, match="chunk ends at byte 11, beyond the 10 bytes declared"):
        rx.feed(c(8, b"ijk"))
    with pytest.raises(WireError, match="chunk ends at byte 1, beyond the 0 bytes declared"):
        inbound(0).feed(c(0, b"x"))


def test_stream_ending_short_is_refused() -> None:
    rx = inbound(4, 6)
    rx.feed(c(0, b"abcde"))
    with pytest.raises(WireError, match=r"SECTION_MODEL: the stream ended after 5 of the 10 bytes declared"):
        rx.finish()
    with pytest.raises(WireError, match="ended after 0 of the 2 bytes"):
        inbound(2).finish()


def test_declare_after_feed_is_refused() -> None:
    rx = inbound(4)
    rx.feed(c(0, b"ab"))
    assert rx.feeding
    with pytest.raises(WireError, match="manifest arrived after the first chunk"):
        rx.declare(MODEL, 4)
    with pytest.raises(WireError, match="'tensors' after the first chunk"):
        read([start(), manifest(spec(shape=(1,))), chunk(0, b"\x00\x00"), manifest(spec(name="v"))])


def test_section_not_allowed_is_refused() -> None:
    rx = inbound(4)
    with pytest.raises(
        WireError,
        match=r"SECTION_RESULT is not accepted here \(expected SECTION_MODEL, SECTION_INITIAL_MODEL\)",
    ):
        rx.declare(RESULT, 4)
    with pytest.raises(WireError, match="SECTION_RESULT is not accepted here"):
        rx.feed(c(0, b"a", RESULT))
    with pytest.raises(WireError, match="section 42 is not accepted here"):
        inbound().feed(c(0, b"a", 42))
    with pytest.raises(WireError, match="SECTION_INITIAL_MODEL: chunk for a section no manifest declared"):
        inbound(4).feed(c(0, b"a", INITIAL))
    with pytest.raises(WireError, match="tensors manifest: SECTION_INITIAL_MODEL is not accepted here"):
        read([start(), manifest(spec(), section=INITIAL)])


def test_declarations_past_max_bytes_raise_limit_error() -> None:
    rx = inbound(600, max_bytes=1000)
    rx.declare(INITIAL, 400)  # exactly the limit is fine
    with pytest.raises(WireLimitError, match="more than 1000 bytes"):
        rx.declare(MODEL, 1)
    # Refused at the manifest, before any chunk arrives: nothing is allocated for the 2**40 floats.
    frames = iter([start(), manifest(spec(shape=(1 << 40,)))])
    with pytest.raises(WireLimitError, match="more than 1048576 bytes"):
        read(list(frames))
    # Sparse values and positions both count.
    out = [SparseOut("w", (100,), torch.ones(10), torch.arange(10))]
    with pytest.raises(WireLimitError):
        read_frames(
            write_frames(
                service_pb2.SelectResponse,
                ("header", service_pb2.SelectionHeader()),
                chunk_size=64,
                sparse=[(RESULT, out, FLAT)],
            ),
            first="header",
            sparse_sections=frozenset({RESULT}),
            max_bytes=10 * 4 + 10 * 8 - 1,
        )


# --- streams --------------------------------------------------------------------------------------------


def test_stream_shape_is_enforced() -> None:
    with pytest.raises(WireError, match="the stream is empty"):
        read([])
    with pytest.raises(WireError, match="frame 0 is 'tensors', but the first frame must be 'start'"):
        read([manifest(spec())])
    with pytest.raises(WireError, match="frame 1 is a second 'start'"):
        read([start(), start()])
    with pytest.raises(WireError, match="frame 1 is empty"):
        read([start(), service_pb2.SelectRequest()])
    with pytest.raises(WireError, match="sparse_tensors manifest: SECTION_RESULT is not accepted here"):
        read_frames(
            [
                service_pb2.SelectResponse(header=service_pb2.SelectionHeader()),
                service_pb2.SelectResponse(sparse_tensors=tensor_pb2.SparseManifest(section=RESULT)),
            ],
            first="header",
            dense_sections=frozenset({RESULT}),
            max_bytes=100,
        )


# --- sending --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sparse_tensor_bytes_are_refused() -> None:
    t = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (3,))
    with pytest.raises(
        WireError, match=r"torch\.sparse_coo tensors cannot be sent; call \.to_dense\(\) first"
    ):
        tensor_bytes(t)
    with pytest.raises(WireError, match=r"\.to_dense\(\)"):
        tensor_bytes(torch.eye(3).to_sparse_csr())


def test_complex_dtype_is_refused() -> None:
    with pytest.raises(
        WireError, match=r"dtype torch\.complex64 is not supported on the wire \(supported: float32,"
    ):
        dtype_to_proto(torch.complex64)
    for dtype in (torch.complex128, torch.quint8, torch.float8_e4m3fn):
        with pytest.raises(WireError, match="is not supported on the wire"):
            dtype_to_proto(dtype)


def test_unsendable_tensors_raise_when_the_frames_are_built() -> None:
    def frames(t: torch.Tensor) -> object:
        return write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=64,
            dense=[(MODEL, [("z", t)])],
        )

    with pytest.raises(WireError, match="complex64"):
        frames(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(WireError, match="to_dense"):
        frames(torch.zeros(2).to_sparse())


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_non_positive_chunk_size_is_refused(chunk_size: int) -> None:
    def first_frames() -> list[service_pb2.SelectRequest]:
        frames = write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=chunk_size,
            dense=[(MODEL, [("a", torch.ones(2))])],
        )
        return list(itertools.islice(frames, 50))  # the bug makes the stream endless

    with pytest.raises(ValueError, match="chunk"):
        first_frames()


def test_flat_position_out_of_range_for_coo_is_refused_when_sending() -> None:
    out = [SparseOut("w", (3, 4), torch.ones(1), torch.tensor([12]))]
    with pytest.raises(WireError, match=r"'w'|out of range"):
        write_frames(
            service_pb2.SelectResponse,
            ("header", service_pb2.SelectionHeader()),
            chunk_size=64,
            sparse=[(RESULT, out, COO)],
        )


def test_coo_positions_of_wrong_size_are_refused_by_the_reader() -> None:
    # Three values but two coordinates: the declaration's byte count gives it away.
    out = [SparseOut("w", (3, 4), torch.ones(3), torch.tensor([[0, 0], [1, 1]]))]
    with pytest.raises(WireError, match=r"positions_size_bytes is 32 but 3 positions .* take 48 bytes"):
        read_sparse(out, COO)


def test_bool_bytes_other_than_0_or_1_are_refused() -> None:
    flag = spec(name="flags", dtype=tensor_pb2.DATA_TYPE_BOOL, shape=(3,))
    with pytest.raises(WireError, match="'flags': bool bytes must be 0 or 1"):
        read([start(), manifest(flag), chunk(0, b"\x01\x02\x00")])
    state = read([start(), manifest(flag), chunk(0, b"\x01\x00\x01")]).state(MODEL)
    assert state is not None
    assert state["flags"].tolist() == [True, False, True]
