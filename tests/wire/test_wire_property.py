"""Random models, sparse results and chunkings round-trip exactly."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DTYPES, Inbound, itemsize
from paramsel.wire.streams import SparseOut, read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
RESULT = tensor_pb2.SECTION_RESULT
SETTINGS = settings(max_examples=150, deadline=None, database=None)

SHAPES = st.lists(st.integers(0, 5), max_size=3).map(tuple)


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """Any bit pattern for numeric dtypes (so NaN payloads, -0.0, subnormals); 0/1 for bool."""
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    shape = draw(SHAPES)
    n = math.prod(shape)
    if dtype == torch.bool:
        t = torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    else:
        data = draw(st.binary(min_size=n * itemsize(dtype), max_size=n * itemsize(dtype)))
        t = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
            if n
            else torch.empty(0, dtype=dtype)
        )
    t = t.reshape(shape)
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.mT  # non-contiguous
    return t


@SETTINGS
@given(model=st.lists(tensors(), max_size=6), chunk_size=st.integers(1, 64))
def test_random_models_round_trip_exactly(model: list[torch.Tensor], chunk_size: int) -> None:
    named = [(f"p{i}", t) for i, t in enumerate(model)]
    frames = list(
        write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=chunk_size,
            dense=[(MODEL, named)],
        )
    )
    chunks = [f.chunk for f in frames if f.WhichOneof("frame") == "chunk"]
    total = sum(t.numel() * t.element_size() for t in model)
    assert all(0 < len(c.data) <= chunk_size for c in chunks)
    assert len(chunks) == -(-total // chunk_size)
    assert b"".join(c.data for c in chunks) == b"".join(raw(t) for t in model)

    # A section with no tensors sends no manifest, so it reads back as "not sent" (None).
    state = (
        read_frames(frames, first="start", dense_sections=frozenset({MODEL}), max_bytes=1 << 20).state(MODEL)
        or {}
    )
    assert list(state) == [name for name, _ in named]
    for name, t in named:
        got = state[name]
        assert got.dtype == t.dtype
        assert got.shape == t.shape
        assert raw(got) == raw(t)
        assert torch.equal(got, t) or got.dtype.is_floating_point  # NaN != NaN; the bytes above decide


@st.composite
def sparse_tensors(draw: st.DrawFn, name: str) -> SparseOut:
    shape = draw(SHAPES)
    n = math.prod(shape)
    positions = sorted(draw(st.sets(st.integers(0, n - 1), max_size=n)) if n else set())
    dtype = draw(st.sampled_from(list(DTYPES.values())))
    nnz = len(positions)
    if dtype == torch.bool:
        values = torch.tensor(draw(st.lists(st.booleans(), min_size=nnz, max_size=nnz)), dtype=torch.bool)
    else:
        data = draw(st.binary(min_size=nnz * itemsize(dtype), max_size=nnz * itemsize(dtype)))
        values = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)
            if nnz
            else torch.empty(0, dtype=dtype)
        )
    return SparseOut(name, shape, values, torch.tensor(positions, dtype=torch.int64))


@SETTINGS
@given(
    out=st.lists(st.integers(), max_size=5).flatmap(
        lambda ids: st.tuples(*(sparse_tensors(f"s{i}") for i in range(len(ids))))
    ),
    encoding=st.sampled_from(
        [tensor_pb2.POSITION_ENCODING_COO_INT64, tensor_pb2.POSITION_ENCODING_FLAT_INT64]
    ),
    chunk_size=st.integers(1, 64),
)
def test_random_sparse_results_round_trip_exactly(
    out: tuple[SparseOut, ...], encoding: int, chunk_size: int
) -> None:
    frames = write_frames(
        service_pb2.SelectResponse,
        ("header", service_pb2.SelectionHeader()),
        chunk_size=chunk_size,
        sparse=[(RESULT, list(out), encoding)],
    )
    got = read_frames(frames, first="header", sparse_sections=frozenset({RESULT}), max_bytes=1 << 20)
    received = got.sparse.get(RESULT, [])
    assert [s.decl.name for s in received] == [o.name for o in out]
    for s, o in zip(received, out, strict=True):
        assert s.decl.shape == o.shape
        assert s.values.dtype == o.values.dtype
        assert raw(s.values) == raw(o.values)
        assert s.positions.tolist() == o.positions.tolist()


@SETTINGS
@given(
    sizes=st.lists(st.integers(0, 20), max_size=8),
    cuts=st.lists(st.integers(1, 25), min_size=1, max_size=200),
    seed=st.integers(0, 255),
)
def test_inbound_reassembles_any_chunking(sizes: list[int], cuts: list[int], seed: int) -> None:
    total = sum(sizes)
    data = bytes((seed + i * 7) % 256 for i in range(total))
    rx = Inbound(allowed={MODEL}, max_bytes=total)
    for size in sizes:
        rx.declare(MODEL, size)
    offset = 0
    for cut in cuts * (total + 1):
        if offset >= total:
            break
        piece = data[offset : offset + cut]
        rx.feed(tensor_pb2.Chunk(section=MODEL, offset_bytes=offset, data=piece))
        offset += len(piece)
    segments = rx.finish().get(MODEL, [])
    assert [len(s) for s in segments] == sizes
    assert b"".join(bytes(s.numpy()) for s in segments) == data
