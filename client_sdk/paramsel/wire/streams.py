"""Whole streams of frames, both directions: write a call's frames, read them back validated.

A stream is one first frame (``start`` in requests, ``header`` in responses), then layouts and
manifests, then the chunks of every declared section, each section in order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire.codec import (
    DenseDecl,
    SparseDecl,
    choose_encoding,
    dense_decl,
    expected_positions_nbytes,
    sparse_decl,
    tensor_bytes,
    tensor_from_bytes,
)
from paramsel.wire.errors import StreamEndedError, WireError
from paramsel.wire.fastframes import encode_chunk_frame
from paramsel.wire.positions import decode_positions, encode_positions
from paramsel.wire.sections import (
    Inbound,
    check_chunk_size,
    chunk_frames,
    chunk_pieces,
    section_name,
    spec_batches,
)

Segments = tuple[int, list[memoryview]]
"""A section and the bytes of its segments (tensor data, positions), in declaration order."""


@dataclass(frozen=True)
class SparseData:
    """A received sparse tensor: its declaration, values and flat int64 positions."""

    decl: SparseDecl
    values: torch.Tensor
    positions: torch.Tensor


@dataclass
class Received:
    """Everything one stream carried, decoded."""

    first: Any
    layout: list[DenseDecl] = field(default_factory=list)
    dense: dict[int, list[tuple[DenseDecl, torch.Tensor]]] = field(default_factory=dict)
    sparse: dict[int, list[SparseData]] = field(default_factory=dict)

    contributions: list[int] = field(default_factory=list)
    """Example counts of the contribution frames, in order (Aggregate)."""
    dense_owners: dict[int, list[int]] = field(default_factory=dict)
    """Per section, the contribution each dense declaration belongs to, in declaration order."""
    sparse_owners: dict[int, list[int]] = field(default_factory=dict)
    """Per section, the contribution each sparse declaration belongs to, in declaration order."""

    def state(self, section: int) -> dict[str, torch.Tensor] | None:
        """The named tensors of a dense section in declaration order; None when it was not sent."""
        if section not in self.dense:
            return None
        return {decl.name: tensor for decl, tensor in self.dense[section]}

    def grouped(self, section: int) -> list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseData]]]:
        """Per contribution: (num_examples, its dense tensors, its sparse tensors) in ``section``."""
        groups: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseData]]] = [
            (n, [], []) for n in self.contributions
        ]
        for (decl, tensor), owner in zip(
            self.dense.get(section, []), self.dense_owners.get(section, []), strict=True
        ):
            groups[owner][1].append((decl.name, tensor))
        for sparse, owner in zip(
            self.sparse.get(section, []), self.sparse_owners.get(section, []), strict=True
        ):
            groups[owner][2].append(sparse)
        return groups


class _Names:
    """Rejects a name declared twice in one section (unless told that names may repeat)."""

    def __init__(self, unique: bool) -> None:
        self._unique = unique
        self._seen: dict[str, set[str]] = {}

    def add(self, where: str, name: str) -> None:
        if not self._unique:
            return
        seen = self._seen.setdefault(where, set())
        if name in seen:
            raise WireError(f"{where}: tensor '{name}' is declared twice")
        seen.add(name)


def read_frames(
    frames: Iterable[Any],
    *,
    first: str,
    dense_sections: frozenset[int] = frozenset(),
    sparse_sections: frozenset[int] = frozenset(),
    max_bytes: int,
    unique_names: bool = True,
    contributions: bool = False,
    delivered: Sequence[Segments] | None = None,
) -> Received:
    """Reads a whole stream whose first frame is the oneof member ``first``.

    With ``contributions``, ``contribution`` frames split the declarations into groups (Aggregate's
    clients): names are unique within a group, and every declaration belongs to the open one.

    ``delivered`` (a call run in process, :func:`declare_frames`): the sections' bytes as the writer
    holds them, after ``frames`` (which then carry no chunk). They are taken as the chunks that would
    carry them, with the same checks, but without a copy: each tensor is a view of the writer's bytes.
    """
    inbound = Inbound(allowed=dense_sections | sparse_sections, max_bytes=max_bytes)
    names = _Names(unique_names)
    received: Received | None = None
    dense_decls: dict[int, list[tuple[DenseDecl, int]]] = {}
    sparse_decls: dict[int, list[tuple[SparseDecl, int, int]]] = {}
    scope = ""  # prefixes name scopes: the open contribution, when there are any
    for index, frame in enumerate(frames):
        kind = frame.WhichOneof("frame")
        if kind is None:
            raise WireError(f"frame {index} is empty: none of its 'frame' fields is set")
        if received is None:
            if kind != first:
                raise WireError(f"frame {index} is '{kind}', but the first frame must be '{first}'")
            received = Received(first=getattr(frame, kind))
            continue
        if kind == first:
            raise WireError(f"frame {index} is a second '{first}'; a stream has exactly one")
        if kind == "chunk":
            inbound.feed(frame.chunk)
            continue
        if inbound.feeding:
            raise WireError(f"frame {index} is '{kind}' after the first chunk; declarations must come first")
        if kind == "contribution" and contributions:
            if frame.contribution.num_examples <= 0:
                raise WireError(
                    f"contribution {len(received.contributions)}: num_examples must be > 0, "
                    f"got {frame.contribution.num_examples}"
                )
            received.contributions.append(int(frame.contribution.num_examples))
            scope = f"contribution {len(received.contributions) - 1} "
            continue
        if contributions and not received.contributions:
            raise WireError(f"frame {index} is '{kind}' before the first contribution")
        if kind == "layout":
            for spec in frame.layout.tensors:
                decl = dense_decl(spec, what="layout")
                names.add("layout", decl.name)
                received.layout.append(decl)
        elif kind == "tensors":
            section = frame.tensors.section
            where = section_name(section)
            if section not in dense_sections:
                raise WireError(f"tensors manifest: {where} is not accepted here")
            for spec in frame.tensors.tensors:
                decl = dense_decl(spec, what=where)
                names.add(scope + where, decl.name)
                dense_decls.setdefault(section, []).append((decl, inbound.declare(section, decl.nbytes)))
                received.dense_owners.setdefault(section, []).append(len(received.contributions) - 1)
        elif kind == "sparse_tensors":
            section = frame.sparse_tensors.section
            where = section_name(section)
            if section not in sparse_sections:
                raise WireError(f"sparse_tensors manifest: {where} is not accepted here")
            for spec in frame.sparse_tensors.tensors:
                sdecl = sparse_decl(spec, what=where)
                names.add(scope + where, sdecl.name)
                received.sparse_owners.setdefault(section, []).append(len(received.contributions) - 1)
                values = inbound.declare(section, sdecl.values_nbytes)
                positions = inbound.declare(section, sdecl.positions_nbytes)
                sparse_decls.setdefault(section, []).append((sdecl, values, positions))
        else:
            raise WireError(f"frame {index}: '{kind}' is not accepted in this stream")
    if received is None:
        raise StreamEndedError(f"the stream is empty; its first frame must be '{first}'")
    for section, data in delivered or ():
        inbound.deliver(section, data)
    segments = inbound.finish()
    _check_bools(segments, dense_decls, sparse_decls)
    for section, dense_list in dense_decls.items():
        received.dense[section] = [
            (decl, tensor_from_bytes(segments[section][seg], decl.dtype, decl.shape))
            for decl, seg in dense_list
        ]
    drawn: dict[tuple[int, int, int], torch.Tensor] = {}
    for section, sparse_list in sparse_decls.items():
        where = section_name(section)
        received.sparse[section] = [
            SparseData(
                decl,
                tensor_from_bytes(segments[section][v], decl.dtype, (decl.nnz,)),
                _positions(decl, segments[section][p], f"{where} '{decl.name}'", drawn),
            )
            for decl, v, p in sparse_list
        ]
    return received


def _positions(
    decl: SparseDecl,
    data: torch.Tensor,
    what: str,
    drawn: dict[tuple[int, int, int], torch.Tensor],
) -> torch.Tensor:
    """A sparse tensor's decoded positions. SEEDED ones, a function of (seed, numel, nnz) alone, are drawn
    once per stream (an Aggregate's clients share a round's seed): later tensors get a copy, not the
    keys again."""
    if decl.position_encoding != tensor_pb2.POSITION_ENCODING_SEEDED:
        return decode_positions(data, decl.nnz, decl.shape, decl.position_encoding, what=what)
    key = (decl.position_seed, math.prod(decl.shape), decl.nnz)
    if key not in drawn:
        drawn[key] = decode_positions(
            data, decl.nnz, decl.shape, decl.position_encoding, what=what, seed=decl.position_seed
        )
        return drawn[key]
    return drawn[key].clone()


def _check_bools(
    segments: dict[int, list[torch.Tensor]],
    dense_decls: dict[int, list[tuple[DenseDecl, int]]],
    sparse_decls: dict[int, list[tuple[SparseDecl, int, int]]],
) -> None:
    """A bool is one byte holding 0 or 1; anything else would make a tensor torch cannot reason about."""
    bools = [
        (s, d.name, seg) for s, decls in dense_decls.items() for d, seg in decls if d.dtype == torch.bool
    ]
    bools += [
        (s, d.name, v) for s, decls in sparse_decls.items() for d, v, _ in decls if d.dtype == torch.bool
    ]
    for section, name, seg in bools:
        if bool((segments[section][seg] > 1).any()):
            raise WireError(f"{section_name(section)} '{name}': bool bytes must be 0 or 1")


# Encodings that code a set: their positions must be distinct, increasing and one per value.
_CODES_SETS = (tensor_pb2.POSITION_ENCODING_BITMAP, tensor_pb2.POSITION_ENCODING_ELIAS_FANO)


@dataclass(frozen=True)
class SparseOut:
    """A sparse tensor to send: flat int64 positions (or, for COO_INT64, (nnz, ndim) coordinates).

    BITMAP, ELIAS_FANO and COMPACT need one strictly increasing flat position per value.
    """

    name: str
    shape: tuple[int, ...]
    values: torch.Tensor
    positions: torch.Tensor
    encoding: int | None = None
    """This tensor's position encoding, when it is not the one its section is written in."""
    position_seed: int | None = None
    """POSITION_ENCODING_SEEDED: the seed ``positions`` were drawn from
    (:func:`~paramsel.wire.seeded.seeded_positions` of it, which the writer does not check)."""


