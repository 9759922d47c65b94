"""Request streams -> engine inputs: framing is checked by the wire codecs, the rest here. No computing."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from paramsel import engine
from paramsel.engine import budget
from paramsel.server.criteria import criterion_work, is_random_k, is_sparse_update, supplies_scores
from paramsel.server.limits import Declarations
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2
from paramsel.wire import DenseDecl, SparseDecl, WireError
from paramsel.wire.compact import bitmap_nbytes, elias_fano_nbytes
from paramsel.wire.seeded import seeded_positions_nbytes
from paramsel.wire.streams import Received, Segments, read_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
PAYLOAD = tensor_pb2.SECTION_PAYLOAD
BASE = tensor_pb2.SECTION_BASE
SCORES = tensor_pb2.SECTION_SCORES
RESIDUAL = tensor_pb2.SECTION_RESIDUAL


def read_models(
    frames: Iterable[Any], *, max_bytes: int, delivered: Sequence[Segments] | None = None
) -> Received:
    """A Select or Push request: the current model and, optionally, the initial model, the caller's
    scores and the caller's residual (checked against the model and the criterion: :func:`check_scores`,
    :func:`check_residual`). ``delivered``: the tensors' bytes, in process (``read_frames``)."""
    received = read_frames(
        frames,
        first="start",
        dense_sections=frozenset({MODEL, INITIAL, SCORES, RESIDUAL}),
        max_bytes=max_bytes,
        delivered=delivered,
    )
    if not received.state(MODEL):
        raise WireError("no model was sent: declare the model's tensors in a SECTION_MODEL manifest")
    criterion = received.first.criterion if received.first.HasField("criterion") else None
    model = [decl for decl, _ in received.dense[MODEL]]
    scores = received.dense.get(SCORES)
    check_scores(criterion, model, None if scores is None else [decl for decl, _ in scores])
    residual = received.dense.get(RESIDUAL)
    check_residual(criterion, model, None if residual is None else [decl for decl, _ in residual])
    return received


_SUPPLIED = "criterion.top_k.score_function SCORE_FUNCTION_SUPPLIED"


def check_scores(
    criterion: criteria_pb2.Criterion | None,
    model: Sequence[engine.TensorSpec | DenseDecl],
    scores: Sequence[engine.TensorSpec | DenseDecl] | None,
) -> None:
    """Refuses (INVALID_ARGUMENT, naming the tensor) SECTION_SCORES that do not go with the criterion or
    the model: SCORE_FUNCTION_SUPPLIED takes exactly one score tensor per SECTION_MODEL tensor, of its
    name and shape (any dtype, any order); every other criterion takes none. ``scores`` is None when no
    SECTION_SCORES tensor was declared. Run on the declarations at the first chunk (:func:`select_plan`),
    so before the upload, and on what was received."""
    if not supplies_scores(criterion):
        if scores is None:
            return
        if criterion is None or criterion.WhichOneof("kind") is None:
            taken = "no criterion is set"
        elif criterion.WhichOneof("kind") == "top_k":
            value = criterion.top_k.score_function
            named = (
                criteria_pb2.ScoreFunction.Name(value)
                if value in criteria_pb2.ScoreFunction.values()
                else value
            )
            taken = f"the criterion's score function is {named}"
        else:
            taken = f"the criterion is {criterion.WhichOneof('kind')}"
        raise WireError(
            f"SECTION_SCORES '{scores[0].name}': SECTION_SCORES is only for {_SUPPLIED}, but {taken}"
        )
    if not model:
        return  # refused as a request without a model (read_models)
    if scores is None:
        raise WireError(
            f"{_SUPPLIED} needs the caller's scores: declare one SECTION_SCORES tensor per SECTION_MODEL "
            f"tensor (none was declared; the first model tensor is '{model[0].name}')"
        )
    by_name = {decl.name: decl for decl in scores}
    for decl in model:
        score = by_name.get(decl.name)
        if score is None:
            raise WireError(f"SECTION_SCORES has no tensor for '{decl.name}', which SECTION_MODEL declares")
        if tuple(score.shape) != tuple(decl.shape):
            raise WireError(
                f"SECTION_SCORES '{decl.name}': shape {list(score.shape)} differs from the SECTION_MODEL "
                f"tensor's {list(decl.shape)}"
            )
    names = {decl.name for decl in model}
    for decl in scores:
        if decl.name not in names:
            raise WireError(f"SECTION_SCORES '{decl.name}': SECTION_MODEL declares no tensor of that name")


