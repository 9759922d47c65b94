"""The rpcs as Python calls: typed values and tensors in, typed results out, ParamselError on failure."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from tqdm.auto import tqdm

from paramsel.client import _embedded
from paramsel.client._connection import Connection, Resolved, channel_for, in_process, resolve, with_target
from paramsel.client._errors import ParamselError, StatusCode, invalid_argument, local_errors
from paramsel.client._memory import kept_memory
from paramsel.client._retry import Operation, with_retries
from paramsel.client._types import (
    AggregateHeader,
    Averaging,
    Criterion,
    PayloadKind,
    PositionEncoding,
    PullMode,
    ScoreFunction,
    SelectionHeader,
    ServerInfo,
    SparseUpdate,
    TopK,
    aggregate_header,
    as_criterion,
    coerce_enum,
    selection_header,
    server_info,
)
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DEFAULT_CHUNK_SIZE_BYTES, MAX_CHUNK_SIZE_BYTES
from paramsel.wire.digest import BLAKE3, SHA256, DigestKind, model_digest
from paramsel.wire.dtypes import DTYPES, dtype_to_proto
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
# What a server older than ModelDigest.blake3 answers (INVALID_ARGUMENT) to a digest that sets only it.
_BLAKE3_UNKNOWN = "initial_model_digest.sha256 must be 32 bytes, got 0"
# Channels (shared per target, never closed) whose server refused a BLAKE3 digest as an older server
# does: they are sent SHA-256 from then on. Every other channel is sent BLAKE3, with no GetServerInfo
# round trip first (that server's GetServerInfoResponse.model_digests would list "blake3").
_digest_kinds: dict[grpc.Channel, DigestKind] = {}
# A digest as a call names it: the ModelDigest field and its value.
Digest = tuple[DigestKind, bytes]
# Uploads this large show a progress bar on a terminal.
PROGRESS_MIN_BYTES = 64 << 20
# The client accepts whatever the server sends back; the server bounds what it computes.
_MAX_RESPONSE_BYTES = 1 << 62
T = TypeVar("T")


@dataclass(frozen=True)
class SparseTensor:
    """A sparse tensor: the dense tensor's name and shape, the values sent, and their positions.

    Results (:class:`SelectResult`, :class:`AggregateResult`) carry flat positions. Given to
    :meth:`Client.pull` or :meth:`Client.aggregate`, ``positions`` may be either form: a 1-d tensor is
    flat positions, a 2-d one COO coordinates.
    """

    name: str
    """The state-dict key of the dense tensor."""
    shape: tuple[int, ...]
    """The dense tensor's shape."""
    values: torch.Tensor
    """The values, 1-d, one per position."""
    positions: torch.Tensor
    """int64 positions of the values: flat row-major positions (nnz,), or COO coordinates (nnz, ndim)."""
    position_seed: int | None = None
    """The seed the positions were drawn from (seeded random-k, PositionEncoding.SEEDED), else None. A
    tensor that has one is sent with its seed instead of its positions, which it must then match."""


def sparse_tensors(received: Sequence[SparseData]) -> list[SparseTensor]:
    """The SDK's sparse tensors of decoded ones, each seeded one with its seed."""
    return [
        SparseTensor(
            s.decl.name,
            tuple(s.decl.shape),
            s.values,
            s.positions,
            s.decl.position_seed if s.decl.position_encoding == tensor_pb2.POSITION_ENCODING_SEEDED else None,
        )
        for s in received
    ]


def _answered(sparse: Sequence[Any]) -> list[SparseTensor]:
    """The SDK's sparse tensors of an answer computed in process (``paramsel.server.local.SparseAnswer``)."""
    return [SparseTensor(s.name, s.shape, s.values, s.positions, s.position_seed) for s in sparse]


