"""The SDK's typed vocabulary: enums whose values are the contract's, criteria, and the headers of answers.

Every enum member takes its value from the generated ``paramsel.v1`` enum of the same name, so the two
cannot drift apart (a test checks both ways). The ``*_UNSPECIFIED`` values are left out: the server
refuses them, or reads them as a default that has its own member. Criteria are small frozen dataclasses
whose ``to_proto()`` gives the ``paramsel.v1.Criterion`` message; headers keep the message they were read
from as ``.raw``. Nothing here needs torch.
"""

from __future__ import annotations

import abc
import enum
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeVar

from paramsel.client._errors import ParamselError, StatusCode, invalid_argument
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2


class ScoreFunction(enum.IntEnum):
    """How :class:`TopK` scores each entry (``paramsel.v1.ScoreFunction``): FL4Health's six score
    functions, applied by the service, or SUPPLIED, the caller's own scores, passed as ``scores=`` to
    :meth:`Client.select` or :meth:`Client.push` (one tensor per model tensor, of its name and shape)."""

    LARGEST_FINAL_MAGNITUDE = criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
    SMALLEST_FINAL_MAGNITUDE = criteria_pb2.SCORE_FUNCTION_SMALLEST_FINAL_MAGNITUDE
    LARGEST_MAGNITUDE_CHANGE = criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE
    SMALLEST_MAGNITUDE_CHANGE = criteria_pb2.SCORE_FUNCTION_SMALLEST_MAGNITUDE_CHANGE
    LARGEST_INCREASE_IN_MAGNITUDE = criteria_pb2.SCORE_FUNCTION_LARGEST_INCREASE_IN_MAGNITUDE
    SMALLEST_INCREASE_IN_MAGNITUDE = criteria_pb2.SCORE_FUNCTION_SMALLEST_INCREASE_IN_MAGNITUDE
    SUPPLIED = criteria_pb2.SCORE_FUNCTION_SUPPLIED


class PositionEncoding(enum.IntEnum):
    """How the positions of sparse values travel (``paramsel.v1.PositionEncoding``); COMPACT asks for
    whichever of BITMAP and ELIAS_FANO is smaller, per tensor (SEEDED for seeded random-k updates, whose
    positions are drawn again from a seed and take no bytes)."""

    COO_INT64 = tensor_pb2.POSITION_ENCODING_COO_INT64
    FLAT_INT64 = tensor_pb2.POSITION_ENCODING_FLAT_INT64
    BITMAP = tensor_pb2.POSITION_ENCODING_BITMAP
    ELIAS_FANO = tensor_pb2.POSITION_ENCODING_ELIAS_FANO
    COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
    SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED


class DataType(enum.IntEnum):
    """Element types on the wire (``paramsel.v1.DataType``), as :meth:`Client.server_info` lists them."""

    FLOAT32 = tensor_pb2.DATA_TYPE_FLOAT32
    FLOAT64 = tensor_pb2.DATA_TYPE_FLOAT64
    FLOAT16 = tensor_pb2.DATA_TYPE_FLOAT16
    BFLOAT16 = tensor_pb2.DATA_TYPE_BFLOAT16
    INT64 = tensor_pb2.DATA_TYPE_INT64
    INT32 = tensor_pb2.DATA_TYPE_INT32
    INT16 = tensor_pb2.DATA_TYPE_INT16
    INT8 = tensor_pb2.DATA_TYPE_INT8
    UINT8 = tensor_pb2.DATA_TYPE_UINT8
    BOOL = tensor_pb2.DATA_TYPE_BOOL


class PayloadKind(enum.IntEnum):
    """What a payload given to :meth:`Client.pull` or :meth:`Client.aggregate` holds
    (``paramsel.v1.PayloadKind``)."""

    SPARSE_COO = service_pb2.PAYLOAD_KIND_SPARSE_COO
    LAYERS = service_pb2.PAYLOAD_KIND_LAYERS
    FEDPM_PROBABILITIES = service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES


class PullMode(enum.IntEnum):
    """How :meth:`Client.pull` applies a payload (``paramsel.v1.PullMode``): REPLACE is FL4Health's (unsent
    coordinates become 0); SCATTER writes only the sent coordinates of sparse payloads; ADD adds a sparse
    update (:class:`SparseUpdate`) to the current values."""

    REPLACE = service_pb2.PULL_MODE_REPLACE
    SCATTER = service_pb2.PULL_MODE_SCATTER
    ADD = service_pb2.PULL_MODE_ADD