_UPDATE = "criterion.sparse_update"


def check_residual(
    criterion: criteria_pb2.Criterion | None,
    model: Sequence[engine.TensorSpec | DenseDecl],
    residual: Sequence[engine.TensorSpec | DenseDecl] | None,
) -> None:
    """Refuses (INVALID_ARGUMENT, naming the tensor) SECTION_RESIDUAL that does not go with the criterion
    or the model, and model tensors SparseUpdateCriterion cannot take: SECTION_RESIDUAL is for
    SparseUpdateCriterion only, at most one tensor per SECTION_MODEL tensor, of its name, dtype and
    shape (in any order; a model tensor without one has a zero residual); SparseUpdateCriterion refuses
    bool model tensors (no w - w0). ``residual`` is None when no SECTION_RESIDUAL tensor was declared.
    Run on the declarations at the first chunk (:func:`select_plan`), so before the upload, and on what
    was received."""
    if not is_sparse_update(criterion):
        if residual is None:
            return
        kind = criterion.WhichOneof("kind") if criterion is not None else None
        taken = "no criterion is set" if kind is None else f"the criterion is {kind}"
        raise WireError(
            f"SECTION_RESIDUAL '{residual[0].name}': SECTION_RESIDUAL is only for {_UPDATE}, but {taken}"
        )
    for decl in model:
        if decl.dtype == torch.bool:
            raise WireError(
                f"SECTION_MODEL '{decl.name}': {_UPDATE} cannot take a bool tensor (it has no update w - w0)"
            )
    by_name = {decl.name: decl for decl in model}
    seen: set[str] = set()
    for decl in residual or []:
        tensor = by_name.get(decl.name)
        if tensor is None:
            raise WireError(f"SECTION_RESIDUAL '{decl.name}': SECTION_MODEL declares no tensor of that name")
        if decl.name in seen:
            raise WireError(
                f"SECTION_RESIDUAL '{decl.name}' is declared twice (at most one per model tensor)"
            )
        seen.add(decl.name)
        if decl.dtype != tensor.dtype:
            raise WireError(
                f"SECTION_RESIDUAL '{decl.name}': dtype {decl.dtype} differs from the SECTION_MODEL "
                f"tensor's {tensor.dtype}"
            )
        if tuple(decl.shape) != tuple(tensor.shape):
            raise WireError(
                f"SECTION_RESIDUAL '{decl.name}': shape {list(decl.shape)} differs from the SECTION_MODEL "
                f"tensor's {list(tensor.shape)}"
            )


def read_pull(
    frames: Iterable[Any], *, max_bytes: int, delivered: Sequence[Segments] | None = None
) -> Received:
    """A Pull request: the model's layout, the payload and, in scatter and add modes, the base tensors."""
    received = read_frames(
        frames,
        first="start",
        dense_sections=frozenset({PAYLOAD, BASE}),
        sparse_sections=frozenset({PAYLOAD}),
        max_bytes=max_bytes,
        delivered=delivered,
    )
    if not received.layout:
        raise WireError("no layout was sent: declare the model's state in 'layout' frames")
    # A small payload can name large tensors: what the pull builds (the answer, densified tensors) was
    # counted against the call's limit from the declarations, before the first chunk (pull_plan).
    return received


def model_specs(received: Received) -> list[engine.TensorSpec]:
    return [engine.TensorSpec(name=d.name, dtype=d.dtype, shape=d.shape) for d in received.layout]


def position_encoding(value: int) -> int:
    """The encoding a Select asked for; unset means COO_INT64 (SEEDED is known; which answers can be
    written in it is :func:`check_select_encoding`'s to say)."""
    if value == tensor_pb2.POSITION_ENCODING_UNSPECIFIED:
        return tensor_pb2.POSITION_ENCODING_COO_INT64
    if value not in tensor_pb2.PositionEncoding.values():
        raise WireError(f"start.position_encoding: unknown value {value}")
    return value


def sparse_payload(received: Received) -> list[engine.SparseTensor]:
    if PAYLOAD in received.dense:
        raise WireError("PAYLOAD_KIND_SPARSE_COO takes a sparse_tensors manifest, not a tensors manifest")
    return [
        engine.SparseTensor(name=s.decl.name, shape=s.decl.shape, values=s.values, positions=s.positions)
        for s in received.sparse.get(PAYLOAD, [])
    ]


