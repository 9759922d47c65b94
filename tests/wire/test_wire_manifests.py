"""Manifests are cut into frames of about chunk_size bytes, keeping every spec and its order."""

import pytest
import torch

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import spec_batches
from paramsel.wire.streams import read_frames, write_frames

MODEL = tensor_pb2.SECTION_MODEL
KiB = 1 << 10
# A frame wraps a batch in a manifest (section tag) and a oneof field (tag, length): a few bytes.
OVERHEAD = 16


def dense_specs(n: int) -> list[tensor_pb2.TensorSpec]:
    return [
        tensor_pb2.TensorSpec(
            name=f"block{i % 97}.layer{i}." + "w" * (i % 41),
            dtype=tensor_pb2.DataType.ValueType(1 + i % 10),
            shape=[i % 7, 1 << (i % 40), 3][: i % 4],
        )
        for i in range(n)
    ]


def sparse_specs(n: int) -> list[tensor_pb2.SparseTensorSpec]:
    return [
        tensor_pb2.SparseTensorSpec(
            name=f"s{i}" * (1 + i % 5),
            dtype=tensor_pb2.DATA_TYPE_FLOAT32,
            shape=[i, 2],
            nnz=i,
            position_encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
            positions_size_bytes=16 * i,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("limit", [1, 40, 100, 1000, 64 * KiB])
def test_spec_batches_stay_under_the_limit_in_order(limit: int) -> None:
    for specs, wrap in (
        (dense_specs(3000), lambda b: tensor_pb2.TensorManifest(section=MODEL, tensors=b)),
        (sparse_specs(500), lambda b: tensor_pb2.SparseManifest(section=MODEL, tensors=b)),
    ):
        batches = list(spec_batches(specs, limit))
        assert all(batches)
        assert [s for b in batches for s in b] == specs
        for batch, following in zip(batches, [*batches[1:], None], strict=True):
            size = wrap(batch).ByteSize()
            if len(batch) > 1:
                assert size <= limit + OVERHEAD
            else:
                # A spec larger than the limit travels alone.
                assert size <= max(limit, batch[0].ByteSize() + 8) + OVERHEAD
            if following is not None:
                # The next spec did not fit: batches are not needlessly small (at least half full).
                assert 2 * (size + following[0].ByteSize() + OVERHEAD) > limit


def test_spec_batches_of_nothing_is_nothing() -> None:
    assert list(spec_batches([], 100)) == []


def test_oversized_spec_travels_alone() -> None:
    specs = [
        tensor_pb2.TensorSpec(name="a"),
        tensor_pb2.TensorSpec(name="x" * 500),
        tensor_pb2.TensorSpec(name="b"),
    ]
    assert [[s.name[:1] for s in b] for b in spec_batches(specs, 100)] == [["a"], ["x"], ["b"]]


@pytest.mark.slow  # moves 20,000 declarations
def test_a_manifest_of_20000_tensors_is_split_into_frames_of_about_chunk_size() -> None:
    chunk_size = 64 * KiB
    named = [
        (f"encoder.layers.{i}.attention.weight", torch.full((i % 3, 1 + i % 2), i % 251, dtype=torch.uint8))
        for i in range(20_000)
    ]
    frames = list(
        write_frames(
            service_pb2.SelectRequest,
            ("start", service_pb2.SelectStart()),
            chunk_size=chunk_size,
            dense=[(MODEL, named)],
        )
    )
    kinds = [f.WhichOneof("frame") for f in frames]
    manifests = [f for f in frames if f.WhichOneof("frame") == "tensors"]
    assert kinds == ["start"] + ["tensors"] * len(manifests) + ["chunk"] * (len(frames) - 1 - len(manifests))
    spec_bytes = sum(s.ByteSize() for f in manifests for s in f.tensors.tensors)
    assert spec_bytes > 10 * chunk_size
    assert 10 < len(manifests) <= 2 * spec_bytes // chunk_size + 1
    assert all(f.ByteSize() <= chunk_size + OVERHEAD for f in frames)
    assert [s.name for f in manifests for s in f.tensors.tensors] == [name for name, _ in named]

    state = read_frames(frames, first="start", dense_sections=frozenset({MODEL}), max_bytes=1 << 20).state(
        MODEL
    )
    assert state is not None
    assert list(state) == [name for name, _ in named]
    assert all(torch.equal(state[name], t) for name, t in named)
