"""Bad input over real gRPC: every malformed call gets its exact status and a message naming the culprit,
and the server keeps serving (proto/paramsel/v1/service.proto, DESIGN.md "Errors").

Streams are built valid with ``write_frames`` and then corrupted, or assembled frame by frame. Select and
Push take the same request stream, so every Select case also runs as a Push.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reserved import reserved_bytes
from support import assert_serving, start_server

from paramsel.server import inbound
from paramsel.server.config import Limits
from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire import chunk_frames
from paramsel.wire.streams import SparseOut, read_frames, write_frames

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
RESIDUAL = tensor_pb2.SECTION_RESIDUAL
PAYLOAD = tensor_pb2.SECTION_PAYLOAD
BASE = tensor_pb2.SECTION_BASE
RESULT = tensor_pb2.SECTION_RESULT
F32 = tensor_pb2.DATA_TYPE_FLOAT32
COO = tensor_pb2.POSITION_ENCODING_COO_INT64
FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
SPARSE_KIND = service_pb2.PAYLOAD_KIND_SPARSE_COO
LAYERS_KIND = service_pb2.PAYLOAD_KIND_LAYERS
FEDPM_KIND = service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES
SCATTER = service_pb2.PULL_MODE_SCATTER
ADD = service_pb2.PULL_MODE_ADD
SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
CHUNK = 1 << 20
CALL_TIMEOUT = 60  # seconds: a hang fails as DEADLINE_EXCEEDED (a loaded machine does not)
NAN = math.nan
INF = math.inf

Frames = list[Any]
Stub = service_pb2_grpc.ParameterSelectionServiceStub


# ---------------------------------------------------------------------------------------------------
# Criteria and tensors


def crit(**kind: Any) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(**kind)


def top_k(level: float = 0.5, fn: int = criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE) -> Any:
    return crit(top_k=criteria_pb2.TopKCriterion(sparsity_level=level, score_function=fn))  # type: ignore[arg-type]


def drift_threshold(threshold: float = 0.01) -> Any:
    return crit(drift_threshold=criteria_pb2.DriftThresholdCriterion(norm_threshold=threshold))


def drift_percentage(fraction: float = 0.5) -> Any:
    return crit(drift_percentage=criteria_pb2.DriftPercentageCriterion(exchange_percentage=fraction))


def fed_pm(seed: int = 0) -> Any:
    return crit(fed_pm=criteria_pb2.FedPmCriterion(seed=seed))


def sparse_update(level: float = 0.5, selection: int = 0, seed: int = 0) -> Any:
    return crit(
        sparse_update=criteria_pb2.SparseUpdateCriterion(sparsity_level=level, selection=selection, seed=seed)  # type: ignore[arg-type]
    )


CHANGE = top_k(0.5, criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE)


def vec(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


W = {"a": vec(1, -5, 3, 0.5)}
W0 = {"a": vec(0, 0, 0, 0)}
DATA = vec(1, -5, 3, 0.5).numpy().tobytes()  # the 16 bytes of W["a"]


# ---------------------------------------------------------------------------------------------------
# Select / Push frames


def select(
    criterion: Any = None,
    model: dict[str, torch.Tensor] | None = None,
    initial: dict[str, torch.Tensor] | None = None,
    *,
    chunk_size: int = CHUNK,
    residual: dict[str, torch.Tensor] | None = None,
    **start: Any,
) -> Frames:
    """A valid Select request stream (default: top-k 0.5 of W)."""
    dense = [(MODEL, list((W if model is None else model).items()))]
    if initial is not None:
        dense.append((INITIAL, list(initial.items())))
    if residual is not None:
        dense.append((RESIDUAL, list(residual.items())))
    first = ("start", service_pb2.SelectStart(criterion=top_k() if criterion is None else criterion, **start))
    return list(write_frames(service_pb2.SelectRequest, first, chunk_size=chunk_size, dense=dense))


def to_push(frames: Sequence[Any]) -> Frames:
    """The same stream as PushRequests: a Select start becomes a Push start with the same criterion."""
    out = []
    for frame in frames:
        kind = frame.WhichOneof("frame")
        if kind == "start":
            out.append(
                service_pb2.PushRequest(
                    start=service_pb2.PushStart(
                        criterion=frame.start.criterion,
                        response_chunk_size_bytes=frame.start.response_chunk_size_bytes,
                    )
                )
            )
        else:
            out.append(service_pb2.PushRequest(**({kind: getattr(frame, kind)} if kind else {})))
    return out


def spec(name: str = "a", dtype: int = F32, shape: Sequence[int] = (4,)) -> tensor_pb2.TensorSpec:
    return tensor_pb2.TensorSpec(name=name, dtype=dtype, shape=list(shape))  # type: ignore[arg-type]


def start(criterion: Any = None) -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(start=service_pb2.SelectStart(criterion=criterion or top_k()))


def manifest(*specs: tensor_pb2.TensorSpec, section: int = MODEL) -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(tensors=tensor_pb2.TensorManifest(section=section, tensors=specs))  # type: ignore[arg-type]


def chunk(offset: int, data: bytes, section: int = MODEL) -> service_pb2.SelectRequest:
    return service_pb2.SelectRequest(chunk=tensor_pb2.Chunk(section=section, offset_bytes=offset, data=data))  # type: ignore[arg-type]


def with_spec(frames: Frames, index: int, **changes: Any) -> Frames:
    """``frames`` with the first tensor spec of declaration frame ``index`` changed."""
    frame = type(frames[index])()
    frame.CopyFrom(frames[index])
    target = getattr(frame, frame.WhichOneof("frame")).tensors[0]
    for field, value in changes.items():
        if field == "shape":
            del target.shape[:]
            target.shape.extend(value)
        else:
            setattr(target, field, value)
    return [*frames[:index], frame, *frames[index + 1 :]]


# ---------------------------------------------------------------------------------------------------
# Pull frames


def pull(
    layout: dict[str, tuple[int, ...]] | None = None,
    *,
    kind: int = SPARSE_KIND,
    mode: int = service_pb2.PULL_MODE_UNSPECIFIED,
    dense: Sequence[tuple[str, torch.Tensor]] = (),
    sparse: Sequence[SparseOut] = (),
    encoding: int = COO,
    base: Sequence[tuple[str, torch.Tensor]] = (),
) -> Frames:
    """A Pull request stream over a float32 layout (default: one tensor 'w' of shape (3, 4))."""
    layout = {"w": (3, 4)} if layout is None else layout
    sections = [(PAYLOAD, list(dense))] if dense else []
    if base:
        sections.append((BASE, list(base)))
    return list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart(payload_kind=kind, mode=mode)),  # type: ignore[arg-type]
            chunk_size=CHUNK,
            layout=[(name, torch.zeros(shape)) for name, shape in layout.items()],
            dense=sections,
            sparse=[(PAYLOAD, list(sparse), encoding)] if sparse else [],
        )
    )


def coo(name: str, shape: tuple[int, ...], *coords: tuple[int, ...]) -> SparseOut:
    """Ones at COO ``coords``, sent as given (``encode_positions`` leaves (nnz, ndim) arrays unchecked)."""
    positions = torch.tensor(coords, dtype=torch.int64).reshape(len(coords), len(shape))
    return SparseOut(name, shape, torch.ones(len(coords)), positions)


def flat(name: str, shape: tuple[int, ...], *positions: int) -> SparseOut:
    return SparseOut(name, shape, torch.ones(len(positions)), torch.tensor(positions, dtype=torch.int64))


def preq(**frame: Any) -> service_pb2.PullRequest:
    return service_pb2.PullRequest(**frame)


# ---------------------------------------------------------------------------------------------------
# Calling


def call(stub: Stub, rpc: str, frames: Frames) -> list[Any]:
    return list(getattr(stub, rpc)(iter(frames), timeout=CALL_TIMEOUT))


def expect(
    channel: grpc.Channel, rpc: str, frames: Frames, code: grpc.StatusCode, needles: Sequence[str]
) -> None:
    """The call fails with exactly ``code``, its details contain every needle, and the server still serves."""
    with pytest.raises(grpc.RpcError) as err:
        call(Stub(channel), rpc, frames)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    for needle in needles:
        assert needle in details, f"{needle!r} not in {details!r}"
    assert_serving(channel)


def bad(case_id: str, frames: Frames, *needles: str, code: grpc.StatusCode = INVALID) -> Any:
    return pytest.param(frames, code, needles, id=case_id)


# ---------------------------------------------------------------------------------------------------
# Select and Push

GOOD = select()
NO_INITIAL = [
    (criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE, "largest_magnitude_change"),
    (criteria_pb2.SCORE_FUNCTION_SMALLEST_MAGNITUDE_CHANGE, "smallest_magnitude_change"),
    (criteria_pb2.SCORE_FUNCTION_LARGEST_INCREASE_IN_MAGNITUDE, "largest_increase_in_magnitude"),
    (criteria_pb2.SCORE_FUNCTION_SMALLEST_INCREASE_IN_MAGNITUDE, "smallest_increase_in_magnitude"),
]
MISMATCH_CRITERIA = {
    "top_k_change": CHANGE,
    "drift_threshold": drift_threshold(),
    "drift_pct": drift_percentage(),
}
MISMATCHES = {  # current model, initial model, needles
    "names": ({"a": vec(1, 2), "b": vec(3)}, {"a": vec(0, 0), "c": vec(0)}, ("'b'", "initial model")),
    "shapes": ({"a": vec(1, 2, 3, 4)}, {"a": torch.zeros(2, 2)}, ("'a'", "shape")),
    "dtypes": ({"a": vec(1, 2)}, {"a": vec(0, 0, dtype=torch.float64)}, ("'a'", "dtype")),
}

MODEL_CASES = [
    # values out of range
    *[bad(f"sparsity_{v}", select(top_k(v)), "sparsity_level") for v in (0.0, -0.5, 1.5, NAN, INF)],
    *[
        bad(f"exchange_{v}", select(drift_percentage(v), W, W0), "exchange_percentage")
        for v in (0.0, 1.2, NAN)
    ],
    *[
        bad(f"threshold_{v}", select(drift_threshold(v), W, W0), "norm_threshold")
        for v in (0.0, -1.0, NAN)  # +inf is a threshold no drift exceeds, as in FL4Health
    ],
    bad("chunk_size_negative", select(response_chunk_size_bytes=-1), "response_chunk_size_bytes"),
    bad("chunk_size_4mib", select(response_chunk_size_bytes=4 << 20), "response_chunk_size_bytes"),
    # current and initial models that differ
    *[
        bad(f"{cid}_differ_in_{what}", select(criterion, model, initial), *needles)
        for cid, criterion in MISMATCH_CRITERIA.items()
        for what, (model, initial, needles) in MISMATCHES.items()
    ],
    # bytes that do not match dtype x shape
    bad(
        "stream_too_short",
        [start(), manifest(spec()), chunk(0, DATA[:8])],
        "SECTION_MODEL",
        "ended after 8 of the 16",
    ),
    bad("no_chunks", [start(), manifest(spec())], "SECTION_MODEL", "ended after 0 of the 16"),
    bad("extra_chunk", [*GOOD, chunk(16, b"\0\0\0\0")], "SECTION_MODEL", "beyond the 16 bytes"),
    bad(
        "chunk_too_long",
        [start(), manifest(spec()), chunk(0, DATA + b"\0")],
        "SECTION_MODEL",
        "beyond the 16",
    ),
    bad(
        "shape_too_small",
        [start(), manifest(spec(shape=(2,))), chunk(0, DATA)],
        "SECTION_MODEL",
        "beyond the 8",
    ),
    # declarations
    bad("duplicate_name", [start(), manifest(spec(), spec()), chunk(0, DATA * 2)], "'a'", "declared twice"),
    bad(
        "duplicate_across_manifests",
        [start(), manifest(spec()), manifest(spec()), chunk(0, DATA * 2)],
        "'a'",
        "twice",
    ),
    bad("empty_name", [start(), manifest(spec(name="")), chunk(0, DATA)], "SECTION_MODEL", "name is empty"),
    bad("negative_dim", with_spec(GOOD, 1, shape=[4, -1]), "'a'", "negative dimension -1"),
    bad("overflow_2^40x2^40", with_spec(GOOD, 1, shape=[2**40, 2**40]), "'a'", "overflows int64"),
    bad("overflow_2^62x4", with_spec(GOOD, 1, shape=[2**62, 4]), "'a'", "overflows int64"),
    bad("dtype_99", with_spec(GOOD, 1, dtype=99), "'a'", "dtype 99"),
    bad("dtype_unspecified", with_spec(GOOD, 1, dtype=0), "'a'", "dtype 0"),
    bad("manifest_section_99", [start(), manifest(spec(), section=99), chunk(0, DATA)], "section 99"),
    bad("manifest_section_0", [start(), manifest(spec(), section=0), chunk(0, DATA)], "SECTION_UNSPECIFIED"),
    bad("manifest_section_payload", [start(), manifest(spec(), section=PAYLOAD)], "SECTION_PAYLOAD"),
    bad("chunk_section_99", [start(), manifest(spec()), chunk(0, DATA, section=99)], "section 99"),
    # criteria and scores
    bad("score_function_99", select(top_k(0.5, 99)), "score_function", "99"),
    bad("score_function_0", select(top_k(0.5, 0)), "score_function", "unknown value 0"),
    bad("no_criterion", select(crit()), "criterion", "none is set"),
    bad("nan_score", select(model={"a": vec(1, NAN, 3)}), "'a'", "NaN"),
    bad("inf_score", select(model={"a": vec(1, 2), "b": vec(1, INF)}), "'b'", "infinite"),
    bad("minus_inf_smallest", select(top_k(0.5, 2), model={"a": vec(-INF, 1)}), "'a'", "infinite"),
    bad("nan_from_initial", select(CHANGE, {"a": vec(1, 2)}, {"a": vec(1, NAN)}), "'a'", "NaN"),
    bad("bool_model", select(model={"a": torch.tensor([True, False])}), "'a'", "bool"),
    bad("all_tensors_empty", select(model={"a": torch.zeros(0), "b": torch.zeros(2, 0)}), "empty"),
    # chunks
    bad(
        "chunk_skips_ahead",
        [start(), manifest(spec()), chunk(8, DATA[8:]), chunk(0, DATA[:8])],
        *("SECTION_MODEL", "offset_bytes 8", "0 bytes have arrived"),
    ),
    bad(
        "chunk_repeated",
        [start(), manifest(spec()), chunk(0, DATA[:8]), chunk(0, DATA[:8]), chunk(8, DATA[8:])],
        *("SECTION_MODEL", "offset_bytes 0", "8 bytes have arrived"),
    ),
    bad("chunk_negative_offset", [*GOOD, chunk(-16, DATA)], "SECTION_MODEL", "offset_bytes -16"),
    bad(
        "chunk_undeclared", [*GOOD, chunk(0, DATA, INITIAL)], "SECTION_INITIAL_MODEL", "no manifest declared"
    ),
    bad(
        "empty_chunk",
        [start(), manifest(spec()), chunk(0, b""), chunk(0, DATA)],
        "SECTION_MODEL",
        "empty chunk",
    ),
    bad(
        "manifest_after_chunk",
        [*GOOD, manifest(spec(), section=INITIAL)],
        "'tensors'",
        "after the first chunk",
    ),
    # framing
    bad("frame_without_oneof", [GOOD[0], service_pb2.SelectRequest(), *GOOD[1:]], "frame 1", "empty"),
    bad("first_frame_not_start", GOOD[1:], "frame 0", "'tensors'", "must be 'start'"),
    bad("second_start", [GOOD[0], start(), *GOOD[1:]], "frame 1", "second 'start'"),
    bad("second_start_at_end", [*GOOD, start()], "second 'start'"),
    bad("empty_request_stream", [], "stream is empty", "'start'"),
    bad("no_model", [start()], "no model"),
    bad("empty_model_manifest", [start(), manifest()], "no model"),
    bad(
        "only_initial_model",
        [start(), manifest(spec(), section=INITIAL), chunk(0, DATA, INITIAL)],
        "no model",
    ),
    # FAILED_PRECONDITION: the criterion needs the initial model
    *[
        bad(f"no_initial_{name}", select(top_k(0.5, fn)), name, "initial model", code=PRECONDITION)
        for fn, name in NO_INITIAL
    ],
    bad(
        "no_initial_drift_threshold",
        select(drift_threshold()),
        "threshold",
        "initial model",
        code=PRECONDITION,
    ),
    bad(
        "no_initial_drift_percentage",
        select(drift_percentage()),
        "percentage",
        "initial model",
        code=PRECONDITION,
    ),
    # sparse updates and their residual
    bad(
        "residual_with_top_k",
        select(residual={"a": vec(0, 0, 0, 0)}),
        "SECTION_RESIDUAL 'a'",
        "only for criterion.sparse_update",
    ),
    bad(
        "residual_unknown_name",
        select(sparse_update(), W, W0, residual={"zz": vec(0)}),
        "SECTION_RESIDUAL 'zz'",
        "declares no tensor",
    ),
    bad(
        "residual_shape",
        select(sparse_update(), W, W0, residual={"a": torch.zeros(2, 2)}),
        "SECTION_RESIDUAL 'a'",
        "shape [2, 2]",
    ),
    bad(
        "residual_dtype",
        select(sparse_update(), W, W0, residual={"a": vec(0, 0, 0, 0, dtype=torch.float16)}),
        "SECTION_RESIDUAL 'a'",
        "torch.float16",
    ),
    bad(
        "update_bool_model",
        select(sparse_update(), {"a": torch.tensor([True])}, {"a": torch.tensor([False])}),
        "SECTION_MODEL 'a'",
        "bool",
    ),
    bad("update_selection_99", select(sparse_update(0.5, 99), W, W0), "sparse_update.selection", "99"),
    *[
        bad(f"update_sparsity_{v}", select(sparse_update(v, s), W, W0), "sparsity_level")
        for v in (0.0, 1.5, NAN)
        for s in (1, 2)
    ],
    bad(
        "no_initial_sparse_update",
        select(sparse_update()),
        "sparse_update",
        "initial model",
        code=PRECONDITION,
    ),
    # RESOURCE_EXHAUSTED on the session server (8 GiB limit): 4 TiB declared, nothing allocated
    bad("declares_4_tib", with_spec(GOOD, 1, shape=[2**20, 2**20]), "8589934592 bytes", code=EXHAUSTED),
]


@pytest.mark.parametrize("rpc", ["Select", "Push"])
@pytest.mark.parametrize(("frames", "code", "needles"), MODEL_CASES)
def test_select_and_push_reject(
    channel: grpc.Channel, rpc: str, frames: Frames, code: grpc.StatusCode, needles: tuple[str, ...]
) -> None:
    expect(channel, rpc, frames if rpc == "Select" else to_push(frames), code, needles)


@pytest.mark.parametrize("encoding", [99, -1])
def test_select_rejects_unknown_position_encoding(channel: grpc.Channel, encoding: int) -> None:
    expect(
        channel,
        "Select",
        select(position_encoding=encoding),
        INVALID,
        ("start.position_encoding", str(encoding)),
    )


@pytest.mark.parametrize("criterion", [top_k(), sparse_update(), fed_pm()], ids=["top_k", "update", "fed_pm"])
def test_select_rejects_seeded_but_for_random_k(channel: grpc.Channel, criterion: Any) -> None:
    expect(
        channel,
        "Select",
        select(criterion, W, W0, position_encoding=SEEDED),
        INVALID,
        ("start.position_encoding", "POSITION_ENCODING_SEEDED", "UPDATE_SELECTION_RANDOM_K"),
    )


# ---------------------------------------------------------------------------------------------------
# Pull

ONES = torch.ones(3, 4)
W_00 = [coo("w", (3, 4), (0, 0))]
PULL_GOOD = pull(sparse=[coo("w", (3, 4), (0, 1), (2, 3))])  # start, layout, sparse manifest, one chunk
SPARSE_SPEC = PULL_GOOD[2].sparse_tensors.tensors[0]

PULL_CASES = [
    bad("layers_unknown_name", pull(dense=[("zz", ONES)], kind=LAYERS_KIND), "'zz'", "does not have"),
    bad("sparse_unknown_name", pull(sparse=[coo("zz", (3, 4), (0, 0))]), "'zz'", "does not have"),
    # COO coordinates out of range; (0, 5) would flatten to 5, inside the 12 elements
    bad("coo_0_5_in_3x4", pull(sparse=[coo("w", (3, 4), (0, 5))]), "'w'", "coordinate 5 on axis 1"),
    bad("coo_3_0_in_3x4", pull(sparse=[coo("w", (3, 4), (3, 0))]), "'w'", "coordinate 3 on axis 0"),
    bad("coo_negative", pull(sparse=[coo("w", (3, 4), (0, 0), (-1, 2))]), "'w'", "coordinate -1 on axis 0"),
    bad("flat_12_in_3x4", pull(sparse=[flat("w", (3, 4), 0, 12)], encoding=FLAT), "'w'", "position 12"),
    bad("flat_negative", pull(sparse=[flat("w", (3, 4), -1)], encoding=FLAT), "'w'", "position -1"),
    # payload shapes disagreeing with the layout
    bad("sparse_shape", pull(sparse=[coo("w", (4, 3), (0, 0))]), "'w'", "shape (4, 3)"),
    bad("sparse_rank", pull(sparse=[coo("w", (12,), (0,))]), "'w'", "shape (12,)"),
    bad("layers_shape", pull(dense=[("w", torch.ones(12))], kind=LAYERS_KIND), "'w'", "shape (12,)"),
    bad("fedpm_shape", pull(dense=[("w", torch.full((4, 3), 0.5))], kind=FEDPM_KIND), "'w'", "shape (4, 3)"),
    # sparse declarations
    bad(
        "positions_size_short",
        with_spec(PULL_GOOD, 2, positions_size_bytes=16),
        "'w'",
        "positions_size_bytes",
    ),
    bad(
        "positions_size_long", with_spec(PULL_GOOD, 2, positions_size_bytes=40), "'w'", "positions_size_bytes"
    ),
    bad("nnz_negative", with_spec(PULL_GOOD, 2, nnz=-1), "'w'", "nnz is negative"),
    bad("sparse_encoding_99", with_spec(PULL_GOOD, 2, position_encoding=99), "'w'", "position encoding 99"),
    bad("sparse_dtype_99", with_spec(PULL_GOOD, 2, dtype=99), "'w'", "dtype 99"),
    bad("sparse_negative_dim", with_spec(PULL_GOOD, 2, shape=[3, -4]), "'w'", "negative dimension -4"),
    bad("sparse_empty_name", with_spec(PULL_GOOD, 2, name=""), "SECTION_PAYLOAD", "name is empty"),
    bad("sparse_duplicate", pull(sparse=[*W_00, coo("w", (3, 4), (1, 1))]), "'w'", "declared twice"),
    bad(
        "sparse_manifest_in_base",
        [*PULL_GOOD[:2], preq(sparse_tensors={"section": BASE, "tensors": [SPARSE_SPEC]})],
        "SECTION_BASE",
    ),
    bad(
        "model_section_in_pull",
        [*PULL_GOOD[:2], preq(tensors={"section": MODEL, "tensors": [spec("w")]})],
        "SECTION_MODEL",
    ),
    # layout
    bad("no_layout", [PULL_GOOD[0], *PULL_GOOD[2:]], "no layout"),
    bad("layout_dtype_99", with_spec(PULL_GOOD, 1, dtype=99), "layout 'w'", "dtype 99"),
    bad("layout_overflow", with_spec(PULL_GOOD, 1, shape=[2**40, 2**40]), "layout 'w'", "overflows int64"),
    bad("layout_empty_name", with_spec(PULL_GOOD, 1, name=""), "layout", "name is empty"),
    bad("layout_duplicate", [*PULL_GOOD[:2], *PULL_GOOD[1:]], "layout", "'w'", "declared twice"),
    bad(
        "layout_after_chunk",
        [*PULL_GOOD, preq(layout={"tensors": [spec("v")]})],
        "'layout'",
        "after the first chunk",
    ),
    # modes, kinds and base tensors
    bad(
        "scatter_with_layers",
        pull(dense=[("w", ONES)], kind=LAYERS_KIND, mode=SCATTER),
        "start.mode",
        "SCATTER",
    ),
    bad("scatter_with_fedpm", pull(dense=[("w", ONES / 2)], kind=FEDPM_KIND, mode=SCATTER), "start.mode"),
    bad(
        "add_with_layers",
        pull(dense=[("w", ONES)], kind=LAYERS_KIND, mode=ADD),
        "start.mode",
        "PULL_MODE_ADD",
        "'w'",
    ),
    bad("add_with_fedpm", pull(dense=[("w", ONES / 2)], kind=FEDPM_KIND, mode=ADD), "PULL_MODE_ADD", "'w'"),
    bad("add_without_base", pull(sparse=W_00, mode=ADD), "'w'", "base"),
    bad(
        "seeded_position_bytes",
        with_spec(PULL_GOOD, 2, position_encoding=SEEDED, nnz=2, position_seed=1),
        "'w'",
        "positions_size_bytes is 32",
    ),
    bad(
        "seeded_nnz_over_numel",
        with_spec(PULL_GOOD, 2, position_encoding=SEEDED, nnz=13, positions_size_bytes=0, position_seed=1),
        "'w'",
        "nnz 13 exceeds the tensor's 12 elements",
    ),
    bad("seed_with_coo", with_spec(PULL_GOOD, 2, position_seed=5), "'w'", "position_seed is set (5)"),
    bad(
        "base_shape",
        pull(sparse=W_00, mode=SCATTER, base=[("w", torch.ones(4, 3))]),
        "SECTION_BASE 'w'",
        "[4, 3]",
    ),
    bad(
        "base_dtype",
        pull(sparse=W_00, mode=SCATTER, base=[("w", ONES.double())]),
        "SECTION_BASE 'w'",
        "float64",
    ),
    bad(
        "base_unknown_name",
        pull(sparse=W_00, mode=SCATTER, base=[("zz", ONES)]),
        "SECTION_BASE 'zz'",
        "no tensor",
    ),
    bad("scatter_without_base", pull(sparse=W_00, mode=SCATTER), "'w'", "base"),
    bad("base_without_scatter", pull(sparse=W_00, base=[("w", ONES)]), "SECTION_BASE", "SCATTER"),
    bad("layers_with_base", pull(dense=[("w", ONES)], kind=LAYERS_KIND, base=[("w", ONES)]), "SECTION_BASE"),
    bad("payload_kind_99", pull(kind=99, dense=[("w", ONES)]), "start.payload_kind", "99"),
    bad("payload_kind_0", pull(kind=0, dense=[("w", ONES)]), "start.payload_kind", "unknown value 0"),
    bad("pull_mode_99", pull(mode=99, sparse=W_00), "start.mode", "99"),
    bad("sparse_kind_dense_payload", pull(dense=[("w", ONES)], kind=SPARSE_KIND), "sparse_tensors manifest"),
    bad("layers_kind_sparse_payload", pull(sparse=W_00, kind=LAYERS_KIND), "tensors manifest"),
    # framing and bytes
    bad("payload_too_short", PULL_GOOD[:-1], "SECTION_PAYLOAD", "ended after 0 of the 40"),
    bad(
        "payload_extra_chunk",
        [*PULL_GOOD, preq(chunk={"section": PAYLOAD, "offset_bytes": 40, "data": b"x"})],
        "SECTION_PAYLOAD",
        "beyond the 40",
    ),
    bad("pull_second_start", [PULL_GOOD[0], *PULL_GOOD], "frame 1", "second 'start'"),
    bad("pull_frame_without_oneof", [*PULL_GOOD[:3], preq(), *PULL_GOOD[3:]], "frame 3", "empty"),
    bad("pull_first_frame_not_start", PULL_GOOD[1:], "frame 0", "'layout'"),
    bad("pull_empty_stream", [], "stream is empty"),
]


@pytest.mark.parametrize(("frames", "code", "needles"), PULL_CASES)
def test_pull_rejects(
    channel: grpc.Channel, frames: Frames, code: grpc.StatusCode, needles: tuple[str, ...]
) -> None:
    expect(channel, "Pull", frames, code, needles)


def test_pull_reference_stream_is_good(channel: grpc.Channel) -> None:
    """The stream the Pull cases corrupt is itself accepted, so each case fails for its own reason."""
    received = read_frames(
        call(Stub(channel), "Pull", PULL_GOOD),
        first="header",
        dense_sections=frozenset({RESULT}),
        max_bytes=CHUNK,
    )
    expected = torch.zeros(3, 4)
    expected[0, 1] = expected[2, 3] = 1.0
    assert torch.equal(received.state(RESULT)["w"], expected)  # type: ignore[index]


# ---------------------------------------------------------------------------------------------------
# Empty FedPM scores and gRPC's own limit


@pytest.mark.parametrize("rpc", ["Select", "Push"])
def test_fedpm_empty_score_tensor(channel: grpc.Channel, rpc: str) -> None:
    """An empty score tensor is legal and gets an empty int64 mask."""
    frames = select(fed_pm(), {"x.weight_scores": torch.zeros(0), "x.bias_scores": vec(0.5)})
    replies = call(Stub(channel), rpc, frames if rpc == "Select" else to_push(frames))
    masks = read_frames(replies, first="header", dense_sections=frozenset({RESULT}), max_bytes=CHUNK).state(
        RESULT
    )
    assert masks is not None
    assert masks["x.weight_scores"].shape == (0,)
    assert masks["x.weight_scores"].dtype == torch.int64


def test_message_over_grpc_limit(channel: grpc.Channel) -> None:
    """One 5 MiB chunk is over gRPC's 4 MiB message limit: gRPC refuses it, and the server keeps serving."""
    frames = [start(), manifest(spec(shape=(5 << 18,))), chunk(0, bytes(5 << 20))]
    with pytest.raises(grpc.RpcError) as err:
        call(Stub(channel), "Select", frames)
    assert err.value.code() == EXHAUSTED
    assert_serving(channel)


