"""Target 8: ``pull_parameters`` of a 10 % payload against a plain copy of the tensors it names."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.procs import Server
from benchmarks.report import Row
from paramsel.client import SparseCooParameterExchanger, largest_magnitude_change_scores


def run(
    server: Server, packed: list[np.ndarray], model: nn.Module, initial: nn.Module, runs: int
) -> tuple[list[Row], dict[str, Any]]:
    exchanger = SparseCooParameterExchanger(0.1, largest_magnitude_change_scores, target=server.target)
    destination = copy.deepcopy(initial)
    exchanger.pull_parameters(packed, destination)  # warm-up
    pulls = []
    for _ in range(runs):
        start = time.perf_counter()
        exchanger.pull_parameters(packed, destination)
        pulls.append(time.perf_counter() - start)

    names = [str(name) for name in packed[-1].tolist()]
    sources = model.state_dict()
    targets = destination.state_dict()
    copies = []
    with torch.no_grad():
        for _ in range(runs + 1):
            start = time.perf_counter()
            for name in names:
                targets[name].copy_(sources[name])
            copies.append(time.perf_counter() - start)
    copies = copies[1:]
    pull_s, copy_s = statistics.median(pulls), statistics.median(copies)
    touched = sum(targets[name].nbytes for name in names)
    row = Row(
        "pull_vs_copy",
        "8. pull 10 % payload / copy of touched tensors",
        pull_s / copy_s,
        "x",
        1.5,
        note=f"pull {pull_s:.3f} s, copy {copy_s:.3f} s of {touched / 1e6:.0f} MB (median of {runs})",
    )
    figures = {"pull_seconds": pulls, "copy_seconds": copies, "touched_bytes": touched}
    return [row], figures
