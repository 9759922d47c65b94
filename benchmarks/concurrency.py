"""Target 7: 1, 2, 4 and 8 concurrent clients against one server, each a separate process ('spawn').

Every client builds the same 10M-parameter pair (same seed), so every push must return the same
packed list; throughput is pushes over the wall time from the first client's start to the last's end.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import numpy as np

from benchmarks.config import Sizes
from benchmarks.procs import paramsel_serve
from benchmarks.report import Row

SEED = 7
TIMEOUT_S = 600.0


def client(index: int, sizes: Sizes, target: str, commands: Any, results: Any) -> None:
    """A client process: builds its model, warms up, then runs the pushes it is told to."""
    from benchmarks.models import digest, trained_pair
    from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

    try:
        model, initial = trained_pair(sizes.concurrency_params, sizes.concurrency_layers, seed=SEED)
        exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=target)
        exchanger.push_parameters(model, initial)
    except Exception as error:
        results.put((index, {"error": repr(error)}))
        return
    results.put((index, {"ready": True}))
    while (count := commands.get()) is not None:
        latencies: list[float] = []
        digests: set[str] = set()
        errors: list[str] = []
        began = time.monotonic()
        for _ in range(count):
            start = time.perf_counter()
            try:
                packed = exchanger.push_parameters(model, initial)
            except Exception as error:
                errors.append(repr(error))
                continue
            latencies.append(time.perf_counter() - start)
            digests.add(digest(packed))
        ended = time.monotonic()
        results.put(
            (
                index,
                {"latencies": latencies, "digests": sorted(digests), "errors": errors, "t": (began, ended)},
            )
        )


def run(sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    context = mp.get_context("spawn")
    most = max(sizes.concurrency_levels)
    results = context.Queue()
    queues = [context.Queue() for _ in range(most)]
    rows: list[Row] = []
    figures: dict[str, Any] = {"clients": "separate processes (multiprocessing 'spawn')"}
    with paramsel_serve() as server:
        workers = [
            context.Process(target=client, args=(i, sizes, server.target, queues[i], results), daemon=True)
            for i in range(most)
        ]
        for worker in workers:
            worker.start()
        try:
            for _ in workers:
                _, ready = results.get(timeout=TIMEOUT_S)
                if "error" in ready:
                    raise RuntimeError(f"a client failed to start: {ready['error']}")
            reference: str | None = None
            for level in sizes.concurrency_levels:
                each = max(2, sizes.concurrency_pushes // level)
                for i in range(level):
                    queues[i].put(each)
                done = [results.get(timeout=TIMEOUT_S)[1] for _ in range(level)]
                latencies = [x for d in done for x in d["latencies"]]
                errors = [e for d in done for e in d["errors"]]
                digests = {x for d in done for x in d["digests"]}
                if reference is None and len(digests) == 1:
                    reference = next(iter(digests))
                agree = not errors and digests == {reference}
                wall = max(d["t"][1] for d in done) - min(d["t"][0] for d in done)
                throughput = len(latencies) / wall
                p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99])) if latencies else (0, 0)
                rows.append(
                    Row(
                        f"concurrency_{level}",
                        f"7. {level} concurrent client{'s' if level > 1 else ''}: throughput",
                        throughput,
                        "push/s",
                        verdict="PASS" if agree else "MISS",
                        note=(
                            f"p50 {p50:.3f} s, p99 {p99:.3f} s; {len(latencies)}/{level * each} ok; "
                            f"agree with 1 client: {agree}"
                        ),
                    )
                )
                figures[str(level)] = {
                    "pushes": level * each,
                    "succeeded": len(latencies),
                    "errors": errors[:5],
                    "agree_with_single_client": agree,
                    "wall_s": wall,
                    "pushes_per_s": throughput,
                    "p50_s": p50,
                    "p99_s": p99,
                    "latencies_s": latencies,
                }
        finally:
            for q in queues:
                q.put(None)
            for worker in workers:
                worker.join(timeout=30)
                if worker.is_alive():
                    worker.terminate()
                    worker.join()
    return rows, figures
