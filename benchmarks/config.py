"""Sizes of the full run and of ``--quick``, and which SDK options this build has."""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any

from paramsel.client import SparseCooParameterExchanger


@dataclass(frozen=True)
class Sizes:
    push_params: int = 50_100_000  # targets 1-5 and 8
    push_layers: int = 3
    runs: int = 5  # timed runs per figure (after one warm-up)
    # Issue 14's comparison with the real FL4Health 0.4.2: two convolutions and four width x width
    # Linear layers (3536: 50.1M params), rounds of FL4Health's push and paramsel's three (after one
    # warm-up round; FL4Health's push takes several seconds at full size).
    fl4health_width: int = 3536
    fl4health_rounds: int = 5
    any_size_params: int = 300_000_000
    any_size_layers: int = 4
    any_size_runs: int = 2  # timed 300M pushes (after one warm-up)
    concurrency_params: int = 10_000_000
    concurrency_layers: int = 3
    concurrency_levels: tuple[int, ...] = (1, 2, 4, 8)
    concurrency_pushes: int = 16  # pushes per level, shared by its clients (at least 2 each)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FULL = Sizes()
QUICK = Sizes(
    push_params=2_000_000,
    runs=5,
    fl4health_width=700,
    fl4health_rounds=3,
    any_size_params=3_000_000,
    concurrency_params=1_000_000,
    concurrency_pushes=8,
)


def has_option(name: str) -> bool:
    """Whether this build's SparseCooParameterExchanger takes the keyword ``name``."""
    return name in inspect.signature(SparseCooParameterExchanger.__init__).parameters
