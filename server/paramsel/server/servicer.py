"""ParameterSelectionService: decode the stream, call the engine, encode the answer. Nothing else: each
rpc's work is in :mod:`paramsel.server.calls`, which the in-process runner (:mod:`paramsel.server.local`)
shares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from paramsel.server import calls, inbound, outbound
from paramsel.server.config import ServerConfig
from paramsel.server.info import server_info
from paramsel.server.limits import Call, CallLimits, Limits
from paramsel.server.models import ModelStore
from paramsel.server.status import statuses
from paramsel.v1 import service_pb2, service_pb2_grpc


def limits_of(config: ServerConfig) -> Limits:
    return config.limits


class ParameterSelectionServicer(service_pb2_grpc.ParameterSelectionServiceServicer):
    """The paramsel.v1 service over :mod:`paramsel.engine`."""

    def __init__(self, config: ServerConfig, limits: CallLimits | None = None) -> None:
        self._config = config
        self._models = ModelStore(config.model_cache_bytes)
        self.limits = limits or CallLimits(limits_of(config))

    def _selection(self, call: Call, frames: Iterator[Any]) -> calls.Selected:
        return calls.selection(
            call,
            frames,
            models=self._models,
            max_bytes=self._config.limits.max_call_bytes,
            default_chunk_size=self._config.chunk_size_bytes,
        )

    def Select(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.SelectRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.SelectResponse]:
        with statuses(context, "Select"), self.limits.call() as call:
            selected = self._selection(call, request_iterator)
            encoding, value_dtype = calls.select_answer(selected.start)
            call.reserve_work(outbound.select_answer_work(selected.selection, encoding, value_dtype))
            yield from outbound.select_frames(selected.selection, encoding, selected.size, value_dtype)

    def Push(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.PushResponse]:
        with statuses(context, "Push"), self.limits.call() as call:
            selected = self._selection(call, request_iterator)
            value_dtype = inbound.value_dtype(selected.start.value_dtype)
            call.reserve_work(outbound.push_answer_work(selected.selection, value_dtype))
            yield from outbound.push_frames(selected.selection, selected.size, value_dtype)

    def Pull(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.PullRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.PullResponse]:
        with statuses(context, "Pull"), self.limits.call() as call:
            size, changed, _ = calls.pull(
                call,
                request_iterator,
                max_bytes=self._config.limits.max_call_bytes,
                default_chunk_size=self._config.chunk_size_bytes,
            )
            yield from outbound.pull_frames(changed, size)

    def Aggregate(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.AggregateRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.AggregateResponse]:
        with statuses(context, "Aggregate"), self.limits.call() as call:
            done = calls.aggregate(
                call,
                request_iterator,
                max_bytes=self._config.limits.max_call_bytes,
                default_chunk_size=self._config.chunk_size_bytes,
            )
            yield from outbound.aggregate_answer(done)

    def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: service_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> service_pb2.GetServerInfoResponse:
        return server_info(self._config)
