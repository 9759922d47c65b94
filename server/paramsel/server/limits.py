"""Admission and accounting: concurrent calls, declared bytes in flight, tensors and elements per call.

Every paramsel.v1 call holds a slot (:meth:`CallLimits.call`) for its whole life. Its manifests are
inspected as they arrive (:meth:`Call.watch`), before the stream reader allocates anything: the declared
bytes are reserved against the server-wide in-flight budget and released when the call ends, however it
ends (finished, failed, cancelled, past its deadline).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from paramsel.wire import WireError, WireLimitError
from paramsel.wire.codec import dense_decl, sparse_decl


class ServerDrainingError(Exception):
    """The server is shutting down and takes no new calls (UNAVAILABLE)."""


@dataclass(frozen=True)
class Limits:
    """What one server accepts at a time."""

    max_concurrent_calls: int
    max_inflight_bytes: int
    max_call_bytes: int
    max_tensors_per_call: int
    max_elements_per_tensor: int


class Call:
    """One admitted call: counts its declarations and holds its share of the in-flight bytes."""

    def __init__(self, owner: CallLimits) -> None:
        self._owner = owner
        self._limits = owner.limits
        self.tensors = 0
        self.declared = 0
        self.reserved = 0

    def _declare(self, name: str, elements: int, nbytes: int) -> None:
        self.tensors += 1
        if self.tensors > self._limits.max_tensors_per_call:
            raise WireLimitError(
                f"the call declares more than {self._limits.max_tensors_per_call} tensors, the server's limit"
            )
        self.declared += nbytes
        if self.declared > self._limits.max_call_bytes:  # Inbound checks it too, after this
            raise WireLimitError(
                f"the call declares more than {self._limits.max_call_bytes} bytes of tensor data, the server's limit"
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
        if kind == "layout":
            for spec in frame.layout.tensors:
                try:
                    elements = dense_decl(spec, what="layout").numel
                except WireError:
                    elements = 0
                self._declare(spec.name, elements, 0)
        elif kind == "tensors":
            for spec in frame.tensors.tensors:
                try:
                    decl = dense_decl(spec, what="tensors")
                except WireError:
                    self._declare(spec.name, 0, 0)
                    continue  # invalid: the stream reader reports it, with its context
                self._declare(decl.name, decl.numel, decl.nbytes)
        elif kind == "sparse_tensors":
            for sspec in frame.sparse_tensors.tensors:
                try:
                    sdecl = sparse_decl(sspec, what="sparse_tensors")
                except WireError:
                    self._declare(sspec.name, 0, 0)
                    continue
                elements = max(math.prod(sdecl.shape), sdecl.nnz)
                self._declare(sdecl.name, elements, sdecl.values_nbytes + sdecl.positions_nbytes)

    def watch(self, frames: Iterable[Any]) -> Iterator[Any]:
        """Passes frames through, checking each manifest against the limits before it goes on."""
        for frame in frames:
            if frame.WhichOneof("frame") != "chunk":
                self._inspect(frame)
            yield frame


class CallLimits:
    """The server-wide counters. Thread-safe."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._lock = threading.Condition()
        self._active = 0
        self._inflight = 0
        self._draining = False

    @property
    def active_calls(self) -> int:
        with self._lock:
            return self._active

    @property
    def inflight_bytes(self) -> int:
        with self._lock:
            return self._inflight

    def reserve(self, nbytes: int) -> None:
        with self._lock:
            if self._inflight + nbytes > self.limits.max_inflight_bytes:
                raise WireLimitError(
                    f"the server has {self._inflight} bytes in flight; {nbytes} more would pass its limit of "
                    f"{self.limits.max_inflight_bytes}: retry later"
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
