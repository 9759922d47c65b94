"""The SDK's public surface is typed: its enums are the contract's, no public signature names a protobuf
class or a bare int code, and every type a public signature names is exported."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper
from google.protobuf.message import Message

import paramsel.client
from paramsel.client import (
    AggregateHeader,
    Averaging,
    Criterion,
    DataType,
    DriftPercentage,
    DriftThreshold,
    FedPm,
    LayerSummary,
    PayloadKind,
    PositionEncoding,
    PullMode,
    ScoreFunction,
    SelectionHeader,
    SelectionKind,
    ServerInfo,
    SparseUpdate,
    TopK,
    TopKSummary,
    UpdateSelection,
)
from paramsel.client._types import criterion_from_proto
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2

# Each SDK enum and the paramsel.v1 enum it mirrors. The proto's *_UNSPECIFIED values have no member:
# the server refuses them, or reads them as a default that has its own member (PullMode.REPLACE,
# PositionEncoding.COO_INT64).
MIRRORS: list[tuple[type[enum.IntEnum], Any]] = [
    (ScoreFunction, criteria_pb2.ScoreFunction),
    (PositionEncoding, tensor_pb2.PositionEncoding),
    (DataType, tensor_pb2.DataType),
    (PayloadKind, service_pb2.PayloadKind),
    (PullMode, service_pb2.PullMode),
    (SelectionKind, service_pb2.SelectionKind),
    (UpdateSelection, criteria_pb2.UpdateSelection),
    (Averaging, service_pb2.Averaging),
]
# paramsel.v1 enums no public signature needs: sections only frame a stream.
INTERNAL_ENUMS = {"Section"}


def _prefix(wrapper: Any) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", wrapper.DESCRIPTOR.name).upper() + "_"


@pytest.mark.parametrize(("ours", "theirs"), MIRRORS, ids=[m[0].__name__ for m in MIRRORS])
def test_every_proto_enum_value_has_a_member_and_back(ours: type[enum.IntEnum], theirs: Any) -> None:
    prefix = _prefix(theirs)
    expected = {
        (value.name.removeprefix(prefix), value.number)
        for value in theirs.DESCRIPTOR.values
        if not value.name.endswith("_UNSPECIFIED")
    }
    assert {(member.name, member.value) for member in ours} == expected
    assert ours.__name__ == theirs.DESCRIPTOR.name
    for member in ours:
        assert theirs.Name(member) == prefix + member.name


def test_every_proto_enum_is_mirrored() -> None:
    declared = {
        name
        for module in (criteria_pb2, service_pb2, tensor_pb2)
        for name in module.DESCRIPTOR.enum_types_by_name
    }
    assert declared - INTERNAL_ENUMS == {ours.__name__ for ours, _ in MIRRORS}


# ---------------------------------------------------------------------------------------------------
# The walker: every public function, class, method, property and dataclass field of paramsel.client.

# The documented ways to the protobuf, for those who want it: a header's ``raw``, a criterion's
# ``to_proto()``.
ESCAPE_HATCHES = {"raw", "to_proto"}
# Names of values that are codes: an ``int`` there is a bare code where an enum belongs.
CODE_NAME = re.compile(r"(_kind|kind|encoding|^mode|_mode|code|dtype)$")


def _members(cls: type) -> Iterator[tuple[str, Callable[..., Any]]]:
    """The public methods and property getters of a class, defined by paramsel (not object or Enum)."""
    for name, value in inspect.getmembers(cls):
        if name.startswith("_") and name != "__init__":
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property) and raw.fget is not None:
            yield name, raw.fget
        elif isinstance(raw, (staticmethod, classmethod)):
            yield name, raw.__func__
        elif inspect.isfunction(value):
            yield name, value


def _leaves(annotation: Any) -> Iterator[Any]:
    """Every type an annotation names (through unions, generics, tuples, callables)."""
    if annotation is None or annotation is type(None) or annotation is Any or annotation is Ellipsis:
        return
    origin = typing.get_origin(annotation)
    if origin is not None:
        if origin is not typing.Union and not isinstance(annotation, types.UnionType):
            yield origin
        for arg in typing.get_args(annotation):
            if isinstance(arg, list):  # Callable[[...], ...]
                for a in arg:
                    yield from _leaves(a)
            else:
                yield from _leaves(arg)
        return
    yield annotation


def _problems(owner: str, name: str, annotation: Any, raw: Any, exported: set[int]) -> Iterator[str]:
    where = f"{owner}: {name}"
    if name in ESCAPE_HATCHES:
        return
    if isinstance(raw, str) and "_pb2" in raw:
        yield f"{where} is annotated with generated code: {raw}"
    for leaf in _leaves(annotation):
        if isinstance(leaf, (str, typing.ForwardRef)):
            yield f"{where}: annotation {leaf!r} does not resolve"
        elif isinstance(leaf, EnumTypeWrapper):
            yield f"{where} is a generated enum wrapper"
        elif inspect.isclass(leaf):
            if issubclass(leaf, Message):
                yield f"{where} is a protobuf message ({leaf.__name__})"
            elif leaf.__module__.endswith("_pb2"):
                yield f"{where} is generated code ({leaf.__module__}.{leaf.__name__})"
            elif leaf.__module__.startswith("paramsel") and id(leaf) not in exported:
                yield f"{where} names {leaf.__module__}.{leaf.__qualname__}, which paramsel.client does not export"
            elif leaf is int and CODE_NAME.search(name):
                yield f"{where} is a bare int used as a code; an enum belongs there"


def _callable_problems(owner: str, function: Callable[..., Any], exported: set[int]) -> Iterator[str]:
    try:
        hints = typing.get_type_hints(function)
    except Exception as error:  # an annotation that does not resolve is a problem of its own
        yield f"{owner}: annotations do not resolve ({type(error).__name__}: {error})"
        return
    raw = getattr(function, "__annotations__", {})
    for name, annotation in hints.items():
        yield from _problems(owner, name, annotation, raw.get(name), exported)


def _class_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints(cls)`` without a dataclass's ``KW_ONLY`` marker, which Python 3.10's
    get_type_hints refuses ("Forward references must evaluate to types"); 3.11 and later skip it."""
    hints: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        own = {
            key: annotation
            for key, annotation in getattr(base, "__annotations__", {}).items()
            if annotation not in ("KW_ONLY", "dataclasses.KW_ONLY") and annotation is not dataclasses.KW_ONLY
        }
        # A stand-in in the base's module resolves the annotations against that module's names.
        stand_in = type(base.__name__, (), {"__annotations__": own, "__module__": base.__module__})
        hints.update(typing.get_type_hints(stand_in))
    return hints


