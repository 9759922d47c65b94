"""POSITION_ENCODING_SEEDED in the wire codec: no position bytes, the positions drawn again from the spec's
position_seed (tests/seeded_reference.py works them out in scalar Python), and every malformed
declaration refused with a WireError naming the tensor."""

from __future__ import annotations

import pytest
import torch
from seeded_reference import reference_positions

from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.codec import choose_encoding, expected_positions_nbytes, sparse_decl
from paramsel.wire.positions import decode_positions, encode_positions
from paramsel.wire.streams import SparseOut, read_frames, write_frames

SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
PAYLOAD = tensor_pb2.SECTION_PAYLOAD
NO_BYTES = torch.zeros(0, dtype=torch.uint8)


def spec(**fields: object) -> tensor_pb2.SparseTensorSpec:
    base: dict[str, object] = {
        "name": "w",
        "dtype": tensor_pb2.DATA_TYPE_FLOAT32,
        "shape": [4, 5],
        "nnz": 5,
        "position_encoding": SEEDED,
        "positions_size_bytes": 0,
        "position_seed": 42,
    }
    return tensor_pb2.SparseTensorSpec(**{**base, **fields})  # type: ignore[arg-type]


def test_a_seeded_declaration_takes_no_bytes_and_keeps_its_seed() -> None:
    decl = sparse_decl(spec(), what="SECTION_PAYLOAD")
    assert (decl.position_encoding, decl.positions_nbytes, decl.position_seed) == (SEEDED, 0, 42)
    assert decl.to_proto() == spec()
    assert expected_positions_nbytes(SEEDED, 20, (4, 5)) == 0
    assert choose_encoding(SEEDED, 3, (4,)) == SEEDED


def test_decoding_draws_the_positions_of_the_seed() -> None:
    # 20 entries (4 x 5), 5 drawn from seed 42: the pinned literal [1, 4, 15, 16, 18].
    positions = decode_positions(NO_BYTES, 5, (4, 5), SEEDED, what="w", seed=42)
    assert positions.dtype == torch.int64
    assert positions.tolist() == reference_positions(42, 20, 5) == [1, 4, 15, 16, 18]
    assert decode_positions(NO_BYTES, 0, (4, 5), SEEDED, what="w", seed=42).tolist() == []
    assert decode_positions(NO_BYTES, 3, (3,), SEEDED, what="w", seed=9).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"positions_size_bytes": 40}, ("SECTION_PAYLOAD 'w'", "positions_size_bytes is 40", "take 0 bytes")),
        ({"nnz": 21}, ("SECTION_PAYLOAD 'w'", "nnz 21 exceeds the tensor's 20 elements")),
        (
            {"position_encoding": COO, "positions_size_bytes": 80},
            ("SECTION_PAYLOAD 'w'", "position_seed is set (42)", "POSITION_ENCODING_COO_INT64"),
        ),
    ],
    ids=["position_bytes", "nnz_over_numel", "seed_with_coo"],
)
def test_malformed_seeded_declarations_are_refused(
    fields: dict[str, object], needles: tuple[str, ...]
) -> None:
    with pytest.raises(WireError) as err:
        sparse_decl(spec(**fields), what="SECTION_PAYLOAD")
    for needle in needles:
        assert needle in str(err.value)


def test_the_decoder_refuses_bytes_and_too_many_positions() -> None:
    with pytest.raises(WireError, match="'w': POSITION_ENCODING_SEEDED takes no position bytes, but 8"):
        decode_positions(torch.zeros(8, dtype=torch.uint8), 1, (4,), SEEDED, what="'w'", seed=1)
    with pytest.raises(WireError, match="'w': POSITION_ENCODING_SEEDED draws distinct positions, but nnz 5"):
        decode_positions(NO_BYTES, 5, (4,), SEEDED, what="'w'", seed=1)


def test_a_seeded_tensor_round_trips_through_frames() -> None:
    seed = (1 << 64) - 1
    positions = torch.tensor(reference_positions(seed, 12, 4))
    out = [
        SparseOut("w", (3, 4), torch.tensor([1.5, -2.0, 0.0, 4.0]), positions, SEEDED, seed),
        SparseOut("v", (5,), torch.tensor([7.0]), torch.tensor([3])),  # the section's own encoding
    ]
    frames = list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart()),
            chunk_size=3,
            sparse=[(PAYLOAD, out, COO)],
        )
    )
    w, v = [t for f in frames if f.WhichOneof("frame") == "sparse_tensors" for t in f.sparse_tensors.tensors]
    assert (w.position_encoding, w.positions_size_bytes, w.position_seed, w.nnz) == (SEEDED, 0, seed, 4)
    assert (v.position_encoding, v.position_seed) == (COO, 0)
    got = read_frames(frames, first="start", sparse_sections=frozenset({PAYLOAD}), max_bytes=1 << 20)
    by_name = {s.decl.name: s for s in got.sparse[PAYLOAD]}
    assert by_name["w"].positions.tolist() == positions.tolist()
    assert by_name["w"].values.tolist() == [1.5, -2.0, 0.0, 4.0]
    assert by_name["w"].decl.position_seed == seed
    assert by_name["v"].positions.tolist() == [3]


def test_writing_seeded_needs_the_seed_and_a_possible_count() -> None:
    with pytest.raises(WireError, match="SECTION_PAYLOAD 'w': POSITION_ENCODING_SEEDED needs the seed"):
        list(
            write_frames(
                service_pb2.PullRequest,
                ("start", service_pb2.PullStart()),
                chunk_size=64,
                sparse=[(PAYLOAD, [SparseOut("w", (4,), torch.ones(1), torch.tensor([0]))], SEEDED)],
            )
        )
    too_many = SparseOut("w", (2,), torch.ones(3), torch.tensor([0, 1, 2]), SEEDED, 5)
    with pytest.raises(WireError, match=r"SECTION_PAYLOAD 'w'.*nnz 3 exceeds"):
        list(
            write_frames(
                service_pb2.PullRequest,
                ("start", service_pb2.PullStart()),
                chunk_size=64,
                sparse=[(PAYLOAD, [too_many], COO)],
            )
        )
    assert encode_positions(torch.tensor([0, 1]), (4,), SEEDED).nbytes == 0


def test_tensors_drawn_from_one_seed_get_the_same_positions_each_its_own() -> None:
    # Two contributions with a round's seed (the keys are drawn once), and one of another shape.
    positions = torch.tensor(reference_positions(8, 12, 3))
    frames = list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart()),
            chunk_size=64,
            sparse=[
                (
                    PAYLOAD,
                    [
                        SparseOut("w", (3, 4), torch.ones(3), positions, SEEDED, 8),
                        SparseOut("v", (12,), torch.ones(3), positions, SEEDED, 8),
                        SparseOut(
                            "u", (13,), torch.ones(3), torch.tensor(reference_positions(8, 13, 3)), SEEDED, 8
                        ),
                    ],
                    COO,
                )
            ],
        )
    )
    got = read_frames(frames, first="start", sparse_sections=frozenset({PAYLOAD}), max_bytes=1 << 20)
    w, v, u = got.sparse[PAYLOAD]
    assert w.positions.tolist() == v.positions.tolist() == positions.tolist()
    assert u.positions.tolist() == reference_positions(8, 13, 3)
    assert w.positions.data_ptr() != v.positions.data_ptr()
