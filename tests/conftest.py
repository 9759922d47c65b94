"""Shared fixtures: a real paramsel server (``create_server``, metrics on a registry of its own) on an
ephemeral loopback port, and channels to it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from support import start_server

from paramsel.server.app import RunningServer
from paramsel.v1 import service_pb2_grpc


@pytest.fixture(scope="session")
def server() -> Iterator[RunningServer]:
    running = start_server()
    yield running
    running.stop(0)


@pytest.fixture(scope="session")
def channel(server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> service_pb2_grpc.ParameterSelectionServiceStub:
    return service_pb2_grpc.ParameterSelectionServiceStub(channel)
