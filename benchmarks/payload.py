"""Targets 3 and 4: bytes on the socket (through a counting proxy) per selected value, and the upload
of a second push against an initial model the server has already seen."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.config import has_option
from benchmarks.models import (
    digest,
    info_floor_bytes_per_value,
    packed_bytes,
    perturb,
    sent_values,
    state_bytes,
    state_entries,
)
from benchmarks.procs import Server
from benchmarks.proxy import CountingProxy
from benchmarks.report import Row, missing
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores

LIMITS = {0.1: 4.8, 0.01: 5.3}


def _push(
    proxy: CountingProxy, exchanger: SparseCooParameterExchanger, model: nn.Module, initial: nn.Module
) -> tuple[list[np.ndarray], int, int]:
    proxy.reset()
    packed = exchanger.push_parameters(model, initial)
    up, down = proxy.counts()
    return packed, up, down


def _payload_row(sparsity: float, n: int, packed: list[np.ndarray], down: int) -> tuple[Row, dict[str, Any]]:
    k = sent_values(packed)
    per_value = down / k
    fl4health = packed_bytes(packed) / k  # the drop-in returns FL4Health's packed list, laid out as it is
    floor = info_floor_bytes_per_value(n, k)
    pct = f"{sparsity:.0%}"
    row = Row(
        f"payload_{pct.rstrip('%')}pct",
        f"3. server->client bytes per value at {pct}",
        per_value,
        "B",
        LIMITS[sparsity],
        note=f"FL4Health packed list {fl4health:.2f} B; floor {floor:.2f} B; {k:,} values",
    )
    figures = {
        "sent_values": k,
        "server_to_client_bytes": down,
        "bytes_per_value": per_value,
        "fl4health_packed_bytes_per_value": fl4health,
        "information_floor_bytes_per_value": floor,
    }
    return row, figures


def run(server: Server, model: nn.Module, initial: nn.Module) -> tuple[list[Row], dict[str, Any]]:
    n = state_entries(model)
    rows: list[Row] = []
    figures: dict[str, Any] = {}
    proxy = CountingProxy(server.target)
    try:
        # An initial model no server has seen yet, so that the first push has to upload it.
        fresh_initial = copy.deepcopy(initial)
        perturb(fresh_initial, torch.Generator().manual_seed(101), scale=0.001)
        ten = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=proxy.target)
        first, up1, down1 = _push(proxy, ten, model, fresh_initial)
        row, figures["payload_10pct"] = _payload_row(0.1, n, first, down1)
        rows.append(row)

        one = SparseCooParameterExchanger(0.01, largest_magnitude_change_scores, target=proxy.target)
        packed, _, down = _push(proxy, one, model, fresh_initial)
        row, figures["payload_1pct"] = _payload_row(0.01, n, packed, down)
        rows.append(row)

        # Target 4: the same exchanger, a model one more step trained, the same initial model.
        title = "4. 2nd push upload / 1st (same initial model)"
        if not has_option("reuse_initial_model"):
            rows.append(missing("initial_model_reuse", title, "x", "reuse_initial_model", 0.55))
            return rows, figures
        later = copy.deepcopy(model)
        perturb(later, torch.Generator().manual_seed(102))
        second, up2, _ = _push(proxy, ten, later, fresh_initial)
        uncached = SparseCooParameterExchanger(
            0.1, largest_magnitude_change_scores, target=server.target, reuse_initial_model=False
        ).push_parameters(later, fresh_initial)
        agrees = digest(second) == digest(uncached)
        model_bytes = state_bytes(model)
        rows.append(
            Row(
                "initial_model_reuse",
                title,
                up2 / up1,
                "x",
                0.55,
                verdict="" if agrees else "MISS",
                note=(
                    f"{up1 / 1e6:.1f} MB then {up2 / 1e6:.1f} MB up (one model {model_bytes / 1e6:.1f} MB); "
                    f"same result as an uncached push: {agrees}"
                ),
            )
        )
        figures["initial_model_reuse"] = {
            "first_upload_bytes": up1,
            "second_upload_bytes": up2,
            "model_bytes": model_bytes,
            "second_over_first": up2 / up1,
            "second_over_one_model": up2 / model_bytes,
            "second_agrees_with_uncached_push": agrees,
        }
    finally:
        proxy.close()
    return rows, figures
