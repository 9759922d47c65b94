"""Shared fixtures: a real paramsel server on an ephemeral loopback port, and channels to it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import SERVICE_NAME, RunningServer
from paramsel.v1 import service_pb2_grpc


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = create_server(ServerConfig(host="127.0.0.1", port=0))
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> service_pb2_grpc.ParameterSelectionServiceStub:
    return service_pb2_grpc.ParameterSelectionServiceStub(channel)


def assert_serving(channel: grpc.Channel) -> None:
    """The server still answers its health check for the paramsel service."""
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