# ---------------------------------------------------------------------------------------------------
# RESOURCE_EXHAUSTED: a server that accepts 1 KiB per call


@pytest.fixture(scope="module")
def small_channel() -> Iterator[grpc.Channel]:
    running = start_server(limits=Limits(max_call_bytes=1024))
    try:
        with grpc.insecure_channel(running.target) as ch:
            yield ch
    finally:
        running.stop(0)


KIB4 = torch.ones(1024)
LIMIT_CASES = [
    pytest.param("Select", select(model={"a": KIB4}), id="select_4kib_model"),
    pytest.param(
        "Select", select(CHANGE, {"a": torch.ones(200)}, {"a": torch.ones(200)}), id="select_two_800b"
    ),
    pytest.param("Push", to_push(select(model={"a": KIB4})), id="push_4kib_model"),
    pytest.param("Pull", pull({"w": (1024,)}, dense=[("w", KIB4)], kind=LAYERS_KIND), id="pull_4kib_payload"),
]


@pytest.mark.parametrize(("rpc", "frames"), LIMIT_CASES)
def test_call_over_the_byte_limit(small_channel: grpc.Channel, rpc: str, frames: Frames) -> None:
    expect(small_channel, rpc, frames, EXHAUSTED, ("more than 1024 bytes",))


