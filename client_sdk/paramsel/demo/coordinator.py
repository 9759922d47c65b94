"""The demo's coordinator: collects each round's selections, aggregates them through the paramsel
service, hands the aggregate back, and gathers the clients' figures.

Rounds are numbered from 1 in each run; a run's round ``r`` accepts one submission per client while it
is the run's current round, and is aggregated (``paramsel.client.aggregate_sparse_coo`` or
``aggregate_layers``, weighted by the clients' example counts, contributions in client order) as soon
as the last client submits. ``Fetch`` blocks until then.

Top-k runs travel as compact payloads: a submission is expanded to FL4Health's packed list
(``unpack_compact``) for the aggregation, and the aggregate goes back compactly (``pack_compact``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from paramsel.demo.protocol import (
    CHANNEL_OPTIONS,
    CONFIG,
    FETCH,
    PROGRESS,
    REPORT,
    SERVICE,
    SUBMIT,
    DemoConfig,
    Message,
    ProgressInfo,
    compact_arrays,
    compact_payload,
    decode,
    encode,
)
from paramsel.demo.report import ClientReport, build_figures, format_table, summary, write_outputs

NDArrays = list[np.ndarray]
Results = list[tuple[NDArrays, int]]
Aggregator = Callable[[str, Results], NDArrays]
"""``(layout, [(packed list, num_examples) per client]) -> aggregated packed list``."""

ROUND_TIMEOUT_SECONDS = 600.0
"""How long a Fetch waits for the other clients' submissions at most."""


class ProtocolError(Exception):
    """A refused call: the gRPC status it fails with and why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Round:
    submissions: dict[int, tuple[NDArrays, int]] = field(default_factory=dict)
    """Per client, its packed list (expanded, for a compact run) and example count."""
    aggregate: NDArrays | None = None
    """The payload Fetch answers with: the aggregated packed list, or its compact payload."""
    error: str | None = None


def _expand(payload: NDArrays) -> NDArrays:
    """FL4Health's packed list of a submitted compact payload; ProtocolError when it is not one."""
    from paramsel.client import ParamselError, unpack_compact

    try:
        return unpack_compact(compact_payload(payload))
    except (ValueError, ParamselError) as error:
        raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed compact payload: {error}") from None


def _compact(aggregate: NDArrays) -> NDArrays:
    """The aggregated packed list as the compact payload Fetch answers with."""
    from paramsel.client import pack_compact

    return compact_arrays(pack_compact(aggregate))


def service_aggregator(target: str | None) -> Aggregator:
    """Aggregation through the paramsel service at ``target`` (else ``$PARAMSEL_TARGET``, else embedded)."""
    from paramsel.client import aggregate_layers, aggregate_sparse_coo

    def aggregate(layout: str, results: Results) -> NDArrays:
        if layout == "sparse_coo":
            return aggregate_sparse_coo(results, weighted=True, target=target)
        return aggregate_layers(results, weighted=True, target=target)

    return aggregate


