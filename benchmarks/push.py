"""Targets 1 and 2: push time against the transport floor, and the server's memory (FL4Health: vs_fl4health)."""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import grpc
import numpy as np
from torch import nn

from benchmarks.config import Sizes, has_option
from benchmarks.echo_server import stream_once
from benchmarks.models import state_bytes
from benchmarks.procs import PeakRss, Server
from benchmarks.report import Row, spread, spread_text
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

SPARSITY = 0.1


def transport_floor(echo: Server, model: nn.Module, initial: nn.Module, runs: int) -> dict[str, Any]:
    """Seconds to stream both models' bytes in 1 MiB chunks to the bare echo server (median of runs)."""
    tensors = [*model.state_dict().values(), *initial.state_dict().values()]
    with grpc.insecure_channel(echo.target) as channel:
        stream_once(channel, tensors)  # warm-up: connection and window sizes
        times = [stream_once(channel, tensors) for _ in range(runs)]
    nbytes = sum(t.nbytes for t in tensors)
    median = statistics.median(times)
    return {"seconds": times, "median_s": median, "bytes": nbytes, "gb_per_s": nbytes / median / 1e9}


def run(
    server: Server, model: nn.Module, initial: nn.Module, sizes: Sizes, floor: dict[str, Any]
) -> tuple[list[Row], dict[str, Any], list[np.ndarray]]:
    uploaded = state_bytes(model) + state_bytes(initial)
    bypass = has_option("reuse_initial_model")
    options: dict[str, Any] = {"reuse_initial_model": False} if bypass else {}
    exchanger = SparseCooParameterExchanger(
        SPARSITY, largest_magnitude_change_scores, target=server.target, **options
    )
    times: list[float] = []
    memory: list[dict[str, int]] = []
    packed: list[np.ndarray] = []
    for i in range(sizes.runs + 1):  # the first is a warm-up, from a freshly started server
        gc.collect()
        with PeakRss(server.pid) as peak:
            start = time.perf_counter()
            packed = exchanger.push_parameters(model, initial)
            seconds = time.perf_counter() - start
        memory.append({"idle_bytes": peak.idle, "peak_bytes": peak.peak, "above_idle": peak.above_idle})
        if i:
            times.append(seconds)
    median = statistics.median(times)

    worst = max(m["above_idle"] for m in memory)
    floor_s = floor.get("median_s")
    how = "reuse_initial_model=False" if bypass else "this build has no initial-model cache"
    floor_row = (
        Row(
            "push_vs_transport_floor",
            "1. push / transport floor",
            median / floor_s,
            "x",
            2.0,
            note=f"floor {floor_s:.3f} s ({floor['gb_per_s']:.2f} GB/s, bare gRPC, 1 MiB chunks)",
        )
        if floor_s
        else Row("push_vs_transport_floor", "1. push / transport floor", None, "x", 2.0, note="no floor")
    )
    rows = [
        Row(
            "push_time",
            f"1. push {sizes.push_params / 1e6:.1f}M params, both models up (median)",
            median,
            "s",
            0.6,
            note=f"{uploaded / 1e6:.0f} MB up; {how}; {spread_text(spread(times), 's')}",
        ),
        floor_row,
        Row(
            "selection_memory",
            "2. server peak RSS above idle / uploaded",
            worst / uploaded,
            "x",
            2.5,
            note=f"{worst / 1e6:.0f} MB above idle for {uploaded / 1e6:.0f} MB uploaded (worst of {len(memory)})",
        ),
    ]
    figures = {
        "uploaded_bytes": uploaded,
        "cache_bypassed_with_reuse_initial_model_false": bypass,
        "paramsel_push_seconds": times,
        "paramsel_push_median_s": median,
        "paramsel_push_spread_s": spread(times),
        "server_memory_per_push": memory,
        "transport_floor": floor,
    }
    return rows, figures, packed