def test_call_at_the_byte_limit() -> None:
    """A Select counts its upload and everything it computes: a server whose limit is exactly that
    serves it; one byte less refuses it, once the last of it (the answer's positions) is reserved."""
    frames = select(model={"a": torch.ones(256)})  # top-k 0.5 by |w|: all 256 entries tie at 1.0
    needed = (
        1024  # the upload: 256 float32
        + inbound.TENSOR_OVERHEAD_BYTES  # the objects the server keeps for 'a'
        + 1024  # its scores (float32)
        + 1024  # the k-th search: every score joined and partitioned (fewer than 2**20: no sample)
        + 256 * (8 + 4)  # the selected entries (the ties included): int64 positions and values
        + 256 * 8  # their positions encoded as (256, 1) int64 COO
    )
    assert reserved_bytes("Select", frames) == needed == 16384
    for limit in (needed, needed - 1):
        running = start_server(limits=Limits(max_call_bytes=limit))
        try:
            with grpc.insecure_channel(running.target) as ch:
                if limit == needed:
                    assert call(Stub(ch), "Select", frames)
                else:
                    expect(
                        ch, "Select", frames, EXHAUSTED, ("tensor 'a'", f"{needed} bytes in all", str(limit))
                    )
                assert running.limits.inflight_bytes == 0
        finally:
            running.stop(0)


