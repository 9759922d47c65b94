"""pack_compact: FL4Health's packed lists -> the compact payload, and back exactly with unpack_compact."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from paramsel.client import (
    SparseCooParameterExchanger,
    largest_magnitude_change_scores,
    pack_compact,
    unpack_compact,
)
from paramsel.client._packing import pack_layers, pack_sparse
from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire.compact import elias_fano_nbytes


def _sparse(*tensors: tuple[str, np.ndarray, list[int], tuple[int, ...]]) -> list[np.ndarray]:
    """A sparse COO packed list of (name, values, flat positions, shape) per tensor."""
    values, indices, shapes, names = [], [], [], []
    for name, v, flat, shape in tensors:
        values.append(v)
        if shape:
            coords = np.stack(np.unravel_index(np.array(flat, dtype=np.int64), shape), axis=1)
        else:  # a 0-d tensor: one row per entry, no axes
            coords = np.zeros((len(flat), 0), dtype=np.int64)
        indices.append(np.ascontiguousarray(coords, dtype=np.int64))
        shapes.append(np.array(shape, dtype=np.int64))
        names.append(name)
    return pack_sparse(values, (indices, shapes, names))


def _assert_identical(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, (i, g.dtype, w.dtype)
        assert g.shape == w.shape, (i, g.shape, w.shape)
        assert g.tobytes() == w.tobytes(), i  # bitwise, NaNs and signed zeros included


def _encodings(payload: bytes) -> dict[str, int]:
    frames = service_pb2.SelectionPayload.FromString(payload).frames
    return {
        spec.name: spec.position_encoding
        for frame in frames
        if frame.WhichOneof("frame") == "sparse_tensors"
        for spec in frame.sparse_tensors.tensors
    }


def test_sparse_round_trip_is_exact_for_every_ndim_and_dtype() -> None:
    rng = np.random.default_rng(0)
    packed = _sparse(
        ("ends", np.array([1.5, -0.0, np.nan], dtype=np.float32), [0, 4, 9], (10,)),
        ("matrix", rng.standard_normal(12), sorted(rng.choice(35, 12, replace=False).tolist()), (5, 7)),
        ("conv", rng.standard_normal(30).astype(np.float16), list(range(0, 120, 4)), (2, 3, 4, 5)),
        ("counts", np.array([7, -3, 2**40], dtype=np.int64), [1, 2, 11], (3, 4)),
        ("one", np.array([0.25], dtype=np.float32), [99], (10, 10)),
        ("scalar", np.array([3.0], dtype=np.float64), [0], ()),
        ("none", np.zeros(0, dtype=np.float32), [], (4, 2)),
        ("flags", np.array([True, False]), [0, 5], (6,)),
    )
    assert packed[8 + 5].shape == (1, 0)  # the 0-d tensor's indices: one entry, no axes
    payload = pack_compact(packed)
    _assert_identical(unpack_compact(payload), packed)
    assert set(_encodings(payload).values()) <= {
        tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
        tensor_pb2.POSITION_ENCODING_BITMAP,
    }


def test_layers_round_trip_is_exact() -> None:
    packed = pack_layers(
        [
            np.arange(12, dtype=np.float32).reshape(3, 4),
            np.array([5, -6], dtype=np.int64),
            np.array(2.5, dtype=np.float64),
            np.ones((2, 1, 3, 2), dtype=np.float16),
            np.zeros((0, 3), dtype=np.float32),
        ],
        ["fc.weight", "steps", "temperature", "conv.weight", "empty"],
    )
    payload = pack_compact(packed)
    _assert_identical(unpack_compact(payload), packed)
    frames = service_pb2.SelectionPayload.FromString(payload).frames
    assert frames[0].header.kind == service_pb2.SELECTION_KIND_LAYERS


def test_empty_selection_round_trips() -> None:
    empty = pack_sparse([], ([], [], []))
    _assert_identical(pack_layers([], []), empty)  # one names array, whichever the layout
    _assert_identical(unpack_compact(pack_compact(empty)), empty)
    _assert_identical(unpack_compact(pack_compact([np.array([], dtype=np.str_)])), [np.array([])])


def test_non_increasing_positions_travel_as_coo_for_that_tensor_only() -> None:
    packed = _sparse(
        ("sorted", np.arange(3, dtype=np.float32), [1, 5, 8], (3, 3)),
        ("shuffled", np.arange(3, dtype=np.float32), [8, 1, 5], (3, 3)),
        ("repeated", np.array([1.0, 2.0], dtype=np.float32), [4, 4], (3, 3)),
    )
    payload = pack_compact(packed)
    _assert_identical(unpack_compact(payload), packed)  # neither reordered nor merged
    encodings = _encodings(payload)
    assert encodings["sorted"] in (
        tensor_pb2.POSITION_ENCODING_ELIAS_FANO,
        tensor_pb2.POSITION_ENCODING_BITMAP,
    )
    assert encodings["shuffled"] == tensor_pb2.POSITION_ENCODING_COO_INT64
    assert encodings["repeated"] == tensor_pb2.POSITION_ENCODING_COO_INT64


def test_narrow_integer_indices_and_shapes_come_back_as_int64() -> None:
    packed = _sparse(("w", np.array([1.0, 2.0], dtype=np.float32), [3, 7], (2, 4)))
    narrow = [packed[0], packed[1].astype(np.int32), packed[2].astype(np.int32), packed[3]]
    _assert_identical(unpack_compact(pack_compact(narrow)), packed)


def test_size_by_hand() -> None:
    """1000 float32 values of a 100 x 100 tensor (10 %): 4 B per value plus Elias-Fano positions."""
    rng = np.random.default_rng(1)
    flat = np.sort(rng.choice(10_000, 1000, replace=False))
    packed = _sparse(("w", rng.standard_normal(1000).astype(np.float32), flat.tolist(), (100, 100)))
    payload = pack_compact(packed)
    # Elias-Fano: L = floor(log2(10000 / 1000)) = 3, so 1000 x 3 low bits (375 B) and
    # 1000 + (9999 >> 3) + 1 = 2251 high bits (282 B); a bitmap would take 1250 B.
    assert elias_fano_nbytes(1000, 10_000) == 375 + 282
    data = 1000 * 4 + 375 + 282
    assert data < len(payload) < data + 100  # header, manifest and chunk framing: a few dozen bytes
    assert len(payload) / 1000 < 4.8
    fl4health = sum(a.nbytes for a in packed[:3])  # values, (nnz, 2) int64 indices, shape
    assert fl4health / 1000 == pytest.approx(20.0, abs=0.1)
    _assert_identical(unpack_compact(payload), packed)


def test_lossy_values() -> None:
    values = np.array([0.1, -2.5, 3.0], dtype=np.float32)
    packed = _sparse(("w", values, [0, 2, 3], (4,)), ("n", np.array([9], dtype=np.int64), [1], (2,)))
    exact = pack_compact(packed)
    half = pack_compact(packed, value_dtype=torch.float16)
    assert len(half) == len(exact) - 3 * 2
    got = unpack_compact(half)
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0], values, rtol=1e-3)
    _assert_identical(got[1:], packed[1:])  # integer values, indices, shapes and names are exact
    brain = unpack_compact(pack_compact(packed, value_dtype=torch.bfloat16))
    assert brain[0].dtype == np.float32  # bfloat16, which numpy lacks, comes back as float32
    np.testing.assert_allclose(brain[0], values, rtol=1e-2)
    with pytest.raises(ValueError, match="value_dtype"):
        pack_compact(packed, value_dtype=torch.int8)


@pytest.mark.parametrize(
    ("packed", "match"),
    [
        ([], "empty list"),
        ([np.zeros(2), np.zeros((2, 1), np.int64), np.array(["w"])], "got 3 arrays"),
        ([np.zeros(2), np.zeros((2, 1), np.int64), np.array([2]), np.array(["w", "v"])], "got 4 arrays"),
        ([np.zeros(2, np.float32), np.array([[0], [2]]), np.array([2]), np.array(["w"])], "out of range"),
        ([np.zeros(1, np.float32), np.array([[-1]]), np.array([2]), np.array(["w"])], "out of range"),
        ([np.zeros(2, np.float32), np.array([[0, 1]]), np.array([2]), np.array(["w"])], r"need \(2, 1\)"),
        ([np.zeros((1, 1), np.float32), np.array([[0]]), np.array([2]), np.array(["w"])], "1-d array"),
        ([np.zeros(1, np.float32), np.array([[0.0]]), np.array([2]), np.array(["w"])], "integer array"),
        ([np.zeros(1, np.float32), np.array([[0]]), np.array([-2]), np.array(["w"])], "negative"),
        ([np.zeros(0, np.float32), np.zeros((0, 2)), np.array([2**40, 2**40]), np.array(["w"])], "overflows"),
        ([np.zeros(1, np.complex64), np.array([[0]]), np.array([2]), np.array(["w"])], "not supported"),
        ([np.zeros(1), np.zeros(1), np.array(["w", "w"])], "named twice"),
        ([np.zeros(1), np.array([""])], "1 to"),
        ([np.zeros(1), np.array([1])], "names"),
        ([np.zeros(1, np.complex64), np.array(["w"])], "not supported"),
        ([np.array(["text"]), np.array(["w"])], "layer 0 'w'"),
    ],
)
def test_bad_lists_are_refused(packed: list[np.ndarray], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pack_compact(packed)


class Wide(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(300, 200, generator=generator), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(300, generator=generator), requires_grad=False)


def test_same_frames_as_the_server_writes(server: RunningServer) -> None:
    """Repacking what the server selected gives its frames byte for byte, but for the header's figures
    (k, threshold, ...), which a packed list does not hold."""
    exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=server.target)
    theirs = exchanger.push_compact(Wide(1), Wide(2))
    mine = pack_compact(unpack_compact(theirs))
    their_frames = service_pb2.SelectionPayload.FromString(theirs).frames
    my_frames = service_pb2.SelectionPayload.FromString(mine).frames
    assert my_frames[1:] == their_frames[1:]
    assert my_frames[0].header.kind == their_frames[0].header.kind
    assert my_frames[0].header.top_k.sent_entries == their_frames[0].header.top_k.sent_entries
    assert len(mine) <= len(theirs)
