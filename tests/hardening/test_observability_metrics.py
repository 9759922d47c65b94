"""The observability interceptor in the real server's chain (``create_server``, its metrics on a registry
of the test's own): Prometheus figures per call, the /metrics endpoint, and exactly one JSON log line per
call that never carries a metadata secret."""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from support import assert_serving, running_server, wait_for

from paramsel.v1 import criteria_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from paramsel.wire.streams import SparseOut, write_frames

Stub = service_pb2_grpc.ParameterSelectionServiceStub
MODEL = tensor_pb2.SECTION_MODEL
CHUNK = 1 << 20
TIMEOUT = 60  # seconds: a generous bound for calls and waits, never a measure of speed


class Served:
    def __init__(self, registry: CollectorRegistry, channel: grpc.Channel) -> None:
        self.registry = registry
        self.channel = channel
        self.stub = Stub(channel)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def served() -> Iterator[Served]:
    with running_server() as running, grpc.insecure_channel(running.target) as channel:
        yield Served(running.registry, channel)


def select_frames(level: float, values: list[float]) -> list[Any]:
    criterion = criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=level, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )
    first = ("start", service_pb2.SelectStart(criterion=criterion))
    dense = [(MODEL, [("a", torch.tensor(values, dtype=torch.float32))])]
    return list(write_frames(service_pb2.SelectRequest, first, chunk_size=CHUNK, dense=dense))


GOOD = select_frames(0.5, [1.0, -5.0, 3.0, 0.5, 0.0, 0.0])  # k = 3: -5, 3 and 1
BAD = select_frames(1.5, [1.0, 2.0])  # sparsity_level out of range: INVALID_ARGUMENT
UPLOAD = sum(frame.ByteSize() for frame in GOOD)
BAD_UPLOAD = sum(frame.ByteSize() for frame in BAD)


def good_and_bad(served: Served, metadata: tuple[tuple[str, str], ...] = ()) -> list[Any]:
    replies = list(served.stub.Select(iter(GOOD), timeout=TIMEOUT, metadata=metadata))
    with pytest.raises(grpc.RpcError) as err:
        list(served.stub.Select(iter(BAD), timeout=TIMEOUT, metadata=metadata))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return replies


def test_counters_bytes_entries_and_histogram(served: Served) -> None:
    replies = good_and_bad(served)
    assert replies[0].header.top_k.sent_entries == 3
    assert served.value("paramsel_calls_total", method="Select", code="OK") == 1
    assert served.value("paramsel_calls_total", method="Select", code="INVALID_ARGUMENT") == 1
    assert served.value("paramsel_calls_total", method="Push", code="OK") == 0
    # Every frame of both uploads was read (the bad one fails on its start frame, after which the
    # server stops reading: at least that frame counts).
    received = served.value("paramsel_received_bytes_total", method="Select")
    assert UPLOAD < received <= UPLOAD + BAD_UPLOAD
    assert served.value("paramsel_sent_bytes_total", method="Select") == sum(r.ByteSize() for r in replies)
    assert served.value("paramsel_selected_entries_total") == 3
    assert served.value("paramsel_call_duration_seconds_count", method="Select") == 2
    assert served.value("paramsel_call_duration_seconds_sum", method="Select") > 0
    assert served.value("paramsel_inflight_bytes") == 0
    assert_serving(served.channel)  # the health check is not a paramsel.v1 call: not counted
    assert served.value("paramsel_call_duration_seconds_count", method="Check") == 0


def test_bytes_in_match_the_upload_exactly(served: Served) -> None:
    list(served.stub.Select(iter(GOOD), timeout=TIMEOUT))
    assert served.value("paramsel_received_bytes_total", method="Select") == UPLOAD


def test_other_methods_are_counted_by_name(served: Served) -> None:
    frames = list(
        write_frames(
            service_pb2.PullRequest,
            ("start", service_pb2.PullStart(payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO)),
            chunk_size=CHUNK,
            layout=[("w", torch.zeros(3, 4))],
            sparse=[
                (
                    tensor_pb2.SECTION_PAYLOAD,
                    [SparseOut("w", (3, 4), torch.ones(2), torch.tensor([[0, 1], [2, 3]]))],
                    tensor_pb2.POSITION_ENCODING_COO_INT64,
                )
            ],
        )
    )
    replies = list(served.stub.Pull(iter(frames), timeout=TIMEOUT))
    assert served.value("paramsel_calls_total", method="Pull", code="OK") == 1
    assert served.value("paramsel_received_bytes_total", method="Pull") == sum(f.ByteSize() for f in frames)
    assert served.value("paramsel_sent_bytes_total", method="Pull") == sum(r.ByteSize() for r in replies)
    assert served.value("paramsel_selected_entries_total") == 0


def test_http_endpoint_serves_the_figures() -> None:
    """``--metrics-port``: the endpoint serves the figures of the registry the server counts on."""
    with (
        running_server(metrics_port=0) as running,
        grpc.insecure_channel(running.target) as channel,
    ):
        good_and_bad(Served(running.registry, channel))
        assert running.metrics_port
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=TIMEOUT) as reply:
            text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("paramsel_calls_total", (("code", "OK"), ("method", "Select")))] == 1
    assert samples[("paramsel_calls_total", (("code", "INVALID_ARGUMENT"), ("method", "Select")))] == 1
    assert samples[("paramsel_selected_entries_total", ())] == 3
    assert samples[("paramsel_call_duration_seconds_count", (("method", "Select"),))] == 2
    assert samples[("paramsel_received_bytes_total", (("method", "Select"),))] >= UPLOAD
    assert samples[("paramsel_sent_bytes_total", (("method", "Select"),))] > 0
    assert ("paramsel_inflight_bytes", ()) in samples
    assert samples[("paramsel_active_calls", ())] == 0