# ---------------------------------------------------------------------------------------------------
# After a whole batch of bad calls, the same server still selects correctly


def _select_result(channel: grpc.Channel, frames: Frames) -> tuple[Any, dict[str, Any]]:
    replies = call(Stub(channel), "Select", frames)
    received = read_frames(replies, first="header", sparse_sections=frozenset({RESULT}), max_bytes=CHUNK)
    return received.first, {s.decl.name: s for s in received.sparse[RESULT]}


def test_good_select_after_bad_calls(channel: grpc.Channel) -> None:
    stub = Stub(channel)
    for rpc, cases in (("Select", MODEL_CASES), ("Push", MODEL_CASES), ("Pull", PULL_CASES)):
        for case in cases:
            frames = case.values[0]
            with pytest.raises(grpc.RpcError):
                call(stub, rpc, frames if rpc != "Push" else to_push(frames))
    assert_serving(channel)

    # top-k 0.5 of [1, -5, 3, 0.5] by |w|: k = 2, threshold 3, so -5 and 3 at flat positions 1 and 2.
    header, result = _select_result(channel, select(top_k(0.5), {"a": vec(1, -5, 3, 0.5)}))
    assert header.kind == service_pb2.SELECTION_KIND_SPARSE_COO
    summary = header.top_k
    assert (summary.total_entries, summary.k, summary.threshold, summary.selected_entries) == (4, 2, 3.0, 2)
    assert result["a"].values.tolist() == [-5.0, 3.0]
    assert result["a"].positions.tolist() == [1, 2]

    # Two tensors and an initial model, in 3-byte chunks: |w - w0| = [1, 4, 0.5 | 2, 2, 0, 0]; k = ceil(7/2)
    # = 4, threshold 1; b[0, 1] scores 2 but is 0 in w, so it is selected and not sent.
    model = {"a": vec(1, -5, 3), "b": torch.tensor([[2.0, 0.0], [1.0, 1.0]])}
    initial = {"a": vec(0, -1, 2.5), "b": torch.tensor([[0.0, 2.0], [1.0, 1.0]])}
    header, result = _select_result(channel, select(CHANGE, model, initial, chunk_size=3))
    summary = header.top_k
    assert (summary.total_entries, summary.k, summary.threshold, summary.selected_entries) == (7, 4, 1.0, 4)
    assert (result["a"].values.tolist(), result["a"].positions.tolist()) == ([1.0, -5.0], [0, 1])
    assert (result["b"].values.tolist(), result["b"].positions.tolist()) == ([2.0], [0])
    assert_serving(channel)