def dense_payload(received: Received) -> list[tuple[str, torch.Tensor]]:
    if PAYLOAD in received.sparse:
        raise WireError("whole-tensor payloads take a tensors manifest, not a sparse_tensors manifest")
    if BASE in received.dense:
        raise WireError("SECTION_BASE is only for PULL_MODE_SCATTER and PULL_MODE_ADD")
    return [(decl.name, tensor) for decl, tensor in received.dense.get(PAYLOAD, [])]


def base_state(received: Received, mode: engine.PullMode) -> dict[str, torch.Tensor] | None:
    """Scatter and add modes' current values, each checked against the layout's dtype and shape."""
    if mode is engine.PullMode.REPLACE:
        if BASE in received.dense:
            raise WireError("SECTION_BASE is only for PULL_MODE_SCATTER and PULL_MODE_ADD")
        return None
    layout: dict[str, DenseDecl] = {d.name: d for d in received.layout}
    for decl, _ in received.dense.get(BASE, []):
        expected = layout.get(decl.name)
        if expected is None:
            raise WireError(f"SECTION_BASE '{decl.name}': the layout has no tensor of that name")
        if (decl.dtype, decl.shape) != (expected.dtype, expected.shape):
            raise WireError(
                f"SECTION_BASE '{decl.name}': {decl.dtype} {list(decl.shape)} disagrees with the layout's "
                f"{expected.dtype} {list(expected.shape)}"
            )
    return received.state(BASE) or {}


def check_select_encoding(value: int, criterion: criteria_pb2.Criterion | None) -> None:
    """POSITION_ENCODING_SEEDED describes only seeded random-k's positions: a Select may ask for it (as
    for COMPACT, its answer is SEEDED) with a random-k sparse update only."""
    if value == _SEEDED and not is_random_k(criterion):
        raise WireError(
            "start.position_encoding: POSITION_ENCODING_SEEDED describes only the positions of "
            f"{_UPDATE} with UPDATE_SELECTION_RANDOM_K (ask POSITION_ENCODING_COMPACT for the smallest "
            "encoding of any answer)"
        )


# Lossy value dtypes a Select may ask for.
_VALUE_DTYPES: dict[int, torch.dtype] = {
    tensor_pb2.DATA_TYPE_FLOAT16: torch.float16,
    tensor_pb2.DATA_TYPE_BFLOAT16: torch.bfloat16,
}


def value_dtype(value: int) -> torch.dtype | None:
    """The dtype float values are sent in; None keeps each tensor's own."""
    if value == tensor_pb2.DATA_TYPE_UNSPECIFIED:
        return None
    if value not in _VALUE_DTYPES:
        raise WireError(f"start.value_dtype: {value} is not DATA_TYPE_FLOAT16 or DATA_TYPE_BFLOAT16")
    return _VALUE_DTYPES[value]


PULL_MODES: dict[int, engine.PullMode] = {
    service_pb2.PULL_MODE_UNSPECIFIED: engine.PullMode.REPLACE,
    service_pb2.PULL_MODE_REPLACE: engine.PullMode.REPLACE,
    service_pb2.PULL_MODE_SCATTER: engine.PullMode.SCATTER,
    service_pb2.PULL_MODE_ADD: engine.PullMode.ADD,
}
"""PullStart.mode -> the engine's mode."""


def pull_mode(value: int) -> engine.PullMode:
    mode = PULL_MODES.get(value)
    if mode is None:
        raise WireError(f"start.mode: unknown value {value} (expected PULL_MODE_REPLACE, _SCATTER or _ADD)")
    return mode


def read_contributions(
    frames: Iterable[Any], *, max_bytes: int, delivered: Sequence[Segments] | None = None
) -> Received:
    """An Aggregate request: contributions, each with its tensors in SECTION_PAYLOAD."""
    received = read_frames(
        frames,
        first="start",
        dense_sections=frozenset({PAYLOAD}),
        sparse_sections=frozenset({PAYLOAD}),
        max_bytes=max_bytes,
        unique_names=False,  # a name twice in one contribution counts twice, as in FL4Health
        contributions=True,
        delivered=delivered,
    )
    if not received.contributions:
        raise WireError("no contributions were sent: open each client's payload with a 'contribution' frame")
    return received


