"""BITMAP, ELIAS_FANO and COMPACT positions: literal bytes, round trips, choices and refusals."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DTYPES, WireError, decode_positions, encode_positions, sparse_decl
from paramsel.wire.codec import choose_encoding, expected_positions_nbytes
from paramsel.wire.compact import (
    decode_bitmap,
    decode_elias_fano,
    encode_bitmap,
    encode_elias_fano,
    pack_fields,
    unpack_fields,
)
from paramsel.wire.streams import Received, SparseOut, read_frames, write_frames

RESULT = tensor_pb2.SECTION_RESULT
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
BITMAP = tensor_pb2.POSITION_ENCODING_BITMAP
EF = tensor_pb2.POSITION_ENCODING_ELIAS_FANO
COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
F32 = tensor_pb2.DATA_TYPE_FLOAT32
SETTINGS = settings(max_examples=150, deadline=None, database=None)
ENCODINGS = pytest.mark.parametrize("encoding", [BITMAP, EF, COMPACT], ids=["bitmap", "ef", "compact"])


def reference_elias_fano(positions: list[int], numel: int) -> bytes:
    """The contract's text, bit by bit with Python integers."""
    n = len(positions)
    if n == 0:
        return b""
    low_bits = 0
    while n << (low_bits + 1) <= numel:  # floor(log2(U / n)) without floating point
        low_bits += 1
    low = sum((p & ((1 << low_bits) - 1)) << (i * low_bits) for i, p in enumerate(positions))
    high = sum(1 << ((p >> low_bits) + i) for i, p in enumerate(positions))
    high_nbits = n + ((numel - 1) >> low_bits) + 1
    return low.to_bytes(-(-n * low_bits // 8), "little") + high.to_bytes(-(-high_nbits // 8), "little")


def reference_bitmap(positions: list[int], numel: int) -> bytes:
    return sum(1 << p for p in positions).to_bytes(-(-numel // 8), "little")


def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def decode(data: bytes, nnz: int, shape: tuple[int, ...], encoding: int) -> list[int]:
    got = decode_positions(as_bytes(data), nnz, shape, encoding, what="t")
    assert got.dtype == torch.int64
    out: list[int] = got.tolist()
    return out


# --- the bytes are the contract -------------------------------------------------------------------------


def test_bitmap_bytes_are_pinned() -> None:
    # U = 16, positions 1, 4, 5, 15: byte 0 has bits 1, 4, 5 = 0b0011_0010; byte 1 has bit 15 - 8 = 7.
    positions = torch.tensor([1, 4, 5, 15])
    assert bytes(encode_positions(positions, (4, 4), BITMAP)) == b"\x32\x80"
    assert decode(b"\x32\x80", 4, (4, 4), BITMAP) == [1, 4, 5, 15]
    # U = 12 is not a multiple of 8: still ceil(12 / 8) = 2 bytes, bits 12-15 are padding.
    assert bytes(encode_positions(torch.tensor([0, 11]), (12,), BITMAP)) == b"\x01\x08"
    # nnz = 0 still sends the whole (empty) bitmap.
    assert bytes(encode_positions(torch.zeros(0, dtype=torch.int64), (12,), BITMAP)) == b"\x00\x00"


def test_elias_fano_bytes_are_pinned() -> None:
    # U = 16, n = 4: L = floor(log2(16 / 4)) = 2.
    # Low parts p & 3 = 1, 0, 1, 3 as 2-bit fields from bit 0: 0b11_01_00_01 = 0xd1 (ceil(4 * 2 / 8) = 1 byte).
    # High parts p >> 2 = 0, 1, 1, 3; bits (p >> 2) + i = 0, 2, 3, 6 of n + (15 >> 2) + 1 = 8 bits:
    # 0b0100_1101 = 0x4d.
    positions = torch.tensor([1, 4, 5, 15])
    assert bytes(encode_positions(positions, (16,), EF)) == b"\xd1\x4d"
    assert decode(b"\xd1\x4d", 4, (16,), EF) == [1, 4, 5, 15]


def test_elias_fano_fields_cross_bytes() -> None:
    # U = 40, n = 4: L = floor(log2(10)) = 3. Positions 2, 13, 27, 39.
    # Low parts 2, 5, 3, 7 as 3-bit fields: bits 0-2 = 010, 3-5 = 101, 6-8 = 011, 9-11 = 111, so
    # byte 0 = bits 1, 3, 5, 6, 7 = 0xea and byte 1 = bits 9, 10, 11 = 0x0e (bits 12-15 padding).
    # High parts 0, 1, 3, 4; bits 0, 2, 5, 7 of 4 + (39 >> 3) + 1 = 9 bits: 0xa5, then 0x00.
    positions = torch.tensor([2, 13, 27, 39])
    assert bytes(encode_positions(positions, (5, 8), EF)) == b"\xea\x0e\xa5\x00"
    assert decode(b"\xea\x0e\xa5\x00", 4, (5, 8), EF) == [2, 13, 27, 39]


def test_elias_fano_without_low_bits() -> None:
    # U = 5 < 2n = 8: L = 0, no low part; bits p + i = 0, 2, 5, 7 of 4 + 4 + 1 = 9 bits.
    assert bytes(encode_positions(torch.tensor([0, 1, 3, 4]), (5,), EF)) == b"\xa5\x00"
    assert decode(b"\xa5\x00", 4, (5,), EF) == [0, 1, 3, 4]
    # No bytes at all when n = 0.
    assert bytes(encode_positions(torch.zeros(0, dtype=torch.int64), (5,), EF)) == b""
    assert decode(b"", 0, (5,), EF) == []


@pytest.mark.parametrize("low_bits", range(1, 65))
def test_fields_of_every_width_match_the_reference(low_bits: int) -> None:
    rng = np.random.default_rng(low_bits)
    for n in (1, 7, 8, 9, 23):
        values = [int(v) for v in rng.integers(0, 1 << min(low_bits, 63), n, dtype=np.uint64)]
        expected = sum(v << (i * low_bits) for i, v in enumerate(values)).to_bytes(
            -(-n * low_bits // 8), "little"
        )
        packed = pack_fields(np.array(values, dtype=np.uint64), low_bits)
        assert packed.tobytes() == expected
        assert [int(v) for v in unpack_fields(packed, n, low_bits)] == values


@pytest.mark.parametrize(
    ("numel", "positions"),
    [
        ((1 << 60) - 1, [0]),  # L = 59
        ((1 << 60) - 1, [0, (1 << 60) - 2]),  # L = 58
        ((1 << 60) - 1, [5, 1 << 40, (1 << 59) + 3]),
        (1 << 33, [1, 2, 3, (1 << 33) - 1]),
        (10**12, list(range(0, 10**12, 10**10 + 7))),
    ],
    ids=["l59", "l58", "three", "l31", "hundred"],
)
def test_large_tensors_with_few_positions(numel: int, positions: list[int]) -> None:
    flat = np.array(positions, dtype=np.int64)
    data = encode_elias_fano(flat, numel)
    assert data.tobytes() == reference_elias_fano(positions, numel)
    assert decode_elias_fano(data, len(positions), numel, what="t").tolist() == positions


# --- sizes and choices ----------------------------------------------------------------------------------


def test_expected_positions_nbytes_takes_the_shape() -> None:
    assert expected_positions_nbytes(COO, 3, (4, 5)) == 48
    assert expected_positions_nbytes(COO, 3, ()) == 0
    assert expected_positions_nbytes(FLAT, 3, (4, 5)) == 24
    assert expected_positions_nbytes(BITMAP, 3, (4, 5)) == 3
    assert expected_positions_nbytes(BITMAP, 0, (17,)) == 3
    assert expected_positions_nbytes(BITMAP, 0, (0, 3)) == 0
    assert expected_positions_nbytes(EF, 4, (16,)) == 2
    assert expected_positions_nbytes(EF, 4, (5, 8)) == 4
    assert expected_positions_nbytes(EF, 0, (5, 8)) == 0
    assert expected_positions_nbytes(EF, 1, ()) == 1  # U = 1: L = 0, 1 + 0 + 1 = 2 high bits
    # 10 % and 1 % of 50M: 3 + 2 bits and 6 + 2.6 bits per position.
    assert expected_positions_nbytes(EF, 5_000_000, (50_000_000,)) == 1_875_000 + 1_406_250
    assert expected_positions_nbytes(EF, 500_000, (50_000_000,)) == 375_000 + 160_157
    with pytest.raises(
        WireError, match="BITMAP codes distinct positions, but nnz 13 exceeds the tensor's 12"
    ):
        expected_positions_nbytes(BITMAP, 13, (3, 4))
    with pytest.raises(
        WireError, match=r"ELIAS_FANO codes distinct positions, but nnz 1 exceeds .* 0 elements"
    ):
        expected_positions_nbytes(EF, 1, (0,))
    with pytest.raises(WireError, match="COMPACT is only a request"):
        expected_positions_nbytes(COMPACT, 1, (3,))
    with pytest.raises(WireError, match="unknown position encoding 9"):
        expected_positions_nbytes(9, 1, (3,))


def test_choose_encoding() -> None:
    # U = 16, n = 4: both take 2 bytes; a tie goes to ELIAS_FANO.
    assert choose_encoding(COMPACT, 4, (16,)) == EF
    assert choose_encoding(COMPACT, 8, (16,)) == BITMAP  # EF: 1 + 3 bytes
    assert choose_encoding(COMPACT, 16, (16,)) == BITMAP
    assert choose_encoding(COMPACT, 1, (16,)) == EF
    assert choose_encoding(COMPACT, 0, (16,)) == EF  # no bytes at all
    assert choose_encoding(COMPACT, 0, (0,)) == EF
    assert choose_encoding(COMPACT, 1, ()) == EF  # 1 byte each
    assert choose_encoding(COMPACT, 5_000_000, (50_000_000,)) == EF
    assert choose_encoding(COMPACT, 20_000_000, (50_000_000,)) == BITMAP
    for encoding in (COO, FLAT, BITMAP, EF, tensor_pb2.POSITION_ENCODING_SEEDED):
        assert choose_encoding(encoding, 3, (4,)) == encoding
    assert choose_encoding(tensor_pb2.POSITION_ENCODING_UNSPECIFIED, 3, (4,)) == COO
    with pytest.raises(WireError, match="unknown position encoding 7"):
        choose_encoding(7, 3, (4,))
    with pytest.raises(WireError, match="nnz 5 exceeds"):
        choose_encoding(COMPACT, 5, (4,))


@pytest.mark.parametrize("numel", [1, 2, 3, 7, 8, 9, 16, 100, 1000, 4097])
def test_compact_is_the_smaller_of_the_two(numel: int) -> None:
    for nnz in range(numel + 1):
        bitmap = expected_positions_nbytes(BITMAP, nnz, (numel,))
        ef = expected_positions_nbytes(EF, nnz, (numel,))
        chosen = choose_encoding(COMPACT, nnz, (numel,))
        assert expected_positions_nbytes(chosen, nnz, (numel,)) == min(bitmap, ef)
        assert chosen == (BITMAP if bitmap < ef else EF)


# --- round trips ----------------------------------------------------------------------------------------


def round_trip(out: list[SparseOut], encoding: int, chunk_size: int = 5) -> Received:
    frames = list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", service_pb2.SelectionHeader()),
            chunk_size=chunk_size,
            sparse=[(RESULT, out, encoding)],
        )
    )
    for f in frames:
        if f.WhichOneof("frame") == "chunk":
            assert 0 < len(f.chunk.data) <= chunk_size
    return read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 30)


def check(out: list[SparseOut], encoding: int, chunk_size: int = 5) -> list[int]:
    """Round-trips ``out``; returns the encoding each tensor declared."""
    got = round_trip(out, encoding, chunk_size).sparse[RESULT]
    assert [s.decl.name for s in got] == [o.name for o in out]
    for s, o in zip(got, out, strict=True):
        assert s.decl.shape == o.shape
        assert s.decl.nnz == o.values.numel()
        assert s.decl.positions_nbytes == expected_positions_nbytes(
            s.decl.position_encoding, s.decl.nnz, o.shape
        )
        if encoding != COMPACT:
            assert s.decl.position_encoding == encoding
        assert torch.equal(s.values, o.values)
        assert s.positions.dtype == torch.int64
        assert torch.equal(s.positions, o.positions.to(torch.int64))
    return [s.decl.position_encoding for s in got]


def sparse(name: str, shape: tuple[int, ...], positions: list[int] | torch.Tensor) -> SparseOut:
    p = torch.as_tensor(positions, dtype=torch.int64)
    return SparseOut(name, shape, torch.arange(p.numel(), dtype=torch.float32), p)


@ENCODINGS
def test_density_zero(encoding: int) -> None:
    assert check([sparse("w", (3, 4), [])], encoding) == [EF if encoding == COMPACT else encoding]
    assert bytes(encode_positions(torch.zeros(0, dtype=torch.int64), (3, 4), EF)) == b""


@ENCODINGS
def test_density_one(encoding: int) -> None:
    for shape in [(3, 4), (5,), (1000,), (7, 9)]:
        chosen = check([sparse("w", shape, list(range(math.prod(shape))))], encoding)
        assert chosen == [BITMAP if encoding == COMPACT else encoding]


@ENCODINGS
def test_single_entry(encoding: int) -> None:
    for shape, position in [((3, 4), 7), ((1,), 0), ((1000,), 999), ((2, 3, 4), 0)]:
        check([sparse("w", shape, [position])], encoding)


@ENCODINGS
@pytest.mark.parametrize("shape", [(2,), (9,), (3, 4), (2, 3, 4), (1000,), (13, 17)], ids=str)
def test_positions_at_both_ends(encoding: int, shape: tuple[int, ...]) -> None:
    n = math.prod(shape)
    check([sparse("w", shape, [0, n - 1])], encoding)
    check([sparse("w", shape, [0, 1, n // 2, n - 1][: min(n, 4)])], encoding)


@ENCODINGS
def test_zero_d_tensor(encoding: int) -> None:
    check([sparse("s", (), [0])], encoding)
    check([sparse("s", (), [])], encoding)


@ENCODINGS
@pytest.mark.parametrize("numel", [1, 3, 7, 9, 15, 17, 63, 65, 1001])
def test_numel_not_a_multiple_of_8(encoding: int, numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    for density in (0.05, 0.3, 0.7, 0.95):
        positions = torch.nonzero(torch.rand(numel, generator=g) < density).reshape(-1)
        check([sparse("w", (numel,), positions)], encoding, chunk_size=3)


@pytest.mark.parametrize("encoding", [EF, COMPACT], ids=["ef", "compact"])
def test_large_numel_with_few_positions(encoding: int) -> None:
    shape = (1 << 20, 1 << 20, 1 << 10)  # 2^50 elements; a bitmap would take 128 TiB
    numel = math.prod(shape)
    positions = [0, 12345, 1 << 40, numel - 2, numel - 1]
    assert check([sparse("w", shape, positions)], encoding) == [EF]
    huge = SparseOut("w", (numel,), torch.ones(3), torch.tensor([0, 5, numel - 1]))
    assert check([huge], encoding) == [EF]


@ENCODINGS
def test_nearly_every_position(encoding: int) -> None:
    for numel, missing in [(100, [0]), (100, [99]), (100, [3, 50]), (4096, [17]), (12, [5])]:
        positions = sorted(set(range(numel)) - set(missing))
        chosen = check([sparse("w", (numel,), positions)], encoding, chunk_size=7)
        assert chosen == [BITMAP if encoding == COMPACT else encoding]


@ENCODINGS
def test_chunks_split_the_positions(encoding: int) -> None:
    g = torch.Generator().manual_seed(1)
    out = [
        sparse("a", (40, 50), torch.randperm(2000, generator=g)[:150].sort().values),
        sparse("empty", (9,), []),
        sparse("dense", (30, 30), torch.randperm(900, generator=g)[:600].sort().values),
        sparse("scalar", (), [0]),
        sparse("b", (3, 5), [2, 14]),
    ]
    for chunk_size in (1, 2, 3, 7, 64, 1000, 1 << 20):
        check(out, encoding, chunk_size)


def test_compact_chooses_per_tensor() -> None:
    out = [
        sparse("dense", (10, 10), list(range(0, 100, 2))),  # 50 %: bitmap 13 bytes, EF 7 + 13
        sparse("sparse", (10, 10), [3, 77]),  # 2 %: EF 2 + 1 bytes, bitmap 13
        sparse("quarter", (16,), [1, 4, 5, 15]),  # a tie
        sparse("full", (8,), list(range(8))),
        sparse("none", (8,), []),
    ]
    assert check(out, COMPACT, chunk_size=4) == [BITMAP, EF, EF, BITMAP, EF]
    frames = list(
        write_frames(
            service_pb2.SelectResponse,
            ("header", service_pb2.SelectionHeader()),
            chunk_size=1 << 20,
            sparse=[(RESULT, out, COMPACT)],
        )
    )
    specs = [s for f in frames if f.WhichOneof("frame") == "sparse_tensors" for s in f.sparse_tensors.tensors]
    assert [s.position_encoding for s in specs] == [BITMAP, EF, EF, BITMAP, EF]
    assert [s.positions_size_bytes for s in specs] == [13, 3, 2, 1, 0]
    # encode_positions resolves COMPACT the same way.
    assert bytes(encode_positions(out[0].positions, (10, 10), COMPACT)) == bytes(
        encode_positions(out[0].positions, (10, 10), BITMAP)
    )
    assert bytes(encode_positions(out[2].positions, (16,), COMPACT)) == b"\xd1\x4d"


def test_non_contiguous_and_int32_positions() -> None:
    v = torch.arange(10, dtype=torch.float32)[::2]
    p = torch.arange(20, dtype=torch.int32)[::4]
    for encoding in (BITMAP, EF, COMPACT):
        got = round_trip([SparseOut("w", (4, 5), v, p)], encoding).sparse[RESULT]
        assert torch.equal(got[0].values, v)
        assert got[0].positions.tolist() == [0, 4, 8, 12, 16]


@SETTINGS
@given(
    numel=st.integers(1, 5000),
    density=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)),
    seed=st.integers(0, 2**32 - 1),
    encoding=st.sampled_from([BITMAP, EF, COMPACT]),
    chunk_size=st.integers(1, 300),
)
@pytest.mark.slow  # fuzzes
def test_random_subsets_round_trip(
    numel: int, density: float, seed: int, encoding: int, chunk_size: int
) -> None:
    positions = np.flatnonzero(np.random.default_rng(seed).random(numel) < density)
    flat = positions.tolist()
    bitmap = encode_bitmap(positions, numel).tobytes()
    ef = encode_elias_fano(positions, numel).tobytes()
    assert bitmap == reference_bitmap(flat, numel)
    assert ef == reference_elias_fano(flat, numel)
    assert decode_bitmap(np.frombuffer(bitmap, dtype=np.uint8), len(flat), numel, what="t").tolist() == flat
    assert decode_elias_fano(np.frombuffer(ef, dtype=np.uint8), len(flat), numel, what="t").tolist() == flat
    chosen = check([sparse("w", (numel,), torch.from_numpy(positions))], encoding, chunk_size)
    if encoding == COMPACT:
        assert chosen == [BITMAP if len(bitmap) < len(ef) else EF]


# --- refusals: sending ----------------------------------------------------------------------------------


def write(out: list[SparseOut], encoding: int) -> object:
    return write_frames(
        service_pb2.SelectResponse,
        ("header", service_pb2.SelectionHeader()),
        chunk_size=64,
        sparse=[(RESULT, out, encoding)],
    )


@ENCODINGS
@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([3, 2], "position 2 at index 1 follows 3"),
        ([1, 4, 4, 7], "position 4 at index 2 follows 4"),
        ([0, 5, 9, 1], "position 1 at index 3 follows 9"),
    ],
    ids=["decreasing", "repeated", "last"],
)
def test_non_increasing_positions_are_refused_when_sending(
    encoding: int, positions: list[int], message: str
) -> None:
    name = "ELIAS_FANO" if encoding == EF else "BITMAP" if encoding == BITMAP else "(BITMAP|ELIAS_FANO)"
    with pytest.raises(
        WireError, match=rf"SECTION_RESULT 'w': {name} needs strictly increasing positions, but {message}"
    ):
        write([sparse("w", (16,), positions)], encoding)
    with pytest.raises(WireError, match=re.escape(message)):
        encode_positions(torch.tensor(positions), (16,), encoding)


@ENCODINGS
@pytest.mark.parametrize(("positions", "bad"), [([3, 16], 16), ([-1, 3], -1), ([0, 1000], 1000)])
def test_out_of_range_positions_are_refused_when_sending(
    encoding: int, positions: list[int], bad: int
) -> None:
    with pytest.raises(
        WireError, match=rf"SECTION_RESULT 'w': position {bad} is out of range for a tensor of 16 elements"
    ):
        write([sparse("w", (4, 4), positions)], encoding)


@ENCODINGS
def test_mismatched_or_too_many_positions_are_refused_when_sending(encoding: int) -> None:
    with pytest.raises(WireError, match="SECTION_RESULT 'w': 3 values but 2 positions"):
        write([SparseOut("w", (16,), torch.ones(3), torch.tensor([1, 2]))], encoding)
    with pytest.raises(WireError, match=r"SECTION_RESULT 'w': .*nnz 5 exceeds the tensor's 4 elements"):
        write([sparse("w", (4,), [0, 1, 2, 3, 3])], encoding)
    with pytest.raises(WireError, match=r"takes flat positions \(a 1-d array\), not a 2-d array"):
        write([SparseOut("w", (4, 4), torch.ones(2), torch.tensor([[0, 1], [2, 3]]))], encoding)
    with pytest.raises(WireError, match=r"takes flat positions \(a 1-d array\), not a 2-d array"):
        encode_positions(torch.tensor([[0, 1], [2, 3]]), (4, 4), encoding)
    with pytest.raises(WireError, match=r"SECTION_RESULT 'w': .* not a 0-d array"):
        write([SparseOut("w", (4, 4), torch.ones(1), torch.tensor(3))], encoding)


def test_coo_and_flat_still_send_what_they_are_given() -> None:
    # Unsorted and repeated positions are fine for COO_INT64 and FLAT_INT64 (a Pull payload sums them).
    for encoding in (COO, FLAT):
        got = round_trip([sparse("w", (3, 4), [7, 2, 2])], encoding).sparse[RESULT]
        assert got[0].positions.tolist() == [7, 2, 2]


# --- refusals: receiving --------------------------------------------------------------------------------


def read_literal(shape: tuple[int, ...], nnz: int, encoding: int, positions: bytes) -> list[int]:
    """Reads one sparse tensor of ``nnz`` float32 ones whose positions are the literal ``positions``."""
    spec = tensor_pb2.SparseTensorSpec(
        name="w",
        dtype=F32,
        shape=list(shape),
        nnz=nnz,
        position_encoding=encoding,  # type: ignore[arg-type]
        positions_size_bytes=len(positions),
    )
    data = np.ones(nnz, dtype="<f4").tobytes() + positions
    frames = [
        service_pb2.SelectResponse(header=service_pb2.SelectionHeader()),
        service_pb2.SelectResponse(sparse_tensors=tensor_pb2.SparseManifest(section=RESULT, tensors=[spec])),
    ]
    if data:
        frames.append(
            service_pb2.SelectResponse(chunk=tensor_pb2.Chunk(section=RESULT, offset_bytes=0, data=data))
        )
    got = read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 20)
    out: list[int] = got.sparse[RESULT][0].positions.tolist()
    return out


def test_literal_streams_are_read() -> None:
    assert read_literal((16,), 4, BITMAP, b"\x32\x80") == [1, 4, 5, 15]
    assert read_literal((16,), 4, EF, b"\xd1\x4d") == [1, 4, 5, 15]
    assert read_literal((5, 8), 4, EF, b"\xea\x0e\xa5\x00") == [2, 13, 27, 39]
    assert read_literal((3,), 0, EF, b"") == []


@pytest.mark.parametrize(
    ("shape", "nnz", "encoding", "size", "expected"),
    [
        ((16,), 4, BITMAP, 3, 2),
        ((12,), 0, BITMAP, 0, 2),
        ((16,), 4, EF, 3, 2),
        ((16,), 0, EF, 1, 0),
        ((5, 8), 4, EF, 3, 4),
    ],
)
def test_wrong_byte_count_is_refused(
    shape: tuple[int, ...], nnz: int, encoding: int, size: int, expected: int
) -> None:
    spec = tensor_pb2.SparseTensorSpec(
        name="w",
        dtype=F32,
        shape=list(shape),
        nnz=nnz,
        position_encoding=encoding,  # type: ignore[arg-type]
        positions_size_bytes=size,
    )
    with pytest.raises(
        WireError, match=rf"result 'w': positions_size_bytes is {size} but .* take {expected} bytes"
    ):
        sparse_decl(spec, what="result")
    # Called directly, the decoders check the size too.
    with pytest.raises(WireError, match=rf"t: .* positions take {expected} bytes, got {size}"):
        decode_positions(torch.zeros(size, dtype=torch.uint8), nnz, shape, encoding, what="t")


def test_compact_and_impossible_nnz_are_refused_in_a_spec() -> None:
    spec = tensor_pb2.SparseTensorSpec(
        name="w", dtype=F32, shape=[16], nnz=4, position_encoding=COMPACT, positions_size_bytes=2
    )
    with pytest.raises(WireError, match="result 'w': POSITION_ENCODING_COMPACT is only a request"):
        sparse_decl(spec, what="result")
    with pytest.raises(WireError, match="t: POSITION_ENCODING_COMPACT is only a request"):
        decode_positions(as_bytes(b"\xd1\x4d"), 4, (16,), COMPACT, what="t")
    for encoding in (BITMAP, EF):
        spec = tensor_pb2.SparseTensorSpec(
            name="w", dtype=F32, shape=[2, 2], nnz=5, position_encoding=encoding, positions_size_bytes=1
        )
        with pytest.raises(WireError, match=r"result 'w': .* nnz 5 exceeds the tensor's 4 elements"):
            sparse_decl(spec, what="result")


@pytest.mark.parametrize(
    ("shape", "nnz", "data", "message"),
    [
        ((16,), 3, b"\x32\x80", "BITMAP has 4 bits set, but nnz is 3"),
        ((16,), 5, b"\x32\x80", "BITMAP has 4 bits set, but nnz is 5"),
        ((16,), 0, b"\x00\x01", "BITMAP has 1 bits set, but nnz is 0"),
        ((12,), 2, b"\x01\x10", r"BITMAP has bits set past its 12 bits \(padding bits must be 0\)"),
        ((12,), 1, b"\x00\x80", "BITMAP has bits set past its 12 bits"),
        ((1,), 1, b"\x03", "BITMAP has bits set past its 1 bits"),
        ((3, 3), 9, b"\xff\x03", "BITMAP has bits set past its 9 bits"),
    ],
    ids=["too-few", "too-many", "empty", "padding", "last-bit", "0-d", "full"],
)
def test_bad_bitmaps_are_refused(shape: tuple[int, ...], nnz: int, data: bytes, message: str) -> None:
    with pytest.raises(WireError, match=rf"SECTION_RESULT 'w': {message}"):
        read_literal(shape, nnz, BITMAP, data)


@pytest.mark.parametrize(
    ("shape", "nnz", "data", "message"),
    [
        # U = 16, n = 4, L = 2; valid is d1 4d (positions 1, 4, 5, 15).
        ((16,), 4, b"\xd1\x4c", "ELIAS_FANO high part has 3 bits set, but nnz is 4"),
        ((16,), 4, b"\xd1\x5d", "ELIAS_FANO high part has 5 bits set, but nnz is 4"),
        # High bits 0, 2, 3, 7: high parts 0, 1, 1, 4, so the last position is 4 * 4 + 3 = 19.
        ((16,), 4, b"\xd1\x8d", "position 19 is out of range for a tensor of 16 elements"),
        # Low parts 1, 1, 0, 3: positions 1, 5, 4, 15.
        (
            (16,),
            4,
            b"\xc5\x4d",
            "ELIAS_FANO positions must be strictly increasing, but position 4 at index 2 follows 5",
        ),
        # Low parts 1, 0, 0, 3: positions 1, 4, 4, 15.
        (
            (16,),
            4,
            b"\xc1\x4d",
            "ELIAS_FANO positions must be strictly increasing, but position 4 at index 2 follows 4",
        ),
        # U = 5, n = 4, L = 0: 9 high bits, bit 9 is padding.
        (
            (5,),
            4,
            b"\xa5\x02",
            r"ELIAS_FANO high part has bits set past its 9 bits \(padding bits must be 0\)",
        ),
        # Positions 0, 1, 3, 4 and a fifth bit, bit 8 (inside the 9 bits).
        ((5,), 4, b"\xa5\x01", "ELIAS_FANO high part has 5 bits set, but nnz is 4"),
        # U = 40, n = 4, L = 3: 12 low bits, bits 12-15 of the second byte are padding.
        ((5, 8), 4, b"\xea\x1e\xa5\x00", "ELIAS_FANO low part has bits set past its 12 bits"),
        # n = 1 of U = 1: L = 0, bits 0-1; bit 1 set means a high part of 1, position 1.
        ((), 1, b"\x02", "position 1 is out of range for a tensor of 1 elements"),
        ((), 1, b"\x04", "ELIAS_FANO high part has bits set past its 2 bits"),
    ],
    ids=[
        "popcount-low",
        "popcount-high",
        "beyond-u",
        "decreasing",
        "repeated",
        "high-padding",
        "extra-bit",
        "low-padding",
        "0-d-beyond",
        "0-d-padding",
    ],
)
def test_bad_elias_fano_codes_are_refused(
    shape: tuple[int, ...], nnz: int, data: bytes, message: str
) -> None:
    with pytest.raises(WireError, match=rf"SECTION_RESULT 'w': {message}"):
        read_literal(shape, nnz, EF, data)


@SETTINGS
@given(numel=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), flip=st.integers(0, 10**6))
def test_any_corrupted_code_is_refused_or_decodes_to_a_valid_set(numel: int, seed: int, flip: int) -> None:
    """Whatever a sender puts in the bytes, what comes out is strictly increasing, in range and nnz long."""
    rng = np.random.default_rng(seed)
    positions = np.flatnonzero(rng.random(numel) < rng.random())
    nnz = positions.size
    for encode, decoder in ((encode_bitmap, decode_bitmap), (encode_elias_fano, decode_elias_fano)):
        data = encode(positions, numel).copy()
        if not data.size:
            continue
        data[flip % data.size] ^= np.uint8(1 << (flip // data.size % 8))
        try:
            got = decoder(data, nnz, numel, what="t")
        except WireError:
            continue
        assert got.size == nnz
        assert np.all(got[1:] > got[:-1])
        assert nnz == 0 or (got[0] >= 0 and got[-1] < numel)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
@pytest.mark.parametrize(
    ("shape", "positions"),
    [((7,), []), ((7,), list(range(7))), ((3, 4), [5]), ((3, 4), [0, 11]), ((2, 3, 4), [0, 9, 23])],
    ids=["density-0", "density-1", "single", "both-ends", "3d"],
)
def test_compact_round_trip_for_every_dtype(
    dtype: torch.dtype, shape: tuple[int, ...], positions: list[int]
) -> None:
    values = (
        torch.arange(1, len(positions) + 1).to(dtype)
        if dtype != torch.bool
        else torch.ones(len(positions), dtype=torch.bool)
    )
    out = SparseOut("t", shape, values, torch.tensor(positions, dtype=torch.int64))
    frames = write_frames(
        service_pb2.SelectResponse,
        ("header", service_pb2.SelectionHeader()),
        chunk_size=5,
        sparse=[(RESULT, [out], COMPACT)],
    )
    got = read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 20).sparse[
        RESULT
    ][0]
    assert got.decl.position_encoding in (BITMAP, EF)
    assert got.values.dtype == dtype
    assert torch.equal(got.values.view(torch.uint8), values.view(torch.uint8))
    assert got.positions.tolist() == positions
