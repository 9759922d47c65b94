"""ParameterSelectionService: decode the stream, call the engine, encode the answer. Nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import torch

from paramsel import engine
from paramsel.server import inbound, outbound
from paramsel.server.config import ServerConfig
from paramsel.server.criteria import Selection, run_criterion
from paramsel.server.info import server_info
from paramsel.server.limits import Call, CallLimits, Limits
from paramsel.server.models import ModelStore, check_held_early, requested_digest, resolve_initial
from paramsel.server.status import statuses
from paramsel.v1 import service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire import WireError
from paramsel.wire.streams import Received


def _model(received: Received) -> dict[str, torch.Tensor]:
    model = received.state(inbound.MODEL)
    assert model is not None  # read_models refuses a request without one
    return model


def limits_of(config: ServerConfig) -> Limits:
    return config.limits


class ParameterSelectionServicer(service_pb2_grpc.ParameterSelectionServiceServicer):
    """The paramsel.v1 service over :mod:`paramsel.engine`."""

    def __init__(self, config: ServerConfig, limits: CallLimits | None = None) -> None:
        self._config = config
        self._models = ModelStore(config.model_cache_bytes)
        self.limits = limits or CallLimits(limits_of(config))

    def _selection(self, call: Call, frames: Iterator[Any]) -> tuple[Any, int, Selection]:
        """Select's and Push's common part: read the models (and the caller's scores, if any), resolve
        the initial one, select.

        What the criterion builds from the declared shapes is reserved at the first chunk
        (``select_plan``); what only the data decide, as the engine comes to it (``reserve_need``)."""
        received = inbound.read_models(
            check_held_early(call.watch(frames, inbound.select_plan), self._models),
            max_bytes=self._config.limits.max_call_bytes,
        )
        start = received.first
        size = outbound.chunk_size(start.response_chunk_size_bytes, self._config.chunk_size_bytes)
        sent = received.state(inbound.INITIAL)
        initial = resolve_initial(start, sent, self._models)
        # An initial model sent without a digest is this call's alone (the store keeps only named ones):
        # the scores may overwrite it.
        scratch = sent is not None and requested_digest(start) is None
        return (
            start,
            size,
            run_criterion(
                start.criterion,
                _model(received),
                initial,
                scores=received.state(inbound.SCORES),
                residual=received.state(inbound.RESIDUAL),
                initial_is_scratch=scratch,
                reserve=call.reserve_need,
            ),
        )

    def Select(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.SelectRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.SelectResponse]:
        with statuses(context, "Select"), self.limits.call() as call:
            start, size, selection = self._selection(call, request_iterator)
            encoding = inbound.position_encoding(start.position_encoding)
            inbound.check_select_encoding(encoding, start.criterion)
            value_dtype = inbound.value_dtype(start.value_dtype)
            call.reserve_work(outbound.select_answer_work(selection, encoding, value_dtype))
            yield from outbound.select_frames(selection, encoding, size, value_dtype)

    def Push(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.PushRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.PushResponse]:
        with statuses(context, "Push"), self.limits.call() as call:
            start, size, selection = self._selection(call, request_iterator)
            value_dtype = inbound.value_dtype(start.value_dtype)
            call.reserve_work(outbound.push_answer_work(selection, value_dtype))
            yield from outbound.push_frames(selection, size, value_dtype)

    def Pull(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.PullRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.PullResponse]:
        with statuses(context, "Pull"), self.limits.call() as call:
            received = inbound.read_pull(
                call.watch(request_iterator, inbound.pull_plan), max_bytes=self._config.limits.max_call_bytes
            )
            start: service_pb2.PullStart = received.first
            size = outbound.chunk_size(start.response_chunk_size_bytes, self._config.chunk_size_bytes)
            mode = inbound.pull_mode(start.mode)
            model = inbound.model_specs(received)
            kind = start.payload_kind
            if kind == service_pb2.PAYLOAD_KIND_SPARSE_COO:
                changed = engine.pull_sparse(
                    model,
                    inbound.sparse_payload(received),
                    mode=mode,
                    base=inbound.base_state(received, mode),
                )
            elif kind in (service_pb2.PAYLOAD_KIND_LAYERS, service_pb2.PAYLOAD_KIND_FEDPM_PROBABILITIES):
                if mode is not engine.PullMode.REPLACE:
                    name = "PULL_MODE_SCATTER" if mode is engine.PullMode.SCATTER else "PULL_MODE_ADD"
                    sent = received.dense.get(inbound.PAYLOAD, [])
                    named = f" (the payload's '{sent[0][0].name}' is a whole tensor)" if sent else ""
                    raise WireError(f"start.mode: {name} applies to PAYLOAD_KIND_SPARSE_COO only{named}")
                pull = engine.pull_layers if kind == service_pb2.PAYLOAD_KIND_LAYERS else engine.pull_fedpm
                changed = pull(model, inbound.dense_payload(received))
            else:
                raise WireError(
                    f"start.payload_kind: unknown value {kind} "
                    "(expected PAYLOAD_KIND_SPARSE_COO, _LAYERS or _FEDPM_PROBABILITIES)"
                )
            yield from outbound.pull_frames(changed, size)

    def Aggregate(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[service_pb2.AggregateRequest], context: grpc.ServicerContext
    ) -> Iterator[service_pb2.AggregateResponse]:
        with statuses(context, "Aggregate"), self.limits.call() as call:
            received = inbound.read_contributions(
                call.watch(request_iterator, inbound.aggregate_plan),
                max_bytes=self._config.limits.max_call_bytes,
            )
            start: service_pb2.AggregateStart = received.first
            size = outbound.chunk_size(start.response_chunk_size_bytes, self._config.chunk_size_bytes)
            weighted = start.weighted if start.HasField("weighted") else True
            per_coordinate = inbound.per_coordinate(start)
            value_dtype = inbound.value_dtype(start.value_dtype)
            contributions = inbound.contributions(received, start.payload_kind)
            if start.payload_kind == service_pb2.PAYLOAD_KIND_SPARSE_COO:
                encoding = inbound.aggregate_encoding(start.position_encoding)
                seeds: dict[str, tuple[int, int]] = {}
                if per_coordinate:
                    sparse = engine.aggregate_per_coordinate(
                        contributions, weighted=weighted, value_dtype=value_dtype
                    )
                    if encoding == tensor_pb2.POSITION_ENCODING_COMPACT:
                        seeds = inbound.shared_seeds(s.decl for s in received.sparse.get(inbound.PAYLOAD, []))
                else:
                    sparse = engine.aggregate_sparse(contributions, weighted=weighted)
                yield from outbound.aggregate_frames(
                    len(contributions),
                    size,
                    sparse=sparse,
                    encoding=encoding,
                    value_dtype=value_dtype,
                    seeds=seeds,
                )
            else:
                layers = engine.aggregate_layers(contributions, weighted=weighted)
                yield from outbound.aggregate_frames(
                    len(contributions), size, layers=layers, value_dtype=value_dtype
                )

    def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: service_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> service_pb2.GetServerInfoResponse:
        return server_info(self._config)
