"""Prometheus metrics and one structured log line per paramsel.v1 call, as a gRPC server interceptor.

Metrics (``registry`` defaults to prometheus_client's global one):

- ``paramsel_calls_total{method,code}``: finished calls by method (``Select``...) and status code name;
- ``paramsel_call_duration_seconds{method}``: call durations, from the handler starting
  to its last response (just before gRPC sends the status);
- ``paramsel_received_bytes_total{method}``, ``paramsel_sent_bytes_total{method}``: the serialized size
  of every request frame the handler read and every response frame it produced;
- ``paramsel_selected_entries_total``: values sent by top-k selections (``TopKSummary.sent_entries``);
- ``paramsel_inflight_bytes``: bytes received and sent by the calls still running;
- ``paramsel_active_calls``: paramsel.v1 calls admitted and still running (read from the server's call
  limits when scraped; of the server created last, when several share one registry).

The log line goes to the ``paramsel.calls`` logger at INFO, as JSON: ``{"event": "call", "method",
"code", "duration_ms", "bytes_in", "bytes_out", "frames_in", "frames_out", "peer", "request_id"}``.
The request id is the call's ``x-request-id`` metadata (clipped to 128 printable characters) or a
generated one; no other metadata value is ever read into a log record.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from paramsel.wire.fastframes import ChunkFrame

log = logging.getLogger("paramsel.calls")

PREFIX = "/paramsel.v1."
REQUEST_ID_KEY = "x-request-id"
_MAX_REQUEST_ID = 128
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The paramsel metrics, registered once per registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "paramsel_calls",
            "paramsel.v1 calls by method and status code",
            ["method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "paramsel_call_duration_seconds",
            "paramsel.v1 call duration",
            ["method"],
            buckets=_BUCKETS,
            registry=registry,
        )
        self.received = Counter(
            "paramsel_received_bytes", "serialized request frame bytes", ["method"], registry=registry
        )
        self.sent = Counter(
            "paramsel_sent_bytes", "serialized response frame bytes", ["method"], registry=registry
        )
        self.selected = Counter(
            "paramsel_selected_entries", "values sent by top-k selections (sent_entries)", registry=registry
        )
        self.inflight = Gauge(
            "paramsel_inflight_bytes", "bytes received and sent by calls still running", registry=registry
        )
        self.active = Gauge(
            "paramsel_active_calls", "paramsel.v1 calls admitted and still running", registry=registry
        )


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, Metrics] = weakref.WeakKeyDictionary()
_metrics_lock = threading.Lock()


def metrics_for(registry: CollectorRegistry | None = None) -> Metrics:
    """The metrics on ``registry``, created on first use (a registry refuses the same name twice)."""
    registry = REGISTRY if registry is None else registry
    with _metrics_lock:
        found = _metrics.get(registry)
        if found is None:
            found = _metrics[registry] = Metrics(registry)
        return found


def frame_size(frame: Any) -> int:
    """The serialized size of a request or response frame (0 for a frame that is not a message)."""
    if isinstance(frame, ChunkFrame):
        return len(frame.encoded)
    byte_size = getattr(frame, "ByteSize", None)
    return int(byte_size()) if callable(byte_size) else 0


def sent_entries(frame: Any) -> int:
    """``TopKSummary.sent_entries`` when ``frame`` is a selection header with a top-k summary, else 0."""
    if isinstance(frame, ChunkFrame) or getattr(frame, "WhichOneof", None) is None:
        return 0
    if "frame" not in frame.DESCRIPTOR.oneofs_by_name or frame.WhichOneof("frame") != "header":
        return 0
    header = frame.header
    if "summary" not in {o.name for o in header.DESCRIPTOR.oneofs}:
        return 0
    return int(header.top_k.sent_entries) if header.WhichOneof("summary") == "top_k" else 0


def _request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            clean = "".join(c for c in text[:_MAX_REQUEST_ID] if c.isprintable())
            if clean:
                return clean
    return uuid.uuid4().hex


class _Call:
    """One call's figures; its frames all pass through the thread that runs the handler."""

    def __init__(self, metrics: Metrics, method: str, request_id: str) -> None:
        self.metrics = metrics
        self.method = method
        self.request_id = request_id
        self.started = time.perf_counter()
        self.bytes_in = self.bytes_out = self.frames_in = self.frames_out = 0
        self.done = False

    def received(self, frame: Any) -> None:
        size = frame_size(frame)
        self.bytes_in += size
        self.frames_in += 1
        self.metrics.received.labels(self.method).inc(size)
        self.metrics.inflight.inc(size)

    def sent(self, frame: Any) -> None:
        size = frame_size(frame)
        self.bytes_out += size
        self.frames_out += 1
        self.metrics.sent.labels(self.method).inc(size)
        self.metrics.inflight.inc(size)
        entries = sent_entries(frame)
        if entries > 0:
            self.metrics.selected.inc(entries)

    def finish(self, context: grpc.ServicerContext, error: BaseException | None) -> None:
        if self.done:
            return
        self.done = True
        elapsed = time.perf_counter() - self.started
        code = _code(context, error)
        self.metrics.calls.labels(self.method, code).inc()
        self.metrics.duration.labels(self.method).observe(elapsed)
        self.metrics.inflight.dec(self.bytes_in + self.bytes_out)
        if not log.isEnabledFor(logging.INFO):
            return
        try:
            peer = context.peer()
        except Exception:  # a context that cannot say: the line is still written
            peer = ""
        line = {
            "event": "call",
            "method": self.method,
            "code": code,
            "duration_ms": round(elapsed * 1000, 3),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "peer": peer,
            "request_id": self.request_id,
        }
        log.info(json.dumps(line, separators=(",", ":")))


