"""Target 6: a 300M-parameter float32 model (1.2 GB) pushes and pulls with default settings."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

from benchmarks.config import Sizes
from benchmarks.models import sent_values, state_bytes, trained_pair
from benchmarks.procs import PeakRss, paramsel_serve
from benchmarks.report import Row
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores


def run(sizes: Sizes) -> tuple[list[Row], dict[str, Any]]:
    model, initial = trained_pair(sizes.any_size_params, sizes.any_size_layers, seed=6)
    model_bytes = state_bytes(model)
    label = f"{sizes.any_size_params / 1e6:.0f}M params ({model_bytes / 1e9:.2f} GB)"
    gc.collect()
    with paramsel_serve() as server:
        exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=server.target)
        with PeakRss(os.getpid()) as client:
            with PeakRss(server.pid) as push_mem:
                start = time.perf_counter()
                packed = exchanger.push_parameters(model, initial)
                push_s = time.perf_counter() - start
            with PeakRss(server.pid) as pull_mem:
                start = time.perf_counter()
                exchanger.pull_parameters(packed, model)
                pull_s = time.perf_counter() - start
    sent = sent_values(packed)
    del packed, model, initial
    gc.collect()
    peak_above = max(push_mem.above_idle, pull_mem.peak - push_mem.idle)
    rows = [
        Row("any_size_push", f"6. push {label}", push_s, "s", verdict="PASS", note=f"{sent:,} values sent"),
        Row("any_size_pull", f"6. pull its payload into {label}", pull_s, "s", verdict="PASS"),
        Row(
            "any_size_server_memory",
            "6. server peak RSS above idle / uploaded",
            push_mem.above_idle / (2 * model_bytes),
            "x",
            note=(
                f"push {push_mem.above_idle / 1e9:.2f} GB, pull {pull_mem.above_idle / 1e9:.2f} GB above "
                f"idle; client peak {client.peak / 1e9:.2f} GB"
            ),
        ),
    ]
    figures = {
        "params": sizes.any_size_params,
        "model_bytes": model_bytes,
        "push_s": push_s,
        "pull_s": pull_s,
        "sent_values": sent,
        "server_idle_bytes": push_mem.idle,
        "server_push_peak_bytes": push_mem.peak,
        "server_pull_peak_bytes": pull_mem.peak,
        "server_peak_above_idle_bytes": peak_above,
        "client_peak_bytes": client.peak,
    }
    return rows, figures