# ---------------------------------------------------------------------------------------------------
# Fuzzing: whatever arrives, the answer is success or a documented status, never UNKNOWN or INTERNAL.

ACCEPTABLE = {None, INVALID, PRECONDITION, EXHAUSTED}
ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}  # DataType -> bytes
FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _outcome(channel: grpc.Channel, rpc: str, frames: Frames) -> grpc.StatusCode | None:
    try:
        call(Stub(channel), rpc, frames)
    except grpc.RpcError as err:
        return err.code()
    return None


# Garbage: frames of every kind with small random fields, in any order.
names = st.sampled_from(["", "a", "b"])
sections = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 99])
dtypes = st.sampled_from([0, *ITEMSIZE, 11, 99])
shapes = st.lists(st.integers(-2, 4), max_size=3)
fractions = st.sampled_from([0.0, 0.1, 0.5, 1.0, 1.5, -1.0, NAN, INF]) | st.floats()
criteria = st.one_of(
    st.just(crit()),
    st.builds(top_k, fractions, st.integers(0, 7) | st.just(99)),
    st.builds(drift_threshold, fractions),
    st.builds(drift_percentage, fractions),
    st.builds(fed_pm, st.integers(0, 2**64 - 1)),
    st.builds(sparse_update, fractions, st.integers(0, 3), st.integers(0, 2**64 - 1)),
)
specs = st.builds(tensor_pb2.TensorSpec, name=names, dtype=dtypes, shape=shapes)
sparse_specs = st.builds(
    tensor_pb2.SparseTensorSpec,
    name=names,
    dtype=dtypes,
    shape=shapes,
    nnz=st.integers(-1, 4),
    position_encoding=st.sampled_from([0, 1, 2, 6, 99]),
    positions_size_bytes=st.integers(-8, 64),
    position_seed=st.sampled_from([0, 1, 2**64 - 1]),
)
chunks = st.builds(
    tensor_pb2.Chunk, section=sections, offset_bytes=st.integers(-4, 64), data=st.binary(max_size=48)
)


