"""Soak: four threads send a few thousand mixed good and bad calls to one in-process server. Every good
call gets the hand-computed answer, every bad one its deliberate status, and memory does not creep.

It runs against a plain server and against one requiring TLS and a bearer token (see secured.py): there
the calls go over TLS with the token, and a few in the mix carry no token or a bad one, which are refused
UNAUTHENTICATED; the server's own count of calls by status agrees, and the token is never logged.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry
from secured import CONFIGS, UNAUTHENTICATED, Metadata, Security, security
from support import assert_serving, server_logs, start_server

from paramsel.server.app import SERVICE_NAME, RunningServer
from paramsel.v1 import criteria_pb2, service_pb2, tensor_pb2
from paramsel.wire.streams import SparseOut, read_frames, write_contributions, write_frames

pytestmark = pytest.mark.slow  # thousands of calls: a soak

THREADS = 4
TOTAL_CALLS = 4000
MIN_CALLS = 1000  # always run, however slow the machine: what the memory check needs to mean something
WALL_SECONDS = 60.0  # past this, stop at MIN_CALLS instead of TOTAL_CALLS (a budget, never asserted)
CALL_TIMEOUT = 60  # seconds per call: a hang fails, a slow machine does not
RSS_GROWTH_BOUND = 50 << 20
CHUNK = 1 << 20
MODEL, PAYLOAD, RESULT = tensor_pb2.SECTION_MODEL, tensor_pb2.SECTION_PAYLOAD, tensor_pb2.SECTION_RESULT
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
RESPONSES: dict[str, type[Message]] = {
    "Select": service_pb2.SelectResponse,
    "Push": service_pb2.PushResponse,
    "Pull": service_pb2.PullResponse,
    "Aggregate": service_pb2.AggregateResponse,
}


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Case:
    name: str
    rpc: str
    frames: list[bytes]
    expect: grpc.StatusCode | Callable[[list[Any]], None]
    metadata: Metadata = ()


def encoded(frames: Iterator[Any] | list[Any]) -> list[bytes]:
    return [frame.SerializeToString() for frame in frames]


def top_k(level: float) -> criteria_pb2.Criterion:
    return criteria_pb2.Criterion(
        top_k=criteria_pb2.TopKCriterion(
            sparsity_level=level, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_FINAL_MAGNITUDE
        )
    )


W = [("a", torch.tensor([1.0, -5.0, 3.0, 0.5]))]


def select_frames(level: float, message: Any = service_pb2.SelectRequest, start: Any = None) -> list[Any]:
    start = service_pb2.SelectStart(criterion=top_k(level)) if start is None else start
    return list(write_frames(message, ("start", start), chunk_size=CHUNK, dense=[(MODEL, W)]))


def pull_frames(mode: int = service_pb2.PULL_MODE_UNSPECIFIED) -> list[Any]:
    payload = SparseOut("w", (3, 4), torch.ones(2), torch.tensor([[0, 1], [2, 3]]))
    start = service_pb2.PullStart(
        payload_kind=service_pb2.PAYLOAD_KIND_SPARSE_COO, mode=service_pb2.PullMode.ValueType(mode)
    )
    return list(
        write_frames(
            service_pb2.PullRequest,
            ("start", start),
            chunk_size=CHUNK,
            layout=[("w", torch.zeros(3, 4))],
            sparse=[(PAYLOAD, [payload], tensor_pb2.POSITION_ENCODING_COO_INT64)],
        )
    )


def aggregate_frames(first_examples: int) -> list[Any]:
    start = service_pb2.AggregateStart(payload_kind=service_pb2.PAYLOAD_KIND_LAYERS)
    contributions: list[tuple[int, list[tuple[str, torch.Tensor]], list[SparseOut]]] = [
        (first_examples, [("x", torch.tensor([1.0, 2.0]))], []),
        (3, [("x", torch.tensor([5.0, 6.0]))], []),
    ]
    return list(
        write_contributions(
            service_pb2.AggregateRequest,
            ("start", start),
            contributions,
            section=PAYLOAD,
            encoding=tensor_pb2.POSITION_ENCODING_COO_INT64,
            chunk_size=CHUNK,
        )
    )


def check_select(replies: list[Any]) -> None:
    # top-k 0.5 of [1, -5, 3, 0.5] by |w|: k = 2, threshold 3: -5 and 3 at flat positions 1 and 2.
    received = read_frames(replies, first="header", sparse_sections=frozenset({RESULT}), max_bytes=CHUNK)
    summary = received.first.top_k
    assert (summary.total_entries, summary.k, summary.threshold, summary.sent_entries) == (4, 2, 3.0, 2)
    (result,) = received.sparse[RESULT]
    assert result.values.tolist() == [-5.0, 3.0]
    assert result.positions.tolist() == [1, 2]


def check_push(replies: list[Any]) -> None:
    summary = replies[0].header.top_k
    assert (summary.total_entries, summary.k, summary.sent_entries) == (4, 2, 2)


def check_pull(replies: list[Any]) -> None:
    received = read_frames(replies, first="header", dense_sections=frozenset({RESULT}), max_bytes=CHUNK)
    expected = torch.zeros(3, 4)
    expected[0, 1] = expected[2, 3] = 1.0
    state = received.state(RESULT)
    assert state is not None
    assert torch.equal(state["w"], expected)


def check_aggregate(replies: list[Any]) -> None:
    # (1 * [1, 2] + 3 * [5, 6]) / 4 = [4, 5]
    received = read_frames(replies, first="header", dense_sections=frozenset({RESULT}), max_bytes=CHUNK)
    state = received.state(RESULT)
    assert state is not None
    assert state["x"].tolist() == [4.0, 5.0]


def cases(security: Security) -> list[Case]:
    """The mix: with the configuration's credentials, and (secured) two calls without a good token."""
    good_select = select_frames(0.5)
    push_start = service_pb2.PushStart(criterion=top_k(0.5))
    unheld = service_pb2.SelectStart(
        criterion=criteria_pb2.Criterion(
            top_k=criteria_pb2.TopKCriterion(
                sparsity_level=0.5, score_function=criteria_pb2.SCORE_FUNCTION_LARGEST_MAGNITUDE_CHANGE
            )
        ),
        initial_model_digest=tensor_pb2.ModelDigest(sha256=bytes(range(32))),
    )
    table = [
        Case("select", "Select", encoded(good_select), check_select),
        Case("push", "Push", encoded(select_frames(0.5, service_pb2.PushRequest, push_start)), check_push),
        Case("pull", "Pull", encoded(pull_frames()), check_pull),
        Case("aggregate", "Aggregate", encoded(aggregate_frames(1)), check_aggregate),
        Case("bad_sparsity", "Select", encoded(select_frames(1.5)), INVALID),
        Case("bad_pull_mode", "Pull", encoded(pull_frames(mode=99)), INVALID),
        Case("zero_examples", "Aggregate", encoded(aggregate_frames(0)), INVALID),
        Case("random_bytes", "Push", [b"\xff\x00garbage\x17" * 5], INVALID),
        Case("cut_short", "Select", encoded(good_select[:-1]), INVALID),
        Case("unheld_initial", "Select", encoded(select_frames(0.5, start=unheld)), PRECONDITION),
    ]
    table = [Case(c.name, c.rpc, c.frames, c.expect, security.metadata) for c in table]
    if security.secured:
        # Good calls but for their authorization: a small share of the mix.
        no_token, _, wrong_token, *_ = security.bad_auth()
        table.append(Case("no_token", "Select", encoded(good_select), UNAUTHENTICATED, no_token))
        table.append(Case("wrong_token", "Aggregate", table[3].frames, UNAUTHENTICATED, wrong_token))
    return table


