"""Initial models the server keeps by content digest, so that a round's clients upload them once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import torch

from paramsel.v1 import tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.digest import DIGEST_KINDS, DIGEST_SIZE_BYTES, DigestKind, model_digest

Model = dict[str, torch.Tensor]
# A named model's key: the ModelDigest field set and its bytes. A model is found only by the kind of
# digest it was kept under.
Digest = tuple[DigestKind, bytes]


class ModelNotHeldError(Exception):
    """The start names an initial model by digest that this server does not hold (FAILED_PRECONDITION)."""

    reason = "INITIAL_MODEL_NOT_HELD"


class ModelStore:
    """A bounded, least-recently-used map from (kind, digest) to model. Thread-safe; models are never
    mutated."""

    def __init__(self, capacity_bytes: int) -> None:
        self._capacity = capacity_bytes
        self._models: OrderedDict[Hashable, tuple[Model, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, digest: Hashable) -> Model | None:
        with self._lock:
            entry = self._models.get(digest)
            if entry is None:
                return None
            self._models.move_to_end(digest)
            return entry[0]

    def put(self, digest: Hashable, model: Model) -> None:
        size = sum(t.nbytes for t in model.values())
        if size > self._capacity:
            return  # larger than the whole store: keeping it would only evict everything else
        with self._lock:
            if digest in self._models:
                self._models.move_to_end(digest)
                return
            self._models[digest] = (model, size)
            self._bytes += size
            while self._bytes > self._capacity:
                _, (_, evicted) = self._models.popitem(last=False)
                self._bytes -= evicted

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._bytes


def requested_digest(start: Any) -> Digest | None:
    """The digest a start names, if any: exactly one ModelDigest field set, of 32 bytes."""
    if not start.HasField("initial_model_digest"):
        return None
    message = start.initial_model_digest
    given = [(kind, bytes(getattr(message, kind))) for kind in DIGEST_KINDS if getattr(message, kind)]
    if len(given) != 1:
        raise WireError(
            "start.initial_model_digest must set exactly one of "
            f"{', '.join(DIGEST_KINDS)}, got {'both' if given else 'neither'}"
        )
    kind, value = given[0]
    if len(value) != DIGEST_SIZE_BYTES:
        raise WireError(
            f"start.initial_model_digest.{kind} must be {DIGEST_SIZE_BYTES} bytes, got {len(value)}"
        )
    return kind, value


def describe(digest: Digest) -> str:
    """A digest as error messages name it: its kind and its first 8 bytes."""
    return f"{digest[0]} {digest[1].hex()[:16]}…"


def check_held_early(frames: Iterable[Any], store: ModelStore) -> Iterator[Any]:
    """Passes frames through; once the declarations are complete, refuses an unknown digest at once.

    That happens at the first chunk (or the end of the stream), so a client whose initial model the
    server lacks learns it before uploading the current model.
    """
    start: Any = None
    initial_sent = False
    checked = False

    def check() -> None:
        digest = requested_digest(start) if start is not None else None
        if digest is not None and not initial_sent and store.get(digest) is None:
            raise ModelNotHeldError(
                f"the initial model {describe(digest)} is not held by this server; send its tensors"
            )

    for frame in frames:
        kind = frame.WhichOneof("frame")
        if kind == "start" and start is None:
            start = frame.start
        elif kind == "tensors" and frame.tensors.section == tensor_pb2.SECTION_INITIAL_MODEL:
            initial_sent = True
        elif kind == "chunk" and not checked:
            checked = True
            check()
        yield frame
    if not checked:
        check()


def resolve_initial(
    start: Any,
    sent: Model | None,
    store: ModelStore,
    digest_of: Callable[[Model, DigestKind], bytes] | None = None,
) -> Model | None:
    """The initial model for this call: the one sent (checked and kept when named), else the held one."""
    digest = requested_digest(start)
    if digest is None:
        return sent
    kind, declared = digest
    if sent is not None:
        actual = (digest_of or (lambda m, k: model_digest(m.items(), k)))(sent, kind)
        if actual != declared:
            raise WireError(
                "start.initial_model_digest does not match the SECTION_INITIAL_MODEL tensors sent "
                f"({kind}: declared {declared.hex()[:16]}…, computed {actual.hex()[:16]}…)"
            )
        store.put(digest, sent)
        return sent
    held = store.get(digest)
    if held is None:  # evicted between the early check and now
        raise ModelNotHeldError(f"the initial model {describe(digest)} is no longer held; send its tensors")
    return held
