"""Target 5: ``exact_k=True`` sends exactly k values on a model full of ties; its time against the default."""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

from benchmarks.config import Sizes, has_option
from benchmarks.models import sent_values, state_entries, tied_pair
from benchmarks.procs import Server
from benchmarks.report import Row, missing
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

SPARSITY = 0.1


def run(server: Server, sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    title = "5. exact_k=True: values sent (must be k)"
    if not has_option("exact_k"):
        return [
            missing("exact_k", title, "", "exact_k"),
            missing("exact_k_time", "5. exact-k time / default", "x", "exact_k"),
        ], {}
    model, initial = tied_pair(sizes.push_params, sizes.push_layers, seed=5)
    k = math.ceil(state_entries(model) * SPARSITY)
    results: dict[str, Any] = {}
    for label, exact in (("default", False), ("exact_k", True)):
        options: dict[str, Any] = {"exact_k": True} if exact else {}
        exchanger = SparseCooParameterExchanger(
            SPARSITY, largest_magnitude_change_scores, target=server.target, **options
        )
        packed = exchanger.push_parameters(model, initial)  # warm-up
        times = []
        for _ in range(sizes.runs):
            start = time.perf_counter()
            packed = exchanger.push_parameters(model, initial)
            times.append(time.perf_counter() - start)
        results[label] = {"seconds": times, "median_s": statistics.median(times), "sent": sent_values(packed)}
    default, exact = results["default"], results["exact_k"]
    ratio = exact["median_s"] / default["median_s"]
    rows = [
        Row(
            "exact_k",
            title,
            exact["sent"],
            "",
            verdict="PASS" if exact["sent"] == k else "MISS",
            note=f"k = {k:,}; the default sends {default['sent']:,} (ties at the threshold)",
        ),
        Row(
            "exact_k_time",
            "5. exact-k time / default",
            ratio,
            "x",
            note=f"{exact['median_s']:.3f} s vs {default['median_s']:.3f} s (median of {sizes.runs})",
        ),
    ]
    return rows, {"k": k, **results}