def per_coordinate(start: service_pb2.AggregateStart) -> bool:
    """Whether an Aggregate averages per coordinate (AVERAGING_PER_COORDINATE) rather than per tensor;
    an unknown averaging, or per-coordinate averaging of anything but sparse payloads, is refused."""
    value = start.averaging
    if value in (service_pb2.AVERAGING_UNSPECIFIED, service_pb2.AVERAGING_PER_TENSOR):
        return False
    if value != service_pb2.AVERAGING_PER_COORDINATE:
        raise WireError(
            f"start.averaging: unknown value {value} (expected AVERAGING_PER_TENSOR or AVERAGING_PER_COORDINATE)"
        )
    kind = start.payload_kind
    if kind != service_pb2.PAYLOAD_KIND_SPARSE_COO:
        named = service_pb2.PayloadKind.Name(kind) if kind in service_pb2.PayloadKind.values() else kind
        raise WireError(
            f"start.averaging: AVERAGING_PER_COORDINATE averages sparse payloads only "
            f"(PAYLOAD_KIND_SPARSE_COO), but start.payload_kind is {named}"
        )
    return True


def aggregate_encoding(value: int) -> int:
    """The position encoding an Aggregate's sparse answer is asked in (unset: COO_INT64). SEEDED is not
    asked for: with AVERAGING_PER_COORDINATE, COMPACT answers in it where it applies."""
    encoding = position_encoding(value)
    if encoding == _SEEDED:
        raise WireError(
            "start.position_encoding: POSITION_ENCODING_SEEDED cannot be asked for; ask for "
            "POSITION_ENCODING_COMPACT, which per-coordinate answers send in SEEDED where every "
            "contribution sent the same seeded positions"
        )
    return encoding


def shared_seeds(declared: Iterable[SparseDecl]) -> dict[str, tuple[int, int]]:
    """Per name, (position_seed, nnz) when every declaration of it is in POSITION_ENCODING_SEEDED with
    the same seed and nnz: a per-coordinate average of such a name lists exactly those positions."""
    seeds: dict[str, tuple[int, int] | None] = {}
    for decl in declared:
        mine = (decl.position_seed, decl.nnz) if decl.position_encoding == _SEEDED else None
        if decl.name not in seeds:
            seeds[decl.name] = mine
        elif seeds[decl.name] != mine:
            seeds[decl.name] = None
    return {name: seed for name, seed in seeds.items() if seed is not None}


def contributions(received: Received, payload_kind: int) -> list[engine.Contribution]:
    """The engine's contributions, checked against the payload kind the start declared."""
    if payload_kind not in (
        service_pb2.PAYLOAD_KIND_SPARSE_COO,
        service_pb2.PAYLOAD_KIND_LAYERS,
    ):
        raise WireError(
            f"start.payload_kind: {payload_kind} cannot be aggregated (expected PAYLOAD_KIND_SPARSE_COO or _LAYERS)"
        )
    sparse = payload_kind == service_pb2.PAYLOAD_KIND_SPARSE_COO
    if sparse and PAYLOAD in received.dense:
        raise WireError("PAYLOAD_KIND_SPARSE_COO takes sparse_tensors manifests, not tensors manifests")
    if not sparse and PAYLOAD in received.sparse:
        raise WireError("PAYLOAD_KIND_LAYERS takes tensors manifests, not sparse_tensors manifests")
    return [
        engine.Contribution(
            num_examples=n,
            sparse=[
                engine.SparseTensor(s.decl.name, s.decl.shape, s.values, s.positions) for s in sparse_items
            ],
            layers=dense_items,
        )
        for n, dense_items, sparse_items in received.grouped(PAYLOAD)
    ]


# --- Work plans: what a call will allocate beyond its upload, from its declarations -------------------

_COO = tensor_pb2.POSITION_ENCODING_COO_INT64
_FLAT = tensor_pb2.POSITION_ENCODING_FLAT_INT64
_BITMAP = tensor_pb2.POSITION_ENCODING_BITMAP
_ELIAS_FANO = tensor_pb2.POSITION_ENCODING_ELIAS_FANO
_COMPACT = tensor_pb2.POSITION_ENCODING_COMPACT
_SEEDED = tensor_pb2.POSITION_ENCODING_SEEDED
# Scratch of decoding or encoding BITMAP and ELIAS_FANO positions, per position (unpacked bits, index
# arrays, bit fields), beside the positions themselves (8 bytes each).
COMPACT_SCRATCH_PER_POSITION = 40
# The objects the server keeps per declared tensor besides its bytes (declarations, tensor headers, the
# engine's and the answer's per-tensor objects): measured at about 5 KiB per payload tensor and 0.7 KiB
# per layout entry, when a call declares 100,000 tiny ones.
TENSOR_OVERHEAD_BYTES = 8 << 10
LAYOUT_ENTRY_OVERHEAD_BYTES = 1 << 10


