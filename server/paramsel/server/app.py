"""Building and running a paramsel server: the service, health checking and reflection on one port."""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramsel.server import observability
from paramsel.server.config import ServerConfig
from paramsel.server.limits import CallLimits
from paramsel.server.security import TokenAuthInterceptor, server_credentials
from paramsel.server.servicer import ParameterSelectionServicer, limits_of
from paramsel.v1 import service_pb2
from paramsel.wire.fastframes import frame_parser, serialize_frame

log = logging.getLogger("paramsel.server")

SERVICE_NAME: str = service_pb2.DESCRIPTOR.services_by_name["ParameterSelectionService"].full_name


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


class RunningServer:
    """A started server: its bound port, health servicer and call limits, and a graceful ``stop``."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: Any,
        config: ServerConfig,
        limits: CallLimits | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.config = config
        self.limits = limits or CallLimits(limits_of(config))
        self.metrics_port = metrics_port

    @property
    def target(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Drains: health reports NOT_SERVING (and keeps answering), new paramsel.v1 calls are refused with
        UNAVAILABLE, in-flight ones get up to ``grace`` seconds; then the server stops."""
        grace = self.config.grace_seconds if grace is None else grace
        began = time.monotonic()
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
        if self.metrics_port is not None:
            observability.stop_metrics_http(self.metrics_port)


def create_server(config: ServerConfig | None = None) -> RunningServer:
    """Builds, binds and starts a server; with ``port=0`` the returned ``port`` is the one picked."""
    config = config or ServerConfig()
    credentials = server_credentials(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
    # Every call is counted and logged (one JSON line on logger paramsel.calls); the metrics are
    # served over HTTP only when asked, on the server's own address.
    interceptors: list[grpc.ServerInterceptor] = [observability.interceptor(None)]  # type: ignore[type-arg]
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = observability.start_metrics_http(config.metrics_port, addr=config.host)
    if config.tokens:
        interceptors.append(TokenAuthInterceptor(config.tokens))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="paramsel"),
        interceptors=interceptors,
        # Without this a second server on a fixed port would silently share it.
        options=[("grpc.so_reuseport", 0)],
    )
    servicer = ParameterSelectionServicer(config)
    server.add_generic_rpc_handlers((service_handlers(servicer),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        services = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
    address = f"{config.host}:{config.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving on port %d: tls=%s, mtls=%s, token auth=%s, reflection=%s, metrics port=%s",
        port,
        credentials is not None,
        config.tls_client_ca_file is not None,
        bool(config.tokens),
        config.reflection,
        metrics_port,
    )
    return RunningServer(server, port, health_servicer, config, servicer.limits, metrics_port)


def serve(config: ServerConfig, *, announce: Any = print) -> None:
    """Runs until SIGTERM or SIGINT, then drains gracefully."""
    running = create_server(config)
    announce(f"paramsel serving on {config.host}:{running.port}", flush=True)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s: draining for up to %.1f s", signum, config.grace_seconds)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    running.stop()