def write_frames(
    message: type[Any],
    first: tuple[str, Any],
    *,
    chunk_size: int,
    layout: Sequence[tuple[str, torch.Tensor]] = (),
    dense: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = (),
    sparse: Sequence[tuple[int, Sequence[SparseOut], int]] = (),
    encoded_chunks: bool = False,
) -> Iterator[Any]:
    """The frames of a stream of ``message``: first frame, declarations, then every section's chunks.

    With ``encoded_chunks`` the chunk frames are :class:`ChunkFrame` s, already encoded, for a channel or
    server that serialises with :func:`paramsel.wire.fastframes.serialize_frame`.

    ``dense`` is (section, named tensors); ``sparse`` is (section, tensors, position encoding); a
    section appears once. With POSITION_ENCODING_COMPACT each tensor goes in whichever of BITMAP and
    ELIAS_FANO is smaller (:func:`~paramsel.wire.codec.choose_encoding`), and its spec declares which.
    Declarations are built now, so that a tensor that cannot be sent raises :class:`WireError` here
    rather than inside gRPC's request thread; the chunks are cut lazily. Manifests are split so that no
    frame carries more than about ``chunk_size`` bytes.
    """
    frames, segments = declare_frames(
        message, first, chunk_size=chunk_size, layout=layout, dense=dense, sparse=sparse
    )
    return _emit(message, frames, segments, chunk_size, encoded_chunks)