def overhead_work(declared: Declarations) -> budget.Work:
    """The per-tensor objects of a call, counted as held by each declared tensor."""
    entries = [(d.name, LAYOUT_ENTRY_OVERHEAD_BYTES) for d in declared.layout]
    entries += [(d.name, TENSOR_OVERHEAD_BYTES) for _, _, d in declared.dense]
    entries += [(d.name, TENSOR_OVERHEAD_BYTES) for _, _, d in declared.sparse]
    return budget.Work(tuple(budget.Need(name, n, 0, "its declaration's objects") for name, n in entries))


def decode_work(sparse: list[tuple[int, int, SparseDecl]]) -> budget.Work:
    """Decoding sparse positions: flat int64 positions (held; FLAT_INT64 ones are views of the upload)
    and, for BITMAP and ELIAS_FANO, the decoder's scratch; for SEEDED, the draw's (the keys of every
    entry of the tensor)."""
    needs = []
    for _, _, decl in sparse:
        encoding = decl.position_encoding
        held = 0 if encoding == _FLAT else 8 * decl.nnz
        scratch = 0
        if encoding in (_BITMAP, _ELIAS_FANO):
            # Counting set bits copies the code once; unpacking it is bounded by the positions it holds.
            scratch = max(decl.positions_nbytes, COMPACT_SCRATCH_PER_POSITION * decl.nnz)
        elif encoding == _SEEDED:
            scratch = seeded_positions_nbytes(budget.numel(decl.shape), decl.nnz)
        if held or scratch:
            needs.append(budget.Need(decl.name, held, scratch, f"{decl.nnz} positions decoded"))
    return budget.Work(tuple(needs))


def encode_need(name: str, entries: int, shape: tuple[int, ...], encoding: int) -> budget.Need | None:
    """Encoding a sparse answer's positions (``entries`` at most) in ``encoding`` (COMPACT: whichever of
    BITMAP and ELIAS_FANO needs more, as the choice depends on the entries there turn out to be)."""
    if entries <= 0 or encoding == _SEEDED:  # SEEDED: no bytes, the seed only
        return None
    size = budget.numel(shape)
    if encoding in (_COMPACT, _BITMAP, _ELIAS_FANO):
        costs = []  # (held, scratch): the code, and a bool per element or the encoder's arrays
        if encoding != _ELIAS_FANO:
            costs.append((bitmap_nbytes(size), size + entries))
        if encoding != _BITMAP:
            costs.append((elias_fano_nbytes(entries, size), COMPACT_SCRATCH_PER_POSITION * entries))
        held, scratch = max(h for h, _ in costs), max(s for _, s in costs)
    elif encoding == _FLAT:
        return None
    else:  # COO_INT64: (entries, ndim) coordinates, peeled off one axis at a time into the columns
        # (from 3 axes on, through one or two int64 remainders beside them)
        held, scratch = 8 * len(shape) * entries, 8 * min(max(len(shape) - 2, 0), 2) * entries
    return budget.Need(name, held, scratch, f"{entries} answer positions encoded")


def aggregate_plan(declared: Declarations) -> budget.Work:
    """An Aggregate's work: decoding positions, the averages (dense accumulators and answers, or
    per-coordinate float64 accumulators), encoding the sparse answer's positions, its values rounded to
    value_dtype. An averaging or value_dtype the server refuses is refused here, before the upload."""
    start = declared.first
    weighted = start.weighted if start is not None and start.HasField("weighted") else True
    coordinates = start is not None and per_coordinate(start)
    value = value_dtype(start.value_dtype) if start is not None else None
    counts = declared.contributions
    sparse: list[list[budget.SparseSpec]] = [[] for _ in counts]
    layers: list[list[engine.TensorSpec]] = [[] for _ in counts]
    for _, owner, decl in declared.sparse:
        if 0 <= owner < len(counts):
            sparse[owner].append(budget.SparseSpec(decl.name, decl.dtype, decl.shape, decl.nnz))
    for _, owner, dense_decl in declared.dense:
        if 0 <= owner < len(counts):
            layers[owner].append(engine.TensorSpec(dense_decl.name, dense_decl.dtype, dense_decl.shape))
    per_client = list(zip(counts, sparse, strict=True))
    if coordinates:
        averages = budget.aggregate_per_coordinate_work(per_client, value_dtype=value)
    else:
        averages = budget.aggregate_sparse_work(per_client, weighted=weighted, value_dtype=value)
    try:
        encoding = aggregate_encoding(start.position_encoding) if start is not None else _COO
    except WireError:  # refused later if the answer is sparse; until then, count the costliest
        encoding = _COMPACT
    seeded = shared_seeds(d for _, _, d in declared.sparse) if coordinates and encoding == _COMPACT else {}
    encoded = [
        encode_need(n.name, n.answer_entries, n.answer_shape, encoding)
        for n in averages.needs
        if n.answer_entries and n.name not in seeded  # value casts have none; SEEDED positions take none
    ]
    return (
        overhead_work(declared)
        + decode_work(declared.sparse)
        + averages
        + budget.Work(tuple(n for n in encoded if n is not None))
        + budget.aggregate_layers_work(
            list(zip(counts, layers, strict=True)), weighted=weighted, value_dtype=value
        )
    )