def run_case(channel: grpc.Channel, case: Case) -> None:
    method = channel.stream_stream(
        f"/{SERVICE_NAME}/{case.rpc}", request_serializer=None, response_deserializer=None
    )
    parse = RESPONSES[case.rpc].FromString
    failed: grpc.RpcError | None = None
    try:
        replies = [
            parse(raw) for raw in method(iter(case.frames), timeout=CALL_TIMEOUT, metadata=case.metadata)
        ]
    except grpc.RpcError as err:
        failed = err
    if failed is not None:
        assert failed.code() == case.expect, f"{case.name}: {failed.code()} {failed.details()}"
        return
    assert callable(case.expect), f"{case.name}: succeeded, expected {case.expect}"
    case.expect(replies)


def calls_by_code(registry: CollectorRegistry) -> collections.Counter[str]:
    """paramsel_calls_total on ``registry``, by status code."""
    counts: collections.Counter[str] = collections.Counter()
    for family in registry.collect():
        if family.name == "paramsel_calls":
            for sample in family.samples:
                if sample.name == "paramsel_calls_total":
                    counts[sample.labels["code"]] += int(sample.value)
    return counts


def start(secured: Security) -> RunningServer:
    """The server as ``paramsel serve`` builds it (TLS and token included when secured), its calls
    counted on a registry of its own."""
    return start_server(secured.server_config())


