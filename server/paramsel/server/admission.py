"""What every call but a health check passes through: refused while the server drains, capped per client
address, and ended when it waits on its client for too long.

A call that stops sending (a hung or stopped client, a dead peer whose connection is still open) would
otherwise hold its call slot, its thread and the in-flight bytes it declared for as long as the
connection stays up. :class:`Watchdog` measures only the time a call spends waiting on its client - for
the next request frame, or for the client to take the next response frame - never the server's own
computing, and ends a call that has waited longer than the progress timeout with DEADLINE_EXCEEDED. The
call's handler then unwinds as for a cancelled call, releasing its slot and its reservation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from paramsel.server.security import refusal

log = logging.getLogger("paramsel.server")

HEALTH_PREFIX = "/grpc.health.v1.Health/"
PARAMSEL_PREFIX = "/paramsel.v1."
DRAINING_MESSAGE = "the server is shutting down; retry on another instance"
_REQUEST = "the next request frame"
_RESPONSE = "the client to take the next response frame"


def peer_address(peer: str) -> str:
    """A call's peer without its port: ``ipv4:10.0.0.7:51234`` -> ``ipv4:10.0.0.7``, and
    ``ipv6:[::1]:51234`` -> ``ipv6:[::1]``; a peer without a port (a Unix socket) as it is."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() and ":" in host else peer


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> grpc.StatusCode:
    """Ends a call from a thread other than its handler's; returns the status the client gets.

    grpcio's sync server has no public way to do this with a status: ``context.abort`` raises in the
    thread that calls it, and ``context.cancel()`` answers a bare CANCELLED. The core call underneath
    takes a status with its cancel (``grpc_call_cancel_with_status``, there from grpcio 1.62 to at least
    1.85); it is used where it can be reached, the public cancel otherwise. Either way the handler's
    request iterator raises ``grpc.RpcError`` and its sends fail, as when a client cancels.
    """
    core_call = getattr(getattr(context, "_rpc_event", None), "call", None)
    cancel: Callable[[int, str], object] | None = getattr(core_call, "cancel", None)
    if cancel is not None:
        try:
            cancel(code.value[0], message)
            return code
        except Exception:  # another grpcio's internals: fall back to the public cancel
            log.debug("the core call's cancel took no status; cancelling without one", exc_info=True)
    public_cancel: Callable[[], object] = context.cancel  # untyped in grpc-stubs
    public_cancel()
    return grpc.StatusCode.CANCELLED


class Watched:
    """One call under the watchdog: since when (if at all) it has been waiting on its client."""

    __slots__ = ("context", "ended", "method", "since", "waiting_for")

    def __init__(self, context: grpc.ServicerContext, method: str) -> None:
        self.context = context
        self.method = method
        self.since: float | None = None
        self.waiting_for = _REQUEST
        self.ended: grpc.StatusCode | None = None

    def requests(self, requests: Iterator[Any]) -> Iterator[Any]:
        return _WatchedRequests(requests, self)

    def responses(self, responses: Iterator[Any]) -> Iterator[Any]:
        """Passes the handler's responses on, timing each one's wait for the client to take it."""
        try:
            for frame in responses:
                self.waiting_for = _RESPONSE
                self.since = time.monotonic()
                yield frame
                self.since = None
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()  # the handler's own cleanup (its call slot) runs now, not when it is collected

    def expired(self, now: float, timeout: float) -> bool:
        since = self.since  # read once: the handler's thread may clear it meanwhile
        return since is not None and now - since > timeout

    def end(self, timeout: float) -> None:
        message = (
            f"the server waited more than {timeout:g} s for {self.waiting_for} (its progress timeout, "
            "--progress-timeout-seconds): the call is ended"
        )
        peer = self.context.peer()
        log.warning(
            "%s from %s waited more than %g s for %s: ending it", self.method, peer, timeout, self.waiting_for
        )
        # Marked and coded before the cancel: the handler's thread wakes from it and its call is logged
        # and counted at once, possibly before end_call returns (set after it, the code came too late for
        # 1 call in 16 in CI, which was then logged CANCELLED). The call was waiting on its client, so it
        # cannot have completed meanwhile, short of its next frame arriving at this very moment.
        self.ended = grpc.StatusCode.DEADLINE_EXCEEDED
        self.context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)
        self.ended = end_call(self.context, grpc.StatusCode.DEADLINE_EXCEEDED, message)
        if self.ended is not grpc.StatusCode.DEADLINE_EXCEEDED:  # the public cancel's bare CANCELLED
            self.context.set_code(self.ended)