class Coordinator:
    """The protocol's state, independent of gRPC: every method is one call, ProtocolError refuses it."""

    def __init__(
        self, config: DemoConfig, aggregate: Aggregator, *, round_timeout: float = ROUND_TIMEOUT_SECONDS
    ) -> None:
        self.config = config
        self._aggregate = aggregate
        self._round_timeout = round_timeout
        self._cond = threading.Condition()
        rounds = range(1, config.rounds + 1)
        self._rounds = {(run, r): _Round() for run in config.runs for r in rounds}
        self._current = dict.fromkeys(config.runs, 1)
        self._reports: dict[tuple[str, int], dict[int, ClientReport]] = {
            (run, r): {} for run in config.runs for r in range(config.rounds + 1)
        }
        self._completed: list[tuple[str, int]] = []
        """Rounds (>= 1) every client has reported on, in the order they completed."""

    # -- checks shared by the calls ---------------------------------------------------------------

    def _check_run(self, run: str) -> None:
        if run not in self.config.runs:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"unknown run {run!r}; this demo runs {', '.join(self.config.runs)}",
            )

    def _check_client(self, client: int) -> None:
        if not 0 <= client < self.config.clients:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"client index {client} is outside [0, {self.config.clients}) for this {self.config.clients}-client demo",
            )

    def _check_round(self, round_number: int, *, first: int = 1) -> None:
        if not first <= round_number <= self.config.rounds:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"round {round_number} is outside [{first}, {self.config.rounds}]",
            )

    # -- the calls --------------------------------------------------------------------------------

    def submit(self, run: str, round_number: int, client: int, num_examples: int, payload: NDArrays) -> None:
        """Accepts client ``client``'s payload for ``round_number`` of ``run`` (a compact payload for a
        top-k run, else a packed list); the last one in triggers the aggregation (through the service)
        before this call returns."""
        self._check_run(run)
        self._check_client(client)
        self._check_round(round_number)
        if num_examples <= 0:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT, f"num_examples must be > 0, got {num_examples}"
            )
        if not payload:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "the payload is empty")
        packed = _expand(payload) if self.config.compact(run) else payload
        with self._cond:
            current = self._current[run]
            if round_number != current:
                state = "is already aggregated" if round_number < current else "has not started"
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"refused: client {client} submitted round {round_number} of run {run!r}, which {state}; "
                    f"the run is at round {current}",
                )
            entry = self._rounds[(run, round_number)]
            if client in entry.submissions:
                raise ProtocolError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"refused: client {client} already submitted round {round_number} of run {run!r}",
                )
            entry.submissions[client] = (packed, num_examples)
            if len(entry.submissions) < self.config.clients:
                return
            results = [entry.submissions[c] for c in range(self.config.clients)]
        try:
            aggregate = self._aggregate(self.config.layout(run), results)
            if self.config.compact(run):
                aggregate = _compact(aggregate)
        except Exception as error:
            message = f"aggregating round {round_number} of run {run!r} through the service failed: {error}"
            with self._cond:
                entry.error = message
                self._cond.notify_all()
            raise ProtocolError(grpc.StatusCode.ABORTED, message) from error
        with self._cond:
            entry.aggregate = aggregate
            entry.submissions.clear()  # the packed lists are no longer needed
            self._current[run] = round_number + 1
            self._cond.notify_all()

    def fetch(self, run: str, round_number: int, timeout: float | None = None) -> NDArrays:
        """The aggregate of ``round_number`` of ``run`` (compact for a top-k run), once every client has
        submitted it."""
        self._check_run(run)
        self._check_round(round_number)
        wait = self._round_timeout if timeout is None else min(timeout, self._round_timeout)
        entry = self._rounds[(run, round_number)]
        with self._cond:
            if not self._cond.wait_for(lambda: entry.aggregate is not None or entry.error is not None, wait):
                raise ProtocolError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"round {round_number} of run {run!r}: {len(entry.submissions)} of "
                    f"{self.config.clients} clients submitted within {wait:g} s",
                )
            if entry.error is not None:
                raise ProtocolError(grpc.StatusCode.ABORTED, entry.error)
            assert entry.aggregate is not None
            return entry.aggregate

    def report(self, run: str, round_number: int, client: int, report: ClientReport) -> None:
        """A client's figures after a round (round 0: the initial model)."""
        self._check_run(run)
        self._check_client(client)
        self._check_round(round_number, first=0)
        if not 0.0 <= report.accuracy <= 1.0:
            raise ProtocolError(
                grpc.StatusCode.INVALID_ARGUMENT, f"accuracy must be in [0, 1], got {report.accuracy}"
            )
        counts = (
            report.bytes_sent,
            report.bytes_received,
            report.fl4health_list_bytes_sent,
            report.fl4health_list_bytes_received,
        )
        if min(counts) < 0:
            raise ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "byte counts must be >= 0")
        with self._cond:
            if round_number >= 1 and self._rounds[(run, round_number)].aggregate is None:
                raise ProtocolError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"refused: round {round_number} of run {run!r} has not been aggregated yet",
                )
            got = self._reports[(run, round_number)]
            if client in got:
                raise ProtocolError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"refused: client {client} already reported round {round_number} of run {run!r}",
                )
            got[client] = report
            if round_number >= 1 and len(got) == self.config.clients:
                self._completed.append((run, round_number))
            self._cond.notify_all()

    @property
    def total_rounds(self) -> int:
        return self.config.rounds * len(self.config.runs)

    def _complete(self) -> bool:
        return all(len(got) == self.config.clients for got in self._reports.values())

    def progress(self, done: int, wait: float) -> ProgressInfo:
        """Waits up to ``wait`` s for more than ``done`` completed rounds; the count and the latest one."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._completed) > done or self._complete(), max(0.0, wait))
            count = len(self._completed)
            if not count:
                return ProgressInfo(0, self.total_rounds, "", 0, 0.0)
            run, round_number = self._completed[-1]
            got = self._reports[(run, round_number)].values()
            accuracy = sum(r.accuracy for r in got) / len(got)
            return ProgressInfo(count, self.total_rounds, run, round_number, accuracy)

    def wait_complete(self, timeout: float) -> bool:
        """True once every client has reported every round of every run."""
        with self._cond:
            return self._cond.wait_for(self._complete, timeout)

    def completed_round(self, index: int) -> tuple[str, int, list[ClientReport]]:
        with self._cond:
            run, round_number = self._completed[index]
            got = self._reports[(run, round_number)]
            return run, round_number, [got[c] for c in range(self.config.clients)]

    def figures(self) -> dict[str, Any]:
        with self._cond:
            if not self._complete():
                raise ProtocolError(grpc.StatusCode.FAILED_PRECONDITION, "the demo has not finished")
            return build_figures(self.config, self._reports)


def _handler(call: Callable[[Message, grpc.ServicerContext], Message]) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A unary handler taking and returning Messages; refusals and malformed messages become statuses."""

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return encode(call(decode(request), context))
        except ProtocolError as error:
            context.abort(error.code, error.message)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed message: {error}")

    return grpc.unary_unary_rpc_method_handler(handle)