def pull_plan(declared: Declarations) -> budget.Work:
    """A Pull's work: decoding positions, the answer tensors and, in replace and add modes, densified
    payloads."""
    start = declared.first
    mode = PULL_MODES.get(int(start.mode) if start is not None else 0, engine.PullMode.REPLACE)
    fedpm = start is not None and start.payload_kind == service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES
    model = [engine.TensorSpec(d.name, d.dtype, d.shape) for d in declared.layout]
    return (
        overhead_work(declared)
        + decode_work(declared.sparse)
        + budget.pull_work(
            model,
            sparse=[
                budget.SparseSpec(d.name, d.dtype, d.shape, d.nnz)
                for s, _, d in declared.sparse
                if s == PAYLOAD
            ],
            dense=[engine.TensorSpec(d.name, d.dtype, d.shape) for s, _, d in declared.dense if s == PAYLOAD],
            mode=mode,
            fedpm=fedpm,
        )
    )


def select_plan(declared: Declarations) -> budget.Work:
    """A Select's or Push's work as far as the declared shapes decide it: the criterion's scores, masks,
    k-th search, drift norms or FedPM masks over the SECTION_MODEL tensors (an initial model sent
    without a digest is this call's alone, so top-k may write its scores over it; the caller's own
    scores, in SECTION_SCORES, are upload). How many entries a top-k selection keeps, and its encoded
    answer, are reserved once they are known (see servicer). Scores that do not go with the model or
    the criterion are refused here, at the first chunk (:func:`check_scores`)."""
    start = declared.first
    model = [engine.TensorSpec(d.name, d.dtype, d.shape) for s, _, d in declared.dense if s == MODEL]
    scores = [engine.TensorSpec(d.name, d.dtype, d.shape) for s, _, d in declared.dense if s == SCORES]
    residual = [engine.TensorSpec(d.name, d.dtype, d.shape) for s, _, d in declared.dense if s == RESIDUAL]
    initial_sent = any(s == INITIAL for s, _, _ in declared.dense)
    digest = start is not None and start.HasField("initial_model_digest")
    criterion = start.criterion if start is not None and start.HasField("criterion") else None
    # Scores and a residual that do not go with the model or the criterion are refused now, before the
    # upload; so is a sparse update without an initial model.
    check_scores(criterion, model, scores or None)
    check_residual(criterion, model, residual or None)
    if is_sparse_update(criterion) and model and not initial_sent and not digest:
        raise engine.FailedPrecondition(
            f"{_UPDATE} needs the initial model (w0 of u = (w - w0) + r), but none was given: send it in "
            "SECTION_INITIAL_MODEL or name a held one by start.initial_model_digest"
        )
    if isinstance(start, service_pb2.SelectStart):
        check_select_encoding(start.position_encoding, criterion)
    # Per name, the objects of both its tensors, its scores and its answer: measured at about 3.4 KiB
    # (Select) and 6.8 KiB (Push) per name when a call declares 49,000 tiny ones with an initial model.
    overhead = [
        budget.Need(
            d.name,
            TENSOR_OVERHEAD_BYTES if s == MODEL else LAYOUT_ENTRY_OVERHEAD_BYTES,
            0,
            "the objects kept for it",
        )
        for s, _, d in declared.dense
    ]
    return budget.Work(tuple(overhead)) + criterion_work(
        criterion, model, initial_is_scratch=initial_sent and not digest, scores=scores
    )