def declare_frames(
    message: type[Any],
    first: tuple[str, Any],
    *,
    chunk_size: int,
    layout: Sequence[tuple[str, torch.Tensor]] = (),
    dense: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = (),
    sparse: Sequence[tuple[int, Sequence[SparseOut], int]] = (),
) -> tuple[list[Any], list[Segments]]:
    """:func:`write_frames`' stream before its chunks: the first frame and the declarations, and the
    bytes the chunks would carry, per section (views of the tensors where they are contiguous). Read
    in process by :func:`read_frames` with ``delivered``."""
    check_chunk_size(chunk_size)
    frames = [message(**{first[0]: first[1]})]
    layout_specs = [DenseDecl(name, t.dtype, tuple(t.shape)).to_proto() for name, t in layout]
    frames += [
        message(layout=tensor_pb2.StateLayout(tensors=b)) for b in spec_batches(layout_specs, chunk_size)
    ]
    segments: list[tuple[int, list[memoryview]]] = []
    for section, named in dense:
        manifests, data = _declare_dense(message, section, named, chunk_size)
        frames += manifests
        segments.append((section, data))
    for section, tensors, encoding in sparse:
        manifests, data = _declare_sparse(message, section, tensors, encoding, chunk_size)
        frames += manifests
        segments.append((section, data))
    return frames, segments


def write_contributions(
    message: type[Any],
    first: tuple[str, Any],
    contributions: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]],
    *,
    section: int,
    encoding: int,
    chunk_size: int,
    encoded_chunks: bool = False,
) -> Iterator[Any]:
    """An Aggregate stream: per contribution (num_examples, dense tensors, sparse tensors), a
    ``contribution`` frame and its manifests; then every contribution's data in ``section``."""
    frames, segments = declare_contributions(
        message, first, contributions, section=section, encoding=encoding, chunk_size=chunk_size
    )
    return _emit(message, frames, segments, chunk_size, encoded_chunks)


