"""Chunk frames without protobuf's copies.

A 1 MiB chunk passing through protobuf is copied into the message, again when serialised, and twice
more on the way out of a parsed message. For the one frame that carries the bulk of every call, these
functions write and read protobuf's canonical encoding directly: the data is copied once when the
frame is assembled and is a view into the received bytes afterwards. Every other frame, and any chunk
frame that is not in canonical form, goes through protobuf as usual, so the semantics are protobuf's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import DecodeError

from paramsel.wire.errors import WireError

_LEN = 2  # wire type of length-delimited fields
_VARINT = 0
# Chunk's fields (tensor.proto): section = 1, offset_bytes = 2, data = 3.
_SECTION_TAG = (1 << 3) | _VARINT
_OFFSET_TAG = (2 << 3) | _VARINT
_DATA_TAG = (3 << 3) | _LEN


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32/int64 values are sign-extended to 10 bytes
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError / ValueError on a truncated or overlong varint."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


class ChunkFrame:
    """A request or response frame whose oneof holds a Chunk, kept as its encoded bytes.

    It answers the few questions the stream readers ask of a frame (``WhichOneof("frame")``,
    ``chunk.section``, ``chunk.offset_bytes``, ``chunk.data``); ``data`` is a view, not a copy.
    """

    __slots__ = ("data", "encoded", "offset_bytes", "section")

    def __init__(self, encoded: bytes, section: int, offset_bytes: int, data: memoryview) -> None:
        self.encoded = encoded
        self.section = section
        self.offset_bytes = offset_bytes
        self.data = data

    def WhichOneof(self, _group: str) -> str:  # noqa: N802 - the protobuf method it stands in for
        return "chunk"

    @property
    def chunk(self) -> ChunkFrame:
        return self


def encode_chunk_frame(
    field_number: int, section: int, offset_bytes: int, pieces: Sequence[Any]
) -> ChunkFrame:
    """The canonical encoding of ``Frame(chunk=Chunk(section, offset_bytes, data=b"".join(pieces)))``."""
    size = sum(len(p) for p in pieces)
    inner = b""
    if section:
        inner += bytes([_SECTION_TAG]) + _varint(section)
    if offset_bytes:
        inner += bytes([_OFFSET_TAG]) + _varint(offset_bytes)
    if size:
        inner += bytes([_DATA_TAG]) + _varint(size)
    outer = _varint((field_number << 3) | _LEN) + _varint(len(inner) + size)
    encoded = b"".join([outer, inner, *pieces])
    return ChunkFrame(encoded, section, offset_bytes, memoryview(encoded)[len(encoded) - size :])


def _parse_chunk(encoded: bytes, field_number: int) -> ChunkFrame | None:
    """The frame, if ``encoded`` is exactly a canonical chunk frame; None means: let protobuf parse it."""
    buf = memoryview(encoded)
    try:
        tag, pos = _read_varint(buf, 0)
        if tag != (field_number << 3) | _LEN:
            return None
        length, pos = _read_varint(buf, pos)
        if pos + length != len(buf):
            return None
        section = offset = 0
        data = buf[pos:pos]
        last_field = 0
        while pos < len(buf):
            tag, pos = _read_varint(buf, pos)
            field = tag >> 3
            if field <= last_field:  # out of order or repeated: protobuf's merge rules apply
                return None
            last_field = field
            if tag == _SECTION_TAG:
                value, pos = _read_varint(buf, pos)
                section = ((_signed64(value) + (1 << 31)) % (1 << 32)) - (
                    1 << 31
                )  # int32, as protobuf reads it
            elif tag == _OFFSET_TAG:
                value, pos = _read_varint(buf, pos)
                offset = _signed64(value)
            elif tag == _DATA_TAG:
                size, pos = _read_varint(buf, pos)
                if pos + size > len(buf):
                    return None
                data = buf[pos : pos + size]
                pos += size
            else:
                return None
        return ChunkFrame(encoded, section, offset, data)
    except (IndexError, ValueError):
        return None


class UnparsableFrame:
    """Bytes that are not a frame at all: reading it raises WireError, so the call ends INVALID_ARGUMENT.

    (A deserializer that raised would make gRPC answer INTERNAL, as if the server were at fault.)
    """

    def __init__(self, message: str, error: Exception) -> None:
        self.reason = f"a frame is not a valid {message} message ({error})"

    def WhichOneof(self, _group: str) -> str:  # noqa: N802 - the protobuf method it stands in for
        raise WireError(self.reason)


def frame_parser(message: type[Any]) -> Callable[[bytes], Any]:
    """A gRPC deserializer for ``message``: chunk frames stay bytes, everything else is protobuf."""
    field_number = message.DESCRIPTOR.fields_by_name["chunk"].number

    def parse(encoded: bytes) -> Any:
        frame = _parse_chunk(encoded, field_number)
        if frame is not None:
            return frame
        try:
            return message.FromString(encoded)
        except DecodeError as error:
            return UnparsableFrame(message.DESCRIPTOR.full_name, error)

    return parse


def serialize_frame(frame: Any) -> bytes:
    """A gRPC serializer for any frame: a ChunkFrame is already bytes."""
    if isinstance(frame, ChunkFrame):
        return frame.encoded
    return bytes(frame.SerializeToString())