def _class_problems(name: str, cls: type, exported: set[int]) -> Iterator[str]:
    if issubclass(cls, enum.Enum):
        return  # members, not signatures
    if issubclass(cls, BaseException):
        members = [(m, f) for m, f in _members(cls) if getattr(f, "__module__", "").startswith("paramsel")]
    else:
        members = list(_members(cls))
    try:
        hints = _class_hints(cls)
    except Exception as error:
        yield f"{name}: class annotations do not resolve ({type(error).__name__}: {error})"
        hints = {}
    raw_hints: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        raw_hints.update(getattr(base, "__annotations__", {}))
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(hints)
    for field in fields:
        if field in hints:
            yield from _problems(name, field, hints[field], raw_hints.get(field), exported)
    for member, function in members:
        if getattr(function, "__module__", "") and not function.__module__.startswith("paramsel"):
            continue
        if member == "__init__" and dataclasses.is_dataclass(cls):
            continue  # the fields, checked above
        owner = f"{name}.{member}"
        if member in ESCAPE_HATCHES:
            continue
        yield from _callable_problems(owner, function, exported)


def surface_problems(module: Any) -> list[str]:
    """What is wrong with the typed surface of ``module`` (its ``__all__``)."""
    values = {name: getattr(module, name) for name in module.__all__}
    exported = {id(value) for value in values.values()}
    problems: list[str] = []
    for name, value in values.items():
        if inspect.isclass(value):
            problems += _class_problems(name, value, exported)
        elif callable(value):
            target = value.__call__ if not inspect.isroutine(value) else value
            if not inspect.isroutine(value):
                problems += _class_problems(name, type(value), exported)
            else:
                problems += _callable_problems(name, target, exported)
    return problems


def test_public_signatures_are_typed_and_exported() -> None:
    assert surface_problems(paramsel.client) == []


# A module whose surface breaks each rule once, to see the walker catch it.
_BAD_SOURCE = '''
from __future__ import annotations
import dataclasses
from paramsel.v1 import criteria_pb2, service_pb2
from paramsel.client._client import SelectResult
from paramsel.wire.streams import SparseOut


def takes_a_message(criterion: criteria_pb2.Criterion) -> None:
    """A protobuf message in a public signature."""


def takes_a_bare_code(payload_kind: int, mode: int = 1) -> None:
    """Codes as bare ints."""


def takes_a_wrapper_value(kind: criteria_pb2.ScoreFunction.ValueType) -> None:
    """A generated enum's value type (an int at run time)."""


def returns_unexported() -> SparseOut:
    """A paramsel type that is not exported."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """A dataclass with a message field and a bare code."""

    header: service_pb2.SelectionHeader
    position_encoding: int
    raw: service_pb2.SelectionHeader
    result: SelectResult

    @property
    def pulled(self) -> service_pb2.PullHeader:
        """A property that returns a message."""
        raise NotImplementedError


__all__ = ["Holder", "SelectResult", "returns_unexported", "takes_a_bare_code", "takes_a_message", "takes_a_wrapper_value"]
'''


