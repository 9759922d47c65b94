"""Building and running a paramsel server: the service, health checking and reflection on one port."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from paramsel.server import observability
from paramsel.server.admission import Admission
from paramsel.server.config import ServerConfig
from paramsel.server.limits import CallLimits
from paramsel.server.memory import return_freed_memory
from paramsel.server.security import TokenAuthInterceptor, server_credentials
from paramsel.server.servicer import ParameterSelectionServicer, limits_of
from paramsel.v1 import service_pb2
from paramsel.wire.fastframes import frame_parser, serialize_frame
from paramsel.wire.memory import IdleTrim

log = logging.getLogger("paramsel.server")

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["ParameterSelectionService"].full_name
HEALTH_THREADS = 2
SIGNAL_POLL_SECONDS = 1.0
REFLECTION_THREADS = 2

# Keepalive. The server pings a connection after 30 s without traffic and closes it when the ping is
# not answered within 10 s: a peer that died without closing its connection (a crashed or stopped
# machine, a cut network) loses its calls, their slots and their bytes within ~40 s, even while the
# server computes for it or the connection has no call. Pings go on however long nothing is sent (gRPC
# stops after 2 otherwise, blind to a peer dying during a long computation). Clients may ping as well, as
# often as every 10 s, with calls or without (gRPC's default floor, 5 min with calls and 2 h without,
# would answer a client keeping its connection alive more often with GOAWAY "too_many_pings").
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.so_reuseport", 0),  # without this a second server on a fixed port would silently share it
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2),
]


def service_handlers(servicer: Any) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's methods, named by the proto's descriptor, with chunk frames kept as bytes.

    The generated ``add_..._to_server`` would parse every chunk through protobuf (two extra copies of
    each byte); :mod:`paramsel.wire.fastframes` reads canonical chunk frames in place instead.
    """
    service = service_pb2.DESCRIPTOR.services_by_name["ParameterSelectionService"]
    # Streaming flags are read from the descriptor's proto form: protobuf 4.21's MethodDescriptor
    # lacks the client_streaming / server_streaming attributes that later runtimes have.
    described = descriptor_pb2.ServiceDescriptorProto()
    service.CopyToProto(described)
    streams_both_ways = {m.name: m.client_streaming and m.server_streaming for m in described.method}
    handlers = {}
    for method in service.methods:
        request = getattr(service_pb2, method.input_type.name)
        response = getattr(service_pb2, method.output_type.name)
        if streams_both_ways[method.name]:  # the tensor-carrying rpcs
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=frame_parser(request),
                response_serializer=serialize_frame,
            )
        else:  # small unary calls (GetServerInfo): plain protobuf
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(servicer, method.name),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def health_handlers(
    servicer: health.HealthServicer, pool: futures.ThreadPoolExecutor
) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """grpc.health.v1 on threads of its own, so that a health check is answered while every worker is
    busy. (``HealthServicer(experimental_thread_pool=...)`` would move only Watch, and by setting an
    attribute of the class, for every server in the process.)"""

    def on_pool(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:  # (request, context), and a send callback for a non-blocking Watch
            return behaviour(*args)

        # gRPC reads these off the behaviour: which pool runs it, and whether it answers by callback.
        setattr(run, "experimental_thread_pool", pool)  # noqa: B010
        setattr(run, "experimental_non_blocking", getattr(behaviour, "experimental_non_blocking", False))  # noqa: B010
        return run

    request, response = (
        health_pb2.HealthCheckRequest.FromString,
        health_pb2.HealthCheckResponse.SerializeToString,
    )
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            on_pool(servicer.Check), request_deserializer=request, response_serializer=response
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            on_pool(servicer.Watch), request_deserializer=request, response_serializer=response
        ),
    }
    return grpc.method_handlers_generic_handler(health.SERVICE_NAME, handlers)


class RunningServer:
    """A started server: its bound port, health servicer, call limits and metrics registry, and a graceful
    ``stop``."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: Any,
        config: ServerConfig,
        limits: CallLimits | None = None,
        metrics_port: int | None = None,
        *,
        admission: Admission | None = None,
        pools: tuple[futures.ThreadPoolExecutor, ...] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.config = config
        self.limits = limits or CallLimits(limits_of(config))
        self.metrics_port = metrics_port
        self.admission = admission
        # Where this server's paramsel_* metrics are counted, and what its /metrics endpoint serves.
        self.registry = REGISTRY if registry is None else registry
        self._pools = pools  # health's and reflection's, shut down with the server

    @property
    def target(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Drains: health reports NOT_SERVING (and keeps answering), every other new call (GetServerInfo and
        reflection too) is refused with UNAVAILABLE, in-flight ones get up to ``grace`` seconds; then the
        server stops."""
        grace = self.config.grace_seconds if grace is None else grace
        began = time.monotonic()
        if self.admission is not None:
            self.admission.drain()
        self.health.enter_graceful_shutdown()
        drained = self.limits.drain(grace)
        if not drained:
            log.warning(
                "%d calls still running after %.1f s: cancelling them", self.limits.active_calls, grace
            )
        # Then the rest of the grace for everything else in flight (a handler's last frames and status, a
        # health Watch); gRPC refuses new calls from here on.
        remaining = max(grace - (time.monotonic() - began), 0.0)
        self.server.stop(remaining if drained else 0).wait()
        for pool in self._pools:
            pool.shutdown(wait=False)
        if self.metrics_port is not None:
            observability.stop_metrics_http(self.metrics_port)