class CoordinatorServer:
    """The Coordinator served on ``host:port`` (0 picks a free port) with gRPC's generic handlers."""

    def __init__(self, coordinator: Coordinator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.coordinator = coordinator
        workers = 2 * coordinator.config.clients + 8  # every client may block in Fetch at once
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=CHANNEL_OPTIONS)
        handlers = {
            CONFIG: _handler(self._config),
            SUBMIT: _handler(self._submit),
            FETCH: _handler(self._fetch),
            REPORT: _handler(self._report),
            PROGRESS: _handler(self._progress),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.host = host
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the coordinator to {host}:{port}")

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> CoordinatorServer:
        self._server.start()
        return self

    def stop(self, grace: float | None = None) -> None:
        self._server.stop(grace).wait()

    def _config(self, request: Message, context: grpc.ServicerContext) -> Message:
        return self.coordinator.config.to_message()

    def _submit(self, request: Message, context: grpc.ServicerContext) -> Message:
        self.coordinator.submit(
            request.get_str("run"),
            request.get_int("round"),
            request.get_int("client"),
            request.get_int("num_examples"),
            request.arrays,
        )
        return Message()

    def _fetch(self, request: Message, context: grpc.ServicerContext) -> Message:
        remaining = context.time_remaining()
        aggregate = self.coordinator.fetch(request.get_str("run"), request.get_int("round"), remaining)
        return Message(arrays=list(aggregate))

    def _report(self, request: Message, context: grpc.ServicerContext) -> Message:
        report = ClientReport(
            accuracy=request.get_float("accuracy"),
            loss=request.get_float("loss"),
            train_loss=request.get_float("train_loss"),
            bytes_sent=request.get_int("bytes_sent"),
            bytes_received=request.get_int("bytes_received"),
            fl4health_list_bytes_sent=request.get_int("fl4health_list_bytes_sent"),
            fl4health_list_bytes_received=request.get_int("fl4health_list_bytes_received"),
        )
        self.coordinator.report(
            request.get_str("run"), request.get_int("round"), request.get_int("client"), report
        )
        return Message()

    def _progress(self, request: Message, context: grpc.ServicerContext) -> Message:
        wait = min(request.get_float("wait"), 30.0)
        info = self.coordinator.progress(request.get_int("done"), wait)
        return Message.of(
            {
                "done": info.done,
                "total": info.total,
                "run": info.run,
                "round": info.round,
                "accuracy": info.accuracy,
            }
        )


def run_coordinator(
    config: DemoConfig,
    *,
    host: str,
    port: int,
    target: str | None,
    out: Path,
    timeout: float,
    stream: TextIO = sys.stdout,
) -> int:
    """Serves the demo until every client has reported every round, then writes the figures, the plot
    and the table; 1 if it does not finish within ``timeout`` seconds."""
    coordinator = Coordinator(config, service_aggregator(target))
    server = CoordinatorServer(coordinator, host, port).start()
    print(f"paramsel demo coordinator on {server.target}", file=stream, flush=True)
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while done < coordinator.total_rounds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                print(
                    f"paramsel demo coordinator: not finished after {timeout:g} s "
                    f"({done} of {coordinator.total_rounds} rounds complete)",
                    file=sys.stderr,
                )
                return 1
            info = coordinator.progress(done, min(remaining, 5.0))
            for index in range(done, info.done):
                _print_round(config, *coordinator.completed_round(index), stream=stream)
            done = info.done
        coordinator.wait_complete(max(0.0, deadline - time.monotonic()))
        figures = coordinator.figures()
        print(format_table(figures), file=stream)
        print(summary(figures), file=stream, flush=True)
        try:
            figures_path, plot_path = write_outputs(figures, out)
        except OSError as error:
            print(f"paramsel demo-coordinator: cannot write the outputs to {out}: {error}", file=sys.stderr)
            return 1
        print(f"figures: {figures_path}\nplot: {plot_path}", file=stream, flush=True)
        return 0
    finally:
        server.stop(grace=5.0)


def _print_round(
    config: DemoConfig, run: str, round_number: int, reports: Sequence[ClientReport], *, stream: TextIO
) -> None:
    accuracy = sum(r.accuracy for r in reports) / len(reports)
    sent = sum(r.bytes_sent for r in reports) / len(reports)
    received = sum(r.bytes_received for r in reports) / len(reports)
    print(
        f"{run} round {round_number}/{config.rounds}: accuracy {accuracy:.4f}, "
        f"{sent:,.0f} B sent and {received:,.0f} B received per client",
        file=stream,
        flush=True,
    )
