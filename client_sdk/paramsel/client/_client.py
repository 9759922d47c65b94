"""The three rpcs as Python calls: tensors in, tensors out, ParamselError on failure."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from tqdm.auto import tqdm

from paramsel.client._connection import Connection, Resolved, channel_for, resolve, with_target
from paramsel.client._errors import ParamselError, StatusCode
from paramsel.client._retry import with_retries
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES, WireError
from paramsel.wire.digest import model_digest
from paramsel.wire.fastframes import frame_parser, serialize_frame
from paramsel.wire.streams import (
    Received,
    SparseData,
    SparseOut,
    read_frames,
    write_contributions,
    write_frames,
)

RESULT = frozenset({tensor_pb2.SECTION_RESULT})
# The ErrorInfo reason of a server that does not hold the initial model a call names by digest.
INITIAL_MODEL_NOT_HELD = "INITIAL_MODEL_NOT_HELD"
# Uploads this large show a progress bar on a terminal.
PROGRESS_MIN_BYTES = 64 << 20
# The client accepts whatever the server sends back; the server bounds what it computes.
_MAX_RESPONSE_BYTES = 1 << 62
T = TypeVar("T")


@dataclass(frozen=True)
class SelectResult:
    """A Select answer: the header (kind and figures) and the sparse or whole tensors."""

    header: service_pb2.SelectionHeader
    """What was selected: the kind and its figures (k, threshold, selected and sent entries, drifts)."""
    sparse: list[SparseData]
    """Sparse tensors (top-k): declaration, values and flat int64 positions."""
    tensors: list[tuple[str, torch.Tensor]]
    """Whole tensors (layers, FedPM masks), named."""
    frames: list[Any] | None = None
    """The response frames as they came off the wire, when asked for (``keep_frames``)."""


def read_selection(responses: Iterable[service_pb2.SelectResponse]) -> Received:
    """Decodes the frames of a Select response."""
    return read_frames(
        responses,
        first="header",
        dense_sections=RESULT,
        sparse_sections=RESULT,
        max_bytes=_MAX_RESPONSE_BYTES,
    )


def _keeping(responses: Iterable[Any], kept: list[Any]) -> Iterator[Any]:
    for response in responses:
        kept.append(response)
        yield response


@dataclass(frozen=True)
class PushResult:
    """A Push answer: the header and FL4Health's packed arrays, each named after its tensor."""

    header: service_pb2.SelectionHeader
    """What was selected: the kind and its figures."""
    arrays: list[tuple[str, torch.Tensor]]
    """FL4Health's packed arrays in order, each named after its tensor (the names array is not sent)."""


def _models(model: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor] | None) -> list[Any]:
    sections = [(tensor_pb2.SECTION_MODEL, list(model.items()))]
    if initial is not None:
        sections.append((tensor_pb2.SECTION_INITIAL_MODEL, list(initial.items())))
    return sections


