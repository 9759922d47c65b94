"""The demo's figures: per round and run, held-out accuracy, loss and the bytes every client exchanged.

Bytes are those of the payloads a ClientApp actually sends to the ServerApp (its selection, in the train
reply) and receives from it (the aggregate, in the evaluate message), ``wire.payload_bytes``: for a top-k
run the length of paramsel's compact payload (values, Elias-Fano or bitmap positions, framing); for a
whole-layer run the sum of ``nbytes`` over the arrays of FL4Health's packed list (layers and the names);
for the dense run the model's arrays. Flower's own framing of the messages is not counted. Beside them,
``fl4health_list_bytes_sent`` and ``fl4health_list_bytes_received`` count the same selections as
FL4Health's packed lists (values, int64 COO indices, shapes, names), which is what a top-k run would
exchange without paramsel's encoding.

The figures hold nothing that varies between runs with the same seed (no timings), so two such runs
write identical ``figures.json`` files.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paramsel_demo.settings import COMPACT_PAYLOAD, DENSE_RUN, DemoSettings

FIGURES_FILE = "figures.json"
PLOT_FILE = "accuracy_vs_bytes.png"
PROGRESS_FILE = "progress.jsonl"
BYTES_COUNTED = (
    "bytes of the payload a ClientApp sends to the ServerApp and receives from it (the aggregate): for "
    "top-k runs the length of paramsel's compact payload (values, Elias-Fano or bitmap positions, "
    "framing), for whole-layer runs the sum of nbytes of the arrays of the FL4Health packed list (layers, "
    "names), for the dense run the model's arrays; Flower's message framing not counted. "
    "fl4health_list_bytes_*: the same selections as FL4Health's packed lists (values, int64 COO indices, "
    "shapes, names)"
)


@dataclass(frozen=True)
class ClientReport:
    """One client's figures after one round (round 0: the initial model, nothing exchanged)."""

    accuracy: float
    loss: float
    train_loss: float
    bytes_sent: int
    """Bytes of the payload sent to the ServerApp (compact, or the arrays of a packed list or state)."""
    bytes_received: int
    """Bytes of the payload received from the ServerApp (the aggregate)."""
    fl4health_list_bytes_sent: int
    """Bytes of the same selection as FL4Health's packed list."""
    fl4health_list_bytes_received: int
    """Bytes of the same aggregate as FL4Health's packed list."""


Reports = Mapping[tuple[str, int], Mapping[int, ClientReport]]


def _mean(values: list[float] | list[int]) -> float:
    return sum(values) / len(values)


def build_figures(settings: DemoSettings, reports: Reports) -> dict[str, Any]:
    """The JSON-ready figures of a complete demo: every run, every round, every client."""
    runs: dict[str, Any] = {}
    clients = range(settings.clients)
    for run in settings.runs:
        initial = [reports[(run, 0)][c] for c in clients]
        cumulative = [0] * settings.clients
        rounds = []
        for round_number in range(1, settings.rounds + 1):
            got = [reports[(run, round_number)][c] for c in clients]
            for c, report in enumerate(got):
                cumulative[c] += report.bytes_sent + report.bytes_received
            rounds.append(
                {
                    "round": round_number,
                    "accuracy": _mean([r.accuracy for r in got]),
                    "loss": _mean([r.loss for r in got]),
                    "train_loss": _mean([r.train_loss for r in got]),
                    "bytes_sent": _mean([r.bytes_sent for r in got]),
                    "bytes_received": _mean([r.bytes_received for r in got]),
                    "cumulative_bytes": _mean(cumulative),
                    "fl4health_list_bytes_sent": _mean([r.fl4health_list_bytes_sent for r in got]),
                    "fl4health_list_bytes_received": _mean([r.fl4health_list_bytes_received for r in got]),
                    "accuracy_per_client": [r.accuracy for r in got],
                    "loss_per_client": [r.loss for r in got],
                    "bytes_sent_per_client": [r.bytes_sent for r in got],
                    "bytes_received_per_client": [r.bytes_received for r in got],
                }
            )
        runs[run] = {
            "exchange": settings.describe(run),
            "layout": settings.layout(run),
            "payload": settings.payload(run),
            "initial": {
                "accuracy": _mean([r.accuracy for r in initial]),
                "loss": _mean([r.loss for r in initial]),
            },
            "rounds": rounds,
        }
    return {"config": dataclasses.asdict(settings), "bytes_counted": BYTES_COUNTED, "runs": runs}


