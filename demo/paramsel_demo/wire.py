"""How the demo's payloads ride in Flower messages, and how their bytes are counted.

A payload is a list of numpy arrays: an FL4Health packed list (values, COO indices, shapes, names; or
layers and names), the model's state (the dense run), or a compact payload as one 1-d uint8 array. It
travels as an ArrayRecord named :data:`PAYLOAD`, its arrays under the keys ``"0"``, ``"1"``, ... in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

NDArrays = list[np.ndarray]

PAYLOAD = "payload"
"""The name of the ArrayRecord carrying a payload, both ways (the strategies' ``arrayrecord_key``)."""
METRICS = "metrics"
"""The name of the MetricRecord of every reply."""


def arrays_record(arrays: Sequence[np.ndarray]) -> ArrayRecord:
    """A payload as an ArrayRecord, its arrays under ``"0"``, ``"1"``, ... in order."""
    record = ArrayRecord()
    for index, array in enumerate(arrays):
        record[str(index)] = Array(np.ascontiguousarray(array))
    return record


def record_arrays(record: ArrayRecord) -> NDArrays:
    """The payload :func:`arrays_record` carried, in order; ValueError for any other record."""
    keys = sorted(record, key=lambda key: int(key) if key.isdecimal() else -1)
    if keys != [str(index) for index in range(len(keys))]:
        raise ValueError(f"a payload's arrays are named 0, 1, ...; got {list(record)}")
    return [record[key].numpy() for key in keys]


def payload_bytes(arrays: Sequence[np.ndarray]) -> int:
    """What the demo counts as a payload's bytes: the sum of ``nbytes`` over its arrays, i.e. a compact
    payload's length, or the arrays of an FL4Health packed list or of the model's state. Flower's framing
    (each array's ``.npy`` header, the record's keys) is not counted."""
    return sum(int(np.asarray(a).nbytes) for a in arrays)


def flower_wire_bytes(record: ArrayRecord) -> int:
    """The bytes of ``record`` as Flower 1.41's Deployment Engine puts it on the wire: the sum of the
    lengths of its deflated objects (``InflatableObject.deflate()``: the ArrayRecord, each Array, each
    ArrayChunk, each with its header; every distinct object once, as Flower pushes each object id once),
    which are the contents of the PushObject / PullObject requests that carry it. The arrays' data is
    their ``.npy`` serialization (Flower's ``Array`` of a numpy array: a 128-byte header, then the
    bytes). Not counted: the message's other records and metadata, the object ids and protobuf framing of
    those requests, gRPC and HTTP/2 framing. The Simulation Engine (``paramsel-demo``) has no socket
    between the apps: this is what the message would take between machines."""
    sizes: dict[str, int] = {}

    def visit(obj: Any) -> None:
        for child in (obj.children or {}).values():
            visit(child)
        sizes[obj.object_id] = len(obj.deflate())

    visit(record)
    return sum(sizes.values())


def compact_arrays(payload: bytes) -> NDArrays:
    """A compact payload as a payload: one 1-d uint8 array of its bytes."""
    return [np.frombuffer(payload, dtype=np.uint8)]


def compact_payload(arrays: Sequence[np.ndarray]) -> bytes:
    """The compact payload :func:`compact_arrays` carried; ValueError for anything else."""
    if len(arrays) != 1 or np.asarray(arrays[0]).dtype != np.uint8 or np.asarray(arrays[0]).ndim != 1:
        shapes = ", ".join(f"{np.asarray(a).dtype} {np.asarray(a).shape}" for a in arrays)
        raise ValueError(f"a compact payload is one 1-d uint8 array, got [{shapes}]")
    return np.asarray(arrays[0]).tobytes()
