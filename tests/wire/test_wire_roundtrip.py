"""Dense tensors through write_frames -> read_frames: every dtype and shape, any layout, any chunk size."""

import math

import pytest
import torch

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DTYPES, itemsize
from paramsel.wire.streams import Received, read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
BOTH = frozenset({MODEL, INITIAL})
MiB = 1 << 20

SHAPES = [(), (0,), (0, 3), (7,), (2, 3, 4)]


def frames_of(named: list[tuple[str, torch.Tensor]], chunk_size: int) -> list[service_pb2.SelectRequest]:
    start = service_pb2.SelectStart(response_chunk_size_bytes=chunk_size)
    return list(
        write_frames(
            service_pb2.SelectRequest, ("start", start), chunk_size=chunk_size, dense=[(MODEL, named)]
        )
    )


def read(frames: list[service_pb2.SelectRequest], max_bytes: int = 64 * MiB) -> Received:
    return read_frames(frames, first="start", dense_sections=BOTH, max_bytes=max_bytes)


def raw(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's elements; comparing these is NaN-safe and sees -0.0 and NaN payloads."""
    return bytes(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert raw(got) == raw(want)


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Values covering the dtype's range, with NaN, infinities and -0.0 for floating types."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return (torch.randint(0, 2, (n,), generator=g) == 1).reshape(shape)
    if dtype.is_floating_point:
        t = (torch.randn(n, generator=g, dtype=torch.float64) * 1e3).to(dtype)
        specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
        k = min(n, 4)
        t[:k] = specials[:k]
        return t.reshape(shape)
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
    if n >= 2:
        t[0], t[1] = info.min, info.max
    return t.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=str)
def test_every_dtype_and_shape_round_trips(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = sample(dtype, shape)
    frames = frames_of([("t", t)], chunk_size=5)
    state = read(frames).state(MODEL)
    assert state is not None
    assert list(state) == ["t"]
    assert_same(state["t"], t)
    chunks = [f.chunk for f in frames if f.WhichOneof("frame") == "chunk"]
    assert sum(len(c.data) for c in chunks) == t.numel() * itemsize(dtype)
    assert all(0 < len(c.data) <= 5 for c in chunks)


def test_all_dtypes_in_one_section_round_trip() -> None:
    named = [
        (f"{dtype}.{i}", sample(dtype, shape, seed=i))
        for i, shape in enumerate(SHAPES)
        for dtype in DTYPES.values()
    ]
    state = read(frames_of(named, chunk_size=3)).state(MODEL)
    assert state is not None
    assert list(state) == [name for name, _ in named]
    for name, t in named:
        assert_same(state[name], t)


def test_both_model_sections_round_trip() -> None:
    current = [("w", sample(torch.float32, (3, 2), 1)), ("b", sample(torch.bfloat16, (3,), 2))]
    initial = [("w", sample(torch.float32, (3, 2), 3)), ("b", sample(torch.bfloat16, (3,), 4))]
    frames = list(
        write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=8,
            dense=[(MODEL, current), (INITIAL, initial)],
        )
    )
    kinds = [f.WhichOneof("frame") for f in frames]
    # Every manifest precedes the first chunk; each section's chunks come together, offsets from 0.
    first_chunk = kinds.index("chunk")
    assert kinds[0] == "start"
    assert set(kinds[1:first_chunk]) == {"tensors"}
    assert set(kinds[first_chunk:]) == {"chunk"}
    sections = [f.chunk.section for f in frames[first_chunk:]]
    assert sections == [MODEL] * 4 + [INITIAL] * 4  # 24 + 6 bytes each
    for section in (MODEL, INITIAL):
        offsets = [f.chunk.offset_bytes for f in frames[first_chunk:] if f.chunk.section == section]
        assert offsets == [0, 8, 16, 24]
    got = read(frames)
    for section, named in ((MODEL, current), (INITIAL, initial)):
        state = got.state(section)
        assert state is not None
        for name, t in named:
            assert_same(state[name], t)


def test_a_section_that_was_not_sent_is_none() -> None:
    got = read(frames_of([("a", torch.ones(2))], chunk_size=64))
    assert got.state(INITIAL) is None
    assert isinstance(got.first, service_pb2.SelectStart)
    assert got.first.response_chunk_size_bytes == 64


def test_a_model_of_only_empty_tensors_sends_no_chunks() -> None:
    named = [("a", torch.zeros(0)), ("b", torch.zeros(0, 3, dtype=torch.int8))]
    frames = frames_of(named, chunk_size=1024)
    assert [f.WhichOneof("frame") for f in frames] == ["start", "tensors"]
    state = read(frames).state(MODEL)
    assert state is not None
    for name, t in named:
        assert_same(state[name], t)


def non_contiguous() -> list[tuple[str, torch.Tensor]]:
    base = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    return [
        ("transpose", base[0].t()),
        ("step", torch.arange(20, dtype=torch.int64)[1::3]),
        ("permute", base.permute(2, 0, 1)),
        ("offset", base[1, 1:3, 2:]),
        ("expand", torch.tensor([1.5, -2.5], dtype=torch.bfloat16).expand(3, 2)),
        (
            "channels_last",
            torch.arange(48, dtype=torch.int16).reshape(2, 3, 2, 4).to(memory_format=torch.channels_last),
        ),
        ("step_3d", base[:, ::2, ::3]),
        ("bool_t", torch.tensor([[True, False, True], [False, False, True]]).t()),
    ]


def test_non_contiguous_tensors_arrive_as_the_same_values() -> None:
    named = non_contiguous()
    assert not any(t.is_contiguous() for name, t in named if name != "channels_last")
    state = read(frames_of(named, chunk_size=7)).state(MODEL)
    assert state is not None
    for name, t in named:
        got = state[name]
        assert got.is_contiguous()
        assert got.dtype == t.dtype
        assert got.shape == t.shape
        assert torch.equal(got, t), name


def test_parameters_that_require_grad_are_sent_by_value() -> None:
    p = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 3.0]]))
    state = read(frames_of([("p", p)], chunk_size=3)).state(MODEL)
    assert state is not None
    assert not state["p"].requires_grad
    assert torch.equal(state["p"], p.detach())