def format_table(figures: Mapping[str, Any]) -> str:
    """One row per round: accuracy, loss, and mean bytes sent / received per client, for every run."""
    runs: Mapping[str, Any] = figures["runs"]
    names = list(runs)
    cell = "{:>8} {:>7} {:>9} {:>9}"
    lines = ["runs: " + "; ".join(f"{name} = {runs[name]['exchange']}" for name in names)]
    lines += _bytes_legend(runs)
    lines.append(f"{'':>5} | " + " | ".join(f"{name:^35}" for name in names))
    lines.append(
        f"{'round':>5} | " + " | ".join(cell.format("accuracy", "loss", "sent B", "recv B") for _ in names)
    )
    lines.append("-" * len(lines[-1]))
    lines.append(
        f"{0:>5} | "
        + " | ".join(
            cell.format(f"{runs[n]['initial']['accuracy']:.4f}", f"{runs[n]['initial']['loss']:.4f}", 0, 0)
            for n in names
        )
    )
    for index in range(len(runs[names[0]]["rounds"])):
        row = [runs[n]["rounds"][index] for n in names]
        lines.append(
            f"{row[0]['round']:>5} | "
            + " | ".join(
                cell.format(
                    f"{r['accuracy']:.4f}",
                    f"{r['loss']:.4f}",
                    f"{r['bytes_sent']:,.0f}",
                    f"{r['bytes_received']:,.0f}",
                )
                for r in row
            )
        )
    lines.append("-" * len(lines[-2]))
    totals = []
    for n in names:
        sent, received = _totals(runs[n])
        totals.append(cell.format("", "", f"{sent:,.0f}", f"{received:,.0f}"))
    lines.append(f"{'total':>5} | " + " | ".join(totals))
    return "\n".join(lines)


def _totals(run: Mapping[str, Any], prefix: str = "") -> tuple[float, float]:
    """Total mean bytes per client sent and received over the run's rounds."""
    rounds = run["rounds"]
    return sum(r[f"{prefix}bytes_sent"] for r in rounds), sum(r[f"{prefix}bytes_received"] for r in rounds)


def _bytes_legend(runs: Mapping[str, Any]) -> list[str]:
    """What the byte columns count, and what FL4Health's packed lists would take for any compact run."""
    kinds = "; ".join(f"{name}: {run['payload']}" for name, run in runs.items())
    lines = [f"bytes: mean per client of the payloads sent to / received from the ServerApp ({kinds})"]
    for name, run in runs.items():
        if run["payload"] == COMPACT_PAYLOAD:
            sent, received = _totals(run, "fl4health_list_")
            lines.append(
                f"       {name} as FL4Health's packed lists (values, int64 COO indices, shapes, names): "
                f"{sent:,.0f} B sent, {received:,.0f} B received in all"
            )
    return lines


def summary(figures: Mapping[str, Any]) -> str:
    """The final accuracy and the total bytes per client of every run, one line each."""
    lines = []
    for name, run in figures["runs"].items():
        last = run["rounds"][-1]
        label = "dense FedAvg" if name == DENSE_RUN else f"{name}: {run['exchange']}"
        line = (
            f"{label}: final held-out accuracy {last['accuracy']:.4f}, "
            f"{last['cumulative_bytes']:,.0f} bytes exchanged per client"
        )
        if run["payload"] == COMPACT_PAYLOAD:
            line += f" (FL4Health's packed lists: {sum(_totals(run, 'fl4health_list_')):,.0f})"
        lines.append(line)
    return "\n".join(lines)


def plot(figures: Mapping[str, Any], path: Path) -> None:
    """Accuracy against cumulative bytes (sent + received, mean per client) for every run, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    config = figures["config"]
    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run in figures["runs"].items():
        xs = [0.0] + [r["cumulative_bytes"] / 1024 for r in run["rounds"]]
        ys = [run["initial"]["accuracy"]] + [r["accuracy"] for r in run["rounds"]]
        label = "dense FedAvg" if name == DENSE_RUN else f"{name}: {run['exchange']}"
        ax.plot(xs, ys, marker="o", markersize=3.5, label=label)
    ax.set_xlabel("cumulative KiB exchanged per client (payloads sent + received)")
    ax.set_ylabel("held-out accuracy (mean over clients)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(
        f"paramsel demo: {config['clients']} clients, {config['rounds']} rounds, "
        f"non-IID digits (skew {config['skew']:g}), seed {config['seed']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


def write_outputs(figures: Mapping[str, Any], out: Path) -> tuple[Path, Path]:
    """Writes ``figures.json`` and ``accuracy_vs_bytes.png`` into ``out`` (created if missing)."""
    out.mkdir(parents=True, exist_ok=True)
    figures_path, plot_path = out / FIGURES_FILE, out / PLOT_FILE
    figures_path.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    plot(figures, plot_path)
    return figures_path, plot_path


def append_progress(out: Path, record: Mapping[str, Any]) -> None:
    """Appends one JSON line to ``out/progress.jsonl``: what ``paramsel-demo`` follows for its bar."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / PROGRESS_FILE).open("a", encoding="utf-8") as stream:
        stream.write(json.dumps({**record, "time": time.time()}) + "\n")
        stream.flush()


def read_progress(out: Path) -> list[dict[str, Any]]:
    """The complete lines of ``out/progress.jsonl`` so far (none when it does not exist yet)."""
    try:
        text = (out / PROGRESS_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n") and line.strip():
            records.append(json.loads(line))
    return records