def _outgoing(sparse: Sequence[SparseTensor], what: str) -> list[SparseOut]:
    """The tensors to send, each in the encoding its positions are in (1-d: FLAT_INT64, 2-d: COO_INT64).

    A ``SparseOut`` (the SDK's old, unexported input type) is taken with a DeprecationWarning."""
    out = []
    for i, tensor in enumerate(sparse):
        if isinstance(tensor, SparseOut):
            warnings.warn(
                f"{what}: paramsel.wire.streams.SparseOut is deprecated; pass paramsel.client.SparseTensor",
                DeprecationWarning,
                stacklevel=3,
            )
            tensor = SparseTensor(tensor.name, tuple(tensor.shape), tensor.values, tensor.positions)
        elif not isinstance(tensor, SparseTensor):
            raise TypeError(
                f"{what}[{i}] must be a paramsel.client.SparseTensor, got {type(tensor).__name__}"
            )
        if tensor.position_seed is not None:
            out.append(
                SparseOut(
                    tensor.name,
                    tuple(tensor.shape),
                    tensor.values,
                    tensor.positions,
                    tensor_pb2.POSITION_ENCODING_SEEDED,
                    position_seed=tensor.position_seed,
                )
            )
            continue
        if tensor.positions.dim() == 1:
            encoding = tensor_pb2.POSITION_ENCODING_FLAT_INT64
        elif tensor.positions.dim() == 2:
            encoding = tensor_pb2.POSITION_ENCODING_COO_INT64
        else:
            raise invalid_argument(
                f"{what}[{i}] '{tensor.name}': positions must be flat (nnz,) or COO (nnz, ndim), "
                f"got shape {tuple(tensor.positions.shape)}"
            )
        out.append(SparseOut(tensor.name, tuple(tensor.shape), tensor.values, tensor.positions, encoding))
    return out


@dataclass(frozen=True)
class SelectResult:
    """A Select answer: the header (kind and figures) and the sparse or whole tensors."""

    header: SelectionHeader
    """What was selected: the kind and its figures (k, threshold, selected and sent entries, drifts)."""
    sparse: list[SparseTensor]
    """Sparse tensors (top-k): name, shape, values and flat int64 positions."""
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

    header: SelectionHeader
    """What was selected: the kind and its figures."""
    arrays: list[tuple[str, torch.Tensor]]
    """FL4Health's packed arrays in order, each named after its tensor (the names array is not sent)."""


@dataclass(frozen=True)
class AggregateResult:
    """An Aggregate answer: the header and the sparse or whole aggregated tensors."""

    header: AggregateHeader
    """How many contributions and tensors were averaged."""
    sparse: list[SparseTensor]
    """The sparse aggregate (sparse COO payloads), with flat positions."""
    tensors: list[tuple[str, torch.Tensor]]
    """The layer aggregate (whole-layer payloads), named."""
    frames: list[Any] | None = None
    """The response frames as they came off the wire, when asked for (``keep_frames``)."""


def _models(
    model: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor] | None,
    scores: Mapping[str, torch.Tensor] | None = None,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> list[Any]:
    sections = [(tensor_pb2.SECTION_MODEL, list(model.items()))]
    if initial is not None:
        sections.append((tensor_pb2.SECTION_INITIAL_MODEL, list(initial.items())))
    if scores:
        sections.append((tensor_pb2.SECTION_SCORES, list(scores.items())))
    if residual:
        sections.append((tensor_pb2.SECTION_RESIDUAL, list(residual.items())))
    return sections


def _residual(criterion: Criterion, residual: object) -> dict[str, torch.Tensor] | None:
    """The residual to send (SECTION_RESIDUAL), detached and on the CPU: only with ``SparseUpdate``.
    The server checks it against the model (names, dtypes, shapes)."""
    if residual is None:
        return None
    if not isinstance(criterion, SparseUpdate):
        raise invalid_argument("residual= goes only with SparseUpdate")
    return _named_tensors(residual, "residual", "residual")


