"""Shared fixtures: a real paramsel server on an ephemeral loopback port, and channels to it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from paramsel.server import ServerConfig, create_server
from paramsel.server.app import RunningServer
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
