"""Chunk frames written and read without protobuf's copies must be exactly protobuf's encoding."""

from __future__ import annotations

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support import assert_serving

from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.fastframes import ChunkFrame, encode_chunk_frame, frame_parser, serialize_frame
from paramsel.wire.streams import read_frames, write_frames

Frame = (
    service_pb2.SelectRequest
    | service_pb2.PushRequest
    | service_pb2.PullRequest
    | service_pb2.SelectResponse
    | service_pb2.PushResponse
    | service_pb2.PullResponse
)
"""Every message of the service that carries ``chunk`` frames."""

FRAMES: list[type[Frame]] = [
    service_pb2.SelectRequest,
    service_pb2.PushRequest,
    service_pb2.PullRequest,
    service_pb2.SelectResponse,
    service_pb2.PushResponse,
    service_pb2.PullResponse,
]


def _protobuf(message: type[Frame], section: int, offset: int, data: bytes) -> bytes:
    chunk = tensor_pb2.Chunk(section=tensor_pb2.Section.ValueType(section), offset_bytes=offset, data=data)
    return bytes(message(chunk=chunk).SerializeToString())


@pytest.mark.parametrize("message", FRAMES)
@pytest.mark.parametrize(
    ("section", "offset", "data"),
    [
        (1, 0, b"abc"),
        (0, 0, b""),
        (5, 1 << 40, b"\x00" * 300),
        (2, -7, b"x"),
        (-3, 5, b"yz"),
        (99, 2**63 - 1, b"q"),
    ],
)
def test_encoding_is_protobufs_byte_for_byte(
    message: type[Frame], section: int, offset: int, data: bytes
) -> None:
    frame = encode_chunk_frame(
        message.DESCRIPTOR.fields_by_name["chunk"].number, section, offset, [data[:1], data[1:]]
    )
    assert frame.encoded == _protobuf(message, section, offset, data)
    assert serialize_frame(frame) == frame.encoded
    parsed = frame_parser(message)(frame.encoded)
    assert isinstance(parsed, ChunkFrame)
    assert (parsed.section, parsed.offset_bytes, bytes(parsed.data)) == (section, offset, data)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(FRAMES),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=64),
)
def test_round_trip_agrees_with_protobuf(
    message: type[Frame], section: int, offset: int, data: bytes
) -> None:
    encoded = _protobuf(message, section, offset, data)
    parsed = frame_parser(message)(encoded)
    reference = message.FromString(encoded).chunk
    assert parsed.WhichOneof("frame") == "chunk"
    assert (parsed.chunk.section, parsed.chunk.offset_bytes, bytes(parsed.chunk.data)) == (
        reference.section,
        reference.offset_bytes,
        reference.data,
    )


def test_non_canonical_frames_get_protobufs_semantics() -> None:
    parse = frame_parser(service_pb2.SelectRequest)
    # data before section, and data twice: protobuf reads them in any order, the last data winning.
    inner = b"\x1a\x01a" + b"\x08\x02" + b"\x1a\x01b"
    frame = parse(b"\x1a" + bytes([len(inner)]) + inner)
    assert not isinstance(frame, ChunkFrame)
    assert (frame.chunk.section, frame.chunk.data) == (2, b"b")
    # Frames that are not chunks are plain protobuf messages.
    start = service_pb2.SelectRequest(start=service_pb2.SelectStart(response_chunk_size_bytes=7))
    assert parse(start.SerializeToString()) == start


def test_bytes_that_are_no_frame_are_refused_not_crashed_on() -> None:
    frame = frame_parser(service_pb2.SelectRequest)(b"\x1a\xff\xff\xff")  # a length past the end
    with pytest.raises(WireError, match=r"not a valid paramsel\.v1\.SelectRequest"):
        frame.WhichOneof("frame")


def test_garbage_over_the_wire_is_invalid_argument(server: RunningServer, channel: grpc.Channel) -> None:
    raw = channel.stream_stream(
        "/paramsel.v1.ParameterSelectionService/Select",
        request_serializer=lambda b: b,
        response_deserializer=service_pb2.SelectResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(raw(iter([b"\x0a\x02\x18\x05", b"\x1a\xff\xff"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid paramsel.v1.SelectRequest" in (err.value.details() or "")
    assert_serving(channel)


def test_encoded_streams_read_back_like_protobuf_ones() -> None:
    model = [("w", torch.arange(300_000, dtype=torch.float32)), ("b", torch.ones(3, dtype=torch.bfloat16))]
    start = ("start", service_pb2.SelectStart())
    parse = frame_parser(service_pb2.SelectRequest)
    fast = [
        parse(serialize_frame(f))
        for f in write_frames(
            service_pb2.SelectRequest, start, chunk_size=1 << 16, dense=[(1, model)], encoded_chunks=True
        )
    ]
    assert sum(isinstance(f, ChunkFrame) for f in fast) == 19  # 1.2 MB in 64 KiB chunks
    got = read_frames(iter(fast), first="start", dense_sections=frozenset({1}), max_bytes=1 << 30).state(1)
    assert got is not None
    assert torch.equal(got["w"], model[0][1])
    assert torch.equal(got["b"], model[1][1])