class SelectionKind(enum.IntEnum):
    """What a selection holds (``paramsel.v1.SelectionKind``): sparse COO tensors (top-k), whole layers
    (the drift criteria), FedPM masks, or an update's entries as sparse COO tensors (:class:`SparseUpdate`)."""

    SPARSE_COO = service_pb2.SELECTION_KIND_SPARSE_COO
    LAYERS = service_pb2.SELECTION_KIND_LAYERS
    FEDPM_MASKS = service_pb2.SELECTION_KIND_FEDPM_MASKS
    SPARSE_UPDATE = service_pb2.SELECTION_KIND_SPARSE_UPDATE


class UpdateSelection(enum.IntEnum):
    """How :class:`SparseUpdate` picks the entries of the update (``paramsel.v1.UpdateSelection``): the
    largest by magnitude, or seeded random positions that every client of a round shares."""

    TOP_K = criteria_pb2.UPDATE_SELECTION_TOP_K
    RANDOM_K = criteria_pb2.UPDATE_SELECTION_RANDOM_K


class Averaging(enum.IntEnum):
    """How :meth:`Client.aggregate` averages sparse payloads (``paramsel.v1.Averaging``): PER_TENSOR is
    FL4Health's (unsent coordinates count as zeros); PER_COORDINATE averages each coordinate over the
    contributions that sent it."""

    PER_TENSOR = service_pb2.AVERAGING_PER_TENSOR
    PER_COORDINATE = service_pb2.AVERAGING_PER_COORDINATE


E = TypeVar("E", bound=enum.IntEnum)


def coerce_enum(kind: type[E], value: object, what: str, *, unspecified: E | None = None) -> E:
    """``value`` as a member of ``kind``. A plain int (the old form, e.g. a ``paramsel.v1`` constant) is
    accepted with a DeprecationWarning, its ``*_UNSPECIFIED`` 0 as ``unspecified`` when given; an int
    that is no member is refused as the server refuses it (INVALID_ARGUMENT)."""
    if isinstance(value, kind):
        return value
    if isinstance(value, (bool, enum.Enum)) or not isinstance(value, int):
        raise TypeError(f"{what} must be a paramsel.client.{kind.__name__}, got {value!r}")
    warnings.warn(
        f"{what} as a plain int is deprecated; pass a paramsel.client.{kind.__name__} member",
        DeprecationWarning,
        stacklevel=3,
    )
    if value == 0 and unspecified is not None:
        return unspecified
    return member_of(kind, value, what)


def member_of(kind: type[E], value: int, what: str) -> E:
    """The member of ``kind`` numbered ``value``; INVALID_ARGUMENT, as the server says, for any other."""
    try:
        return kind(value)
    except ValueError:
        expected = ", ".join(m.name for m in kind)
        raise invalid_argument(
            f"{what}: unknown value {value} (expected {kind.__name__} {expected})"
        ) from None


class Criterion(abc.ABC):
    """What the service selects: :class:`TopK`, :class:`DriftThreshold`, :class:`DriftPercentage`,
    :class:`FedPm` or :class:`SparseUpdate`. The server checks the values (INVALID_ARGUMENT when out of
    range)."""

    __slots__ = ()

    @abc.abstractmethod
    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""


@dataclass(frozen=True)
class TopK(Criterion):
    """The top-k entries by a score, sent as sparse COO tensors (FL4Health's SparseCooParameterExchanger):
    k = ceil(N x sparsity_level) over the N entries of the state."""

    sparsity_level: float
    """Fraction of the entries to select, in (0, 1]."""
    score_function: ScoreFunction
    """How the entries are scored; SUPPLIED: by the ``scores=`` the call is given."""
    exact_k: bool = False
    """Select exactly k entries, ties at the threshold going to the earliest in the state; False is FL4Health's rule."""

    def __post_init__(self) -> None:
        if not isinstance(self.score_function, ScoreFunction):
            if isinstance(self.score_function, (bool, enum.Enum)) or not isinstance(self.score_function, int):
                raise TypeError(f"score_function must be a ScoreFunction, got {self.score_function!r}")
            object.__setattr__(
                self, "score_function", member_of(ScoreFunction, self.score_function, "score_function")
            )

    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""
        return criteria_pb2.Criterion(
            top_k=criteria_pb2.TopKCriterion(
                sparsity_level=float(self.sparsity_level),
                score_function=int(self.score_function),  # type: ignore[arg-type]
                exact_k=bool(self.exact_k),
            )
        )