def test_the_walker_catches_each_kind_of_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("paramsel_bad_surface")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses resolve names through it
    exec(compile(_BAD_SOURCE, "<bad surface>", "exec"), module.__dict__)
    problems = "\n".join(surface_problems(module))
    for expected in [
        "takes_a_message: criterion is annotated with generated code",
        "takes_a_message: criterion is a protobuf message (Criterion)",
        "takes_a_bare_code: payload_kind is a bare int used as a code",
        "takes_a_bare_code: mode is a bare int used as a code",
        "takes_a_wrapper_value: kind is annotated with generated code",
        "which paramsel.client does not export",
        "Holder: header is a protobuf message (SelectionHeader)",
        "Holder: position_encoding is a bare int used as a code",
        "Holder.pulled: return is a protobuf message (PullHeader)",
    ]:
        assert expected in problems, (expected, problems)
    assert "Holder: raw" not in problems  # the escape hatch
    assert "result" not in problems  # SelectResult is exported by that module


# ---------------------------------------------------------------------------------------------------
# Criteria and headers.

CRITERIA: list[Criterion] = [
    TopK(0.25, ScoreFunction.SMALLEST_MAGNITUDE_CHANGE),
    TopK(1.0, ScoreFunction.LARGEST_FINAL_MAGNITUDE, exact_k=True),
    DriftThreshold(0.5),
    DriftThreshold(2.0, normalize=False, select_drift_more=False),
    DriftPercentage(0.3),
    DriftPercentage(1.0, normalize=False, select_drift_more=True),
    FedPm(),
    FedPm(0),
    FedPm(2**64 - 1),
    FedPm(3, packed_masks=True),
    SparseUpdate(0.1),
    SparseUpdate(0.01, UpdateSelection.TOP_K, exact_k=True),
    SparseUpdate(0.5, UpdateSelection.RANDOM_K, seed=2**64 - 1),
]


@pytest.mark.parametrize("criterion", CRITERIA, ids=repr)
def test_criteria_make_their_message_and_back(criterion: Criterion) -> None:
    message = criterion.to_proto()
    assert isinstance(message, criteria_pb2.Criterion)
    assert message is not criterion.to_proto()  # a new message each time: the criterion stays frozen
    assert criterion_from_proto(criteria_pb2.Criterion.FromString(message.SerializeToString())) == criterion
    with pytest.raises(dataclasses.FrozenInstanceError):
        criterion.normalize = False  # type: ignore[attr-defined]  # not on Criterion, and frozen anyway


def test_criterion_messages_say_what_the_proto_says() -> None:
    message = TopK(0.1, ScoreFunction.LARGEST_MAGNITUDE_CHANGE).to_proto()
    assert message.top_k.score_function == criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE
    assert not FedPm().to_proto().fed_pm.HasField("seed")
    assert FedPm(7).to_proto().fed_pm.seed == 7
    assert FedPm(packed_masks=True).to_proto().fed_pm.packed_masks
    update = SparseUpdate(0.25, UpdateSelection.RANDOM_K, seed=11).to_proto().sparse_update
    assert (update.sparsity_level, update.selection, update.seed) == (
        0.25,
        criteria_pb2.UPDATE_SELECTION_RANDOM_K,
        11,
    )
    threshold = DriftThreshold(0.5, normalize=False).to_proto().drift_threshold
    assert threshold.HasField("normalize")
    assert not threshold.normalize


def test_criterion_values_the_proto_cannot_hold_are_refused() -> None:
    from paramsel.client import InvalidArgumentError, ParamselError, StatusCode

    for seed in (-1, 2**64):
        for make in (FedPm, lambda seed: SparseUpdate(0.1, UpdateSelection.RANDOM_K, seed=seed)):
            with pytest.raises(ParamselError) as refused:
                make(seed)
            assert refused.value.status is StatusCode.INVALID_ARGUMENT
            assert isinstance(refused.value, InvalidArgumentError)
    with pytest.raises(TypeError):
        FedPm(1.5)  # type: ignore[arg-type]
    with pytest.raises(ParamselError, match="unknown value 9"):
        TopK(0.1, 9)  # type: ignore[arg-type]
    with pytest.raises(ParamselError, match="exactly one"):
        criterion_from_proto(criteria_pb2.Criterion())


def test_headers_built_by_hand_carry_their_message() -> None:
    header = SelectionHeader(SelectionKind.SPARSE_COO, top_k=TopKSummary(10, 2, 0.5, 3, 3))
    assert header.raw.kind == service_pb2.SELECTION_KIND_SPARSE_COO
    assert header.raw.top_k.selected_entries == 3
    layers = SelectionHeader(SelectionKind.LAYERS, layers=LayerSummary(4, (0.5, 0.25), 0))
    assert list(layers.raw.layers.drifts) == [0.5, 0.25]
    assert AggregateHeader(3, 2).raw == service_pb2.AggregateHeader(contributions=3, tensors=2)
    info = ServerInfo("1", "paramsel.v1", (PositionEncoding.BITMAP,), (), (), ("top_k",), (), 1, 2, False)
    assert list(info.raw.position_encodings) == [tensor_pb2.POSITION_ENCODING_BITMAP]
    assert "raw" not in repr(header)
