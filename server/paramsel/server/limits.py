"""Admission and accounting: concurrent calls, bytes in flight, tensors and elements per call.

Every paramsel.v1 call holds a slot (:meth:`CallLimits.call`) for its whole life. Its manifests are
inspected as they arrive (:meth:`Call.watch`), before the stream reader allocates anything: the declared
bytes are reserved against the server-wide in-flight budget. Once the declarations are complete (at the
first chunk, or at the end of a stream that has none), the call's *work* - what it builds from the
declared shapes: Aggregate's dense accumulators, Pull's densified tensors and answers, a selection's
scores, masks and k-th search - is planned from them (:mod:`paramsel.engine.budget`) and reserved the
same way, before any of it is allocated. What only the data decide (how many entries a top-k selection
keeps, its encoded answer) is reserved later, but still before it is allocated
(:meth:`Call.reserve_need`, :meth:`Call.reserve_work`). Upload plus work must fit ``max_call_bytes``;
everything reserved is released when the call ends, however it ends (finished, failed, cancelled, past
its deadline).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from paramsel.engine.budget import Need, Work

# Defined with the settings (torch-free, nested in ServerConfig); re-exported for the admission code.
from paramsel.server.config import Limits as Limits
from paramsel.wire import DenseDecl, WireError, WireLimitError
from paramsel.wire.codec import SparseDecl, dense_decl, sparse_decl

CALL_FLAG = "--max-call-bytes"
INFLIGHT_FLAG = "--max-inflight-bytes"


class ServerDrainingError(Exception):
    """The server is shutting down and takes no new calls (UNAVAILABLE)."""


@dataclass
class Declarations:
    """What a call's request stream declared before its first chunk: the plan's input."""

    first: Any = None
    """The start frame's message."""
    layout: list[DenseDecl] = field(default_factory=list)
    dense: list[tuple[int, int, DenseDecl]] = field(default_factory=list)
    """(section, contribution index or -1, declaration), in declaration order."""
    sparse: list[tuple[int, int, SparseDecl]] = field(default_factory=list)
    """(section, contribution index or -1, declaration), in declaration order."""
    contributions: list[int] = field(default_factory=list)
    """Example counts of the contribution frames, in order."""


Plan = Callable[[Declarations], Work]
"""The work a call's computation will allocate, from its declarations (see :mod:`paramsel.engine.budget`)."""


