"""Building and running a paramsel server: the service, health checking and reflection on one port."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from paramsel.server.config import ServerConfig
from paramsel.server.servicer import ParameterSelectionServicer
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
    handlers = {
        method.name: grpc.stream_stream_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=frame_parser(getattr(service_pb2, method.input_type.name)),
            response_serializer=serialize_frame,
        )
        for method in service.methods
    }
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


class RunningServer:
    """A started server: its bound port and health servicer, and a graceful ``stop``."""

    def __init__(self, server: grpc.Server, port: int, health_servicer: Any, config: ServerConfig) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.config = config

    @property
    def target(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "[::]", "::"):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, refuses new calls, and lets in-flight calls finish within the grace."""
        self.health.enter_graceful_shutdown()
        self.server.stop(self.config.grace_seconds if grace is None else grace).wait()


def create_server(config: ServerConfig | None = None) -> RunningServer:
    """Builds, binds and starts a server; with ``port=0`` the returned ``port`` is the one picked."""
    config = config or ServerConfig()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="paramsel"),
        # Without this a second server on a fixed port would silently share it.
        options=[("grpc.so_reuseport", 0)],
    )
    server.add_generic_rpc_handlers((service_handlers(ParameterSelectionServicer(config)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"could not bind {config.host}:{config.port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health_servicer, config)


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