def _named_tensors(tensors: object, what: str, one: str) -> dict[str, torch.Tensor]:
    """``tensors`` (the ``what`` of a call, each tensor ``one``) checked as the wire will take them."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a mapping of tensor names to tensors, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise invalid_argument(f"the {what} are keyed by tensor names (str), got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise invalid_argument(f"the {one} of {name!r} is a {type(tensor).__name__}, not a tensor")
        with local_errors(f"the {one} of {name!r}: "):
            dtype_to_proto(tensor.dtype)  # refused here, naming the tensor, rather than as it is framed
        out[name] = tensor.detach().cpu()
    return out


def _supplied_scores(criterion: Criterion, scores: object) -> dict[str, torch.Tensor] | None:
    """The caller's scores to send (SECTION_SCORES), detached and on the CPU: given exactly when the
    criterion is ``TopK`` with ``ScoreFunction.SUPPLIED``. The server checks them against the model."""
    supplied = isinstance(criterion, TopK) and criterion.score_function is ScoreFunction.SUPPLIED
    if scores is None:
        if supplied:
            raise invalid_argument(
                "TopK with ScoreFunction.SUPPLIED needs scores=: one tensor per model tensor, of its name "
                "and shape"
            )
        return None
    if not supplied:
        raise invalid_argument("scores= goes only with TopK(..., ScoreFunction.SUPPLIED)")
    return _named_tensors(scores, "scores", "score")


def _value_dtype(value_dtype: object) -> int:
    """The wire DataType of ``value_dtype``: None (each tensor's own), a torch dtype, or (deprecated) a
    ``paramsel.v1`` DataType number."""
    if value_dtype is None:
        return tensor_pb2.DATA_TYPE_UNSPECIFIED
    if isinstance(value_dtype, torch.dtype):
        with local_errors("value_dtype: "):
            return int(dtype_to_proto(value_dtype))
    if isinstance(value_dtype, int) and not isinstance(value_dtype, bool):
        warnings.warn(
            "value_dtype as a paramsel.v1 DataType number is deprecated; pass torch.float16 or torch.bfloat16",
            DeprecationWarning,
            stacklevel=3,
        )
        if value_dtype != tensor_pb2.DATA_TYPE_UNSPECIFIED and value_dtype not in DTYPES:
            raise invalid_argument(f"value_dtype: unknown value {value_dtype}")
        return value_dtype
    raise TypeError(f"value_dtype must be a torch.dtype or None, got {value_dtype!r}")


class Client:
    """Calls one paramsel server. Thread-safe; cheap to create (channels are shared per target).

    ``connection`` says where and how (TLS, token, deadline, retries); ``target`` is a shortcut that
    overrides its address. Each operation (one method call) has one deadline,
    ``connection.timeout_seconds``, that covers everything it does: its attempts are retried, whole
    upload included, while the server is unreachable (UNAVAILABLE), each with what is left of that
    time; other failures raise :class:`ParamselError` at once.

    With no target (none given, no ``$PARAMSEL_TARGET``), each call runs the service's own code in this
    process, on the tensors given (``paramsel.server.local``): the same results and the same errors as
    a server, without gRPC, protobuf encoding of the tensors or chunks; no server limits, deadline or
    retries apply. ``target="embedded-grpc"`` calls a loopback server started in this process instead.
    """

    def __init__(
        self,
        *,
        target: str | None = None,
        connection: Connection | None = None,
        chunk_size_bytes: int = DEFAULT_CHUNK_SIZE_BYTES,
    ) -> None:
        if not 0 < chunk_size_bytes <= MAX_CHUNK_SIZE_BYTES:
            raise invalid_argument(
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

    def _operation(self, name: str) -> Operation:
        return Operation(self._connection, name)

    def aggregate(
        self,
        payload_kind: PayloadKind,
        contributions: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseTensor]]],
        *,
        weighted: bool = True,
        averaging: Averaging = Averaging.PER_TENSOR,
        value_dtype: torch.dtype | None = None,
        keep_frames: bool = False,
    ) -> AggregateResult:
        """FedAvg of clients' payloads: per contribution (num_examples, whole tensors, sparse tensors).

        ``payload_kind`` is PayloadKind.SPARSE_COO or PayloadKind.LAYERS (a plain int is deprecated).
        ``averaging``: PER_TENSOR is FL4Health's; PER_COORDINATE (sparse payloads) averages each
        coordinate over the contributions that sent it. ``value_dtype`` (torch.float16 or
        torch.bfloat16) rounds the answer's float values to it. ``keep_frames`` keeps the response frames
        in the result. Sparse answers come back with compact positions (seeded ones when every
        contribution sent the same seeded positions, per coordinate)."""
        kind = coerce_enum(PayloadKind, payload_kind, "payload_kind")
        how = coerce_enum(Averaging, averaging, "averaging", unspecified=Averaging.PER_TENSOR)
        outgoing: list[tuple[int, Sequence[tuple[str, torch.Tensor]], list[SparseOut]]] = []
        for i, (num_examples, named, sparse) in enumerate(contributions):
            outgoing.append((num_examples, named, _outgoing(sparse, f"contributions[{i}] sparse")))
        return _aggregate(
            self,
            kind,
            outgoing,
            weighted=weighted,
            averaging=how,
            value_dtype=_value_dtype(value_dtype),
            keep_frames=keep_frames,
        )

    def server_info(self) -> ServerInfo:
        """What the server is and speaks: version, encodings, dtypes, criteria, limits (GetServerInfo).
        In process (no target): the embedded server's, whose limits do not apply in process."""
        if in_process(self._connection):
            return server_info(_embedded.run_local("server_info"))
        operation = self._operation("GetServerInfo")
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

        return server_info(with_retries(operation, attempt))

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
        operation: Operation,
        frames: Callable[[], Iterator[Any]],
        read: Callable[[Any], T],
        *,
        upload_bytes: int,
    ) -> T:
        """One rpc of ``operation``: ``frames()`` builds the whole request afresh for every attempt."""
        resolved = resolve(self._connection)
        rpc = self._rpc(resolved, operation.name)

        def attempt(timeout: float) -> T:
            # Declarations are built here: a tensor that cannot travel is refused before anything is sent.
            with local_errors():
                requests = frames()
            if upload_bytes >= PROGRESS_MIN_BYTES:
                requests = _with_progress(requests, upload_bytes)
            try:
                responses = rpc(requests, timeout=max(timeout, 0.001), metadata=resolved.metadata)
                with local_errors():  # an answer that is not what the contract says
                    return read(responses)
            except grpc.RpcError as error:
                raise ParamselError.from_rpc_error(error) from None

        with kept_memory():
            return with_retries(operation, attempt)

    def _reusing(
        self,
        call: Callable[[Mapping[str, torch.Tensor] | None, Digest | None], T],
        initial: Mapping[str, torch.Tensor] | None,
        reuse_initial: bool,
    ) -> T:
        """Names the initial model by digest first and uploads it only if the server lacks it."""
        if initial is None or not reuse_initial:
            return call(initial, None)
        channel = channel_for(resolve(self._connection))
        kind = _digest_kinds.get(channel, BLAKE3)
        while True:
            with local_errors():  # a tensor that cannot travel: refused as it would be when sent
                digest = (kind, model_digest(initial.items(), kind))
            try:
                return call(None, digest)
            except ParamselError as error:
                if (
                    kind == BLAKE3
                    and error.status == StatusCode.INVALID_ARGUMENT
                    and _BLAKE3_UNKNOWN in error.message
                ):
                    # A server older than ModelDigest.blake3 (refused before the upload): SHA-256 from now on.
                    kind = _digest_kinds[channel] = SHA256
                    continue
                if error.reason != INITIAL_MODEL_NOT_HELD:
                    raise
            return call(initial, digest)

    def select(
        self,
        criterion: Criterion,
        model: Mapping[str, torch.Tensor],
        initial: Mapping[str, torch.Tensor] | None = None,
        *,
        position_encoding: PositionEncoding = PositionEncoding.COMPACT,
        value_dtype: torch.dtype | None = None,
        reuse_initial: bool = True,
        keep_frames: bool = False,
        scores: Mapping[str, torch.Tensor] | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> SelectResult:
        """The typed selection; with ``reuse_initial`` the initial model travels only if the server lacks it.

        ``value_dtype`` (torch.float16 or torch.bfloat16) sends float values in that dtype (lossy);
        None keeps each tensor's own. ``scores`` (with ``TopK(..., ScoreFunction.SUPPLIED)`` only, and
        then required) are the caller's own: one tensor per tensor of ``model``, of its name and shape,
        any dtype; the server selects their top-k as it does a score function's (no initial model
        needed). ``residual`` (with :class:`SparseUpdate` only) is what earlier rounds did not send, at
        most one tensor per tensor of ``model``, of its name, dtype and shape (:class:`SparseUpdateExchanger`
        keeps it for you)."""
        typed = as_criterion(criterion)
        supplied = _supplied_scores(typed, scores)
        carried = _residual(typed, residual)
        encoding = coerce_enum(
            PositionEncoding, position_encoding, "position_encoding", unspecified=PositionEncoding.COO_INT64
        )
        dtype = _value_dtype(value_dtype)
        if in_process(self._connection):
            answer = _embedded.run_local(
                "select",
                service_pb2.SelectStart(
                    criterion=typed.to_proto(),
                    position_encoding=int(encoding),  # type: ignore[arg-type]
                    response_chunk_size_bytes=self._chunk_size,
                    value_dtype=dtype,  # type: ignore[arg-type]
                ),
                _models(model, initial, supplied, carried),
                chunk_size=self._chunk_size,
                keep_frames=keep_frames,
            )
            return SelectResult(
                selection_header(answer.header), _answered(answer.sparse), answer.tensors, answer.frames
            )
        operation = self._operation("Select")

        def call(initial: Mapping[str, torch.Tensor] | None, digest: Digest | None) -> SelectResult:
            start = service_pb2.SelectStart(
                criterion=typed.to_proto(),
                position_encoding=int(encoding),  # type: ignore[arg-type]
                response_chunk_size_bytes=self._chunk_size,
                value_dtype=dtype,  # type: ignore[arg-type]
            )
            if digest is not None:
                setattr(start.initial_model_digest, *digest)

            def frames() -> Iterator[Any]:
                return write_frames(
                    service_pb2.SelectRequest,
                    ("start", start),
                    chunk_size=self._chunk_size,
                    encoded_chunks=True,
                    dense=_models(model, initial, supplied, carried),
                )

            def read(responses: Any) -> SelectResult:
                kept: list[Any] | None = [] if keep_frames else None
                got = read_selection(_keeping(responses, kept) if kept is not None else responses)
                return SelectResult(
                    selection_header(got.first),
                    sparse_tensors(got.sparse.get(tensor_pb2.SECTION_RESULT, [])),
                    _named(got),
                    kept,
                )

            return self._call(
                operation, frames, read, upload_bytes=_nbytes(model, initial, supplied, carried)
            )

        return self._reusing(call, initial, reuse_initial)

    def push(
        self,
        criterion: Criterion,
        model: Mapping[str, torch.Tensor],
        initial: Mapping[str, torch.Tensor] | None = None,
        *,
        reuse_initial: bool = True,
        scores: Mapping[str, torch.Tensor] | None = None,
        value_dtype: torch.dtype | None = None,
        residual: Mapping[str, torch.Tensor] | None = None,
    ) -> PushResult:
        """FL4Health's packed list; with ``reuse_initial`` the initial model travels only if needed.
        ``scores``: the caller's own, with ``TopK(..., ScoreFunction.SUPPLIED)``; ``value_dtype`` and
        ``residual``: as for :meth:`select`."""
        typed = as_criterion(criterion)
        supplied = _supplied_scores(typed, scores)
        carried = _residual(typed, residual)
        dtype = _value_dtype(value_dtype)
        if in_process(self._connection):
            answer = _embedded.run_local(
                "push",
                service_pb2.PushStart(
                    criterion=typed.to_proto(),
                    response_chunk_size_bytes=self._chunk_size,
                    value_dtype=dtype,  # type: ignore[arg-type]
                ),
                _models(model, initial, supplied, carried),
                chunk_size=self._chunk_size,
            )
            return PushResult(selection_header(answer.header), answer.tensors)
        operation = self._operation("Push")

        def call(initial: Mapping[str, torch.Tensor] | None, digest: Digest | None) -> PushResult:
            start = service_pb2.PushStart(
                criterion=typed.to_proto(),
                response_chunk_size_bytes=self._chunk_size,
                value_dtype=dtype,  # type: ignore[arg-type]
            )
            if digest is not None:
                setattr(start.initial_model_digest, *digest)

            def frames() -> Iterator[Any]:
                return write_frames(
                    service_pb2.PushRequest,
                    ("start", start),
                    chunk_size=self._chunk_size,
                    encoded_chunks=True,
                    dense=_models(model, initial, supplied, carried),
                )

            def read(responses: Any) -> PushResult:
                got = read_frames(
                    responses,
                    first="header",
                    dense_sections=RESULT,
                    max_bytes=_MAX_RESPONSE_BYTES,
                    unique_names=False,
                )
                return PushResult(selection_header(got.first), _named(got))

            return self._call(
                operation, frames, read, upload_bytes=_nbytes(model, initial, supplied, carried)
            )

        return self._reusing(call, initial, reuse_initial)

    def pull(
        self,
        payload_kind: PayloadKind,
        layout: Mapping[str, torch.Tensor],
        *,
        sparse: Sequence[SparseTensor] = (),
        tensors: Sequence[tuple[str, torch.Tensor]] = (),
        mode: PullMode = PullMode.REPLACE,
        base: Sequence[tuple[str, torch.Tensor]] = (),
    ) -> dict[str, torch.Tensor]:
        """Applies a payload to a model whose state is ``layout``; returns the tensors that changed.

        ``sparse`` carries a SPARSE_COO payload, ``tensors`` a LAYERS or FEDPM_PROBABILITIES one; in
        SCATTER and ADD modes ``base`` holds the current values of the tensors the payload names."""
        kind = coerce_enum(PayloadKind, payload_kind, "payload_kind")
        pull_mode = coerce_enum(PullMode, mode, "mode", unspecified=PullMode.REPLACE)
        outgoing = _outgoing(sparse, "sparse")
        start = service_pb2.PullStart(
            payload_kind=int(kind),  # type: ignore[arg-type]
            mode=int(pull_mode),  # type: ignore[arg-type]
            response_chunk_size_bytes=self._chunk_size,
        )
        dense: list[tuple[int, Sequence[tuple[str, torch.Tensor]]]] = []
        if tensors:
            dense.append((tensor_pb2.SECTION_PAYLOAD, tensors))
        if base:
            dense.append((tensor_pb2.SECTION_BASE, base))
        sparse_sections = (
            [(tensor_pb2.SECTION_PAYLOAD, outgoing, tensor_pb2.POSITION_ENCODING_COO_INT64)]
            if outgoing
            else []
        )
        if in_process(self._connection):
            changed: dict[str, torch.Tensor] = _embedded.run_local(
                "pull",
                start,
                layout=list(layout.items()),
                dense=dense,
                sparse=sparse_sections,
                chunk_size=self._chunk_size,
            )
            return changed

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
            self._operation("Pull"),
            frames,
            read,
            upload_bytes=sum(_size(t.values) for t in outgoing) + _nbytes(dict(tensors)),
        )