def _stream(message: type[Any], **kinds: st.SearchStrategy[Any]) -> st.SearchStrategy[Frames]:
    """Up to 10 frames of ``message``; the first is a start more often than not, to get past it."""
    of_kind = {kind: st.builds(lambda v, kind=kind: message(**{kind: v}), s) for kind, s in kinds.items()}
    frame = st.one_of(st.just(message()), *of_kind.values())
    first = st.lists(of_kind["start"] | frame, max_size=1)
    return st.builds(lambda head, rest: head + rest, first, st.lists(frame, max_size=9))


garbage = st.one_of(
    st.tuples(
        st.just("Select"),
        _stream(
            service_pb2.SelectRequest,
            start=st.builds(
                service_pb2.SelectStart,
                criterion=criteria,
                position_encoding=st.sampled_from([0, 1, 2, 5, 6, 99]),
            ),
            tensors=st.builds(
                tensor_pb2.TensorManifest, section=sections, tensors=st.lists(specs, max_size=3)
            ),
            chunk=chunks,
        ),
    ),
    st.tuples(
        st.just("Push"),
        _stream(
            service_pb2.PushRequest,
            start=st.builds(service_pb2.PushStart, criterion=criteria),
            tensors=st.builds(
                tensor_pb2.TensorManifest, section=sections, tensors=st.lists(specs, max_size=3)
            ),
            chunk=chunks,
        ),
    ),
    st.tuples(
        st.just("Pull"),
        _stream(
            service_pb2.PullRequest,
            start=st.builds(service_pb2.PullStart, payload_kind=st.integers(0, 4), mode=st.integers(0, 4)),
            layout=st.builds(tensor_pb2.StateLayout, tensors=st.lists(specs, max_size=3)),
            tensors=st.builds(
                tensor_pb2.TensorManifest, section=sections, tensors=st.lists(specs, max_size=2)
            ),
            sparse_tensors=st.builds(
                tensor_pb2.SparseManifest, section=sections, tensors=st.lists(sparse_specs, max_size=2)
            ),
            chunk=chunks,
        ),
    ),
)