class Call:
    """One admitted call: counts its declarations and holds its share of the in-flight bytes."""

    def __init__(self, owner: CallLimits) -> None:
        self._owner = owner
        self._limits = owner.limits
        self.tensors = 0
        self.declared = 0
        self.work = 0
        self.scratch = 0
        """The largest scratch reserved so far: steps run one at a time, so a later step's scratch
        needs only what it has beyond it."""
        self.reserved = 0
        self.declarations = Declarations()

    def _declare(self, name: str, elements: int, nbytes: int) -> None:
        self.tensors += 1
        if self.tensors > self._limits.max_tensors_per_call:
            raise WireLimitError(
                f"the call declares more than {self._limits.max_tensors_per_call} tensors, the server's limit"
            )
        self.declared += nbytes
        if self.declared > self._limits.max_call_bytes:  # Inbound checks it too, after this
            raise WireLimitError(
                f"the call declares more than {self._limits.max_call_bytes} bytes of tensor data, the server's "
                f"limit ({CALL_FLAG})"
            )
        if elements > self._limits.max_elements_per_tensor:
            raise WireLimitError(
                f"tensor '{name}' has {elements} elements, more than the server's limit of "
                f"{self._limits.max_elements_per_tensor} per tensor"
            )
        if nbytes:
            self._owner.reserve(nbytes)
            self.reserved += nbytes

    def _inspect(self, frame: Any) -> None:
        kind = frame.WhichOneof("frame")
        seen = self.declarations
        owner = len(seen.contributions) - 1
        if kind == "layout":
            for spec in frame.layout.tensors:
                try:
                    layout = dense_decl(spec, what="layout")
                except WireError:
                    self._declare(spec.name, 0, 0)
                    continue
                self._declare(spec.name, layout.numel, 0)
                seen.layout.append(layout)
        elif kind == "tensors":
            for spec in frame.tensors.tensors:
                try:
                    decl = dense_decl(spec, what="tensors")
                except WireError:
                    self._declare(spec.name, 0, 0)
                    continue  # invalid: the stream reader reports it, with its context
                self._declare(decl.name, decl.numel, decl.nbytes)
                seen.dense.append((frame.tensors.section, owner, decl))
        elif kind == "sparse_tensors":
            for sspec in frame.sparse_tensors.tensors:
                try:
                    sdecl = sparse_decl(sspec, what="sparse_tensors")
                except WireError:
                    self._declare(sspec.name, 0, 0)
                    continue
                elements = max(math.prod(sdecl.shape), sdecl.nnz)
                self._declare(sdecl.name, elements, sdecl.values_nbytes + sdecl.positions_nbytes)
                seen.sparse.append((frame.sparse_tensors.section, owner, sdecl))
        elif kind == "contribution":
            seen.contributions.append(int(frame.contribution.num_examples))
        elif kind is not None and seen.first is None:
            seen.first = getattr(frame, kind)

    def watch(self, frames: Iterable[Any], plan: Plan | None = None) -> Iterator[Any]:
        """Passes frames through, checking each manifest against the limits before it goes on; with a
        ``plan``, reserves the call's work once its declarations are complete, before the first chunk
        (or the end of a stream without one) goes on."""
        pending = plan
        for frame in frames:
            if frame.WhichOneof("frame") != "chunk":
                self._inspect(frame)
            elif pending is not None:
                self.reserve_work(pending(self.declarations))
                pending = None
            yield frame
        if pending is not None:
            self.reserve_work(pending(self.declarations))

    def reserve_work(self, work: Work) -> None:
        """Counts the work of the call's computation against its limit and the in-flight bytes, or refuses
        the call (RESOURCE_EXHAUSTED) naming the tensor that needs the most and the figures.

        May be called more than once: what is reserved adds up as one :class:`Work` of all the needs
        would (every ``held``, the largest ``scratch`` once)."""
        nbytes = work.held + max(work.scratch - self.scratch, 0)
        if nbytes <= 0:
            return
        largest = work.largest()
        blame = (
            ""
            if largest is None
            else f"tensor '{largest.name}' needs {largest.nbytes} bytes ({largest.what})"
        )
        needed = self.declared + self.work + nbytes
        if needed > self._limits.max_call_bytes:
            raise WireLimitError(
                f"{blame}; the call needs {needed} bytes in all ({self.declared} uploaded, "
                f"{self.work + nbytes} to compute and answer), over the server's limit of "
                f"{self._limits.max_call_bytes} bytes per call ({CALL_FLAG})"
            )
        self._owner.reserve(nbytes, what=blame)
        self.work += nbytes
        self.scratch = max(self.scratch, work.scratch)
        self.reserved += nbytes

    def reserve_need(self, need: Need) -> None:
        """:meth:`reserve_work` of one need: the engine's callback (:data:`paramsel.engine.needs.Reserve`)
        for what only the data decide, reserved just before it is allocated."""
        self.reserve_work(Work((need,)))


class CallLimits:
    """The server-wide counters. Thread-safe."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Condition()
        self._active = 0
        self._finished = 0
        self._inflight = 0
        self._draining = False

    @property
    def active_calls(self) -> int:
        with self._lock:
            return self._active

    @property
    def finished_calls(self) -> int:
        """Calls admitted and ended (however they ended) since the server started."""
        with self._lock:
            return self._finished

    @property
    def inflight_bytes(self) -> int:
        with self._lock:
            return self._inflight

    def reserve(self, nbytes: int, *, what: str = "") -> None:
        """Adds ``nbytes`` to the bytes in flight, or refuses them (RESOURCE_EXHAUSTED); ``what`` says
        what they are for, in the message."""
        with self._lock:
            if self._inflight + nbytes > self.limits.max_inflight_bytes:
                spent = f"{what}: " if what else ""
                raise WireLimitError(
                    f"{spent}the server has {self._inflight} bytes in flight; {nbytes} more would pass its "
                    f"limit of {self.limits.max_inflight_bytes} ({INFLIGHT_FLAG}): retry later"
                )
            self._inflight += nbytes

    @contextmanager
    def call(self) -> Iterator[Call]:
        """Admits a call or refuses it at once (RESOURCE_EXHAUSTED when full, UNAVAILABLE when draining)."""
        with self._lock:
            if self._draining:
                raise ServerDrainingError("the server is shutting down; retry on another instance")
            if self._active >= self.limits.max_concurrent_calls:
                raise WireLimitError(
                    f"the server is already running {self._active} calls, its limit: retry later"
                )
            self._active += 1
        call = Call(self)
        try:
            yield call
        finally:
            with self._lock:
                self._active -= 1
                self._finished += 1
                self._inflight -= call.reserved
                self._lock.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuses new calls from now on; waits up to ``timeout`` s for the running ones. True if none left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._draining = True
            while self._active:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True