def _code(context: grpc.ServicerContext, error: BaseException | None) -> str:
    """The status the client sees: CANCELLED or DEADLINE_EXCEEDED once it has gone away (whatever the
    handler made of its cut-short stream), DEADLINE_EXCEEDED when the server's progress timeout ended it
    (the watchdog sets that code), else the context's code, else OK or UNKNOWN by how it ended."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED.name
    read = getattr(context, "code", None)  # grpc >= 1.38; missing from grpc-stubs
    code = read() if callable(read) else None
    if not context.is_active():
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return code.name
        return grpc.StatusCode.CANCELLED.name
    if isinstance(code, grpc.StatusCode):
        return code.name
    if error is None:
        return grpc.StatusCode.OK.name
    if isinstance(error, GeneratorExit):
        return grpc.StatusCode.CANCELLED.name  # the response stream was dropped
    return grpc.StatusCode.UNKNOWN.name  # gRPC answers UNKNOWN to an exception that is not an abort


class _CountedRequests:
    """The request iterator, counting every frame the handler takes."""

    def __init__(self, requests: Iterator[Any], call: _Call) -> None:
        self._requests = requests
        self._call = call

    def __iter__(self) -> _CountedRequests:
        return self

    def __next__(self) -> Any:
        frame = next(self._requests)
        self._call.received(frame)
        return frame

    def __getattr__(self, name: str) -> Any:
        return getattr(self._requests, name)


def _counted_responses(responses: Iterator[Any], call: _Call, context: grpc.ServicerContext) -> Iterator[Any]:
    # The error is never kept in a local: the frame would then hold its own traceback, a cycle that
    # leaves a dropped call's generators (and the call slot they hold) to the garbage collector's next
    # full pass instead of releasing them when gRPC lets go of the call.
    try:
        for frame in responses:
            call.sent(frame)
            yield frame
    except BaseException as raised:
        call.finish(context, raised)
        raise
    finally:
        call.finish(context, None)  # a no-op once finished above


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], metrics: Metrics, method: str, metadata: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, its behaviour wrapped so both directions are counted and the call is logged."""
    kind = (
        ("stream" if handler.request_streaming else "unary")
        + "_"
        + ("stream" if handler.response_streaming else "unary")
    )
    behaviour: Callable[[Any, grpc.ServicerContext], Any] = getattr(handler, kind)

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        call = _Call(metrics, method, _request_id(metadata))
        if handler.request_streaming:
            request = _CountedRequests(request, call)
        else:
            call.received(request)
        if handler.response_streaming:
            try:
                responses = behaviour(request, context)
            except BaseException as raised:
                call.finish(context, raised)
                raise
            return _counted_responses(responses, call, context)
        try:
            response = behaviour(request, context)
        except BaseException as raised:
            call.finish(context, raised)
            raise
        call.sent(response)
        call.finish(context, None)
        return response

    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    wrapped: grpc.RpcMethodHandler[Any, Any] = factory(
        run,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    return wrapped


class _Interceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        path = handler_call_details.method
        if handler is None or not path.startswith(PREFIX):
            return handler  # health, reflection, unknown methods: not paramsel's figures
        method = path.rsplit("/", 1)[-1]
        return _wrap(handler, self._metrics, method, handler_call_details.invocation_metadata)


def interceptor(registry: CollectorRegistry | None = None) -> grpc.ServerInterceptor[Any, Any]:
    """A server interceptor recording paramsel.v1 calls on ``registry`` (default: the global one)."""
    return _Interceptor(metrics_for(registry))


_http_servers: dict[int, WSGIServer] = {}


def start_metrics_http(
    port: int, registry: CollectorRegistry | None = None, *, addr: str = "127.0.0.1"
) -> int:
    """Serves ``/metrics`` of ``registry`` over HTTP on ``addr:port`` in a daemon thread; returns the port
    bound (``port=0`` picks a free one). ``addr="0.0.0.0"`` lets other machines scrape it."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY if registry is None else registry)
    bound = int(server.server_port)
    _http_servers[bound] = server
    return bound


def stop_metrics_http(port: int) -> None:
    """Stops the endpoint ``start_metrics_http`` started on ``port`` (no-op if none)."""
    server = _http_servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