def call_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "paramsel.calls"]


def test_one_json_line_per_call(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paramsel.calls")
    good_and_bad(served, metadata=(("x-request-id", "req-42"),))
    list(served.stub.Select(iter(GOOD), timeout=TIMEOUT))  # no request id: one is generated
    assert_serving(served.channel)  # not a paramsel.v1 call: no line
    lines = call_lines(caplog)
    assert len(lines) == 3
    good, bad, anonymous = lines
    fields = {"event", "method", "code", "duration_ms", "bytes_in", "bytes_out", "peer", "request_id"}
    for line in lines:
        assert fields <= line.keys()
        assert line["method"] == "Select"
        assert line["duration_ms"] >= 0
        assert "127.0.0.1" in line["peer"]
    assert (good["code"], good["request_id"], good["bytes_in"]) == ("OK", "req-42", UPLOAD)
    assert good["bytes_out"] > 0
    assert (bad["code"], bad["request_id"], bad["bytes_out"]) == ("INVALID_ARGUMENT", "req-42", 0)
    assert anonymous["code"] == "OK"
    assert anonymous["request_id"] not in ("", "req-42")


def test_authorization_never_logged(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "secret-token-123"
    good_and_bad(served, metadata=(("authorization", f"Bearer {secret}"), ("x-request-id", "req-7")))
    lines = call_lines(caplog)
    assert [line["request_id"] for line in lines] == ["req-7", "req-7"]
    assert all(secret not in record.getMessage() for record in caplog.records)
    assert secret not in caplog.text


def test_request_id_is_clipped_and_printable(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="paramsel.calls")
    list(served.stub.Select(iter(GOOD), timeout=TIMEOUT, metadata=(("x-request-id", "r" * 500),)))
    (line,) = call_lines(caplog)
    assert line["request_id"] == "r" * 128


DEADLINES = (0.5, 5.0, 30.0)
"""Deadlines tried in turn for a call left to expire: the server must have the upload before it does,
and a loaded machine can need longer than the first."""


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_abandoned_call_is_counted_and_released(caplog: pytest.LogCaptureFixture, how: str) -> None:
    """A client that goes away mid-upload: its bytes leave the in-flight gauge and its code is recorded.

    Each attempt has a server (and registry) of its own, so that an attempt whose deadline came before
    the upload was in (a loaded machine) leaves nothing behind in the next one's figures."""
    caplog.set_level(logging.INFO, logger="paramsel.calls")
    held = sum(f.ByteSize() for f in GOOD[:-1])
    for attempt, timeout in enumerate(DEADLINES if how == "deadline" else (TIMEOUT,)):
        release = threading.Event()
        with running_server() as running, grpc.insecure_channel(running.target) as channel:
            try:
                served = Served(running.registry, channel)

                def upload(release: threading.Event = release) -> Iterator[Any]:
                    yield from GOOD[:-1]
                    release.wait(TIMEOUT)  # hold the stream open until the client has given up

                request_id = f"abandoned-{attempt}"
                call = served.stub.Select(upload(), timeout=timeout, metadata=(("x-request-id", request_id),))
                in_flight: list[bool] = []

                def settled(
                    call: Any = call, served: Served = served, in_flight: list[bool] = in_flight
                ) -> bool:
                    if served.value("paramsel_inflight_bytes") == held:
                        assert served.value("paramsel_active_calls") == 1
                        in_flight.append(True)
                        return True
                    return not call.is_active()

                wait_for(settled)
                assert in_flight or how == "deadline", "the server never had the upload in flight"
                if how == "cancel":
                    call.cancel()  # type: ignore[no-untyped-call]  # unannotated in grpc-stubs' RpcContext
                with pytest.raises(grpc.RpcError):
                    list(call)
                release.set()
                if not in_flight:
                    continue  # the deadline came before the server had the whole upload: allow more

                def mine(request_id: str = request_id) -> list[dict[str, Any]]:
                    return [line for line in call_lines(caplog) if line["request_id"] == request_id]

                wait_for(lambda: len(mine()) == 1)  # the line is written last
                (line,) = mine()
                # On cancel, gRPC may end the request iterator before it marks the context cancelled;
                # the servicer waits for that rather than record the cut-short stream as
                # INVALID_ARGUMENT. A deadline is seen by the server either as its own deadline
                # passing or as the client's cancellation arriving first (the client's copy of the
                # deadline expires a moment before the server's): either code says the client left.
                codes = {"cancel": ("CANCELLED",), "deadline": ("DEADLINE_EXCEEDED", "CANCELLED")}[how]
                assert line["code"] in codes
                assert served.value("paramsel_calls_total", method="Select", code=line["code"]) == 1
                assert served.value("paramsel_inflight_bytes") == 0

                def idle(served: Served = served) -> bool:
                    return served.value("paramsel_active_calls") == 0

                wait_for(idle)
                assert line["bytes_in"] == held
                return
            finally:
                release.set()
    pytest.fail(f"the upload never reached the server before the deadline, even with {DEADLINES[-1]} s")