class Client:
    """Calls one paramsel server. Thread-safe; cheap to create (channels are shared per target).

    ``connection`` says where and how (TLS, token, deadline, retries); ``target`` is a shortcut that
    overrides its address. Each call has a deadline and is retried, whole upload included, while the
    server is unreachable (UNAVAILABLE); other failures raise :class:`ParamselError` at once.
    """

    def __init__(
        self,
        *,
        target: str | None = None,
        connection: Connection | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        if not 0 < chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise ValueError(
                f"chunk_size_bytes must be in (0, {MAX_CHUNK_SIZE_BYTES}], got {chunk_size_bytes}"
            )
        self._connection = with_target(connection, target)
        self._chunk_size = chunk_size_bytes

    @property
    def connection(self) -> Connection:
        """Where and how this client calls."""
        return self._connection

    @property
    def chunk_size(self) -> int:
        """Tensor bytes per message this client sends and asks for."""
        return self._chunk_size

    def aggregate(
        self,
        payload_kind: int,
        contributions: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]],
        *,
        weighted: bool = True,
    ) -> AggregateResult:
        """FedAvg of clients' payloads: per contribution (num_examples, whole tensors, sparse tensors)."""
        return _aggregate(self, payload_kind, contributions, weighted=weighted)

    def server_info(self) -> service_pb2.GetServerInfoResponse:
        """What the server is and speaks: version, encodings, dtypes, criteria, limits (GetServerInfo)."""
        resolved = resolve(self._connection)
        service = service_pb2.DESCRIPTOR.services_by_name["ParameterSelectionService"]
        rpc = channel_for(resolved).unary_unary(
            f"/{service.full_name}/GetServerInfo",
            request_serializer=service_pb2.GetServerInfoRequest.SerializeToString,
            response_deserializer=service_pb2.GetServerInfoResponse.FromString,
        )

        def attempt(timeout: float) -> service_pb2.GetServerInfoResponse:
            try:
                reply: service_pb2.GetServerInfoResponse = rpc(
                    service_pb2.GetServerInfoRequest(),
                    timeout=max(timeout, 0.001),
                    metadata=resolved.metadata,
                )
                return reply
            except grpc.RpcError as error:
                raise ParamselError.from_rpc_error(error) from None

        return with_retries(self._connection, attempt)

    @staticmethod
    def _rpc(resolved: Resolved, method: str) -> Callable[..., Any]:
        """A streaming call of the service whose chunk frames skip protobuf's copies both ways."""
        service = service_pb2.DESCRIPTOR.services_by_name["ParameterSelectionService"]
        response = getattr(service_pb2, service.methods_by_name[method].output_type.name)
        return channel_for(resolved).stream_stream(
            f"/{service.full_name}/{method}",
            request_serializer=serialize_frame,
            response_deserializer=frame_parser(response),
        )

    def _call(
        self,
        method: str,
        frames: Callable[[], Iterator[Any]],
        read: Callable[[Any], T],
        *,
        upload_bytes: int,
    ) -> T:
        """One call: ``frames()`` builds the whole request afresh for every attempt."""
        resolved = resolve(self._connection)
        rpc = self._rpc(resolved, method)

        def attempt(timeout: float) -> T:
            requests = frames()
            if upload_bytes >= PROGRESS_MIN_BYTES:
                requests = _with_progress(requests, upload_bytes)
            try:
                return read(rpc(requests, timeout=max(timeout, 0.001), metadata=resolved.metadata))
            except grpc.RpcError as error:
                raise ParamselError.from_rpc_error(error) from None
            except WireError as error:
                # Raised while encoding our own request (e.g. an unsupported dtype) or reading a bad answer.
                raise ParamselError(StatusCode.INVALID_ARGUMENT, str(error)) from None

        return with_retries(self._connection, attempt)

    def _reusing(
        self,
        call: Callable[[Mapping[str, torch.Tensor] | None, bytes | None], T],
        initial: Mapping[str, torch.Tensor] | None,
        reuse_initial: bool,
    ) -> T:
        """Names the initial model by digest first and uploads it only if the server lacks it."""
        if initial is None or not reuse_initial:
            return call(initial, None)
        digest = model_digest(initial.items())
        try:
            return call(None, digest)
        except ParamselError as error:
            if error.reason != INITIAL_MODEL_NOT_HELD:
                raise
        return call(initial, digest)

    def select(
        self,
        criterion: criteria_pb2.Criterion,
        model: Mapping[str, torch.Tensor],
        initial: Mapping[str, torch.Tensor] | None = None,
        *,
        position_encoding: int = tensor_pb2.POSITION_ENCODING_COMPACT,
        value_dtype: int = tensor_pb2.DATA_TYPE_UNSPECIFIED,
        reuse_initial: bool = True,
        keep_frames: bool = False,
    ) -> SelectResult:
        """The typed selection; with ``reuse_initial`` the initial model travels only if the server lacks it."""

        def call(initial: Mapping[str, torch.Tensor] | None, digest: bytes | None) -> SelectResult:
            start = service_pb2.SelectStart(
                criterion=criterion,
                position_encoding=position_encoding,  # type: ignore[arg-type]
                response_chunk_size_bytes=self._chunk_size,
                value_dtype=value_dtype,  # type: ignore[arg-type]
            )
            if digest is not None:
                start.initial_model_digest.sha256 = digest

            def frames() -> Iterator[Any]:
                return write_frames(
                    service_pb2.SelectRequest,
                    ("start", start),
                    chunk_size=self._chunk_size,
                    encoded_chunks=True,
                    dense=_models(model, initial),
                )

            def read(responses: Any) -> SelectResult:
                kept: list[Any] | None = [] if keep_frames else None
                got = read_selection(_keeping(responses, kept) if kept is not None else responses)
                return SelectResult(
                    got.first, got.sparse.get(tensor_pb2.SECTION_RESULT, []), _named(got), kept
                )

            return self._call("Select", frames, read, upload_bytes=_nbytes(model, initial))

        return self._reusing(call, initial, reuse_initial)

    def push(
        self,
        criterion: criteria_pb2.Criterion,
        model: Mapping[str, torch.Tensor],
        initial: Mapping[str, torch.Tensor] | None = None,
        *,
        reuse_initial: bool = True,
    ) -> PushResult:
        """FL4Health's packed list; with ``reuse_initial`` the initial model travels only if needed."""

        def call(initial: Mapping[str, torch.Tensor] | None, digest: bytes | None) -> PushResult:
            start = service_pb2.PushStart(criterion=criterion, response_chunk_size_bytes=self._chunk_size)
            if digest is not None:
                start.initial_model_digest.sha256 = digest

            def frames() -> Iterator[Any]:
                return write_frames(
                    service_pb2.PushRequest,
                    ("start", start),
                    chunk_size=self._chunk_size,
                    encoded_chunks=True,
                    dense=_models(model, initial),
                )

            def read(responses: Any) -> PushResult:
                got = read_frames(
                    responses,
                    first="header",
                    dense_sections=RESULT,
                    max_bytes=_MAX_RESPONSE_BYTES,
                    unique_names=False,
                )
                return PushResult(got.first, _named(got))

            return self._call("Push", frames, read, upload_bytes=_nbytes(model, initial))

        return self._reusing(call, initial, reuse_initial)

    def pull(
        self,
        payload_kind: int,
        layout: Mapping[str, torch.Tensor],
        *,
        sparse: Sequence[SparseOut] = (),
        tensors: Sequence[tuple[str, torch.Tensor]] = (),
        mode: int = service_pb2.PULL_MODE_REPLACE,
        base: Sequence[tuple[str, torch.Tensor]] = (),
    ) -> dict[str, torch.Tensor]:
        """Applies a payload to a model whose state is ``layout``; returns the tensors that changed."""
        start = service_pb2.PullStart(
            payload_kind=payload_kind,  # type: ignore[arg-type]
            mode=mode,  # type: ignore[arg-type]
            response_chunk_size_bytes=self._chunk_size,
        )
        dense: list[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = []
        if tensors:
            dense.append((tensor_pb2.SECTION_PAYLOAD, tensors))
        if base:
            dense.append((tensor_pb2.SECTION_BASE, base))
        sparse_sections = (
            [(tensor_pb2.SECTION_PAYLOAD, sparse, tensor_pb2.POSITION_ENCODING_COO_INT64)] if sparse else []
        )

        def frames() -> Iterator[Any]:
            return write_frames(
                service_pb2.PullRequest,
                ("start", start),
                chunk_size=self._chunk_size,
                encoded_chunks=True,
                layout=list(layout.items()),
                dense=dense,
                sparse=sparse_sections,
            )

        def read(responses: Any) -> dict[str, torch.Tensor]:
            got = read_frames(responses, first="header", dense_sections=RESULT, max_bytes=_MAX_RESPONSE_BYTES)
            return dict(_named(got))

        return self._call(
            "Pull",
            frames,
            read,
            upload_bytes=sum(t.values.nbytes for t in sparse) + _nbytes(dict(tensors)),
        )


def _nbytes(*states: Mapping[str, torch.Tensor] | None) -> int:
    return sum(t.nbytes for state in states if state for t in state.values())


def _with_progress(frames: Iterator[Any], total: int) -> Iterator[Any]:
    """Shows upload progress on a terminal (tqdm stays silent when stderr is not one)."""
    with tqdm(
        total=total, unit="B", unit_scale=True, desc="paramsel upload", disable=None, leave=False
    ) as bar:
        for frame in frames:
            if frame.WhichOneof("frame") == "chunk":
                bar.update(len(frame.chunk.data))
            yield frame


def _named(got: Received) -> list[tuple[str, torch.Tensor]]:
    return [(decl.name, tensor) for decl, tensor in got.dense.get(tensor_pb2.SECTION_RESULT, [])]


@dataclass(frozen=True)
class AggregateResult:
    """An Aggregate answer: the header and the sparse or whole aggregated tensors."""

    header: service_pb2.AggregateHeader
    """How many contributions and tensors were averaged."""
    sparse: list[SparseData]
    """The sparse aggregate (sparse COO payloads)."""
    tensors: list[tuple[str, torch.Tensor]]
    """The layer aggregate (whole-layer payloads), named."""


def _aggregate(
    client: Client,
    payload_kind: int,
    contributions: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]],
    *,
    weighted: bool = True,
) -> AggregateResult:
    start = service_pb2.AggregateStart(
        payload_kind=payload_kind,  # type: ignore[arg-type]
        weighted=weighted,
        position_encoding=tensor_pb2.POSITION_ENCODING_COMPACT,
        response_chunk_size_bytes=client.chunk_size,
    )

    def frames() -> Iterator[Any]:
        return write_contributions(
            service_pb2.AggregateRequest,
            ("start", start),
            contributions,
            section=tensor_pb2.SECTION_PAYLOAD,
            encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
            chunk_size=client.chunk_size,
            encoded_chunks=True,
        )

    def read(responses: Any) -> AggregateResult:
        got = read_frames(
            responses,
            first="header",
            dense_sections=RESULT,
            sparse_sections=RESULT,
            max_bytes=_MAX_RESPONSE_BYTES,
        )
        return AggregateResult(got.first, got.sparse.get(tensor_pb2.SECTION_RESULT, []), _named(got))

    upload = sum(
        _nbytes(dict(named)) + sum(t.values.nbytes for t in sparse) for _, named, sparse in contributions
    )
    return client._call("Aggregate", frames, read, upload_bytes=upload)
