"""Request streams -> engine inputs: framing is checked by the wire codecs, the rest here. No computing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from paramsel import engine
from paramsel.v1 import service_pb2, tensor_pb2
from paramsel.wire import DenseDecl, WireError, WireLimitError
from paramsel.wire.streams import Received, read_frames

MODEL = tensor_pb2.SECTION_MODEL
INITIAL = tensor_pb2.SECTION_INITIAL_MODEL
PAYLOAD = tensor_pb2.SECTION_PAYLOAD
BASE = tensor_pb2.SECTION_BASE


def read_models(frames: Iterable[Any], *, max_bytes: int) -> Received:
    """A Select or Push request: the current model and, optionally, the initial model."""
    received = read_frames(
        frames, first="start", dense_sections=frozenset({MODEL, INITIAL}), max_bytes=max_bytes
    )
    if not received.state(MODEL):
        raise WireError("no model was sent: declare the model's tensors in a SECTION_MODEL manifest")
    return received


def read_pull(frames: Iterable[Any], *, max_bytes: int) -> Received:
    """A Pull request: the model's layout, the payload and, in scatter mode, the base tensors."""
    received = read_frames(
        frames,
        first="start",
        dense_sections=frozenset({PAYLOAD, BASE}),
        sparse_sections=frozenset({PAYLOAD}),
        max_bytes=max_bytes,
    )
    if not received.layout:
        raise WireError("no layout was sent: declare the model's state in 'layout' frames")
    # A small payload can name large tensors, and the answer is those tensors, dense: their size counts
    # against the call's limit too, before anything is built.
    named = {d.name for d, _ in received.dense.get(PAYLOAD, [])} | {
        s.decl.name for s in received.sparse.get(PAYLOAD, [])
    }
    answer = sum(d.nbytes for d in received.layout if d.name in named)
    if answer > max_bytes:
        raise WireLimitError(
            f"the tensors the payload names take {answer} bytes in the answer, over the server's {max_bytes} "
            "bytes per call"
        )
    return received


def model_specs(received: Received) -> list[engine.TensorSpec]:
    return [engine.TensorSpec(name=d.name, dtype=d.dtype, shape=d.shape) for d in received.layout]


def position_encoding(value: int) -> int:
    """The encoding a Select asked for; unset means COO_INT64."""
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
        raise WireError("SECTION_BASE is only for PULL_MODE_SCATTER")
    return [(decl.name, tensor) for decl, tensor in received.dense.get(PAYLOAD, [])]


def base_state(received: Received, mode: engine.PullMode) -> dict[str, torch.Tensor] | None:
    """Scatter mode's current values, each checked against the layout's dtype and shape."""
    if mode is not engine.PullMode.SCATTER:
        if BASE in received.dense:
            raise WireError("SECTION_BASE is only for PULL_MODE_SCATTER")
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


def read_contributions(frames: Iterable[Any], *, max_bytes: int) -> Received:
    """An Aggregate request: contributions, each with its tensors in SECTION_PAYLOAD."""
    received = read_frames(
        frames,
        first="start",
        dense_sections=frozenset({PAYLOAD}),
        sparse_sections=frozenset({PAYLOAD}),
        max_bytes=max_bytes,
        contributions=True,
    )
    if not received.contributions:
        raise WireError("no contributions were sent: open each client's payload with a 'contribution' frame")
    return received


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
