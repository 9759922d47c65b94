"""paramsel's benchmark: every target of issue 3 and issue 14's comparison with the real FL4Health.

Measured against separately started servers; FL4Health 0.4.2 is its own wheel (benchmarks.vs_fl4health).

    make bench                                     # installs FL4Health's wheel into .oracle/, then the full run
    PYTHONPATH=.oracle .venv/bin/python -m benchmarks.run            # the full run (5 to 11 minutes on 2 cores)
    PYTHONPATH=.oracle .venv/bin/python -m benchmarks.run --quick    # small sizes, about 2 minutes

Without FL4Health on the path its rows are ERROR (saying how to get it) and the others run.

Prints the table and writes benchmarks/results/latest.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import any_size, concurrency, exact_k, payload, pull, push, vs_fl4health
from benchmarks.config import FULL, QUICK, Sizes
from benchmarks.models import trained_pair
from benchmarks.procs import MachineMemory, echo_serve, paramsel_serve
from benchmarks.report import Row, failed, table, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"

# Every target the JSON reports, with its table title and unit (used when a whole group fails).
TARGETS: dict[str, tuple[str, str]] = {
    "push_time": ("1. push time", "s"),
    "push_vs_transport_floor": ("1. push / transport floor", "x"),
    "fl4health_push_time": ("1. FL4Health 0.4.2 push", "s"),
    "fl4health_vs_cached": ("1. FL4Health push / paramsel remote, initial model cached", "x"),
    "fl4health_vs_first": ("1. FL4Health push / paramsel remote, first push", "x"),
    "fl4health_vs_embedded": ("1. FL4Health push / paramsel embedded default", "x"),
    "selection_memory": ("2. server peak RSS above idle / uploaded", "x"),
    "payload_10pct": ("3. server->client bytes per value at 10%", "B"),
    "payload_1pct": ("3. server->client bytes per value at 1%", "B"),
    "initial_model_reuse": ("4. 2nd push upload / 1st", "x"),
    "exact_k": ("5. exact_k=True: values sent", ""),
    "exact_k_time": ("5. exact-k time / default", "x"),
    "any_size_push": ("6. push, any size", "s"),
    "any_size_pull": ("6. pull, any size", "s"),
    "any_size_linear": ("6. 300M push / 6 x the 50M push", "x"),
    "any_size_server_memory": ("6. server peak RSS above idle / uploaded", "x"),
    "concurrency_1": ("7. 1 client: throughput", "push/s"),
    "concurrency_2": ("7. 2 concurrent clients: throughput", "push/s"),
    "concurrency_4": ("7. 4 concurrent clients: throughput", "push/s"),
    "concurrency_8": ("7. 8 concurrent clients: throughput", "push/s"),
    "pull_vs_copy": ("8. pull 10 % payload / copy of touched tensors", "x"),
}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Collector:
    """Runs each group, keeping its rows and figures; a group that raises yields ERROR rows."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.figures: dict[str, Any] = {}

    def group(
        self, name: str, targets: list[str], body: Callable[[], tuple[list[Row], dict[str, Any]]]
    ) -> None:
        _log(f"{name} ...")
        start = time.perf_counter()
        try:
            rows, figures = body()
        except Exception as error:
            traceback.print_exc()
            rows = [failed(t, *TARGETS[t], error) for t in targets]
            figures = {"error": repr(error)}
        for row in rows:
            self.rows[row.target] = row
        self.figures[name] = figures
        _log(f"{name} done in {time.perf_counter() - start:.1f} s")

    def ordered(self) -> list[Row]:
        known = [self.rows[t] for t in TARGETS if t in self.rows]
        return known + [r for t, r in self.rows.items() if t not in TARGETS]


def _fifty_million(out: Collector, sizes: Sizes) -> None:
    """Targets 1-5 and 8, on one pair of models and one server (the models go when this returns)."""
    model, initial = trained_pair(sizes.push_params, sizes.push_layers, seed=1)
    floor: dict[str, Any] = {}
    packed: list[Any] = []

    def transport() -> tuple[list[Row], dict[str, Any]]:
        with echo_serve() as echo:
            floor.update(push.transport_floor(echo, model, initial, sizes.runs))
        return [], floor

    def pushes() -> tuple[list[Row], dict[str, Any]]:
        rows, figures, result = push.run(server, model, initial, sizes, floor)
        packed.extend(result)
        return rows, figures

    out.group("transport_floor", ["push_vs_transport_floor"], transport)
    with paramsel_serve() as server:
        out.group(
            "push",
            ["push_time", "push_vs_transport_floor", "selection_memory"],
            pushes,
        )
        out.group(
            "payload",
            ["payload_10pct", "payload_1pct", "initial_model_reuse"],
            lambda: payload.run(server, model, initial),
        )
        out.group("pull", ["pull_vs_copy"], lambda: pull.run(server, packed, model, initial, sizes.runs))
        out.group("exact_k", ["exact_k", "exact_k_time"], lambda: exact_k.run(server, sizes))


def measure(sizes: Sizes) -> Collector:
    out = Collector()
    _fifty_million(out, sizes)
    gc.collect()
    out.group(
        "vs_fl4health",
        ["fl4health_push_time", *(f"fl4health_vs_{mode}" for mode in vs_fl4health.MODES)],
        lambda: vs_fl4health.run(sizes),
    )
    gc.collect()
    fifty_million = out.figures.get("push", {}).get("paramsel_push_median_s")
    out.group(
        "any_size",
        ["any_size_push", "any_size_pull", "any_size_linear", "any_size_server_memory"],
        lambda: any_size.run(sizes, fifty_million),
    )
    gc.collect()
    out.group(
        "concurrency",
        [f"concurrency_{n}" for n in sizes.concurrency_levels],
        lambda: concurrency.run(sizes),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test, under a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output (default %(default)s)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    _log(f"{mode} run: {sizes.as_dict()}")
    used_before = MachineMemory.used()
    load_before = os.getloadavg()
    start = time.perf_counter()
    with MachineMemory() as memory:
        collected = measure(sizes)
    collected.figures["machine_memory"] = {
        "used_before_bytes": used_before,
        "peak_used_bytes": memory.peak,
        "note": "whole machine (MemTotal - MemAvailable), other processes included",
    }
    collected.figures["machine_load"] = {"loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    rows = collected.ordered()
    seconds = time.perf_counter() - start
    write_json(args.out, mode, sizes.as_dict(), rows, collected.figures, seconds)
    print(f"paramsel benchmark ({mode}, {seconds:.0f} s)")
    print(table(rows))
    print(
        f"machine memory used at peak: {memory.peak / 2**30:.1f} GiB (before: {used_before / 2**30:.1f} GiB)"
    )
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