def _nbytes(*states: Mapping[str, torch.Tensor] | None) -> int:
    """The bytes of dense tensors, for the progress bar (a tensor that cannot travel, sparse say, is
    refused by the writer, which says why)."""
    return sum(_size(t) for state in states if state for t in state.values())


def _size(tensor: object) -> int:
    """A tensor's dense bytes, for the progress bar; 0 for anything else, which the writer refuses as it
    does in process."""
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


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


def _aggregate(
    client: Client,
    payload_kind: PayloadKind,
    outgoing: Sequence[tuple[int, Sequence[tuple[str, torch.Tensor]], Sequence[SparseOut]]],
    *,
    weighted: bool = True,
    averaging: Averaging = Averaging.PER_TENSOR,
    value_dtype: int = tensor_pb2.DATA_TYPE_UNSPECIFIED,
    keep_frames: bool = False,
) -> AggregateResult:
    start = service_pb2.AggregateStart(
        payload_kind=int(payload_kind),  # type: ignore[arg-type]
        weighted=weighted,
        position_encoding=tensor_pb2.POSITION_ENCODING_COMPACT,
        response_chunk_size_bytes=client.chunk_size,
        value_dtype=value_dtype,  # type: ignore[arg-type]
        averaging=int(averaging),  # type: ignore[arg-type]
    )
    if in_process(client.connection):
        answer = _embedded.run_local(
            "aggregate",
            start,
            outgoing,
            encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
            chunk_size=client.chunk_size,
            keep_frames=keep_frames,
        )
        return AggregateResult(
            aggregate_header(answer.header), _answered(answer.sparse), answer.tensors, answer.frames
        )

    def frames() -> Iterator[Any]:
        return write_contributions(
            service_pb2.AggregateRequest,
            ("start", start),
            outgoing,
            section=tensor_pb2.SECTION_PAYLOAD,
            encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
            chunk_size=client.chunk_size,
            encoded_chunks=True,
        )

    def read(responses: Any) -> AggregateResult:
        kept: list[Any] | None = [] if keep_frames else None
        got = read_frames(
            _keeping(responses, kept) if kept is not None else responses,
            first="header",
            dense_sections=RESULT,
            sparse_sections=RESULT,
            max_bytes=_MAX_RESPONSE_BYTES,
        )
        return AggregateResult(
            aggregate_header(got.first),
            sparse_tensors(got.sparse.get(tensor_pb2.SECTION_RESULT, [])),
            _named(got),
            kept,
        )

    upload = sum(_nbytes(dict(named)) + sum(_size(t.values) for t in sparse) for _, named, sparse in outgoing)
    return client._call(client._operation("Aggregate"), frames, read, upload_bytes=upload)