@dataclass(frozen=True)
class DriftThreshold(Criterion):
    """Whole layers whose drift from the initial model (l2 norm, divided by the entry count when
    ``normalize``) is above ``norm_threshold`` (at most it, when not ``select_drift_more``)."""

    norm_threshold: float
    """The threshold; the service takes finite values > 0."""
    normalize: bool = True
    """Divide each layer's drift by its number of entries."""
    select_drift_more: bool = True
    """Select drifts above the threshold (True) or at most it (False)."""

    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""
        return criteria_pb2.Criterion(
            drift_threshold=criteria_pb2.DriftThresholdCriterion(
                norm_threshold=float(self.norm_threshold),
                normalize=bool(self.normalize),
                select_drift_more=bool(self.select_drift_more),
            )
        )


@dataclass(frozen=True)
class DriftPercentage(Criterion):
    """The ceil(L x exchange_percentage) layers (of the state's L) that drifted most from the initial
    model (least, when not ``select_drift_more``)."""

    exchange_percentage: float
    """Fraction of the layers to select; the service takes values in (0, 1]."""
    normalize: bool = True
    """Divide each layer's drift by its number of entries."""
    select_drift_more: bool = True
    """Select the largest drifts (True) or the smallest (False)."""

    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""
        return criteria_pb2.Criterion(
            drift_percentage=criteria_pb2.DriftPercentageCriterion(
                exchange_percentage=float(self.exchange_percentage),
                normalize=bool(self.normalize),
                select_drift_more=bool(self.select_drift_more),
            )
        )


_UINT64 = 1 << 64


@dataclass(frozen=True)
class FedPm(Criterion):
    """FedPM: every ``weight_scores`` / ``bias_scores`` tensor as an int64 0/1 mask sampled from
    Bernoulli(sigmoid(score)) (FL4Health's select_scores_and_sample_masks)."""

    seed: int | None = None
    """Seed of the sampler, in [0, 2**64): the same seed and scores give the same masks. None: the server draws one."""
    packed_masks: bool = False
    """Beyond FL4Health: the masks travel at 1 bit per entry, as uint8 tensors of ceil(n / 8) bytes
    (:func:`unpack_masks` expands one); False: FL4Health's int64 masks."""

    def __post_init__(self) -> None:
        if self.seed is not None:
            object.__setattr__(self, "seed", _checked_seed(self.seed))

    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""
        fed_pm = criteria_pb2.FedPmCriterion(packed_masks=bool(self.packed_masks))
        if self.seed is not None:
            fed_pm.seed = self.seed
        return criteria_pb2.Criterion(fed_pm=fed_pm)


def _checked_seed(value: object) -> int:
    seed = operator.index(value)  # type: ignore[arg-type]  # TypeError for a float, as protobuf raised
    if not 0 <= seed < _UINT64:
        raise invalid_argument(f"seed must be in [0, 2**64), got {seed}")
    return seed


