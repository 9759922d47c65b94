"""Sections: the byte streams of a call. Manifests declare segments; chunks fill them, strictly in order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
from google.protobuf.message import Message

from paramsel.v1 import tensor_pb2
from paramsel.wire.codec import MAX_CHUNK_SIZE_BYTES
from paramsel.wire.errors import StreamEndedError, WireError, WireLimitError

M = TypeVar("M", bound=Message)


def section_name(section: int) -> str:
    try:
        return tensor_pb2.Section.Name(section)  # type: ignore[arg-type]
    except ValueError:
        return f"section {section}"


class _Section:
    """One section being received: a list of segment sizes and the buffers they fill."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sizes: list[int] = []
        self.buffers: list[np.ndarray | None] = []
        self.total = 0
        self.received = 0
        self._seg = 0
        self._seg_off = 0

    def declare(self, nbytes: int) -> int:
        self.sizes.append(nbytes)
        self.buffers.append(None)
        self.total += nbytes
        return len(self.sizes) - 1

    def feed(self, offset: int, data: bytes) -> None:
        if offset != self.received:
            raise WireError(
                f"{self.name}: chunk at offset_bytes {offset}, but {self.received} bytes have arrived "
                "(chunks out of order, missing or repeated)"
            )
        if not data:
            raise WireError(f"{self.name}: empty chunk at offset_bytes {offset}")
        end = self.received + len(data)
        if end > self.total:
            raise WireError(f"{self.name}: chunk ends at byte {end}, beyond the {self.total} bytes declared")
        src = np.frombuffer(data, dtype=np.uint8)
        pos = 0
        while pos < len(src):
            while self._seg_off == self.sizes[self._seg]:
                self._seg += 1
                self._seg_off = 0
            size = self.sizes[self._seg]
            buf = self.buffers[self._seg]
            if buf is None:
                buf = self.buffers[self._seg] = np.empty(size, dtype=np.uint8)
            take = min(len(src) - pos, size - self._seg_off)
            buf[self._seg_off : self._seg_off + take] = src[pos : pos + take]
            pos += take
            self._seg_off += take
        self.received = end

    def deliver(self, data: Sequence[memoryview]) -> None:
        """Takes the bytes that chunks at offsets 0, 1 chunk, ... of one writer's segments would carry
        (:meth:`Inbound.deliver`), checked as :meth:`feed` checks them; the segments whose sizes are
        the declared ones are kept as they are, without a copy."""
        total = sum(len(d) for d in data)
        if not total:
            return  # no chunk would be sent
        if self.received or len(data) != len(self.sizes) or [len(d) for d in data] != self.sizes:
            offset = 0  # anything but the declared segments, whole and in order: as its chunks go
            for piece in data:
                if len(piece):
                    self.feed(offset, piece)  # type: ignore[arg-type]
                    offset += len(piece)
            return
        self.buffers = [np.frombuffer(d, dtype=np.uint8) if len(d) else None for d in data]
        self._seg, self._seg_off = len(self.sizes) - 1, self.sizes[-1]
        self.received = total

    def finish(self) -> list[torch.Tensor]:
        if self.received != self.total:
            raise StreamEndedError(
                f"{self.name}: the stream ended after {self.received} of the {self.total} bytes declared "
                "(chunks missing)"
            )
        return [
            torch.from_numpy(buf) if buf is not None else torch.empty(0, dtype=torch.uint8)
            for buf in self.buffers
        ]


class Inbound:
    """Receives the sections of one call.

    ``declare`` every segment (from manifests) before the first ``feed``; ``finish`` checks every
    section is complete and returns each section's segments in declaration order.
    """

    def __init__(self, *, allowed: Iterable[int], max_bytes: int) -> None:
        self._allowed = set(allowed)
        self._sections: dict[int, _Section] = {}
        self._max_bytes = max_bytes
        self._declared = 0
        self._feeding = False

    def _section(self, section: int) -> _Section:
        if section not in self._allowed:
            allowed = ", ".join(section_name(s) for s in sorted(self._allowed))
            raise WireError(f"{section_name(section)} is not accepted here (expected {allowed})")
        return self._sections.setdefault(section, _Section(section_name(section)))

    @property
    def feeding(self) -> bool:
        """True once the first chunk has arrived: no more declarations."""
        return self._feeding

    def declare(self, section: int, nbytes: int) -> int:
        """Adds a segment of ``nbytes`` to ``section``; returns its index there."""
        if self._feeding:
            raise WireError("a manifest arrived after the first chunk; all manifests must come first")
        target = self._section(section)
        self._declared += nbytes
        if self._declared > self._max_bytes:
            raise WireLimitError(
                f"the call declares more than {self._max_bytes} bytes of tensor data, the server's limit"
            )
        return target.declare(nbytes)

    def feed(self, chunk: tensor_pb2.Chunk) -> None:
        self._feeding = True
        if chunk.section not in self._sections:
            self._section(chunk.section)  # raises for sections not accepted here
            raise WireError(f"{section_name(chunk.section)}: chunk for a section no manifest declared")
        self._sections[chunk.section].feed(chunk.offset_bytes, chunk.data)

    def deliver(self, section: int, data: Sequence[memoryview]) -> None:
        """The bytes of ``section``'s segments, delivered in process instead of in chunks (a writer's
        :func:`~paramsel.wire.streams.declare_frames`); checked as the chunks that carry them would be."""
        if not any(len(d) for d in data):
            return  # no chunk would be sent
        self._feeding = True
        if section not in self._sections:
            self._section(section)  # raises for sections not accepted here
            raise WireError(f"{section_name(section)}: chunk for a section no manifest declared")
        self._sections[section].deliver(data)

    def finish(self) -> dict[int, list[torch.Tensor]]:
        return {section: s.finish() for section, s in self._sections.items()}


def check_chunk_size(chunk_size: int) -> None:
    if not 0 < chunk_size <= MAX_CHUNK_SIZE_BYTES:
        raise WireError(f"chunk size must be in (0, {MAX_CHUNK_SIZE_BYTES}] bytes, got {chunk_size}")


def chunk_pieces(segments: Iterable[memoryview], chunk_size: int) -> Iterator[tuple[int, list[memoryview]]]:
    """(offset, pieces) of each chunk of at most ``chunk_size`` bytes over the concatenated ``segments``."""
    check_chunk_size(chunk_size)
    pieces: list[memoryview] = []
    filled = 0
    offset = 0
    for segment in segments:
        start = 0
        while start < len(segment):
            take = min(chunk_size - filled, len(segment) - start)
            pieces.append(segment[start : start + take])
            filled += take
            start += take
            if filled == chunk_size:
                yield offset, pieces
                offset += filled
                pieces, filled = [], 0
    if filled:
        yield offset, pieces


def chunk_frames(section: int, segments: Iterable[memoryview], chunk_size: int) -> Iterator[tensor_pb2.Chunk]:
    """Chunks of at most ``chunk_size`` bytes carrying the concatenation of ``segments``."""
    for offset, pieces in chunk_pieces(segments, chunk_size):
        yield tensor_pb2.Chunk(section=section, offset_bytes=offset, data=b"".join(pieces))  # type: ignore[arg-type]


def spec_batches(specs: Sequence[M], limit_bytes: int) -> Iterator[list[M]]:
    """Splits manifest entries into batches whose encoded size stays under ``limit_bytes``."""
    batch: list[M] = []
    size = 0
    for spec in specs:
        entry = spec.ByteSize() + 8
        if batch and size + entry > limit_bytes:
            yield batch
            batch, size = [], 0
        batch.append(spec)
        size += entry
    if batch:
        yield batch