@pytest.fixture(params=CONFIGS)
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Security:
    return security(request.param, tmp_path)


@pytest.mark.timeout(900)  # MIN_CALLS take ~5 s on 2 idle cores: the limit only catches a hang
def test_soak_mixed_good_and_bad_calls(secured: Security, tmp_path: Path) -> None:
    with server_logs(tmp_path / "server.log") as log:
        soak(secured)
    if secured.token is not None:
        assert secured.token not in log.read_text(), "the bearer token was logged"


def soak(secured: Security) -> None:
    soaked = start(secured)
    registry = soaked.registry
    assert calls_by_code(registry).total() == 0  # a registry of its own: only this soak's calls
    table = cases(secured)
    refused_per_round = sum(case.expect == UNAUTHENTICATED for case in table)
    try:
        with secured.channel(soaked.target) as warm:
            for case in table:  # every path once, so that one-time allocations land before the baseline
                run_case(warm, case)
        lock = threading.Lock()
        issued = 0
        refused = 0
        samples: list[tuple[int, int]] = []
        failures: list[str] = []
        deadline = time.monotonic() + WALL_SECONDS

        def worker(offset: int) -> None:
            nonlocal issued, refused
            with secured.channel(soaked.target) as channel:
                while not failures:
                    with lock:
                        index = issued
                        if index >= TOTAL_CALLS or (index >= MIN_CALLS and time.monotonic() >= deadline):
                            return
                        issued += 1
                        case = table[(index + offset) % len(table)]
                        refused += case.expect == UNAUTHENTICATED
                    try:
                        run_case(channel, case)
                    except AssertionError as error:
                        failures.append(str(error))
                        return
                    if index % 8 == 0:
                        sample = rss()
                        with lock:
                            samples.append((index, sample))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:5]
        done = issued  # between MIN_CALLS and TOTAL_CALLS, depending on the machine's speed only
        samples.sort()
        quarter = max(len(samples) // 4, 1)
        first = sum(s for _, s in samples[:quarter]) / quarter
        last = sum(s for _, s in samples[-quarter:]) / quarter
        assert last - first < RSS_GROWTH_BOUND, f"RSS grew {(last - first) / 2**20:.1f} MiB over {done} calls"
        with secured.channel(soaked.target) as channel:
            assert_serving(channel)
            for case in table:
                run_case(channel, case)
            assert_serving(channel)
        # The interceptor saw every call once (warm-up, soak and the final round), refusals included,
        # and answered none with UNKNOWN or INTERNAL.
        counts = calls_by_code(registry)
        assert counts.total() == done + 2 * len(table), counts
        assert counts["UNAUTHENTICATED"] == refused + 2 * refused_per_round, counts
        assert counts["UNKNOWN"] == counts["INTERNAL"] == 0, counts
        assert registry.get_sample_value("paramsel_inflight_bytes") == 0
    finally:
        soaked.stop(0)