class _WatchedRequests:
    """The request iterator, marking the call as waiting while it blocks for the next frame."""

    __slots__ = ("_requests", "_watched")

    def __init__(self, requests: Iterator[Any], watched: Watched) -> None:
        self._requests = requests
        self._watched = watched

    def __iter__(self) -> _WatchedRequests:
        return self

    def __next__(self) -> Any:
        watched = self._watched
        watched.waiting_for = _REQUEST
        watched.since = time.monotonic()
        try:
            return next(self._requests)
        except grpc.RpcError:
            if watched.ended is not None:  # the call's log line names the status its client got
                watched.context.set_code(watched.ended)
            raise
        finally:
            watched.since = None


class Watchdog:
    """Ends calls that wait on their client longer than ``timeout`` seconds.

    One thread per server, running only while there are calls to watch; it looks every quarter of the
    timeout (at most every second), so a stalled call ends between ``timeout`` and ``timeout`` plus a
    quarter of it (plus a second at most) after its last frame. The calls themselves only note the time
    around each wait: no thread handoff per frame.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._tick = min(max(timeout / 4, 0.01), 1.0)
        self._lock = threading.Lock()
        self._calls: set[Watched] = set()
        self._running = False

    @contextmanager
    def watching(self, context: grpc.ServicerContext, method: str) -> Iterator[Watched]:
        watched = Watched(context, method)
        with self._lock:
            self._calls.add(watched)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="paramsel-watchdog", daemon=True).start()
        try:
            yield watched
        finally:
            with self._lock:
                self._calls.discard(watched)

    def _run(self) -> None:
        while True:
            time.sleep(self._tick)
            now = time.monotonic()
            with self._lock:
                if not self._calls:
                    self._running = False
                    return
                stalled = [c for c in self._calls if c.expired(now, self.timeout)]
                self._calls.difference_update(stalled)
            for watched in stalled:
                try:
                    watched.end(self.timeout)
                except Exception:  # one call's failure to end must not stop the watch over the others
                    log.exception("could not end stalled call %s", watched.method)


class Admission(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Every call but grpc.health.v1: refused with UNAVAILABLE once :meth:`drain` was called; refused
    with RESOURCE_EXHAUSTED beyond ``max_calls_per_peer`` running calls from one client address (None:
    no cap); streams ended by a :class:`Watchdog` of ``progress_timeout`` seconds. Calls of services
    other than paramsel.v1 (reflection) run on ``aside_pool`` when one is given, so that they never
    take the threads paramsel calls and their refusals need."""

    def __init__(
        self,
        progress_timeout: float,
        max_calls_per_peer: int | None = None,
        aside_pool: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        self.watchdog = Watchdog(progress_timeout)
        self._aside_pool = aside_pool
        self._max_per_peer = max_calls_per_peer
        self._lock = threading.Lock()
        self._per_peer: dict[str, int] = {}
        self._draining = threading.Event()

    def drain(self) -> None:
        """Refuses every new call but health checks from now on."""
        self._draining.set()

    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    def calls_from(self, peer: str) -> int:
        """Calls running from a client address (as :func:`peer_address` gives it); counted only with a cap."""
        with self._lock:
            return self._per_peer.get(peer, 0)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler  # health answers while draining, on its own threads (see app.py)
        if self._draining.is_set():
            return refusal(handler, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        return self._wrap(handler, method)

    @contextmanager
    def _admitted(self, context: grpc.ServicerContext) -> Iterator[None]:
        cap = self._max_per_peer
        if cap is None:
            yield
            return
        peer = peer_address(context.peer())
        with self._lock:
            running = self._per_peer.get(peer, 0)
            if running < cap:
                self._per_peer[peer] = running + 1
        if running >= cap:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client address already has {running} calls running, the server's limit per address "
                "(--max-calls-per-peer): retry later",
            )
        try:
            yield
        finally:
            with self._lock:
                left = self._per_peer[peer] - 1
                if left:
                    self._per_peer[peer] = left
                else:
                    del self._per_peer[peer]

    def _wrap(self, handler: grpc.RpcMethodHandler[Any, Any], method: str) -> grpc.RpcMethodHandler[Any, Any]:
        streaming_in, streaming_out = handler.request_streaming, handler.response_streaming
        kind = ("stream" if streaming_in else "unary") + "_" + ("stream" if streaming_out else "unary")
        behaviour: Callable[[Any, grpc.ServicerContext], Any] = getattr(handler, kind)
        admitted, watchdog = self._admitted, self.watchdog

        def streaming(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with admitted(context), watchdog.watching(context, method) as watched:
                if streaming_in:
                    request = watched.requests(request)
                yield from watched.responses(behaviour(request, context))

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            with admitted(context):
                if not streaming_in:  # nothing to wait for: a unary request is in before the handler runs
                    return behaviour(request, context)
                with watchdog.watching(context, method) as watched:
                    return behaviour(watched.requests(request), context)

        run = streaming if streaming_out else unary
        if self._aside_pool is not None and not method.startswith(PARAMSEL_PREFIX):
            setattr(run, "experimental_thread_pool", self._aside_pool)  # noqa: B010 - gRPC reads it off the behaviour
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        return wrapped