def create_server(
    config: ServerConfig | None = None,
    *,
    registry: CollectorRegistry | None = None,
    extra_interceptors: Sequence[grpc.ServerInterceptor] = (),  # type: ignore[type-arg]
) -> RunningServer:
    """Builds, binds and starts a server; with ``port=0`` the returned ``port`` is the one picked.

    ``registry``: the Prometheus registry its metrics are counted on and its /metrics endpoint (when
    ``config.metrics_port`` asks for one) serves; None, as ``paramsel serve`` runs, is prometheus_client's
    process-wide one. A server with a registry of its own counts only its own calls there.

    ``extra_interceptors`` run before paramsel's own chain (metrics and the call log, the token check,
    admission), outermost first: they see every call, those the chain goes on to refuse included. Empty,
    as ``paramsel serve`` runs; tests inject faults with them.

    Raises ValueError (a ConfigError) for TLS files that cannot be used and OSError when the address
    cannot be bound (or the metrics port, when one is asked for)."""
    config = config or ServerConfig()
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    # Health checks and reflection run on threads of their own: a health check never waits behind busy
    # workers, and idle reflection streams cannot take the workers paramsel calls need.
    health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="paramsel-health")
    aside_pool = futures.ThreadPoolExecutor(
        max_workers=REFLECTION_THREADS, thread_name_prefix="paramsel-reflection"
    )
    admission = Admission(config.progress_timeout_seconds, config.max_calls_per_peer, aside_pool)
    # Outermost first, after any extra ones. Every paramsel.v1 call is counted and logged (one JSON line
    # on logger paramsel.calls), refusals included; then the token, if any; then admission (drain, calls
    # per address, the progress timeout), which only calls that carry a good token reach.
    interceptors: list[grpc.ServerInterceptor] = [  # type: ignore[type-arg]
        *extra_interceptors,
        observability.interceptor(registry),
    ]
    if config.tokens:
        interceptors.append(TokenAuthInterceptor(config.tokens))
    interceptors.append(admission)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="paramsel"),
        interceptors=interceptors,
        options=SERVER_OPTIONS,
    )
    servicer = ParameterSelectionServicer(config)
    limits = servicer.limits
    observability.metrics_for(registry).active.set_function(lambda: limits.active_calls)
    server.add_generic_rpc_handlers((service_handlers(servicer),))
    health_servicer = health.HealthServicer()
    server.add_generic_rpc_handlers((health_handlers(health_servicer, health_pool),))
    if config.reflection:
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
    address = f"{config.host}:{config.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio >= 1.5x raises where older ones returned port 0
        port = 0
    if port == 0:
        for pool in (health_pool, aside_pool):
            pool.shutdown(wait=False)
        raise OSError(f"cannot listen on {address}: the port is taken or the address is not this machine's")
    metrics_port = None
    if config.metrics_port is not None:
        # On the server's own address, and only once the gRPC port is bound, so that nothing is left
        # serving when that fails.
        try:
            metrics_port = observability.start_metrics_http(config.metrics_port, registry, addr=config.host)
        except OSError:
            server.stop(0)
            for pool in (health_pool, aside_pool):
                pool.shutdown(wait=False)
            raise
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving on port %d: tls=%s, mtls=%s, token auth=%s, reflection=%s, metrics port=%s, "
        "progress timeout=%gs, calls per peer=%s",
        port,
        credentials is not None,
        config.tls_client_ca_file is not None,
        bool(config.tokens),
        config.reflection,
        metrics_port,
        config.progress_timeout_seconds,
        config.max_calls_per_peer or "no cap",
    )
    return RunningServer(
        server,
        port,
        health_servicer,
        config,
        servicer.limits,
        metrics_port,
        admission=admission,
        pools=(health_pool, aside_pool),
        registry=registry,
    )


def serve(config: ServerConfig, *, announce: Any = print) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully. The process's free memory goes back to the
    system once no call has run for a while (see :mod:`paramsel.server.memory`): ``serve`` owns its
    process, so it may."""
    return_freed_memory()
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: draining for up to %.1f s", signum, config.grace_seconds)
        stopping.set()

    # Before the port is announced: a SIGTERM that follows the announcement at once must drain, not kill.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    running = create_server(config)
    announce(f"paramsel serving on {config.host}:{running.port}", flush=True)
    # Woken every second: the kernel may hand SIGTERM to any of gRPC's threads, and then nothing interrupts
    # an untimed wait here, where Python runs signal handlers; the signal would be left pending for ever.
    idle = IdleTrim(config.idle_release_seconds)
    while not stopping.wait(SIGNAL_POLL_SECONDS):
        idle.tick(running.limits.active_calls, running.limits.finished_calls)
    running.stop()