def test_a_tensor_bigger_than_a_chunk_arrives_intact() -> None:
    n = (3 * MiB + 12) // 4
    t = torch.arange(n, dtype=torch.int32).to(torch.float32) * 0.5
    frames = frames_of([("big", t)], chunk_size=MiB)
    chunks = [f.chunk for f in frames if f.WhichOneof("frame") == "chunk"]
    assert [len(c.data) for c in chunks] == [MiB, MiB, MiB, 12]
    assert [c.offset_bytes for c in chunks] == [0, MiB, 2 * MiB, 3 * MiB]
    state = read(frames).state(MODEL)
    assert state is not None
    assert torch.equal(state["big"], t)


def test_many_tiny_tensors_are_packed_into_few_chunks() -> None:
    named = [(f"t{i}", torch.tensor([float(i)])) for i in range(1000)]
    frames = frames_of(named, chunk_size=1024)
    chunks = [f.chunk for f in frames if f.WhichOneof("frame") == "chunk"]
    assert [len(c.data) for c in chunks] == [1024, 1024, 1024, 4000 - 3 * 1024]
    state = read(frames).state(MODEL)
    assert state is not None
    assert list(state) == [name for name, _ in named]
    assert all(state[name].item() == t.item() for name, t in named)


def test_chunk_size_one_sends_every_byte_alone() -> None:
    named = [
        ("w", sample(torch.float32, (2, 3), 5)),
        ("e", torch.zeros(0)),
        ("s", torch.tensor(7, dtype=torch.int64)),
        ("m", torch.tensor([True, False, True])),
        ("h", sample(torch.bfloat16, (4,), 6)),
    ]
    total = sum(t.numel() * t.element_size() for _, t in named)
    frames = frames_of(named, chunk_size=1)
    chunks = [f.chunk for f in frames if f.WhichOneof("frame") == "chunk"]
    assert [c.offset_bytes for c in chunks] == list(range(total))
    assert all(len(c.data) == 1 for c in chunks)
    assert b"".join(c.data for c in chunks) == b"".join(raw(t) for _, t in named)
    state = read(frames).state(MODEL)
    assert state is not None
    for name, t in named:
        assert_same(state[name], t)


def test_received_tensors_do_not_share_memory() -> None:
    named = [("a", torch.zeros(4)), ("b", torch.zeros(4))]
    state = read(frames_of(named, chunk_size=3)).state(MODEL)
    assert state is not None
    state["a"] += 1
    assert torch.equal(state["b"], torch.zeros(4))


def test_layout_round_trips_without_data() -> None:
    layout = [(f"l{i}", sample(dtype, (i % 3, 2), i)) for i, dtype in enumerate(DTYPES.values())]
    frames = list(
        write_frames(
            service_pb2.PullRequest, ("start", service_pb2.PullStart()), chunk_size=40, layout=layout
        )
    )
    kinds = [f.WhichOneof("frame") for f in frames]
    assert kinds[0] == "start"
    assert set(kinds[1:]) == {"layout"}
    assert len(kinds) > 2  # split by spec_batches
    got = read_frames(frames, first="start", max_bytes=0)
    assert [(d.name, d.dtype, d.shape) for d in got.layout] == [
        (n, t.dtype, tuple(t.shape)) for n, t in layout
    ]
