"""``paramsel-demo --compare``: eight exchanges side by side, each on the same data split, each repeated
for several seeds, in one Flower run.

The exchanges (:data:`METHODS`): dense FedAvg; FL4Health-compatible sparse *values* (the demo's
``largest_magnitude_change`` top-k through ``SparseCooParameterExchanger``, aggregated with FL4Health's
rule) at sparsity 0.1 and 0.01; sparse *updates* with error feedback (``SparseUpdateExchanger``, top-k
by |update|, averaged per coordinate) at 0.1 and 0.01, with float32 and float16 values; seeded random-k
updates with error feedback at 0.1. Every exchange runs for the seeds ``seed``, ``seed + 1``, ...: the
seed fixes the model's initialization and the batch order; the data split (held-out test split and the
clients' shards) is the one of ``seed`` for all of them.

This module holds the exchanges, the settings and the figures' arithmetic (pure, no Flower): what the
ServerApp records is turned into ``compare.json``, the table (``compare.md``) and the plot
(``compare.png``) here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paramsel_demo.settings import DemoSettings, RunConfig

COMPARE_FILE = "compare.json"
COMPARE_PLOT = "compare.png"
COMPARE_TABLE = "compare.md"
TARGET_ACCURACY = 0.9
"""The accuracy whose first round the table reports."""
LAST_ROUNDS = 3
"""The final accuracy of a run is the mean held-out accuracy of its last this many rounds."""
COMPARE_HIDDEN_UNITS = 256
"""The comparison's MLP: 64-256-10, 19,210 parameters (the demo's 64-32-10 has 2,410)."""
COMPARE_SEEDS = 3

DENSE = "dense"
VALUES = "values"
UPDATES = "updates"

BYTES_COUNTED = (
    "Bytes are counted per client and round: sent = the train reply's payload ArrayRecord, received = "
    "the evaluate message's payload ArrayRecord (the aggregate), each as Flower 1.41's Deployment Engine "
    "serializes it for the wire (the deflated ArrayRecord, Array and ArrayChunk objects, headers "
    "included; the arrays' data in .npy form). Not counted: the messages' metadata and metric/config "
    "records, the object ids and protobuf framing of Flower's PushObject/PullObject requests, gRPC and "
    "HTTP/2 framing. The runs use the Simulation Engine, which has no socket between the apps: these are "
    "the bytes the same messages would carry between machines, not bytes measured on a socket."
)


@dataclass(frozen=True)
class Method:
    """One exchange of the comparison."""

    key: str
    label: str
    kind: str
    """:data:`DENSE`, :data:`VALUES` (FL4Health-compatible sparse values) or :data:`UPDATES` (sparse
    updates with error feedback)."""
    sparsity: float = 1.0
    selection: str = "top_k"
    """Updates only: ``"top_k"`` (by |update|) or ``"random_k"`` (seeded, shared by a round's clients)."""
    value_dtype: str = "float32"
    """Updates only: the dtype the values travel in, both ways (``"float16"`` is lossy)."""


METHODS: tuple[Method, ...] = (
    Method(DENSE, "dense FedAvg", DENSE),
    Method("values-0.1", "FL4Health sparse values, top-k 0.1", VALUES, 0.1),
    Method("values-0.01", "FL4Health sparse values, top-k 0.01", VALUES, 0.01),
    Method("ef-top-k-0.1-f32", "EF updates, top-k 0.1, float32", UPDATES, 0.1),
    Method("ef-top-k-0.1-f16", "EF updates, top-k 0.1, float16", UPDATES, 0.1, value_dtype="float16"),
    Method("ef-top-k-0.01-f32", "EF updates, top-k 0.01, float32", UPDATES, 0.01),
    Method("ef-top-k-0.01-f16", "EF updates, top-k 0.01, float16", UPDATES, 0.01, value_dtype="float16"),
    Method("ef-random-k-0.1-f32", "EF updates, seeded random-k 0.1, float32", UPDATES, 0.1, "random_k"),
)
METHODS_BY_KEY = {method.key: method for method in METHODS}

TARGETS: tuple[tuple[float, float, float], ...] = ((0.1, 1.0, 1 / 6), (0.01, 2.0, 1 / 40))
"""Issue 13's targets for sparse updates with error feedback: (sparsity, at most this many accuracy
points below dense, at most this fraction of dense's upload bytes)."""


def run_name(method: Method, seed: int) -> str:
    """The name of one (exchange, seed) run: the ``run`` of its messages' config."""
    return f"{method.key}@{seed}"


def round_seed(seed: int, round_number: int) -> int:
    """The random-k seed of one round of a run: every client of the round derives the same one, and it
    changes from round to round (else the same positions would be sent forever)."""
    state = np.random.SeedSequence([seed, round_number, 0x72616E64]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


@dataclass(frozen=True)
class CompareSettings:
    """What one comparison does; ``ValueError`` for a setting out of range."""

    demo: DemoSettings
    """Clients, rounds, the base seed (and the data split's), local epochs and skew."""
    seeds: int = COMPARE_SEEDS
    hidden_units: int = COMPARE_HIDDEN_UNITS
    learning_rate: float = 0.0
    """SGD's step size for every exchange; 0 means the task's (``task.LEARNING_RATE``)."""

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        if self.hidden_units < 1:
            raise ValueError(f"hidden units must be >= 1, got {self.hidden_units}")
        if not self.learning_rate >= 0.0:
            raise ValueError(f"learning rate must be > 0 (0: the default), got {self.learning_rate}")

    @property
    def seed_list(self) -> list[int]:
        return [self.demo.seed + offset for offset in range(self.seeds)]

    @property
    def parameters(self) -> int:
        """The MLP's parameter count: 64 x h + h (first layer), h x 10 + 10 (second)."""
        return 64 * self.hidden_units + self.hidden_units + self.hidden_units * 10 + 10

    @property
    def runs(self) -> list[tuple[Method, int]]:
        """Every (exchange, seed) run, in the order the ServerApp carries them out."""
        return [(method, seed) for method in METHODS for seed in self.seed_list]

    @classmethod
    def from_run_config(cls, config: RunConfig) -> CompareSettings:
        """The settings a run config holds; ``hidden-units`` 0 (the app's default) or absent means
        :data:`COMPARE_HIDDEN_UNITS`."""
        seeds, hidden = config.get("compare-seeds", COMPARE_SEEDS), config.get("hidden-units", 0)
        rate = config.get("learning-rate", 0.0)
        if isinstance(seeds, bool) or not isinstance(seeds, int):
            raise ValueError(f"run config 'compare-seeds' must be an integer, got {seeds!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, int):
            raise ValueError(f"run config 'hidden-units' must be an integer, got {hidden!r}")
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValueError(f"run config 'learning-rate' must be a number, got {rate!r}")
        return cls(DemoSettings.from_run_config(config), seeds, hidden or COMPARE_HIDDEN_UNITS, float(rate))

    def run_config(self) -> dict[str, int | float | str | bool]:
        return {
            **self.demo.run_config(),
            "compare": True,
            "compare-seeds": self.seeds,
            "hidden-units": self.hidden_units,
            "learning-rate": float(self.learning_rate),
        }


# -- the figures' arithmetic --------------------------------------------------------------------------


def final_accuracy(accuracies: Sequence[float], last: int = LAST_ROUNDS) -> float:
    """The mean of the last ``last`` rounds' accuracies (of all of them when there are fewer)."""
    if not accuracies:
        raise ValueError("no rounds")
    tail = list(accuracies)[-last:]
    return sum(tail) / len(tail)


def rounds_to(accuracies: Sequence[float], target: float = TARGET_ACCURACY) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``; None when none does. Accuracies
    that miss ``target`` only by the rounding of a mean (1e-9) count as reaching it."""
    for index, accuracy in enumerate(accuracies):
        if accuracy >= target - 1e-9:
            return index + 1
    return None


def mean_rounds(per_seed: Sequence[int | None]) -> tuple[float | None, int]:
    """(the mean of the rounds over the seeds that reached the target, or None; how many did)."""
    reached = [r for r in per_seed if r is not None]
    return (sum(reached) / len(reached) if reached else None), len(reached)


def upload_fraction(sent: float, dense_sent: float) -> float:
    """A run's upload bytes as a fraction of dense FedAvg's."""
    if dense_sent <= 0:
        raise ValueError(f"dense bytes must be > 0, got {dense_sent}")
    return sent / dense_sent


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


RoundRecord = Mapping[int, Mapping[str, float]]
"""One round of one run: per client, its figures (accuracy, loss, train_loss, sent, received,
payload_sent, payload_received)."""


def run_figures(rounds: Sequence[RoundRecord], initial_accuracy: float) -> dict[str, Any]:
    """One (exchange, seed) run: per round the means over the clients, and the run's figures."""
    out_rounds: list[dict[str, Any]] = []
    cumulative_sent = 0.0
    for number, clients in enumerate(rounds, start=1):
        order = sorted(clients)
        mean = {
            key: _mean([clients[c][key] for c in order])
            for key in (
                "accuracy",
                "loss",
                "train_loss",
                "sent",
                "received",
                "payload_sent",
                "payload_received",
            )
        }
        cumulative_sent += mean["sent"]
        out_rounds.append(
            {
                "round": number,
                **mean,
                "cumulative_sent": cumulative_sent,
                "accuracy_per_client": [clients[c]["accuracy"] for c in order],
                "sent_per_client": [clients[c]["sent"] for c in order],
                "received_per_client": [clients[c]["received"] for c in order],
            }
        )
    accuracies = [r["accuracy"] for r in out_rounds]
    return {
        "initial_accuracy": initial_accuracy,
        "final_accuracy": final_accuracy(accuracies),
        "rounds_to_target": rounds_to(accuracies),
        "sent_per_round": _mean([r["sent"] for r in out_rounds]),
        "received_per_round": _mean([r["received"] for r in out_rounds]),
        "sent_total": sum(r["sent"] for r in out_rounds),
        "received_total": sum(r["received"] for r in out_rounds),
        "rounds": out_rounds,
    }


def method_summary(runs: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """One exchange over its seeds' runs (:func:`run_figures`): the means, the spread of the final
    accuracy, and the curve (cumulative upload bytes against accuracy, round by round, means over the
    seeds)."""
    seeds = sorted(runs)
    finals = [runs[s]["final_accuracy"] for s in seeds]
    mean_to_target, reached = mean_rounds([runs[s]["rounds_to_target"] for s in seeds])
    rounds = len(runs[seeds[0]]["rounds"])
    curve = [
        {
            "round": index + 1,
            "cumulative_sent": _mean([runs[s]["rounds"][index]["cumulative_sent"] for s in seeds]),
            "accuracy": _mean([runs[s]["rounds"][index]["accuracy"] for s in seeds]),
        }
        for index in range(rounds)
    ]
    return {
        "final_accuracy": _mean(finals),
        "final_accuracy_min": min(finals),
        "final_accuracy_max": max(finals),
        "rounds_to_target": mean_to_target,
        "seeds_reaching_target": reached,
        "sent_per_round": _mean([runs[s]["sent_per_round"] for s in seeds]),
        "received_per_round": _mean([runs[s]["received_per_round"] for s in seeds]),
        "sent_total": _mean([runs[s]["sent_total"] for s in seeds]),
        "received_total": _mean([runs[s]["received_total"] for s in seeds]),
        "curve": curve,
    }


def target_checks(methods: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's targets (:data:`TARGETS`) for every exchange of sparse updates at their sparsity."""
    dense = methods[DENSE]["summary"]
    checks = []
    for sparsity, max_points, max_fraction in TARGETS:
        for key, entry in methods.items():
            method = METHODS_BY_KEY[key]
            if method.kind != UPDATES or method.sparsity != sparsity:
                continue
            summary = entry["summary"]
            points = (dense["final_accuracy"] - summary["final_accuracy"]) * 100
            fraction = summary["upload_fraction"]
            checks.append(
                {
                    "method": key,
                    "accuracy_points_below_dense": points,
                    "max_points_below_dense": max_points,
                    "upload_fraction": fraction,
                    "max_upload_fraction": max_fraction,
                    "met": points <= max_points and fraction <= max_fraction,
                }
            )
    return checks


def build_compare_figures(
    settings: CompareSettings,
    rounds: Mapping[str, Mapping[int, Sequence[RoundRecord]]],
    initial: Mapping[str, Mapping[int, float]],
) -> dict[str, Any]:
    """The JSON-ready figures of a comparison: ``rounds[method][seed]`` the run's rounds in order,
    ``initial[method][seed]`` its initial model's accuracy (mean over the clients)."""
    methods: dict[str, Any] = {}
    for method in METHODS:
        runs = {
            seed: run_figures(rounds[method.key][seed], initial[method.key][seed])
            for seed in settings.seed_list
        }
        methods[method.key] = {
            "label": method.label,
            "kind": method.kind,
            "sparsity": method.sparsity,
            "selection": method.selection if method.kind == UPDATES else None,
            "value_dtype": method.value_dtype,
            "summary": method_summary(runs),
            "runs": {str(seed): runs[seed] for seed in settings.seed_list},
        }
    dense_sent = methods[DENSE]["summary"]["sent_per_round"]
    for entry in methods.values():
        entry["summary"]["upload_fraction"] = upload_fraction(entry["summary"]["sent_per_round"], dense_sent)
    demo = settings.demo
    from paramsel_demo.task import BATCH_SIZE, LEARNING_RATE, MOMENTUM

    return {
        "config": {
            "clients": demo.clients,
            "rounds": demo.rounds,
            "seeds": settings.seed_list,
            "data_split_seed": demo.seed,
            "local_epochs": demo.local_epochs,
            "skew": demo.skew,
            "model": f"MLP 64-{settings.hidden_units}-10",
            "parameters": settings.parameters,
            "learning_rate": settings.learning_rate or LEARNING_RATE,
            "momentum": MOMENTUM,
            "batch_size": BATCH_SIZE,
        },
        "bytes_counted": BYTES_COUNTED,
        "final_accuracy": f"mean held-out accuracy of the last {LAST_ROUNDS} rounds (mean over clients)",
        "target_accuracy": TARGET_ACCURACY,
        "methods": methods,
        "targets": target_checks(methods),
    }


# -- the table and the plot ---------------------------------------------------------------------------


def _bytes(value: float) -> str:
    return f"{value:,.0f}"


def _ratio(fraction: float) -> str:
    return "1" if math.isclose(fraction, 1.0) else f"{fraction:.4f} (1/{1 / fraction:.1f})"


def format_compare_table(figures: Mapping[str, Any]) -> str:
    """The comparison as a Markdown table, its caption and the targets' verdicts."""
    config = figures["config"]
    seeds = config["seeds"]
    lines = [
        f"{config['clients']} clients, {config['rounds']} rounds, {config['local_epochs']} local epochs, "
        f"{config['model']} ({config['parameters']:,} parameters), non-IID digits (skew {config['skew']:g}), "
        f"seeds {', '.join(map(str, seeds))} (data split of seed {config['data_split_seed']}).",
        "",
        f"| exchange | final accuracy (min\N{EN DASH}max over {len(seeds)} seeds) | rounds to "
        f"{figures['target_accuracy']:.0%} | sent B / round | received B / round | sent B total "
        "| received B total | upload vs dense |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for entry in figures["methods"].values():
        s = entry["summary"]
        if s["rounds_to_target"] is None:
            to_target = "never"
        else:
            to_target = f"{s['rounds_to_target']:.1f}"
            if s["seeds_reaching_target"] < len(seeds):
                to_target += f" ({s['seeds_reaching_target']} of {len(seeds)} seeds; the others never)"
        lines.append(
            f"| {entry['label']} | {s['final_accuracy']:.4f} ({s['final_accuracy_min']:.4f}\N{EN DASH}"
            f"{s['final_accuracy_max']:.4f}) | {to_target} | {_bytes(s['sent_per_round'])} | "
            f"{_bytes(s['received_per_round'])} | {_bytes(s['sent_total'])} | {_bytes(s['received_total'])} | "
            f"{_ratio(s['upload_fraction'])} |"
        )
    lines += [
        "",
        f"Final accuracy: the {figures['final_accuracy']}, averaged over the seeds. Rounds to "
        f"{figures['target_accuracy']:.0%}: the first round whose accuracy reaches it, averaged over the "
        "seeds that reach it. Bytes: per client, the mean over clients and rounds (total: over the run), "
        "averaged over the seeds; upload vs dense: sent bytes as a fraction of dense FedAvg's. "
        + figures["bytes_counted"],
        "",
        "Targets (issue 13), sparse updates with error feedback against dense FedAvg:",
    ]
    for check in figures["targets"]:
        label = figures["methods"][check["method"]]["label"]
        lines.append(
            f"- {label}: {check['accuracy_points_below_dense']:.2f} points below dense (at most "
            f"{check['max_points_below_dense']:g}), {check['upload_fraction']:.4f} of its upload bytes (at "
            f"most 1/{1 / check['max_upload_fraction']:.0f} = {check['max_upload_fraction']:.4f}): "
            + ("met" if check["met"] else "MISSED")
        )
    return "\n".join(lines)


def plot_compare(figures: Mapping[str, Any], path: Path) -> None:
    """Accuracy against cumulative upload bytes per client (log scale), one line per exchange (means over
    the seeds), a marker per round."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    config = figures["config"]
    fig = Figure(figsize=(8.5, 5.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {DENSE: ("black", "o", "-"), VALUES: (None, "s", "--"), UPDATES: (None, "^", "-")}
    for entry in figures["methods"].values():
        curve = entry["summary"]["curve"]
        color, marker, line = styles[entry["kind"]]
        if entry["kind"] == UPDATES and entry["selection"] == "random_k":
            marker = "D"
        if entry["value_dtype"] == "float16":
            line = ":"
        ax.plot(
            [p["cumulative_sent"] for p in curve],
            [p["accuracy"] for p in curve],
            marker=marker,
            markersize=3.5,
            linestyle=line,
            color=color,
            label=entry["label"],
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative bytes uploaded per client (Flower's serialized ArrayRecord; log scale)")
    ax.set_ylabel("held-out accuracy (mean over clients and seeds)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title(
        f"paramsel-demo --compare: {config['clients']} clients, {config['rounds']} rounds, {config['model']}, "
        f"{len(config['seeds'])} seeds",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


def write_compare(figures: Mapping[str, Any], out: Path) -> tuple[Path, Path, Path]:
    """Writes ``compare.json``, ``compare.md`` (the table) and ``compare.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = out / COMPARE_FILE, out / COMPARE_TABLE, out / COMPARE_PLOT
    paths[0].write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    paths[1].write_text(format_compare_table(figures) + "\n", encoding="utf-8")
    plot_compare(figures, paths[2])
    return paths
