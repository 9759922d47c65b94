"""Target 6 and issue 14's linear cost: a 300M-parameter float32 model (1.2 GB) pushes and pulls with
default settings, and its push costs about what six of the 50M push would (``push.run``'s figure).

Like the 50M push it is compared with, each push uploads both models (``reuse_initial_model=False``)
to a server that has already served one (the first push is a warm-up, not timed): the ratio is of
like with like. The server's peak memory is measured over every push, the warm-up included.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from benchmarks.config import Sizes
from benchmarks.models import sent_values, state_bytes, trained_pair
from benchmarks.procs import PeakRss, paramsel_serve
from benchmarks.report import Row, spread, spread_text
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

# Issue 14: the 300M push at most 1.3x the 50M one scaled by size; the server's peak at most 1.5x what
# was uploaded.
LINEAR_LIMIT = 1.3
MEMORY_LIMIT = 1.5


def run(sizes: Sizes, fifty_million_s: float | None = None) -> tuple[list[Row], dict[str, Any]]:
    """``fifty_million_s``: the median 50M push (``push.run``'s, both models uploaded), when measured."""
    model, initial = trained_pair(sizes.any_size_params, sizes.any_size_layers, seed=6)
    model_bytes = state_bytes(model)
    uploaded = 2 * model_bytes
    label = f"{sizes.any_size_params / 1e6:.0f}M params ({model_bytes / 1e9:.2f} GB)"
    gc.collect()
    times: list[float] = []
    above_idle: list[int] = []
    with paramsel_serve() as server:
        exchanger = SparseCooParameterExchanger(
            0.1, largest_magnitude_change_scores, target=server.target, reuse_initial_model=False
        )
        with PeakRss(os.getpid()) as client:
            for i in range(sizes.any_size_runs + 1):  # the first is a warm-up
                packed: list[Any] = []
                gc.collect()
                with PeakRss(server.pid) as push_mem:
                    start = time.perf_counter()
                    packed = exchanger.push_parameters(model, initial)
                    seconds = time.perf_counter() - start
                above_idle.append(push_mem.above_idle)
                if i:
                    times.append(seconds)
            with PeakRss(server.pid) as pull_mem:
                start = time.perf_counter()
                exchanger.pull_parameters(packed, model)
                pull_s = time.perf_counter() - start
    sent = sent_values(packed)
    del packed, model, initial
    gc.collect()
    push = spread(times)
    worst = max(above_idle)
    scale = sizes.any_size_params / sizes.push_params
    rows = [
        Row(
            "any_size_push",
            f"6. push {label}, both models up (median)",
            push["median"],
            "s",
            verdict="PASS",
            note=f"{sent:,} values sent; {spread_text(push, 's')}",
        ),
        Row("any_size_pull", f"6. pull its payload into {label}", pull_s, "s", verdict="PASS"),
        Row(
            "any_size_linear",
            f"6. {label} push / ({scale:.2f} x the {sizes.push_params / 1e6:.1f}M push)",
            push["median"] / (scale * fifty_million_s) if fifty_million_s else None,
            "x",
            LINEAR_LIMIT,
            note=(
                f"{scale:.2f} x {fifty_million_s:.3f} s = {scale * fifty_million_s:.2f} s"
                if fifty_million_s
                else "the 50M push was not measured"
            ),
        ),
        Row(
            "any_size_server_memory",
            "6. server peak RSS above idle / uploaded",
            worst / uploaded,
            "x",
            MEMORY_LIMIT,
            note=(
                f"push {worst / 1e9:.2f} GB (worst of {len(above_idle)}), pull "
                f"{pull_mem.above_idle / 1e9:.2f} GB above idle, {uploaded / 1e9:.2f} GB uploaded; "
                f"client peak {client.peak / 1e9:.2f} GB"
            ),
        ),
    ]
    figures = {
        "params": sizes.any_size_params,
        "model_bytes": model_bytes,
        "uploaded_bytes": uploaded,
        "push_s": push,
        "fifty_million_push_s": fifty_million_s,
        "pull_s": pull_s,
        "sent_values": sent,
        "server_push_above_idle_bytes": above_idle,
        "server_pull_above_idle_bytes": pull_mem.above_idle,
        "client_peak_bytes": client.peak,
    }
    return rows, figures
