"""Target 8: ``pull_parameters`` of a 10 % payload against a plain copy of the tensors it names.

The floor is ``copy_`` of every touched tensor from another model's (same bytes written as the pull
writes; the pull reads about half as many: the values and FL4Health's (nnz, ndim) int64 coordinates).
Pull and copy alternate in one loop, so that a machine slowed down by other work slows both alike; the
figure is the median of the per-round ratios, with their spread.
"""

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
    names = [str(name) for name in packed[-1].tolist()]
    sources = model.state_dict()
    targets = destination.state_dict()

    def pull() -> float:
        start = time.perf_counter()
        exchanger.pull_parameters(packed, destination)
        return time.perf_counter() - start

    def plain_copy() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for name in names:
                targets[name].copy_(sources[name])
        return time.perf_counter() - start

    pull()  # warm-up, both
    plain_copy()
    pulls, copies = [], []
    for _ in range(max(3 * runs, 11)):  # a round is a fraction of a second: take more than `runs`
        pulls.append(pull())
        copies.append(plain_copy())
    ratios = sorted(p / c for p, c in zip(pulls, copies, strict=True))
    ratio = statistics.median(ratios)
    pull_s, copy_s = statistics.median(pulls), statistics.median(copies)
    touched = sum(targets[name].nbytes for name in names)
    row = Row(
        "pull_vs_copy",
        "8. pull 10 % payload / copy of touched tensors",
        ratio,
        "x",
        1.5,
        note=(
            f"pull {pull_s:.3f} s, copy {copy_s:.3f} s of {touched / 1e6:.0f} MB; ratio median of "
            f"{len(ratios)} alternating rounds, range {ratios[0]:.2f}-{ratios[-1]:.2f}"
        ),
    )
    figures = {
        "pull_seconds": pulls,
        "copy_seconds": copies,
        "ratios": ratios,
        "touched_bytes": touched,
    }
    return [row], figures