@dataclass(frozen=True)
class SparseUpdate(Criterion):
    """Beyond FL4Health: entries of the update u = (w - w0) + residual, for error feedback (the residual
    is what earlier rounds did not send; :class:`SparseUpdateExchanger` keeps it). TOP_K sends the
    k = ceil(N x sparsity_level) entries of largest |u| (FL4Health's top-k rule); RANDOM_K sends, per
    tensor, ceil(n x sparsity_level) positions drawn from ``seed`` (the same for every client of a round,
    a new one every round), whose positions take no bytes with PositionEncoding.COMPACT."""

    sparsity_level: float
    """Fraction of the entries to send, in (0, 1]."""
    selection: UpdateSelection = UpdateSelection.TOP_K
    """Top-k by magnitude or seeded random-k."""
    exact_k: bool = False
    """TOP_K only: exactly k entries, ties at the threshold going to the earliest in the state."""
    seed: int = 0
    """RANDOM_K only: the seed of the positions, in [0, 2**64)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "selection",
            coerce_enum(UpdateSelection, self.selection, "selection", unspecified=UpdateSelection.TOP_K),
        )
        object.__setattr__(self, "seed", _checked_seed(self.seed))

    def to_proto(self) -> criteria_pb2.Criterion:
        """The ``paramsel.v1.Criterion`` message of this criterion (a new one at each call)."""
        return criteria_pb2.Criterion(
            sparse_update=criteria_pb2.SparseUpdateCriterion(
                sparsity_level=float(self.sparsity_level),
                selection=int(self.selection),  # type: ignore[arg-type]
                exact_k=bool(self.exact_k),
                seed=self.seed,
            )
        )


def criterion_from_proto(message: criteria_pb2.Criterion) -> Criterion:
    """The typed criterion of a ``paramsel.v1.Criterion``; INVALID_ARGUMENT, as the server says, for one
    with no kind set or an unknown score function."""
    kind = message.WhichOneof("kind")
    if kind == "top_k":
        top_k = message.top_k
        return TopK(
            top_k.sparsity_level,
            member_of(ScoreFunction, top_k.score_function, "criterion.top_k.score_function"),
            top_k.exact_k,
        )
    if kind == "drift_threshold":
        rule = message.drift_threshold
        return DriftThreshold(
            rule.norm_threshold,
            rule.normalize if rule.HasField("normalize") else True,
            rule.select_drift_more if rule.HasField("select_drift_more") else True,
        )
    if kind == "drift_percentage":
        share = message.drift_percentage
        return DriftPercentage(
            share.exchange_percentage,
            share.normalize if share.HasField("normalize") else True,
            share.select_drift_more if share.HasField("select_drift_more") else True,
        )
    if kind == "fed_pm":
        return FedPm(
            message.fed_pm.seed if message.fed_pm.HasField("seed") else None, message.fed_pm.packed_masks
        )
    if kind == "sparse_update":
        update = message.sparse_update
        return SparseUpdate(
            update.sparsity_level,
            member_of(
                UpdateSelection,
                update.selection or UpdateSelection.TOP_K,
                "criterion.sparse_update.selection",
            ),
            update.exact_k,
            update.seed,
        )
    raise invalid_argument(
        "criterion: exactly one of top_k, drift_threshold, drift_percentage, fed_pm, sparse_update must be set"
    )


def as_criterion(value: object, what: str = "criterion") -> Criterion:
    """A typed criterion; a ``paramsel.v1.Criterion`` message (the old form) is converted, with a
    DeprecationWarning."""
    if isinstance(value, Criterion):
        return value
    if isinstance(value, criteria_pb2.Criterion):
        warnings.warn(
            f"{what} as a paramsel.v1 Criterion message is deprecated; pass paramsel.client.TopK, "
            "DriftThreshold, DriftPercentage, FedPm or SparseUpdate",
            DeprecationWarning,
            stacklevel=3,
        )
        return criterion_from_proto(value)
    raise TypeError(f"{what} must be a paramsel.client.Criterion (TopK, DriftThreshold, ...), got {value!r}")


@dataclass(frozen=True)
class TopKSummary:
    """Figures of a top-k selection."""

    total_entries: int
    """N: the entries of the whole state."""
    k: int
    """k = ceil(N x sparsity_level)."""
    threshold: float
    """The k-th largest score."""
    selected_entries: int
    """Entries scoring at least the threshold (ties included, so it can exceed k)."""
    sent_entries: int
    """Values sent: selected entries of tensors with a dimension, exact zeros left out."""


@dataclass(frozen=True)
class LayerSummary:
    """Figures of a layer or FedPM selection."""

    total_layers: int
    """L: the entries of the whole state."""
    drifts: tuple[float, ...]
    """The drift of each selected layer, in result order (empty for FedPM)."""
    seed: int
    """FedPM: the seed the masks were drawn with."""


@dataclass(frozen=True)
class SelectionHeader:
    """What a Select or Push selected: the kind, and the figures of a top-k (``top_k``) or of a layer or
    FedPM selection (``layers``). ``raw`` is the ``paramsel.v1.SelectionHeader`` it was read from."""

    kind: SelectionKind
    """What the result holds."""
    top_k: TopKSummary | None = None
    """The figures of a top-k selection (SPARSE_COO); None otherwise."""
    layers: LayerSummary | None = None
    """The figures of a layer or FedPM selection; None otherwise."""
    raw: service_pb2.SelectionHeader = field(init=False, repr=False, compare=False)
    """The message as received (made from the fields above when built by hand)."""

    def __post_init__(self) -> None:
        message = service_pb2.SelectionHeader(kind=int(self.kind))  # type: ignore[arg-type]
        if self.top_k is not None:
            t = self.top_k
            message.top_k.CopyFrom(
                service_pb2.TopKSummary(
                    total_entries=t.total_entries,
                    k=t.k,
                    threshold=t.threshold,
                    selected_entries=t.selected_entries,
                    sent_entries=t.sent_entries,
                )
            )
        elif self.layers is not None:
            layers = self.layers
            message.layers.CopyFrom(
                service_pb2.LayerSummary(
                    total_layers=layers.total_layers, drifts=list(layers.drifts), seed=layers.seed
                )
            )
        object.__setattr__(self, "raw", message)


def selection_header(message: service_pb2.SelectionHeader) -> SelectionHeader:
    """The typed header of a received ``paramsel.v1.SelectionHeader`` (kept as ``raw``)."""
    summary = message.WhichOneof("summary")
    top_k = layers = None
    if summary == "top_k":
        t = message.top_k
        top_k = TopKSummary(t.total_entries, t.k, t.threshold, t.selected_entries, t.sent_entries)
    elif summary == "layers":
        layers = LayerSummary(message.layers.total_layers, tuple(message.layers.drifts), message.layers.seed)
    header = SelectionHeader(_known(SelectionKind, message.kind, "header.kind"), top_k, layers)
    object.__setattr__(header, "raw", message)
    return header


@dataclass(frozen=True)
class AggregateHeader:
    """What an Aggregate averaged. ``raw`` is the ``paramsel.v1.AggregateHeader`` it was read from."""

    contributions: int
    """Contributions averaged."""
    tensors: int
    """Tensors in the aggregate."""
    raw: service_pb2.AggregateHeader = field(init=False, repr=False, compare=False)
    """The message as received (made from the fields above when built by hand)."""

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "raw", service_pb2.AggregateHeader(contributions=self.contributions, tensors=self.tensors)
        )


def aggregate_header(message: service_pb2.AggregateHeader) -> AggregateHeader:
    """The typed header of a received ``paramsel.v1.AggregateHeader`` (kept as ``raw``)."""
    header = AggregateHeader(message.contributions, message.tensors)
    object.__setattr__(header, "raw", message)
    return header


@dataclass(frozen=True)
class ServerInfo:
    """What a server is and speaks (GetServerInfo). Values a newer server lists that this SDK has no
    member for are left out of the tuples (``raw`` keeps them)."""

    server_version: str
    """The server's release, e.g. "0.1.0"."""
    api_package: str
    """The contract's proto package, "paramsel.v1"."""
    position_encodings: tuple[PositionEncoding, ...]
    """Position encodings the server reads and writes (COMPACT included, as a request option)."""
    data_types: tuple[DataType, ...]
    """Element types the server accepts."""
    score_functions: tuple[ScoreFunction, ...]
    """Score functions a TopK criterion may name."""
    criteria: tuple[str, ...]
    """Criterion kinds, by the paramsel.v1.Criterion field names ("top_k", "drift_threshold", ...)."""
    payload_kinds: tuple[PayloadKind, ...]
    """Payload kinds Pull applies."""
    max_chunk_size_bytes: int
    """Largest chunk of tensor data the server sends when asked."""
    max_call_bytes: int
    """Bytes one call may make the server hold (see the service's memory rules)."""
    requires_token: bool
    """Whether calls need a bearer token."""
    model_digests: tuple[str, ...] = ("sha256",)
    """Initial-model digest kinds the server accepts; ("sha256",) from a server that lists none."""
    raw: service_pb2.GetServerInfoResponse = field(init=False, repr=False, compare=False)
    """The message as received (made from the fields above when built by hand)."""

    def __post_init__(self) -> None:
        message = service_pb2.GetServerInfoResponse(
            server_version=self.server_version,
            api_package=self.api_package,
            position_encodings=[int(e) for e in self.position_encodings],  # type: ignore[misc]
            data_types=[int(d) for d in self.data_types],  # type: ignore[misc]
            score_functions=[int(s) for s in self.score_functions],  # type: ignore[misc]
            criteria=list(self.criteria),
            payload_kinds=[int(p) for p in self.payload_kinds],  # type: ignore[misc]
            max_chunk_size_bytes=self.max_chunk_size_bytes,
            max_call_bytes=self.max_call_bytes,
            requires_token=self.requires_token,
            model_digests=list(self.model_digests),
        )
        object.__setattr__(self, "raw", message)


def server_info(message: service_pb2.GetServerInfoResponse) -> ServerInfo:
    """The typed description of a received ``GetServerInfoResponse`` (kept as ``raw``)."""
    info = ServerInfo(
        message.server_version,
        message.api_package,
        _members(PositionEncoding, message.position_encodings),
        _members(DataType, message.data_types),
        _members(ScoreFunction, message.score_functions),
        tuple(message.criteria),
        _members(PayloadKind, message.payload_kinds),
        message.max_chunk_size_bytes,
        message.max_call_bytes,
        message.requires_token,
        tuple(message.model_digests) or ("sha256",),
    )
    object.__setattr__(info, "raw", message)
    return info


def _members(kind: type[E], values: Any) -> tuple[E, ...]:
    known = {m.value for m in kind}
    return tuple(kind(v) for v in values if v in known)


def _known(kind: type[E], value: int, what: str) -> E:
    """A member of an enum the server sent; an unknown value means a newer server than this SDK."""
    try:
        return kind(value)
    except ValueError:
        raise ParamselError(
            StatusCode.INTERNAL,
            f"{what}: the server sent {kind.__name__} {value}, which this SDK does not know (a newer server?)",
        ) from None