@FUZZ
@given(case=garbage)
def test_garbage_frames_never_unknown_or_internal(channel: grpc.Channel, case: tuple[str, Frames]) -> None:
    rpc, frames = case
    assert _outcome(channel, rpc, frames) in ACCEPTABLE
    assert_serving(channel)


# Well framed: every section carries exactly what its manifests declare, but the contents (random bytes:
# NaN, inf, non-0/1 bools, int extremes), dtypes, layouts and criteria are anything.

valid_fractions = st.sampled_from([0.1, 0.5, 1.0]) | st.floats(min_value=1e-9, max_value=1.0)
sane_criteria = st.one_of(
    st.builds(top_k, valid_fractions, st.integers(1, 6)),
    st.builds(drift_threshold, st.floats(min_value=1e-6, max_value=10.0)),
    st.builds(drift_percentage, valid_fractions),
    st.builds(fed_pm, st.integers(0, 2**64 - 1)),
    st.builds(sparse_update, valid_fractions, st.integers(1, 2), st.integers(0, 2**64 - 1)),
)
small_shapes = st.lists(st.integers(0, 3), max_size=2)
wire_dtypes = st.sampled_from(sorted(ITEMSIZE))


def _data(draw: Callable[..., Any], specs_: Sequence[tensor_pb2.TensorSpec]) -> bytes:
    return b"".join(
        draw(st.binary(min_size=n, max_size=n))
        for n in (math.prod(s.shape) * ITEMSIZE[s.dtype] for s in specs_)
    )


