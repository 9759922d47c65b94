"""The ServerApp: the sparse run, whose strategy aggregates through the paramsel service, then dense FedAvg.

Both runs use every node every round and the same round: a ``train`` message with the run's config only
(the nodes hold their models between messages), the replies aggregated, then an ``evaluate`` message
carrying the aggregate. :class:`ParamselFedAvg` expands the compact payloads (``unpack_compact``),
aggregates them with FL4Health's rule through the service's Aggregate rpc (``aggregate_sparse_coo``, or
``aggregate_layers`` for whole layers; weighted by the clients' example counts) and sends the aggregate
back compactly (``pack_compact``). :class:`DenseFedAvg` is Flower's FedAvg on the whole model.

The ServerApp checks what it gets and raises when something is wrong (a client's error, a missing reply,
a failed aggregation, a figure out of range), so that the run ends ``finished:failed``. When the run
config names an ``out-dir``, it appends a line per completed round to ``progress.jsonl`` there, and at
the end writes ``figures.json`` and ``accuracy_vs_bytes.png``.

With the run config's ``compare`` set (``paramsel-demo --compare``), :func:`compare_main` runs every
exchange of :mod:`paramsel_demo.compare` for every seed instead, one after the other, with the same
rounds: sparse values through :class:`ParamselFedAvg`, dense FedAvg through :class:`DenseFedAvg`, sparse
updates with error feedback through :class:`UpdateFedAvg` (the per-coordinate average); it writes
``compare.json``, ``compare.md`` and ``compare.png``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, MetricRecordValues, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from paramsel_demo.compare import (
    DENSE,
    UPDATES,
    CompareSettings,
    Method,
    RoundRecord,
    build_compare_figures,
    run_name,
    write_compare,
)
from paramsel_demo.figures import ClientReport, append_progress, build_figures, write_outputs
from paramsel_demo.settings import SPARSE_RUN, DemoSettings, run_config_float, run_config_str
from paramsel_demo.wire import (
    METRICS,
    PAYLOAD,
    NDArrays,
    arrays_record,
    compact_arrays,
    compact_payload,
    record_arrays,
)

app = ServerApp()


class DemoRunError(RuntimeError):
    """The run cannot go on: a client failed, a reply is missing or wrong, or an aggregation failed."""


def _number(metrics: MetricRecord, key: str) -> float:
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DemoRunError(f"a reply's metrics have no number {key!r}: {dict(metrics)}")
    return float(value)


def _count(metrics: MetricRecord, key: str) -> int:
    value = _number(metrics, key)
    if value < 0 or value != int(value):
        raise DemoRunError(f"a reply's {key!r} must be a count, got {value}")
    return int(value)


def _reason(reason: str) -> str:
    """The gist of a ClientApp's error: the message of the exception it raised, without the tracebacks
    the Simulation Engine wraps it in."""
    marker = "Message: "
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    said = [line.split(marker, 1)[1] for line in lines if marker in line]
    gist = said[-1] if said else (lines[-1] if lines else reason)
    return gist.removesuffix("'>")


class RoundSink(Protocol):
    """What the strategies hand every round's checked replies to."""

    def train(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None: ...

    def evaluate(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None: ...


class Recorder:
    """Every client's figures of every round of every run, as the replies come in."""

    def __init__(self, settings: DemoSettings, out: Path | None) -> None:
        self.settings = settings
        self.out = out
        self.reports: dict[tuple[str, int], dict[int, ClientReport]] = {}
        self._train: dict[tuple[str, int], dict[int, MetricRecord]] = {}
        self.completed = 0

    @property
    def total_rounds(self) -> int:
        return self.settings.rounds * len(self.settings.runs)

    def progress(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            append_progress(self.out, record)

    def train(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None:
        self._train[(run, round_number)] = replies
        if round_number == 1:
            initial = {}
            for client, metrics in replies.items():
                accuracy, loss = _number(metrics, "initial-accuracy"), _number(metrics, "initial-loss")
                initial[client] = ClientReport(accuracy, loss, 0.0, 0, 0, 0, 0)
            self.reports[(run, 0)] = initial

    def evaluate(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None:
        trained = self._train.pop((run, round_number))
        reports = {}
        for client, metrics in replies.items():
            report = ClientReport(
                accuracy=_number(metrics, "accuracy"),
                loss=_number(metrics, "loss"),
                train_loss=_number(trained[client], "train-loss"),
                bytes_sent=_count(trained[client], "bytes-sent"),
                bytes_received=_count(metrics, "bytes-received"),
                fl4health_list_bytes_sent=_count(trained[client], "fl4health-list-bytes-sent"),
                fl4health_list_bytes_received=_count(metrics, "fl4health-list-bytes-received"),
            )
            if not 0.0 <= report.accuracy <= 1.0:
                raise DemoRunError(f"client {client}: accuracy {report.accuracy} is not in [0, 1]")
            reports[client] = report
        self.reports[(run, round_number)] = reports
        self.completed += 1
        accuracy = sum(r.accuracy for r in reports.values()) / len(reports)
        sent = sum(r.bytes_sent for r in reports.values()) / len(reports)
        self.progress(
            {
                "event": "round",
                "done": self.completed,
                "total": self.total_rounds,
                "run": run,
                "round": round_number,
                "accuracy": accuracy,
                "bytes_sent": sent,
            }
        )

    def figures(self) -> dict[str, Any]:
        for run in self.settings.runs:
            for round_number in range(self.settings.rounds + 1):
                got = self.reports.get((run, round_number), {})
                if sorted(got) != list(range(self.settings.clients)):
                    raise DemoRunError(
                        f"round {round_number} of run {run!r}: reports from clients {sorted(got)}"
                    )
        return build_figures(self.settings, self.reports)


def _mean_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """The mean over the clients of the replies' losses and accuracy (what Flower logs per round)."""
    means: dict[str, MetricRecordValues] = {}
    for key in ("train-loss", "accuracy", "loss"):
        values = [
            _number(r.metric_records[METRICS], key) for r in records if key in r.metric_records[METRICS]
        ]
        if values:
            means[key] = sum(values) / len(values)
    return MetricRecord(means)


class _DemoRounds(FedAvg):
    """Every node every round; train messages carry the run's config only (the nodes keep their models);
    every reply is checked and recorded, and any failure raises :class:`DemoRunError`."""

    def __init__(self, settings: DemoSettings, run: str, recorder: RoundSink) -> None:
        clients = settings.clients
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=clients,
            min_evaluate_nodes=clients,
            min_available_nodes=clients,
            arrayrecord_key=PAYLOAD,
            train_metrics_aggr_fn=_mean_metrics,
            evaluate_metrics_aggr_fn=_mean_metrics,
        )
        self.settings = settings
        self.run = run
        self.recorder = recorder

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return super().configure_train(server_round, ArrayRecord(), config, grid)

    def _checked(self, server_round: int, replies: Iterable[Message], phase: str) -> dict[int, Message]:
        """The replies by client index: one from every client, none an error, else DemoRunError."""
        where = f"{phase} of round {server_round} of run {self.run!r}"
        replies = list(replies)
        errors = [m for m in replies if m.has_error()]
        if errors:
            reasons: dict[str, list[int]] = {}
            for message in errors:
                reasons.setdefault(_reason(message.error.reason or "no reason given"), []).append(
                    message.metadata.src_node_id
                )
            said = "; ".join(
                f"{reason} (nodes {', '.join(map(str, nodes))})" for reason, nodes in reasons.items()
            )
            raise DemoRunError(f"{where}: {len(errors)} of {len(replies)} clients failed: {said}")
        by_client: dict[int, Message] = {}
        for message in replies:
            client = _count(message.content.metric_records[METRICS], "client")
            if client in by_client:
                raise DemoRunError(f"{where}: two replies from client {client}")
            by_client[client] = message
        if sorted(by_client) != list(range(self.settings.clients)):
            raise DemoRunError(
                f"{where}: replies from clients {sorted(by_client)} of {self.settings.clients} "
                "(the others did not answer in time)"
            )
        return dict(sorted(by_client.items()))

    def _train_replies(self, server_round: int, replies: Iterable[Message]) -> dict[int, Message]:
        checked = self._checked(server_round, replies, "training")
        self.recorder.train(
            self.run, server_round, {c: m.content.metric_records[METRICS] for c, m in checked.items()}
        )
        return checked

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        checked = self._checked(server_round, replies, "evaluation")
        self.recorder.evaluate(
            self.run, server_round, {c: m.content.metric_records[METRICS] for c, m in checked.items()}
        )
        return _mean_metrics([m.content for m in checked.values()], self.weighted_by_key)


class ParamselFedAvg(_DemoRounds):
    """The sparse run: FL4Health's aggregation of the clients' selections, computed by the paramsel
    service (``aggregate_sparse_coo`` for top-k payloads, ``aggregate_layers`` for whole layers)."""

    def __init__(self, settings: DemoSettings, run: str, recorder: RoundSink, target: str | None) -> None:
        super().__init__(settings, run, recorder)
        self.target = target
        self.layout = settings.layout(run)

    def _packed(self, payload: NDArrays) -> NDArrays:
        """FL4Health's packed list of a client's payload."""
        if self.layout != "sparse_coo":
            return payload
        from paramsel.client import unpack_compact

        return unpack_compact(compact_payload(payload))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        from paramsel.client import aggregate_layers, aggregate_sparse_coo, pack_compact

        checked = self._train_replies(server_round, replies)
        results: list[tuple[NDArrays, int]] = []
        for message in checked.values():
            payload = record_arrays(message.content.array_records[PAYLOAD])
            examples = _count(message.content.metric_records[METRICS], "num-examples")
            results.append((self._packed(payload), examples))
        try:
            if self.layout == "sparse_coo":
                aggregate = compact_arrays(
                    pack_compact(aggregate_sparse_coo(results, weighted=True, target=self.target))
                )
            else:
                aggregate = aggregate_layers(results, weighted=True, target=self.target)
        except Exception as error:
            raise DemoRunError(
                f"aggregating round {server_round} of run {self.run!r} through the paramsel service failed: {error}"
            ) from error
        metrics = _mean_metrics([m.content for m in checked.values()], self.weighted_by_key)
        return arrays_record(aggregate), metrics


class DenseFedAvg(_DemoRounds):
    """The dense baseline: Flower's FedAvg (weighted by example counts) on the whole model."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        checked = self._train_replies(server_round, replies)
        arrays, metrics = super().aggregate_train(server_round, list(checked.values()))
        if arrays is None:
            raise DemoRunError(f"FedAvg could not aggregate round {server_round} of run {self.run!r}")
        return arrays, metrics


class UpdateFedAvg(_DemoRounds):
    """Sparse updates with error feedback (``paramsel-demo --compare``): the clients' compact update
    payloads averaged per coordinate, weighted by their example counts, by the paramsel service
    (``aggregate_updates``), the average sent back as a compact payload in the method's value dtype."""

    def __init__(
        self, settings: DemoSettings, run: str, recorder: RoundSink, target: str | None, method: Method
    ) -> None:
        super().__init__(settings, run, recorder)
        self.target = target
        self.method = method

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        import torch

        from paramsel.client import aggregate_updates

        checked = self._train_replies(server_round, replies)
        results = [
            (
                compact_payload(record_arrays(message.content.array_records[PAYLOAD])),
                _count(message.content.metric_records[METRICS], "num-examples"),
            )
            for message in checked.values()
        ]
        value_dtype = torch.float16 if self.method.value_dtype == "float16" else None
        try:
            aggregate = aggregate_updates(results, weighted=True, value_dtype=value_dtype, target=self.target)
        except Exception as error:
            raise DemoRunError(
                f"aggregating round {server_round} of run {self.run!r} through the paramsel service failed: {error}"
            ) from error
        metrics = _mean_metrics([m.content for m in checked.values()], self.weighted_by_key)
        return arrays_record(compact_arrays(aggregate)), metrics


class CompareRecorder:
    """Every client's figures of every round of every run of a comparison, as the replies come in."""

    def __init__(self, settings: CompareSettings, out: Path | None) -> None:
        self.settings = settings
        self.out = out
        self.rounds: dict[str, dict[int, list[RoundRecord]]] = {}
        self.initial: dict[str, dict[int, float]] = {}
        self._train: dict[tuple[str, int], dict[int, MetricRecord]] = {}
        self.current: tuple[Method, int] | None = None
        self.done = 0

    def progress(self, record: dict[str, Any]) -> None:
        if self.out is not None:
            append_progress(self.out, record)

    def start(self, method: Method, seed: int) -> None:
        self.current = (method, seed)
        self.rounds.setdefault(method.key, {})[seed] = []

    def train(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None:
        assert self.current is not None
        method, seed = self.current
        self._train[(run, round_number)] = replies
        if round_number == 1:
            initial = [_number(m, "initial-accuracy") for m in replies.values()]
            self.initial.setdefault(method.key, {})[seed] = sum(initial) / len(initial)

    def evaluate(self, run: str, round_number: int, replies: dict[int, MetricRecord]) -> None:
        assert self.current is not None
        method, seed = self.current
        trained = self._train.pop((run, round_number))
        clients: dict[int, dict[str, float]] = {}
        for client, metrics in replies.items():
            figures = {
                "accuracy": _number(metrics, "accuracy"),
                "loss": _number(metrics, "loss"),
                "train_loss": _number(trained[client], "train-loss"),
                "sent": float(_count(trained[client], "wire-bytes-sent")),
                "received": float(_count(metrics, "wire-bytes-received")),
                "payload_sent": float(_count(trained[client], "bytes-sent")),
                "payload_received": float(_count(metrics, "bytes-received")),
            }
            if not 0.0 <= figures["accuracy"] <= 1.0:
                raise DemoRunError(f"client {client}: accuracy {figures['accuracy']} is not in [0, 1]")
            if figures["sent"] <= 0 or figures["received"] <= 0:
                raise DemoRunError(f"client {client}: no bytes counted in round {round_number} of {run!r}")
            clients[client] = figures
        self.rounds[method.key][seed].append(clients)
        accuracy = sum(c["accuracy"] for c in clients.values()) / len(clients)
        self.progress(
            {
                "event": "round",
                "run": run,
                "label": method.label,
                "seed": seed,
                "round": round_number,
                "done": self.done,
                "total": len(self.settings.runs),
                "accuracy": accuracy,
            }
        )
        if round_number == self.settings.demo.rounds:
            self.done += 1
            self.progress({"event": "run", "run": run, "done": self.done, "total": len(self.settings.runs)})

    def figures(self) -> dict[str, Any]:
        for method, seed in self.settings.runs:
            got = self.rounds.get(method.key, {}).get(seed, [])
            if len(got) != self.settings.demo.rounds:
                raise DemoRunError(f"run {run_name(method, seed)!r}: {len(got)} rounds recorded")
            for number, clients in enumerate(got, start=1):
                if sorted(clients) != list(range(self.settings.demo.clients)):
                    raise DemoRunError(
                        f"round {number} of run {run_name(method, seed)!r}: reports from clients {sorted(clients)}"
                    )
        return build_compare_figures(self.settings, self.rounds, self.initial)


def compare_main(grid: Grid, context: Context) -> None:
    """``paramsel-demo --compare``: every exchange for every seed, one after the other; writes
    compare.json, compare.md and compare.png; raises on any failure."""
    compare = CompareSettings.from_run_config(context.run_config)
    settings = compare.demo
    target = run_config_str(context.run_config, "paramsel-target") or None
    out_dir = run_config_str(context.run_config, "out-dir")
    timeout = run_config_float(context.run_config, "round-timeout", 600.0)
    out = Path(out_dir) if out_dir else None
    recorder = CompareRecorder(compare, out)
    recorder.progress({"event": "start", "done": 0, "total": len(compare.runs)})
    for method, seed in compare.runs:
        run = run_name(method, seed)
        recorder.start(method, seed)
        strategy: _DemoRounds
        if method.kind == DENSE:
            strategy = DenseFedAvg(settings, run, recorder)
        elif method.kind == UPDATES:
            strategy = UpdateFedAvg(settings, run, recorder, target, method)
        else:
            values = dataclasses.replace(
                settings, criterion="largest_magnitude_change", sparsity=method.sparsity
            )
            strategy = ParamselFedAvg(values, run, recorder, target)
        config = ConfigRecord({"run": run, "method": method.key, "run-seed": seed})
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=settings.rounds,
            timeout=timeout,
            train_config=config,
            evaluate_config=config,
        )
    figures = recorder.figures()
    if out is not None:
        write_compare(figures, out)
    recorder.progress({"event": "done", "done": recorder.done, "total": len(compare.runs)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the sparse run, then the dense one; writes the figures; raises on any failure. With the run
    config's ``compare`` set: the comparison instead (:func:`compare_main`)."""
    if context.run_config.get("compare") is True:
        compare_main(grid, context)
        return
    settings = DemoSettings.from_run_config(context.run_config)
    target = run_config_str(context.run_config, "paramsel-target") or None
    out_dir = run_config_str(context.run_config, "out-dir")
    timeout = run_config_float(context.run_config, "round-timeout", 600.0)
    out = Path(out_dir) if out_dir else None
    recorder = Recorder(settings, out)
    recorder.progress({"event": "start", "done": 0, "total": recorder.total_rounds})
    for run in settings.runs:
        strategy: _DemoRounds = (
            ParamselFedAvg(settings, run, recorder, target)
            if run == SPARSE_RUN
            else DenseFedAvg(settings, run, recorder)
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(),
            num_rounds=settings.rounds,
            timeout=timeout,
            train_config=ConfigRecord({"run": run}),
            evaluate_config=ConfigRecord({"run": run}),
        )
    figures = recorder.figures()
    if out is not None:
        write_outputs(figures, out)
    recorder.progress({"event": "done", "done": recorder.completed, "total": recorder.total_rounds})
