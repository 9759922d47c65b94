"""The compact codecs on numpy 1.24-1.26 as on numpy 2.x: a popcount that needs no ``np.bitwise_count``
(numpy >= 2.0 only), and integer arithmetic that does not depend on numpy's scalar promotion rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire import WireError, compact, decode_positions, encode_positions
from paramsel.wire.positions import coo_to_flat, flat_to_coo

BITMAP = tensor_pb2.POSITION_ENCODING_BITMAP
EF = tensor_pb2.POSITION_ENCODING_ELIAS_FANO


def u8(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.uint8)


@pytest.fixture
def numpy1_popcount(monkeypatch: pytest.MonkeyPatch) -> None:
    """The codecs as they run on numpy 1.x, where np.bitwise_count does not exist."""
    monkeypatch.setattr(compact, "_BITWISE_COUNT", None)


def test_portable_popcount_of_hand_counted_bytes() -> None:
    # 0x00: 0, 0x01: 1, 0x80: 1, 0xFF: 8, 0x0F: 4, 0xAA: 4, 0x55: 4, 0x7E: 6
    assert compact.popcount_portable(u8([0x00, 0x01, 0x80, 0xFF, 0x0F, 0xAA, 0x55, 0x7E])) == 28
    assert compact.popcount_portable(u8([])) == 0
    assert compact.popcount_portable(u8([0xFF] * 3)) == 24


def test_portable_popcount_of_every_byte_value() -> None:
    every = np.arange(256, dtype=np.uint8)
    assert [compact.popcount_portable(every[i : i + 1]) for i in range(256)] == [
        i.bit_count() for i in range(256)
    ]
    assert compact.popcount_portable(every) == 1024  # each of the 8 bits is set in half of 256 bytes


def test_portable_popcount_across_its_blocks() -> None:
    block = compact._POPCOUNT_BLOCK
    data = np.full(2 * block + 3, 0xFF, dtype=np.uint8)
    data[block - 1] = 0x01  # straddling the first block boundary: 7 bits fewer
    data[block] = 0x00  # the second block's first byte: 8 fewer
    assert compact.popcount_portable(data) == 8 * data.size - 7 - 8


def test_portable_popcount_agrees_with_the_dispatching_one() -> None:
    data = np.random.default_rng(7).integers(0, 256, 100_003, dtype=np.uint8)
    expected = sum(int(byte).bit_count() for byte in data.tolist())
    assert compact.popcount_portable(data) == expected
    assert compact.popcount(data) == expected


@pytest.mark.skipif(not hasattr(np, "bitwise_count"), reason="np.bitwise_count needs numpy >= 2.0")
def test_portable_popcount_agrees_with_numpy_bitwise_count() -> None:
    data = np.random.default_rng(11).integers(0, 256, 300_001, dtype=np.uint8)
    native = int(np.bitwise_count(data).sum(dtype=np.int64))
    assert compact.popcount_portable(data) == native
    assert compact._BITWISE_COUNT is np.bitwise_count  # numpy 2.x uses its own, checked on import


def test_without_bitwise_count_the_portable_popcount_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy 1.x
    assert compact._native_popcount() is None
    monkeypatch.setattr(compact, "_BITWISE_COUNT", None)
    assert compact.popcount(u8([0xF0, 0x03])) == 6


# --- what numpy 1.x broke: every decode of a compact code --------------------------------------------


@pytest.mark.parametrize("popcount", ["installed", "numpy-1"])
def test_literal_codes_decode_on_any_numpy(popcount: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if popcount == "numpy-1":
        monkeypatch.setattr(compact, "_BITWISE_COUNT", None)
    # BITMAP of {0, 3, 9} among 12: bits 0 and 3 of byte 0 (0x09), bit 1 of byte 1 (0x02).
    assert compact.decode_bitmap(u8([0x09, 0x02]), 3, 12, what="t").tolist() == [0, 3, 9]
    # ELIAS_FANO of {1, 4, 7} among 8: L = 1; low fields 1, 0, 1 -> 0x05; high bits (p >> 1) + i =
    # 0, 3, 5 -> 0x29 (7 bits).
    assert compact.encode_elias_fano(np.array([1, 4, 7], dtype=np.int64), 8).tolist() == [0x05, 0x29]
    decoded = compact.decode_elias_fano(u8([0x05, 0x29]), 3, 8, what="t")
    assert decoded.dtype == np.int64
    assert decoded.tolist() == [1, 4, 7]
    with pytest.raises(WireError, match="2 bits set, but nnz is 3"):
        compact.decode_bitmap(u8([0x09, 0x00]), 3, 12, what="t")


@pytest.mark.usefixtures("numpy1_popcount")
@pytest.mark.parametrize("encoding", [BITMAP, EF], ids=["bitmap", "ef"])
@pytest.mark.parametrize("density", [0.0005, 0.05, 0.6])
def test_round_trips_without_bitwise_count(encoding: int, density: float) -> None:
    shape = (300, 700)
    rng = np.random.default_rng(int(density * 10_000))
    flat = np.flatnonzero(rng.random(shape[0] * shape[1]) < density).astype(np.int64)
    data = encode_positions(torch.from_numpy(flat), shape, encoding)
    back = decode_positions(
        torch.frombuffer(bytearray(data), dtype=torch.uint8), flat.size, shape, encoding, what="t"
    )
    assert back.dtype == torch.int64
    assert torch.equal(back, torch.from_numpy(flat))


# --- integer arithmetic that promotion rules could have changed ---------------------------------------


def test_coo_round_trip_stays_int64_for_large_shapes() -> None:
    shape = (3, 2**20, 2**12)  # strides beyond int32; python ints would be uint32/uint16 on numpy 1.x
    flat = torch.tensor([0, 1, 2**32 - 1, 2**32, 3 * 2**32 - 1], dtype=torch.int64)
    coords = flat_to_coo(flat, shape)
    assert coords.dtype == np.int64
    assert coords.tolist() == [
        [0, 0, 0],
        [0, 0, 1],
        [0, 2**20 - 1, 2**12 - 1],
        [1, 0, 0],
        [2, 2**20 - 1, 2**12 - 1],
    ]
    back = coo_to_flat(coords, shape, what="t")
    assert back.dtype == np.int64
    assert back.tolist() == flat.tolist()


def test_elias_fano_of_int32_positions_is_that_of_int64_ones() -> None:
    numel = 5000
    flat = np.array([0, 17, 18, 1023, 4096, 4999], dtype=np.int64)
    code = compact.encode_elias_fano(flat, numel)
    assert np.array_equal(compact.encode_elias_fano(flat.astype(np.int32), numel), code)
    assert compact.decode_elias_fano(code, flat.size, numel, what="t").tolist() == flat.tolist()