def _layout(draw: Callable[..., Any], pool: Sequence[str]) -> list[tensor_pb2.TensorSpec]:
    picked = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
    return [spec(name, draw(wire_dtypes), draw(st.lists(st.integers(0, 3), max_size=2))) for name in picked]


@st.composite
def well_framed_models(draw: Callable[..., Any]) -> tuple[str, Frames]:
    pool = ["a", "b", "x.weight_scores", "bias_scores"]
    model = _layout(draw, pool)
    initial = draw(st.sampled_from([None, model, _layout(draw, pool)]))
    residual = draw(st.sampled_from([None, model, _layout(draw, pool)]))
    declared = [(MODEL, model)] + ([(INITIAL, initial)] if initial is not None else [])
    declared += [(RESIDUAL, residual)] if residual is not None else []
    size = draw(st.integers(1, 40))
    frames = [
        service_pb2.SelectRequest(
            start=service_pb2.SelectStart(
                criterion=draw(sane_criteria | criteria), position_encoding=draw(st.integers(0, 6))
            )
        ),
        *(manifest(*s, section=section) for section, s in declared),
    ]
    for section, s in declared:
        frames += [
            service_pb2.SelectRequest(chunk=c)
            for c in chunk_frames(section, [memoryview(_data(draw, s))], size)
        ]
    rpc = draw(st.sampled_from(["Select", "Push"]))
    return rpc, frames if rpc == "Select" else to_push(frames)


@FUZZ
@given(case=well_framed_models())
def test_well_framed_models_never_unknown_or_internal(
    channel: grpc.Channel, case: tuple[str, Frames]
) -> None:
    assert _outcome(channel, *case) in ACCEPTABLE
    assert_serving(channel)


@st.composite
def well_framed_pulls(draw: Callable[..., Any]) -> Frames:
    layout = _layout(draw, ["a", "b", "c.bias_scores"])
    by_name = {s.name: s for s in layout}
    kind, mode = draw(st.integers(1, 3)), draw(st.integers(0, 3))
    targets = draw(st.lists(st.sampled_from([*by_name, "zz"]), max_size=3, unique=True))
    frames = [preq(start={"payload_kind": kind, "mode": mode}), preq(layout={"tensors": layout})]
    data = b""
    if kind == SPARSE_KIND:
        entries = []
        for name in targets:
            same = name in by_name and draw(st.booleans())
            shape = list(by_name[name].shape) if same else draw(small_shapes)
            dtype, encoding, nnz = (
                draw(wire_dtypes),
                draw(st.sampled_from([COO, FLAT, SEEDED])),
                draw(st.integers(0, 4)),
            )
            count = 0 if encoding == SEEDED else nnz * (len(shape) if encoding == COO else 1)
            positions = draw(
                st.lists(st.integers(-1, max(math.prod(shape), 1)), min_size=count, max_size=count)
            )
            entries.append(
                tensor_pb2.SparseTensorSpec(
                    name=name,
                    dtype=dtype,
                    shape=shape,
                    nnz=nnz,
                    position_encoding=encoding,
                    positions_size_bytes=8 * count,
                    position_seed=draw(st.integers(0, 2**64 - 1)) if encoding == SEEDED else 0,
                )
            )
            data += draw(st.binary(min_size=nnz * ITEMSIZE[dtype], max_size=nnz * ITEMSIZE[dtype]))
            data += torch.tensor(positions, dtype=torch.int64).numpy().tobytes()
        frames.append(preq(sparse_tensors={"section": PAYLOAD, "tensors": entries}))
    else:
        payload = [spec(n, draw(wire_dtypes), by_name[n].shape if n in by_name else (2,)) for n in targets]
        frames.append(preq(tensors={"section": PAYLOAD, "tensors": payload}))
        data = _data(draw, payload)
    size = draw(st.integers(1, 40))
    chunk_list = [preq(chunk=c) for c in chunk_frames(PAYLOAD, [memoryview(data)], size)]
    if mode in (SCATTER, ADD) and draw(st.booleans()):
        base = [s for s in layout if s.name in targets]
        frames.append(preq(tensors={"section": BASE, "tensors": base}))
        chunk_list += [preq(chunk=c) for c in chunk_frames(BASE, [memoryview(_data(draw, base))], size)]
    return frames + chunk_list


@FUZZ
@given(frames=well_framed_pulls())
def test_well_framed_pulls_never_unknown_or_internal(channel: grpc.Channel, frames: Frames) -> None:
    assert _outcome(channel, "Pull", frames) in ACCEPTABLE
    assert_serving(channel)