def declare_contributions(
    message: type[Any],
    first: tuple[str, Any],
    contributions: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]],
    *,
    section: int,
    encoding: int,
    chunk_size: int,
) -> tuple[list[Any], list[Segments]]:
    """:func:`write_contributions`' stream before its chunks, as :func:`declare_frames` is
    :func:`write_frames`'."""
    check_chunk_size(chunk_size)
    frames = [message(**{first[0]: first[1]})]
    data: list[memoryview] = []
    for num_examples, named, tensors in contributions:
        frames.append(message(contribution={"num_examples": num_examples}))
        for manifests, segment in (
            _declare_dense(message, section, named, chunk_size) if named else ([], []),
            _declare_sparse(message, section, tensors, encoding, chunk_size) if tensors else ([], []),
        ):
            frames += manifests
            data += segment
    return frames, [(section, data)]


def _declare_dense(
    message: type[Any], section: int, named: Sequence[tuple[str, torch.Tensor]], chunk_size: int
) -> tuple[list[Any], list[memoryview]]:
    """The manifests declaring dense tensors in ``section``, and their data."""
    specs = [DenseDecl(name, t.dtype, tuple(t.shape)).to_proto() for name, t in named]
    manifests = [
        message(tensors=tensor_pb2.TensorManifest(section=section, tensors=b))  # type: ignore[arg-type]
        for b in spec_batches(specs, chunk_size)
    ]
    return manifests, [tensor_bytes(t) for _, t in named]


def _declare_sparse(
    message: type[Any], section: int, tensors: Sequence[SparseOut], encoding: int, chunk_size: int
) -> tuple[list[Any], list[memoryview]]:
    """The manifests declaring sparse tensors in ``section``, and their data (values, positions)."""
    encoded = [_encode_sparse(section, t, encoding) for t in tensors]
    specs = [
        SparseDecl(
            t.name, t.values.dtype, t.shape, t.values.numel(), chosen, len(pos), _seed_of(t, chosen)
        ).to_proto()
        for t, chosen, pos in encoded
    ]
    manifests = [
        message(sparse_tensors=tensor_pb2.SparseManifest(section=section, tensors=b))  # type: ignore[arg-type]
        for b in spec_batches(specs, chunk_size)
    ]
    data: list[memoryview] = []
    for t, _, pos in encoded:
        data += [tensor_bytes(t.values), pos]
    return manifests, data


def _seed_of(t: SparseOut, encoding: int) -> int:
    return (t.position_seed or 0) if encoding == tensor_pb2.POSITION_ENCODING_SEEDED else 0


def _encode_sparse(section: int, t: SparseOut, encoding: int) -> tuple[SparseOut, int, memoryview]:
    """The tensor, the concrete encoding it is sent in (COMPACT resolved), and its positions' bytes."""
    try:
        nnz = t.values.numel()
        chosen = choose_encoding(encoding if t.encoding is None else t.encoding, nnz, t.shape)
        if chosen == tensor_pb2.POSITION_ENCODING_SEEDED:
            if t.position_seed is None:
                raise WireError("POSITION_ENCODING_SEEDED needs the seed the positions were drawn from")
            if t.positions.dim() != 1 or t.positions.numel() != nnz:
                raise WireError(f"{nnz} values but {t.positions.numel()} flat positions")
            expected_positions_nbytes(chosen, nnz, t.shape)  # refuses nnz > numel
            return t, chosen, memoryview(b"")
        if chosen not in _CODES_SETS:
            return t, chosen, encode_positions(t.positions, t.shape, chosen)
        expected = expected_positions_nbytes(chosen, nnz, t.shape)  # refuses nnz > numel
        if t.positions.dim() == 1 and t.positions.numel() != nnz:  # other shapes: encode_positions refuses
            raise WireError(f"{nnz} values but {t.positions.numel()} positions")
        positions = encode_positions(t.positions, t.shape, chosen)
        assert len(positions) == expected, (len(positions), expected)
        return t, chosen, positions
    except WireError as err:
        raise WireError(f"{section_name(section)} '{t.name}': {err}") from None


def _emit(
    message: type[Any],
    frames: list[Any],
    segments: list[tuple[int, list[memoryview]]],
    chunk_size: int,
    encoded_chunks: bool,
) -> Iterator[Any]:
    yield from frames
    field_number = message.DESCRIPTOR.fields_by_name["chunk"].number
    for section, data in segments:
        if encoded_chunks:
            for offset, pieces in chunk_pieces(data, chunk_size):
                yield encode_chunk_frame(field_number, section, offset, pieces)
        else:
            for chunk in chunk_frames(section, data, chunk_size):
                yield message(chunk=chunk)
